"""Server arguments: SGLang's flag names, one frozen dataclass, the CLI built from it.

``ServerArgs`` holds what the user asked for; every field is a flag (``dp_size`` ->
``--dp-size``) whose default is the field's default. ``resolve_args`` turns the
``auto``/``None`` values into concrete ones once, at start-up, before any process is
spawned, so the launcher, the ranks and ``/server_info`` all see the same values:

- ``load_balance_method auto``: by role (``scheduler.policy.resolve_method``);
- ``model_path``: a local folder (``engine.model_source``: the default model, a .gguf
  file or a Hugging Face repo id are fetched and converted once, into the cache);
- ``served_model_name``: ``model_path`` as given (SGLang's default);
- ``tokenizer_path``: the local folder holding the tokenizer (the built-in ``tiny``
  model's committed folder), so a gateway reading ``/model_info`` finds it on disk;
- ``context_length``: the model's own (``config.json``), read without torch; with
  ``--executor sim`` the profile's (``scheduler.sim_executor.load_profile``).
- ``api_key``: ``$DPSERVE_API_KEY`` when the flag is not given;
- ``limit_concurrency``: from the open-file limit (``server.connections``).

Devices and KV sizes are per rank: ``server.placement.plan_launch`` turns ``device``,
``base_gpu_id``, ``gpu_id_step``, ``mem_fraction_static`` and ``max_total_tokens`` into
one device and one KV pool size per rank, and refuses a launch that cannot fit, before
anything starts. ``max_running_requests`` left at ``None`` is derived by each rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import types
import typing
import warnings
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

DISAGGREGATION_MODES = ("null", "prefill", "decode", "pd")
ROLE_BY_DISAGGREGATION_MODE = {"null": "mixed", "prefill": "prefill", "decode": "decode",
                               "pd": "pd"}
# The rank roles each mode runs (pd: both, behind one front door).
ROLES_OF_MODE = {"null": ("mixed",), "prefill": ("prefill",), "decode": ("decode",),
                 "pd": ("prefill", "decode")}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
EXECUTORS = ("real", "sim")
MAX_SIM_TIME_SCALE = 1000.0
MAX_RANDOM_SEED = 1 << 30  # the default is drawn below this, as SGLang draws its own
MAX_SEED_FLAG = (1 << 63) - 4096  # seed + rank (at most 2 x 1024 ranks) stays an int64
API_KEY_ENV = "DPSERVE_API_KEY"


class InvalidServerArgs(ValueError):
    """A flag value the server cannot run with; the message names the flag."""


def _flag(help_text: str, **extra) -> dict:
    return {"metadata": {"help": help_text, **extra}}


@dataclass(frozen=True)
class ServerArgs:
    host: str = field(default="127.0.0.1", **_flag("address to listen on"))
    port: int = field(default=30000, **_flag("HTTP port"))
    timeout_keep_alive: float = field(default=5.0, **_flag(
        "seconds an idle HTTP keep-alive connection stays open (uvicorn's; SGLang's "
        "SGLANG_TIMEOUT_KEEP_ALIVE, also 5). A client or gateway that keeps idle "
        "connections longer can reuse one just as the server closes it, and that request "
        "fails: raise this above its idle timeout (python -m bench.keepalive shows the race)"))
    timeout_request_read: float = field(default=60.0, **_flag(
        "seconds a client has to send a whole request (request line, headers and body), "
        "from the connection's opening or, on a kept-alive connection, from the request's "
        "first byte; a slower client, or one that opens a connection and sends nothing, is "
        "disconnected (nginx's client_header_timeout is also 60). Raise it for clients "
        "that send large bodies over slow links"))
    max_request_body_bytes: int = field(default=64 * 2**20, **_flag(
        "a request body larger than this gets 413 and is never read into memory (64 MiB: "
        "a million-token prompt as input_ids is about 7 MB of JSON)"))
    limit_concurrency: int | None = field(default=None, **_flag(
        "open HTTP connections served at once (uvicorn's flag); a request on a connection "
        "past it gets 503 with Retry-After, and the connection is closed. Unset: the "
        "open-file limit, which the server raises to its hard limit at start, less room "
        "for the ranks' pipes and segments"))
    api_key: str | None = field(default=None, **_flag(
        "require 'Authorization: Bearer <key>' on every route but /health (401 otherwise). "
        f"Unset: ${API_KEY_ENV} if set, which keeps the key out of the process list (as "
        "vLLM's VLLM_API_KEY)"))
    model_path: str = field(default="SmolLM2-135M-Instruct", **_flag(
        "checkpoint folder, .gguf file, Hugging Face repo id (owner/name), 'tiny' for the "
        "built-in random test model (nothing to download), or SmolLM2-135M-Instruct: "
        "fetched once (about 93 MB) into the user's cache"))
    served_model_name: str | None = field(default=None, **_flag(
        "model id in OpenAI responses (default: --model-path)"))
    tokenizer_path: str | None = field(default=None, **_flag(
        "tokenizer folder (default: the model's)"))
    chat_template: str | None = field(default=None, **_flag(
        "chat template for /v1/chat/completions: a file (.jinja, or a tokenizer_config.json) "
        "or the template text (default: the model's chat_template.jinja, else its "
        "tokenizer_config.json's)"))
    dp_size: int = field(default=1, **_flag("number of data-parallel ranks (one process each)"))
    load_balance_method: str = field(default="auto", **_flag(
        "round_robin, follow_bootstrap_room, total_requests, total_tokens, prefill_tokens "
        "(fewest prompt tokens waiting for prefill, then total_tokens) or auto (by role: "
        "prefill_tokens for mixed ranks, total_tokens for prefill ranks, total_requests for "
        "decode ranks)"))
    max_running_requests: int | None = field(default=None, **_flag(
        "per rank (default: derived by the rank)"))
    max_total_tokens: int | None = field(default=None, **_flag(
        "KV pool size in tokens per rank; overrides the size --mem-fraction-static gives, "
        "and a launch whose ranks cannot hold it is refused before any rank starts"))
    mem_fraction_static: float | None = field(default=None, **_flag(
        "fraction of memory for weights plus KV pool (SGLang's flag): on CUDA, of the GPU's "
        "free memory at launch, split between the ranks sharing that GPU; on CPU, of the "
        "host's available RAM, split between all ranks (the KV pool is then capped at 16 "
        "full contexts). Each rank's KV pool gets what its weights leave. Default: 0.88 on "
        "CUDA (SGLang's for one GPU), 0.5 on CPU"))
    chunked_prefill_size: int = field(default=512, **_flag("prefill tokens per batch"))
    context_length: int | None = field(default=None, **_flag(
        "max prompt + output tokens (default: the model's)"))
    device: str = field(default="auto", **_flag(
        "auto (cuda when a GPU is visible, else cpu), cpu, cuda, or cuda:N (cuda with "
        "--base-gpu-id N)"))
    base_gpu_id: int = field(default=0, **_flag(
        "CUDA: rank i runs on cuda:(base_gpu_id + i * gpu_id_step) (SGLang's flags); in pd "
        "mode the prefill ranks come first, then the decode ranks, so no GPU holds both "
        "(PD's KV hand-off is CPU-only for now: a prefill rank on CUDA is refused)"))
    gpu_id_step: int = field(default=1, **_flag("CUDA: GPU index step between ranks"))
    allow_gpu_sharing: bool = field(default=False, **_flag(
        "CUDA: allow more ranks than GPUs (GPU indices wrap around the visible GPUs, and "
        "the ranks on one GPU split its memory); without it such a launch is refused"))
    log_level: str = field(default="info", **_flag("logging level", choices=LOG_LEVELS))
    disaggregation_mode: str = field(default="null", **_flag(
        "null (mixed ranks); pd (prefill and decode ranks behind this one server); prefill "
        "or decode (one half each, two servers on one node for an external PD gateway)",
        choices=DISAGGREGATION_MODES))
    prefill_dp_size: int | None = field(default=None, **_flag(
        "pd mode: prefill ranks (default: --dp-size)"))
    decode_dp_size: int | None = field(default=None, **_flag(
        "pd mode: decode ranks (default: --dp-size); routed_dp_rank addresses these"))
    prefill_load_balance_method: str | None = field(default=None, **_flag(
        "PD: method for prefill ranks (default: --load-balance-method; auto = total_tokens)"))
    decode_load_balance_method: str | None = field(default=None, **_flag(
        "PD: method for decode ranks (default: --load-balance-method; auto = total_requests)"))
    disaggregation_bootstrap_port: int = field(default=8998, **_flag(
        "prefill/decode servers: the pair on one node shares its tables under this number "
        "(SGLang's flag; no socket is opened: the bootstrap is shared memory)"))
    disaggregation_decode_dp: int | None = field(default=None, **_flag(
        "prefill server: at most this many decode ranks claim its KV (default: 32)"))
    disaggregation_bootstrap_timeout: float = field(default=300.0, **_flag(
        "PD: seconds a room may wait for its prefill (decode side) or its decode (prefill "
        "side, then its KV is freed)"))
    disaggregation_waiting_timeout: float = field(default=300.0, **_flag(
        "PD decode: seconds a placed request may wait for its KV"))
    executor: str = field(default="real", **_flag(
        "real (the torch model) or sim (simulated accelerator, for benchmarks)",
        choices=EXECUTORS))
    sim_profile: str = field(default="tiny-cpu", **_flag(
        "with --executor sim: a profile name in scheduler/sim_profiles or a .json path"))
    sim_lockstep: bool = field(default=False, **_flag(
        "with --executor sim: every rank's step lasts as long as the slowest rank's, as DP "
        "attention with expert parallelism does (scheduler/lockstep.py)"))
    sim_time_scale: float = field(default=1.0, **_flag(
        "with --executor sim: every simulated step lasts this many times its modelled time "
        "in wall-clock time, so a host with fewer cores than ranks keeps the steps on time; "
        "bench.serving reads it from /server_info and reports in simulated time. "
        "--stale-after-s and the --disaggregation-*-timeout flags are stretched by the same "
        "factor; /metrics stays in wall-clock time"))
    random_seed: int | None = field(default=None, **_flag(
        "seed of the ranks' sampling generators: rank i draws from seed + i (in pd mode, "
        "decode rank i from seed + prefill ranks + i), so ranks differ; default: a random "
        "seed, chosen once at start-up and shown in /server_info. Requests with their own "
        "seed (sampling_seed, OpenAI seed) are reproducible whatever this is"))
    heartbeat_interval_s: float = field(default=0.05, **_flag(
        "how often an idle rank refreshes its heartbeat"))
    stale_after_s: float = field(default=10.0, **_flag(
        "a rank silent this long is not picked; must exceed the longest forward pass (with "
        "--sim-time-scale: in simulated seconds)"))
    startup_timeout_s: float = field(default=600.0, **_flag(
        "give up if a rank is not ready after this long"))
    shutdown_timeout_s: float = field(default=5.0, **_flag(
        "at exit, how long ranks get to stop before they are terminated"))
    max_queued_requests: int | None = field(default=None, **_flag(
        "per rank: past running + this many queued, new requests get 503 (default: no bound)"))

    @property
    def role(self) -> str:
        return ROLE_BY_DISAGGREGATION_MODE[self.disaggregation_mode]

    def wall_s(self, seconds: float) -> float:
        """A wait on forward passes in wall-clock seconds: ``seconds`` times
        ``--sim-time-scale`` on the simulated executor (its passes last that many times
        their modelled time), else ``seconds``."""
        return seconds * (self.sim_time_scale if self.executor == "sim" else 1.0)

    @property
    def stale_ns(self) -> int:
        """``--stale-after-s`` in wall-clock ns (a heartbeat gap can last a forward pass)."""
        return int(self.wall_s(self.stale_after_s) * 1e9)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def check_sim_time_scale(scale: float) -> None:
    """``InvalidServerArgs`` unless 0 < ``scale`` <= ``MAX_SIM_TIME_SCALE`` (NaN fails)."""
    if not 0 < scale <= MAX_SIM_TIME_SCALE:
        raise InvalidServerArgs(f"--sim-time-scale must be in (0, {MAX_SIM_TIME_SCALE:g}], "
                                f"got {scale}")


def validate_args(args: ServerArgs) -> None:
    """Raise ``InvalidServerArgs`` for values no launch can use."""
    if not 0 <= args.port <= 65535:
        raise InvalidServerArgs(f"--port must be in [0, 65535], got {args.port}")
    if not 0 < args.timeout_keep_alive < float("inf"):
        raise InvalidServerArgs(f"--timeout-keep-alive must be a number > 0, got "
                                f"{args.timeout_keep_alive}")
    if args.random_seed is not None and not 0 <= args.random_seed <= MAX_SEED_FLAG:
        raise InvalidServerArgs(f"--random-seed must be in [0, {MAX_SEED_FLAG}], got "
                                f"{args.random_seed}")
    if not 0 < args.timeout_request_read < float("inf"):
        raise InvalidServerArgs(f"--timeout-request-read must be a number > 0, got "
                                f"{args.timeout_request_read}")
    if args.max_request_body_bytes < 1:
        raise InvalidServerArgs(f"--max-request-body-bytes must be >= 1, got "
                                f"{args.max_request_body_bytes}")
    if args.limit_concurrency is not None and args.limit_concurrency < 1:
        raise InvalidServerArgs(f"--limit-concurrency must be >= 1, got {args.limit_concurrency}")
    if args.api_key is not None and not _is_header_token(args.api_key):
        raise InvalidServerArgs("--api-key must be printable ASCII without spaces (it travels "
                                "in an HTTP header)")
    if not 1 <= args.dp_size <= 1024:
        raise InvalidServerArgs(f"--dp-size must be in [1, 1024], got {args.dp_size}")
    for name in ("prefill_dp_size", "decode_dp_size", "disaggregation_decode_dp"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 1024:
            raise InvalidServerArgs(f"--{name.replace('_', '-')} must be in [1, 1024], got {value}")
    if args.disaggregation_bootstrap_timeout <= 0 or args.disaggregation_waiting_timeout <= 0:
        raise InvalidServerArgs("--disaggregation-bootstrap-timeout and "
                                "--disaggregation-waiting-timeout must be > 0")
    if not 1 <= args.disaggregation_bootstrap_port <= 65535:
        raise InvalidServerArgs("--disaggregation-bootstrap-port must be in [1, 65535]")
    for name in ("max_running_requests", "max_total_tokens", "context_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidServerArgs(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.base_gpu_id < 0 or args.gpu_id_step < 1:
        raise InvalidServerArgs(f"--base-gpu-id must be >= 0 and --gpu-id-step >= 1, got "
                                f"{args.base_gpu_id} and {args.gpu_id_step}")
    if args.mem_fraction_static is not None and not 0 < args.mem_fraction_static <= 1:
        raise InvalidServerArgs(f"--mem-fraction-static must be in (0, 1], got "
                                f"{args.mem_fraction_static}")
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise InvalidServerArgs(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    if args.chunked_prefill_size < 1:
        raise InvalidServerArgs("--chunked-prefill-size must be >= 1")
    if args.sim_lockstep and args.executor != "sim":
        raise InvalidServerArgs("--sim-lockstep needs --executor sim")
    check_sim_time_scale(args.sim_time_scale)
    if args.sim_time_scale != 1.0 and args.executor != "sim":
        raise InvalidServerArgs("--sim-time-scale needs --executor sim")
    if args.heartbeat_interval_s <= 0 or args.stale_after_s <= 4 * args.heartbeat_interval_s:
        raise InvalidServerArgs("--stale-after-s must exceed several --heartbeat-interval-s (> 0)")


def _is_header_token(key: str) -> bool:
    return bool(key) and key.isascii() and key.isprintable() and " " not in key


def resolve_args(args: ServerArgs) -> ServerArgs:
    """The same arguments with every ``auto``/``None`` the API can settle made concrete."""
    from engine.chat_template import InvalidChatTemplate, load_chat_template_arg
    from engine.config import ModelLoadError, load_model_config
    from engine.model_source import resolve_model_path
    from scheduler.policy import InvalidLoadBalanceMethod, resolve_method
    from server.connections import default_connection_limit

    args = dataclasses.replace(args, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)
    validate_args(args)
    methods = {}
    for role in ROLES_OF_MODE[args.disaggregation_mode]:
        flag = f"{role}_load_balance_method"
        name = getattr(args, flag, None) or args.load_balance_method
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DeprecationWarning)
                methods[role] = resolve_method(name, role).value
        except InvalidLoadBalanceMethod as exc:
            raise InvalidServerArgs(f"--{flag.replace('_', '-')}: {exc}") from None
        for w in caught:  # a deprecated alias: say so where a server user looks, the log
            logger.warning("--load-balance-method: %s", w.message)
    # The method this server's own dispatch uses (pd: the decode one, which routed_dp_rank
    # and /server_info's dp_size refer to); per-role ones only where roles exist.
    method = methods.get("mixed") or methods.get("decode") or methods["prefill"]
    pd_sizes = {}
    if args.disaggregation_mode == "pd":
        pd_sizes = {"prefill_dp_size": args.prefill_dp_size or args.dp_size,
                    "decode_dp_size": args.decode_dp_size or args.dp_size}
        pd_sizes["dp_size"] = pd_sizes["decode_dp_size"]
    num_ranks = pd_sizes["prefill_dp_size"] + pd_sizes["decode_dp_size"] if pd_sizes else args.dp_size
    try:  # a failed download is ModelFetchError, let through: not the flag's fault
        model_path = resolve_model_path(args.model_path)
        model_ctx = load_model_config(model_path).context_len
    except ModelLoadError as exc:
        raise InvalidServerArgs(f"--model-path: {exc}") from None
    if args.chat_template is not None:
        try:
            load_chat_template_arg(args.chat_template)
        except InvalidChatTemplate as exc:
            raise InvalidServerArgs(f"--chat-template: {exc}") from None
    if args.executor == "sim":  # the simulated model's context, not the tokenizer model's
        model_ctx = _sim_context_len(args.sim_profile)
    if args.context_length is not None and args.context_length > model_ctx:
        raise InvalidServerArgs(
            f"--context-length {args.context_length} exceeds the model's {model_ctx}")
    return dataclasses.replace(
        args,
        load_balance_method=method,
        prefill_load_balance_method=methods.get("prefill"),
        decode_load_balance_method=methods.get("decode"),
        **pd_sizes,
        model_path=model_path,
        served_model_name=args.served_model_name or args.model_path,
        tokenizer_path=args.tokenizer_path or local_model_path(model_path),
        context_length=args.context_length or model_ctx,
        random_seed=(args.random_seed if args.random_seed is not None
                     else secrets.randbelow(MAX_RANDOM_SEED)),
        limit_concurrency=args.limit_concurrency or default_connection_limit(num_ranks),
    )


def _sim_context_len(profile: str) -> int:
    from scheduler.sim_executor import load_profile
    try:
        return load_profile(profile).context_len
    except (ValueError, TypeError, OSError) as exc:
        raise InvalidServerArgs(f"--sim-profile: {exc}") from None


def local_model_path(model_path: str) -> str:
    """The folder on disk that holds the model's config and tokenizer files."""
    if model_path == "tiny":
        from engine.tiny import tiny_model_path
        return tiny_model_path()
    return model_path


# ---- CLI ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.serve",
        description="Serve a model over N data-parallel ranks balanced through a shared-memory "
                    "load board (SGLang- and OpenAI-compatible HTTP API).")
    hints = typing.get_type_hints(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        kind, optional = _scalar_type(hints[f.name])
        kwargs = {"dest": f.name, "default": f.default, "help": f.metadata.get("help", "")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = f.name.upper()
        kwargs["help"] += " (default: %(default)s)"
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    namespace = build_parser().parse_args(argv)
    return ServerArgs(**vars(namespace))


def _scalar_type(hint) -> tuple[type, bool]:
    """``int | None`` -> (int, True); ``str`` -> (str, False)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False
