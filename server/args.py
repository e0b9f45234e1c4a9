"""Server arguments: SGLang's flag names, one frozen dataclass, the CLI built from it.

``ServerArgs`` holds what the user asked for; every field is a flag (``dp_size`` ->
``--dp-size``) whose default is the field's default. ``resolve_args`` turns the
``auto``/``None`` values into concrete ones once, at start-up, before any process is
spawned, so the launcher, the ranks and ``/server_info`` all see the same values:

- ``load_balance_method auto``: by role (``scheduler.policy.resolve_method``); the three
  method fields and ``disaggregation_mode`` then hold their enums (string enums: they
  compare and print as the flag's words), and ``args.method_for(role)`` answers which
  method a rank group's dispatch uses;
- ``model_path``: a local folder (``engine.model_source``: the default model, a .gguf
  file or a Hugging Face repo id are fetched and converted once, into the cache);
- ``served_model_name``: ``model_path`` as given (SGLang's default);
- ``tokenizer_path``: the local folder holding the tokenizer (the built-in ``tiny``
  model's committed folder), so a gateway reading ``/model_info`` finds it on disk;
- ``context_length``: the model's own (``config.json``), read without torch; with
  ``--executor sim`` the profile's (``sim.executor.load_profile``).
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

from scheduler.policy import LoadBalanceMethod
from scheduler.roles import DisaggregationMode, Role

logger = logging.getLogger(__name__)

DISAGGREGATION_MODES = tuple(mode.value for mode in DisaggregationMode)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
HTTP_STACKS = ("auto", "fast", "asyncio")
EXECUTORS = ("real", "sim")
MAX_SIM_TIME_SCALE = 1000.0
MAX_RANDOM_SEED = 1 << 30  # the default is drawn below this, as SGLang draws its own
MAX_SEED_FLAG = (1 << 63) - 4096  # seed + rank (at most 2 x 1024 ranks) stays an int64
API_KEY_ENV = "DPSERVE_API_KEY"


class InvalidServerArgs(ValueError):
    """A flag value the server cannot run with; the message names the flag."""


# ``--help`` sections, in order; a field names its own with ``group=`` (default: server).
HELP_GROUPS = {
    "server": "HTTP server and operations",
    "model": "model",
    "balancing": "data parallelism, load balancing and per-rank limits",
    "disaggregation": "prefill/decode disaggregation",
    "simulation": "simulated accelerator (benchmarks)",
}
DTYPES = ("auto", "float32", "bfloat16", "float16", "float", "half")
DTYPE_ALIASES = {"float": "float32", "half": "float16"}  # SGLang's short names
# SGLang's KV transfer backends, all served by node-local shared memory here.
TRANSFER_BACKENDS = ("shm", "mooncake", "nixl")
# Flags only the simulated executor reads, and flags only PD servers read: given to a
# server that would ignore them, they are refused.
SIM_FLAGS = ("sim_profile", "sim_lockstep", "sim_time_scale")
PD_FLAGS = ("disaggregation_bootstrap_port", "disaggregation_transfer_backend",
            "disaggregation_bootstrap_timeout", "disaggregation_waiting_timeout")
# Environment variables SGLang's PD servers read for flags left unset (seconds); a plain
# server reads none, as SGLang's does not.
ENV_OF_FLAG = {
    "disaggregation_bootstrap_timeout": "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT",
    "disaggregation_waiting_timeout": "SGLANG_DISAGGREGATION_WAITING_TIMEOUT",
}


def _flag(help_text: str, group: str = "server", aliases: tuple[str, ...] = (),
          **extra) -> dict:
    """A field's CLI metadata: its help, its ``--help`` section, SGLang's other names."""
    return {"metadata": {"help": help_text, "group": group, "aliases": aliases, **extra}}


@dataclass(frozen=True)
class ServerArgs:
    # ---- server ----
    host: str = field(default="127.0.0.1", **_flag("address to listen on"))
    port: int = field(default=30000, **_flag("HTTP port"))
    timeout_keep_alive: float = field(default=5.0, **_flag(
        "seconds an idle HTTP keep-alive connection stays open (uvicorn's; SGLang's "
        "SGLANG_TIMEOUT_KEEP_ALIVE, also 5). A client or gateway that keeps idle "
        "connections longer can reuse one just as the server closes it, and that request "
        "fails: raise this above its idle timeout (python -m bench.micro.keepalive shows the race)"))
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
        "past it gets 503 with Retry-After, and the connection is closed. Default: the "
        "open-file limit, which the server raises to its hard limit at start, less room "
        "for the ranks' pipes and segments"))
    api_key: str | None = field(default=None, **_flag(
        "require 'Authorization: Bearer <key>' on every route but /health (401 otherwise). "
        f"Default: ${API_KEY_ENV} if set, which keeps the key out of the process list (as "
        "vLLM's VLLM_API_KEY)"))
    http_stack: str = field(default="auto", **_flag(
        "event loop and HTTP parser: fast (uvloop and httptools), asyncio (asyncio's loop "
        "and h11) or auto (fast when both are installed)", choices=HTTP_STACKS))
    log_level: str = field(default="info", **_flag("logging level", choices=LOG_LEVELS))
    log_requests: bool = field(default=False, **_flag(
        "log one line per finished request at info: id, rank, prompt and output tokens, "
        "finish reason, latency"))
    decode_log_interval: int = field(default=40, **_flag(
        "each rank logs SGLang's 'Decode batch.' line (running requests, KV tokens held, "
        "reservations included, token usage, generation throughput, queue) every this "
        "many decoding batches"))
    enable_metrics: bool = field(default=False, **_flag(
        "SGLang's flag, accepted: GET /metrics (Prometheus, SGLang's metric names) is "
        "always served"))
    startup_timeout_s: float = field(default=600.0, **_flag(
        "give up if a rank is not ready after this long"))
    shutdown_timeout_s: float = field(default=5.0, **_flag(
        "at exit, how long ranks get to stop before they are terminated"))
    # ---- model ----
    model_path: str = field(default="SmolLM2-135M-Instruct", **_flag(
        "checkpoint folder, .gguf file, Hugging Face repo id (owner/name), 'tiny' for the "
        "built-in random test model (nothing to download), or SmolLM2-135M-Instruct: "
        "fetched once (about 93 MB) into the user's cache", group="model"))
    served_model_name: str | None = field(default=None, **_flag(
        "model id in OpenAI responses (default: --model-path)", group="model"))
    tokenizer_path: str | None = field(default=None, **_flag(
        "tokenizer folder (default: the model's)", group="model"))
    chat_template: str | None = field(default=None, **_flag(
        "chat template for /v1/chat/completions: a file (.jinja, or a tokenizer_config.json) "
        "or the template text (default: the model's chat_template.jinja, else its "
        "tokenizer_config.json's)", group="model"))
    context_length: int | None = field(default=None, **_flag(
        "max prompt + output tokens (default: the model's)", group="model"))
    dtype: str = field(default="auto", **_flag(
        "weights and KV cache dtype: auto (float32 on CPU, the checkpoint's on CUDA), "
        "float32, bfloat16 or float16 (float and half are SGLang's short names)",
        group="model", choices=DTYPES))
    trust_remote_code: bool = field(default=False, **_flag(
        "SGLang's flag, accepted: no code is ever loaded from a checkpoint; the built-in "
        "architectures (engine/model.py) run every model", group="model"))
    device: str = field(default="auto", **_flag(
        "auto (cuda when a GPU is visible, else cpu), cpu, cuda, or cuda:N (cuda with "
        "--base-gpu-id N)", group="model"))
    base_gpu_id: int = field(default=0, **_flag(
        "CUDA: rank i runs on cuda:(base_gpu_id + i * gpu_id_step) (SGLang's flags); in pd "
        "mode the prefill ranks come first, then the decode ranks, so no GPU holds both "
        "(PD's KV hand-off is CPU-only for now: a prefill rank on CUDA is refused)",
        group="model"))
    gpu_id_step: int = field(default=1, **_flag("CUDA: GPU index step between ranks",
                                                group="model"))
    allow_gpu_sharing: bool = field(default=False, **_flag(
        "CUDA: allow more ranks than GPUs (GPU indices wrap around the visible GPUs, and "
        "the ranks on one GPU split its memory); without it such a launch is refused",
        group="model"))
    mem_fraction_static: float | None = field(default=None, **_flag(
        "fraction of memory for weights plus KV pool (SGLang's flag): on CUDA, of the GPU's "
        "free memory at launch, split between the ranks sharing that GPU; on CPU, of the "
        "host's available RAM, split between all ranks (the KV pool is then capped at 16 "
        "full contexts). Each rank's KV pool gets what its weights leave. Default: 0.88 on "
        "CUDA (SGLang's for one GPU), 0.5 on CPU", group="model"))
    random_seed: int | None = field(default=None, **_flag(
        "seed of the ranks' sampling generators: rank i draws from seed + i (in pd mode, "
        "decode rank i from seed + prefill ranks + i), so ranks differ. Default: a random "
        "seed, chosen once at start-up and shown in /server_info. Requests with their own "
        "seed (sampling_seed, OpenAI seed) are reproducible whatever this is",
        group="model"))
    # ---- balancing ----
    dp_size: int = field(default=1, **_flag(
        "number of data-parallel ranks (one process each)", group="balancing",
        aliases=("--data-parallel-size",)))
    api_server_count: int = field(default=1, **_flag(
        "API processes serving the one port (vLLM's flag): each parses, tokenizes and "
        "dispatches its own requests as its own dispatcher on the load board, so they "
        "balance as one; the launcher starts and stops them all", group="balancing"))
    tp_size: int = field(default=1, **_flag(
        "tensor-parallel size; only 1: each rank runs the whole model on one device "
        "(scale out with --dp-size)", group="balancing", aliases=("--tensor-parallel-size",)))
    enable_dp_attention: bool = field(default=False, **_flag(
        "SGLang's DP attention: every rank already runs its own attention and KV cache; "
        "with --executor sim the ranks also step together as DP attention with expert "
        "parallelism does (--sim-lockstep)", group="balancing"))
    load_balance_method: str = field(default="auto", **_flag(
        "round_robin, follow_bootstrap_room, total_requests, total_tokens, prefill_tokens "
        "(fewest prompt tokens waiting for prefill, then total_tokens), cache_aware (the "
        "earliest first token given what each rank's prefix cache holds of the prompt, in "
        "whole 64-token blocks: a shorter prompt goes by load) or "
        "auto (by role: cache_aware for mixed and prefill ranks; with "
        "--disable-radix-cache prefill_tokens for mixed and total_tokens for prefill "
        "ranks; total_requests for decode ranks)", group="balancing"))
    max_running_requests: int | None = field(default=None, **_flag(
        "per rank (default: derived by the rank)", group="balancing"))
    max_total_tokens: int | None = field(default=None, **_flag(
        "KV pool size in tokens per rank; overrides the size --mem-fraction-static gives, "
        "and a launch whose ranks cannot hold it is refused before any rank starts",
        group="balancing"))
    chunked_prefill_size: int = field(default=512, **_flag(
        "prefill tokens per batch", group="balancing"))
    clip_max_new_tokens_estimation: int = field(default=4096, **_flag(
        "KV a rank reserves when it admits a request: its prompt and at most this many new "
        "tokens (its max_new_tokens when fewer; SGLang's estimate clips at the same 4096). "
        "A request that decodes past it grows its KV as it goes; when the pool is full "
        "the newest running request is retracted and computed again later. A request "
        "sent without a max_tokens (all the context left) so no longer holds a whole "
        "context of KV", group="balancing"))
    disable_radix_cache: bool = field(default=False, **_flag(
        "turn off each rank's prefix cache (SGLang's RadixAttention flag): every prompt is "
        "prefilled whole and cached_tokens is 0. On by default: a prompt that begins like "
        "an earlier one reuses that beginning's KV (POST /flush_cache empties the caches)",
        group="balancing"))
    enable_cross_rank_prefix_cache: bool = field(default=False, **_flag(
        "a rank copies the KV of a prompt's cached prefix from the rank that caches it "
        "(shared memory, no hop, without stopping that rank) instead of computing it, "
        "and cache_aware counts a prefix any rank caches as cached on every rank. Mixed "
        "and PD prefill ranks, on CPU or the simulated accelerator (CUDA IPC is not "
        "implemented)",
        group="balancing"))
    max_queued_requests: int | None = field(default=None, **_flag(
        "per rank: past running + this many queued, new requests get 503 (default: no bound)",
        group="balancing"))
    heartbeat_interval_s: float = field(default=0.05, **_flag(
        "how often an idle rank refreshes its heartbeat", group="balancing"))
    stale_after_s: float = field(default=10.0, **_flag(
        "a rank silent this long is not picked; must exceed the longest forward pass (with "
        "--sim-time-scale: in simulated seconds)", group="balancing"))
    # ---- disaggregation ----
    disaggregation_mode: str = field(default=DisaggregationMode.NULL.value, **_flag(
        "null (mixed ranks); pd (prefill and decode ranks behind this one server); prefill "
        "or decode (one half each, two servers on one node for an external PD gateway)",
        group="disaggregation", choices=DISAGGREGATION_MODES))
    prefill_dp_size: int | None = field(default=None, **_flag(
        "pd mode: prefill ranks (default: --dp-size)", group="disaggregation"))
    decode_dp_size: int | None = field(default=None, **_flag(
        "pd mode: decode ranks (default: --dp-size); routed_dp_rank addresses these",
        group="disaggregation"))
    prefill_load_balance_method: str | None = field(default=None, **_flag(
        "pd and prefill modes: method for prefill ranks (default: --load-balance-method; "
        "auto = cache_aware, or total_tokens with --disable-radix-cache)",
        group="disaggregation"))
    decode_load_balance_method: str | None = field(default=None, **_flag(
        "pd and decode modes: method for decode ranks (default: --load-balance-method; "
        "auto = total_requests)", group="disaggregation"))
    disaggregation_bootstrap_port: int = field(default=8998, **_flag(
        "prefill/decode servers: the pair on one node shares its tables under this number "
        "(SGLang's flag; no socket is opened: the bootstrap is shared memory)",
        group="disaggregation"))
    disaggregation_transfer_backend: str = field(default="shm", **_flag(
        "how KV moves from prefill to decode: always node-local shared memory (prefill "
        "and decode ranks on one node); SGLang's mooncake and nixl name the same "
        "transfer here (its fake backend, which skips the transfer, is not offered)", group="disaggregation", choices=TRANSFER_BACKENDS))
    disaggregation_decode_dp: int | None = field(default=None, **_flag(
        "prefill server: at most this many decode ranks claim its KV (default: 32)",
        group="disaggregation"))
    disaggregation_bootstrap_timeout: float = field(default=300.0, **_flag(
        "PD: seconds a room may wait for its prefill (decode side) or its decode (prefill "
        "side, then its KV is freed)", group="disaggregation"))
    disaggregation_waiting_timeout: float = field(default=300.0, **_flag(
        "PD decode: seconds a placed request may wait for its KV", group="disaggregation"))
    # ---- simulation ----
    executor: str = field(default="real", **_flag(
        "real (the torch model) or sim (simulated accelerator, for benchmarks)",
        group="simulation", choices=EXECUTORS))
    sim_profile: str = field(default="tiny-cpu", **_flag(
        "with --executor sim: a profile name in sim/profiles or a .json path",
        group="simulation"))
    sim_lockstep: bool = field(default=False, **_flag(
        "with --executor sim: every rank's step lasts as long as the slowest rank's, as DP "
        "attention with expert parallelism does (sim/lockstep.py)", group="simulation"))
    sim_time_scale: float = field(default=1.0, **_flag(
        "with --executor sim: every simulated step lasts this many times its modelled time "
        "in wall-clock time, so a host with fewer cores than ranks keeps the steps on time; "
        "bench.client.serving reads it from /server_info and reports in simulated time. "
        "--stale-after-s and the --disaggregation-*-timeout flags are stretched by the same "
        "factor; /metrics stays in wall-clock time", group="simulation"))

    @property
    def role(self) -> Role:
        """This server's role (``scheduler.roles``): mixed, prefill, decode or pd."""
        return DisaggregationMode(self.disaggregation_mode).role

    def method_for(self, role: Role) -> LoadBalanceMethod:
        """The balancing method of ``role``'s ranks, as ``resolve_args`` settled it (a
        prefill or decode group's own flag, else ``load_balance_method``)."""
        per_role = {Role.PREFILL: self.prefill_load_balance_method,
                    Role.DECODE: self.decode_load_balance_method}.get(role)
        return LoadBalanceMethod(per_role or self.load_balance_method)

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


def has_fast_http() -> bool:
    """uvloop and httptools are both installed."""
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("uvloop", "httptools"))


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
    if not 1 <= args.api_server_count <= 64:
        raise InvalidServerArgs(f"--api-server-count must be in [1, 64], got "
                                f"{args.api_server_count}")
    if args.tp_size != 1:
        raise InvalidServerArgs(
            f"--tp-size {args.tp_size}: tensor parallelism is not supported; each rank runs "
            f"the whole model on one device (scale out with --dp-size)")
    if args.decode_log_interval < 1:
        raise InvalidServerArgs(f"--decode-log-interval must be >= 1, got {args.decode_log_interval}")
    _check_pd_flags(args)
    for name in ("prefill_dp_size", "decode_dp_size", "disaggregation_decode_dp"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 1024:
            raise InvalidServerArgs(f"{_flag_name(name)} must be in [1, 1024], got {value}")
    if args.disaggregation_bootstrap_timeout <= 0 or args.disaggregation_waiting_timeout <= 0:
        raise InvalidServerArgs("--disaggregation-bootstrap-timeout and "
                                "--disaggregation-waiting-timeout must be > 0")
    if not 1 <= args.disaggregation_bootstrap_port <= 65535:
        raise InvalidServerArgs("--disaggregation-bootstrap-port must be in [1, 65535]")
    for name in ("max_running_requests", "max_total_tokens", "context_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidServerArgs(f"{_flag_name(name)} must be >= 1, got {value}")
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
    if args.clip_max_new_tokens_estimation < 1:
        raise InvalidServerArgs("--clip-max-new-tokens-estimation must be >= 1")
    if args.enable_cross_rank_prefix_cache and (
            args.disable_radix_cache or args.disaggregation_mode == DisaggregationMode.DECODE):
        raise InvalidServerArgs("--enable-cross-rank-prefix-cache shares the prefix caches of "
                                "mixed and prefill ranks: not with --disable-radix-cache or "
                                "--disaggregation-mode decode (decode ranks cache none)")
    if args.http_stack == "fast" and not has_fast_http():
        raise InvalidServerArgs("--http-stack fast needs uvloop and httptools installed "
                                "(pip install uvloop httptools)")
    check_sim_time_scale(args.sim_time_scale)
    for name in SIM_FLAGS:
        if args.executor != "sim" and _is_given(args, name):
            raise InvalidServerArgs(f"{_flag_name(name)} needs --executor sim")
    if args.heartbeat_interval_s <= 0 or args.stale_after_s <= 4 * args.heartbeat_interval_s:
        raise InvalidServerArgs("--stale-after-s must exceed several --heartbeat-interval-s (> 0)")


def _check_pd_flags(args: ServerArgs) -> None:
    """Per-role flags that the mode would not use contradict it: refuse them rather
    than run something other than what the command line says."""
    try:
        mode = DisaggregationMode(args.disaggregation_mode)
    except ValueError:
        raise InvalidServerArgs(f"--disaggregation-mode must be one of "
                                f"{', '.join(DISAGGREGATION_MODES)}, got "
                                f"{args.disaggregation_mode!r}") from None
    for role in (Role.PREFILL, Role.DECODE):
        size = getattr(args, f"{role}_dp_size")
        if mode != DisaggregationMode.PD and size is not None and size != args.dp_size:
            raise InvalidServerArgs(
                f"--{role}-dp-size {size} contradicts --dp-size {args.dp_size}: "
                f"--{role}-dp-size is for --disaggregation-mode pd; a --disaggregation-mode "
                f"{mode} server runs --dp-size ranks")
        method = getattr(args, f"{role}_load_balance_method")
        if method is not None and role not in mode.rank_roles:
            raise InvalidServerArgs(
                f"--{role}-load-balance-method: --disaggregation-mode {mode} runs no {role} "
                f"ranks; use --load-balance-method")
    if args.disaggregation_decode_dp is not None and mode != DisaggregationMode.PREFILL:
        raise InvalidServerArgs(
            "--disaggregation-decode-dp is for --disaggregation-mode prefill (pd mode: "
            "--decode-dp-size)")
    for name in PD_FLAGS:
        if mode == DisaggregationMode.NULL and _is_given(args, name):
            raise InvalidServerArgs(
                f"{_flag_name(name)} {getattr(args, name)}: --disaggregation-mode null runs "
                f"no prefill or decode ranks; the flag is for --disaggregation-mode pd, "
                f"prefill or decode")
    if mode == DisaggregationMode.PD and _is_given(args, "disaggregation_bootstrap_port"):
        raise InvalidServerArgs(
            f"--disaggregation-bootstrap-port {args.disaggregation_bootstrap_port}: "
            f"--disaggregation-mode pd runs both halves in this server, which pair through "
            f"tables of their own; the port names the tables a prefill and a decode server "
            f"share (--disaggregation-mode prefill / decode)")


def _is_given(args: ServerArgs, name: str) -> bool:
    """The flag was given, as far as the arguments tell: its value is not the field's
    default (a flag given at its default changes nothing, so it is never refused)."""
    return getattr(args, name) != _field_default(name)


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_header_token(key: str) -> bool:
    return bool(key) and key.isascii() and key.isprintable() and " " not in key


def _default_connection_limit(num_ranks: int) -> int:
    from server.connections import default_connection_limit, soft_open_file_limit

    limit = default_connection_limit(num_ranks)
    if limit < 1:
        raise InvalidServerArgs(
            f"the open-file limit ({soft_open_file_limit()}) leaves no descriptor for HTTP "
            f"connections with {num_ranks} rank(s): raise it (ulimit -n) or set "
            "--limit-concurrency")
    return limit


def resolve_args(args: ServerArgs) -> ServerArgs:
    """The same arguments with every ``auto``/``None`` the API can settle made concrete."""
    from engine.chat_template import InvalidChatTemplate, load_chat_template_arg
    from engine.config import ModelLoadError, load_model_config
    from engine.model_source import resolve_model_path
    from scheduler.policy import InvalidLoadBalanceMethod, resolve_method

    args = dataclasses.replace(args, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)
    validate_args(args)
    mode = DisaggregationMode(args.disaggregation_mode)
    methods = {}
    for role in mode.rank_roles:
        per_role = getattr(args, f"{role}_load_balance_method", None)  # mixed has none
        flag = f"--{role}-load-balance-method" if per_role else "--load-balance-method"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DeprecationWarning)
                methods[role] = resolve_method(per_role or args.load_balance_method, role,
                                               has_prefix_cache=not args.disable_radix_cache)
        except InvalidLoadBalanceMethod as exc:
            raise InvalidServerArgs(f"{flag}: {exc}") from None
        for w in caught:  # a deprecated alias: say so where a server user looks, the log
            logger.warning("%s: %s", flag, w.message)
    # The method this server's own dispatch uses (pd: the decode one, which routed_dp_rank
    # and /server_info's dp_size refer to); per-role ones only where roles exist.
    method = methods.get(Role.MIXED) or methods.get(Role.DECODE) or methods[Role.PREFILL]
    pd_sizes = {}
    if mode == DisaggregationMode.PD:
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
        disaggregation_mode=mode,
        load_balance_method=method,
        prefill_load_balance_method=methods.get(Role.PREFILL),
        decode_load_balance_method=methods.get(Role.DECODE),
        **pd_sizes,
        model_path=model_path,
        served_model_name=args.served_model_name or args.model_path,
        tokenizer_path=args.tokenizer_path or local_model_path(model_path),
        context_length=args.context_length or model_ctx,
        random_seed=(args.random_seed if args.random_seed is not None
                     else secrets.randbelow(MAX_RANDOM_SEED)),
        limit_concurrency=args.limit_concurrency or _default_connection_limit(num_ranks),
        http_stack=("fast" if has_fast_http() else "asyncio") if args.http_stack == "auto"
        else args.http_stack,
        dtype=DTYPE_ALIASES.get(args.dtype, args.dtype),
        # SGLang's DP attention (with expert parallelism) steps the ranks together; the
        # simulated executor models exactly that.
        sim_lockstep=args.sim_lockstep or (args.enable_dp_attention and args.executor == "sim"),
    )


def _sim_context_len(profile: str) -> int:
    from sim.executor import load_profile
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
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, naming the flag, then exit 2 (argparse's usage block would list
        every flag before the message)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m engine.serve", usage="%(prog)s [options]",
        description="Serve a model over N data-parallel ranks balanced through a shared-memory "
                    "load board (SGLang- and OpenAI-compatible HTTP API).")
    groups = {name: parser.add_argument_group(title) for name, title in HELP_GROUPS.items()}
    hints = typing.get_type_hints(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        kind, _ = _scalar_type(hints[f.name])
        meta = f.metadata
        kwargs = {"dest": f.name, "default": f.default, "help": _help_of(f)}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if kind is bool:
            kwargs["action"] = "store_true"  # SGLang's flags are switches without --no-
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = f.name.upper()
        if f.name in ENV_OF_FLAG:
            kwargs["default"] = None  # unset: parse_args reads the environment
        flags = [_flag_name(f.name), *meta.get("aliases", ())]
        groups[meta.get("group", "server")].add_argument(*flags, **kwargs)
    return parser


def _help_of(f: dataclasses.Field) -> str:
    """The field's help with its default stated once: a help text that says its own
    default ("default: ...") keeps it; a switch's default (off) goes unsaid."""
    text = f.metadata.get("help", "")
    if f.name in ENV_OF_FLAG:
        return f"{text} (default: ${ENV_OF_FLAG[f.name]} if set, else {f.default:g})"
    if "default:" in text.lower() or f.default is None or f.default is False:
        return text
    return f"{text} (default: {f.default})"


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    is_pd = values["disaggregation_mode"] != DisaggregationMode.NULL
    for name, env in ENV_OF_FLAG.items():
        if values[name] is None:
            default = _field_default(name)
            values[name] = _env_seconds(parser, env, default) if is_pd else default
    return ServerArgs(**values)


def _env_seconds(parser: argparse.ArgumentParser, env: str, default: float) -> float:
    raw = os.environ.get(env)
    if raw is None or not raw.strip():
        return default
    try:
        return float(raw)
    except ValueError:
        parser.error(f"${env} must be a number of seconds, got {raw!r}")


def _field_default(name: str):
    return next(f.default for f in dataclasses.fields(ServerArgs) if f.name == name)


def _scalar_type(hint) -> tuple[type, bool]:
    """``int | None`` -> (int, True); ``str`` -> (str, False)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False
