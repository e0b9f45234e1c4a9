"""``python -m bench.client.serving``: an open-loop serving benchmark like SGLang's ``bench_serving``.

    python -m bench.client.serving --backend sglang --port 30000 --dataset-name random \\
        --random-input-len 1024 --random-output-len 128 --random-range-ratio 0.5 \\
        --num-prompts 200 --request-rate 4 --max-concurrency 64 --output-file runs.jsonl
    python -m bench.client.serving --dataset-name generated-shared-prefix --gsp-num-groups 8 \\
        --gsp-prompts-per-group 4 --gsp-num-turns 3 --max-concurrency 8 --flush-cache

Requests are sent at Poisson arrival times (``--request-rate``; ``inf`` sends all at
once) whatever the server's progress (open loop); ``--max-concurrency`` caps the
requests in flight (an arrival then waits for a free slot, and its TTFT counts from
when it is actually sent, as in SGLang). The summary block has SGLang's layout; the
figures (``bench.client.metrics``) also go to ``--output-file`` as one JSON line per run,
with the per-rank request counts when the server reports ``meta_info.dp_rank``, the
prefix cache hit rate when it reports ``cached_tokens``, and ``simulated: true`` when
the server runs the simulated accelerator. Datasets: ``bench.client.dataset``; a
multi-turn conversation (``--gsp-num-turns``) arrives at its first turn's time and sends
each later turn when the one before has finished (each turn takes a concurrency slot).

A simulated server started with ``--sim-time-scale K`` (``/server_info``) runs every
step K times slower than its model: the client then sends at ``--request-rate / K``
per wall-clock second and reports every figure in simulated time (``to_model_time``),
so the figures compare with an unstretched run's; ``sim_time_scale`` records K.

In-process use (``bench.compare``): ``figures = await run_benchmark(BenchConfig(...))``.

HTTP client: aiohttp, one ``ClientSession`` whose connector holds as many connections
as requests can be in flight. It is what SGLang's client uses, and its C HTTP parser
costs less CPU per streamed chunk than httpx's pure-Python one, which matters when the
client shares two cores with the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field

import aiohttp
from tqdm.asyncio import tqdm

from bench.cli import http_url, interrupted, tcp_port, writable_file
from bench.client.backends import BACKENDS, RequestResult
from bench.client.dataset import (DEFAULT_VOCAB_SIZE, GROUP_DISTRIBUTIONS, BenchRequest,
                                  arrival_offsets, check_counts, check_multi_turn,
                                  check_random, check_shared_prefix, multi_turn_requests,
                                  random_requests, shared_prefix_requests,
                                  skewed_prefix_requests)
from bench.client.metrics import format_rate, format_summary, summarize


# How long an idle pooled connection is reused. uvicorn (ours and SGLang's) closes idle
# keep-alive connections after 5 s and aiohttp keeps them 15 s by default, so a request
# sent on a connection idle about 5 s can meet the server's close and fail with
# ServerDisconnectedError (aio-libs/aiohttp#9138). Stretched simulated runs
# (--sim-time-scale) leave connections idle that long; three of them failed 1-3
# requests of 384 or 1,600, with errors not recorded then (bench.compare keeps them now).
# `python -m bench.micro.keepalive` reproduces the race: of 700 reuses after 5 s +- 10 ms idle,
# 59 failed with aiohttp's 15 s and none with this.
KEEPALIVE_S = 3.0
DATASETS = ("random", "generated-shared-prefix", "multi-turn")


def _opt(help_text: str, **extra) -> dict:
    return {"metadata": {"help": help_text, **extra}}


@dataclass(frozen=True)
class BenchConfig:
    backend: str = field(default="sglang", **_opt("sglang (/generate) or openai (/v1/completions)",
                                                  choices=tuple(BACKENDS)))
    base_url: str | None = field(default=None, **_opt("server URL; overrides --host/--port",
                                                      type=http_url))
    host: str = field(default="127.0.0.1", **_opt("server host"))
    port: int = field(default=30000, **_opt("server port", type=tcp_port))
    model: str | None = field(default=None, **_opt("model name for the openai backend"))
    dataset_name: str = field(default="random", **_opt(
        "random, or generated-shared-prefix (groups of prompts sharing a system prompt, for "
        "prefix caches; the --gsp-* flags), or multi-turn (conversations that resend their "
        "history with a drawn reply, open loop; the --mt-* flags)", choices=DATASETS))
    random_input_len: int = field(default=1024, **_opt("max input length in tokens"))
    random_output_len: int = field(default=1024, **_opt("max output length in tokens"))
    random_range_ratio: float = field(default=0.0, **_opt(
        "lengths are uniform in [len * ratio, len]"))
    random_vocab_size: int = field(default=DEFAULT_VOCAB_SIZE, **_opt(
        "prompt token ids are drawn from [0, this)"))
    gsp_num_groups: int = field(default=64, **_opt(
        "generated-shared-prefix: groups, each with its own system prompt"))
    gsp_prompts_per_group: int = field(default=16, **_opt(
        "generated-shared-prefix: prompts (conversations) per group; the run sends groups x "
        "this, whatever --num-prompts says"))
    gsp_system_prompt_len: int = field(default=2048, **_opt(
        "generated-shared-prefix: system prompt tokens (the prefix a group shares)"))
    gsp_question_len: int = field(default=128, **_opt(
        "generated-shared-prefix: question tokens after the system prompt (and per later turn)"))
    gsp_output_len: int = field(default=256, **_opt("generated-shared-prefix: output tokens"))
    gsp_range_ratio: float = field(default=1.0, **_opt(
        "generated-shared-prefix: lengths are uniform in [len * ratio, len] (SGLang's default "
        "1: exact)"))
    gsp_num_turns: int = field(default=1, **_opt(
        "generated-shared-prefix: turns per conversation; each later turn resends the "
        "conversation so far (prompt and the server's answer) plus a new question"))
    gsp_ordered: bool = field(default=False, **_opt(
        "generated-shared-prefix: send the prompts group by group instead of shuffled"))
    gsp_group_distribution: str = field(default="uniform", **_opt(
        "generated-shared-prefix: uniform (each group gets --gsp-prompts-per-group requests) "
        "or zipf (each request's group drawn with probability proportional to "
        "1/rank**alpha, rank starts at 1: group 0 is the hottest)",
        choices=GROUP_DISTRIBUTIONS))
    gsp_zipf_alpha: float | None = field(default=None, **_opt(
        "generated-shared-prefix with --gsp-group-distribution zipf: alpha, a finite number "
        "> 0 (larger: more skewed)"))
    gsp_hot_share: float = field(default=0.0, **_opt(
        "generated-shared-prefix: share of the requests in group 0 (0: groups equal; with "
        "one turn)"))
    mt_num_conversations: int = field(default=16, **_opt("multi-turn: conversations"))
    mt_num_turns: int = field(default=4, **_opt("multi-turn: turns per conversation"))
    mt_turn_len: int = field(default=256, **_opt("multi-turn: tokens of each user message"))
    mt_output_len: int = field(default=128, **_opt(
        "multi-turn: output tokens per turn (and the drawn reply resent in the next turn)"))
    text_prompts: bool = field(default=False, **_opt(
        "send prompts as text (sglang backend), as a gateway that routes by text needs"))
    num_prompts: int = field(default=1000, **_opt("requests in the run (random dataset)"))
    request_rate: float = field(default=math.inf, **_opt(
        "Poisson arrivals per second (> 0), or inf: all at once"))
    max_concurrency: int | None = field(default=None, **_opt(
        "cap on requests in flight; 0 or not given: no cap (as in SGLang)"))
    seed: int = field(default=1, **_opt("seed of prompts, lengths and arrivals"))
    seeded_bootstrap_rooms: bool = field(default=False, **_opt(
        "send each request a bootstrap_room drawn from --seed (sglang backend; PD servers): "
        "every run of a seed places alike under follow_bootstrap_room, which otherwise "
        "depends on the rooms the server draws"))
    warmup_requests: int = field(default=1, **_opt("short requests sent first, not counted"))
    flush_cache: bool = field(default=False, **_opt(
        "POST /flush_cache after the warm-up, so the run starts with empty prefix caches"))
    request_timeout_s: float = field(default=6 * 3600.0, **_opt(
        "per request, wall-clock seconds"))
    output_file: str | None = field(default=None, **_opt(
        "append the figures as a JSON line (checked before the run)", type=writable_file))
    disable_tqdm: bool = field(default=False, **_opt("no progress bar"))
    # In-process only: also return every request's timings under "requests".
    return_requests: bool = field(default=False, metadata={"cli": False})

    def __post_init__(self) -> None:
        """ValueError naming the first flag a run could not use, before any request."""
        check_sending(self)
        if self.seeded_bootstrap_rooms and self.backend != "sglang":
            raise ValueError("--seeded-bootstrap-rooms needs --backend sglang (OpenAI requests "
                             "carry no bootstrap_room)")
        if self.seeded_bootstrap_rooms and self.dataset_name != "random":
            raise ValueError("--seeded-bootstrap-rooms works with --dataset-name random")
        if self.dataset_name == "generated-shared-prefix":
            check_shared_prefix(self.gsp_num_groups, self.gsp_prompts_per_group,
                                self.gsp_system_prompt_len, self.gsp_question_len,
                                self.gsp_output_len, self.gsp_range_ratio, self.gsp_num_turns,
                                self.gsp_group_distribution, self.gsp_zipf_alpha)
            check_hot_share(self)
        elif self.dataset_name == "multi-turn":
            check_multi_turn(self.mt_num_conversations, self.mt_num_turns, self.mt_turn_len,
                             self.mt_output_len)
        else:
            check_random(self.num_prompts, self.random_input_len, self.random_output_len,
                         self.random_range_ratio)

    @property
    def url(self) -> str:
        return (self.base_url or f"http://{self.host}:{self.port}").rstrip("/")


def check_sending(cfg: BenchConfig) -> None:
    """ValueError naming the first flag of how requests are sent that is out of range."""
    if not cfg.request_rate > 0:  # NaN too
        raise ValueError(f"--request-rate must be > 0, or inf to send all at once; "
                         f"got {cfg.request_rate}")
    if cfg.max_concurrency is not None and cfg.max_concurrency < 0:
        raise ValueError(f"--max-concurrency must be >= 1, or 0 for no cap; "
                         f"got {cfg.max_concurrency}")
    if cfg.warmup_requests < 0:
        raise ValueError(f"--warmup-requests must be >= 0, got {cfg.warmup_requests}")
    if not 0 < cfg.request_timeout_s < math.inf:  # aiohttp cannot wait forever
        raise ValueError(f"--request-timeout-s must be a finite number of seconds > 0, "
                         f"got {cfg.request_timeout_s}")
    check_counts((("--random-vocab-size", cfg.random_vocab_size),))


def check_hot_share(cfg: BenchConfig) -> None:
    if not 0.0 <= cfg.gsp_hot_share < 1.0:
        raise ValueError(f"--gsp-hot-share must be in [0, 1), got {cfg.gsp_hot_share}")
    if cfg.gsp_hot_share > 0 and cfg.gsp_group_distribution != "uniform":
        raise ValueError("--gsp-hot-share and --gsp-group-distribution zipf each set "
                         "how requests spread over groups: give one")
    if cfg.gsp_hot_share > 0 and cfg.gsp_num_turns != 1:
        raise ValueError("--gsp-hot-share needs --gsp-num-turns 1")


def make_requests(cfg: BenchConfig) -> list[BenchRequest]:
    as_text = cfg.backend == "openai" or cfg.text_prompts
    if cfg.dataset_name == "generated-shared-prefix" and cfg.gsp_hot_share > 0:
        return skewed_prefix_requests(
            cfg.gsp_num_groups, cfg.gsp_prompts_per_group, cfg.gsp_system_prompt_len,
            cfg.gsp_question_len, cfg.gsp_output_len, cfg.seed, as_text=as_text,
            vocab_size=cfg.random_vocab_size, hot_share=cfg.gsp_hot_share)
    if cfg.dataset_name == "multi-turn":
        return multi_turn_requests(cfg.mt_num_conversations, cfg.mt_num_turns, cfg.mt_turn_len,
                                   cfg.mt_output_len, cfg.seed, as_text=as_text,
                                   vocab_size=cfg.random_vocab_size)
    if cfg.dataset_name == "generated-shared-prefix":
        return shared_prefix_requests(
            cfg.gsp_num_groups, cfg.gsp_prompts_per_group, cfg.gsp_system_prompt_len,
            cfg.gsp_question_len, cfg.gsp_output_len, cfg.gsp_range_ratio, cfg.seed,
            num_turns=cfg.gsp_num_turns, ordered=cfg.gsp_ordered, as_text=as_text,
            vocab_size=cfg.random_vocab_size, group_distribution=cfg.gsp_group_distribution,
            zipf_alpha=cfg.gsp_zipf_alpha)
    return random_requests(cfg.num_prompts, cfg.random_input_len, cfg.random_output_len,
                           cfg.random_range_ratio, cfg.seed, as_text=as_text,
                           vocab_size=cfg.random_vocab_size, rooms=cfg.seeded_bootstrap_rooms)


async def run_benchmark(cfg: BenchConfig) -> dict:
    """Run one benchmark against a live server; returns every figure (see
    ``bench.client.metrics.summarize``) plus the run's settings and server facts."""
    requests = make_requests(cfg)
    send = BACKENDS[cfg.backend]
    limit = cfg.max_concurrency or len(requests)  # 0: no cap, as SGLang reads it
    connector = aiohttp.TCPConnector(limit=limit + cfg.warmup_requests, limit_per_host=0,
                                     ttl_dns_cache=None, keepalive_timeout=KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     trust_env=False) as session:
        server = await server_facts(session, cfg.url)
        scale = time_scale(server)
        offsets = [o * scale for o in arrival_offsets(len(requests), cfg.request_rate, cfg.seed)]
        model = cfg.model or server.get("served_model_name")
        await warm_up(session, cfg, send, model)
        if cfg.flush_cache:
            await flush_cache(session, cfg.url)
        gate = asyncio.Semaphore(limit)
        num_sends = sum(1 + len(r.later_questions) for r in requests)
        bar = tqdm(total=num_sends, disable=cfg.disable_tqdm, desc="requests")
        start = time.perf_counter()

        async def conversation(req: BenchRequest, offset: float) -> list[RequestResult]:
            """One request, or each turn of a conversation after the one before."""
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            results = []
            while True:
                async with gate:
                    result = await send(session, cfg.url, req, model)
                bar.update(1)
                results.append(result)
                if not (result.success and req.later_questions):
                    return results  # a failed turn ends its conversation
                req = req.next_turn(result.answer)

        results = [r for turns in await asyncio.gather(
            *(conversation(r, o) for r, o in zip(requests, offsets))) for r in turns]
        # Until the last request finished, failed or not (SGLang's duration: it stops
        # the clock when every request has returned).
        duration = max((r.start_time + r.latency for r in results),
                       default=time.perf_counter()) - start
        bar.close()
    if scale != 1.0:
        results = [to_model_time(r, start, scale) for r in results]
        duration /= scale
    figures = {"backend": cfg.backend, "request_rate": cfg.request_rate,
               "max_concurrency": cfg.max_concurrency, **summarize(results, duration, start)}
    figures.update(settings(cfg), **server_summary(server))
    errors = [r.error for r in results if not r.success]
    if errors:
        figures["first_errors"] = errors[:5]
    if cfg.return_requests:
        figures["requests"] = [request_record(r, start) for r in results]
    return figures


async def server_facts(session: aiohttp.ClientSession, url: str) -> dict:
    """``/server_info`` (or SGLang's older ``/get_server_info``); {} if neither answers."""
    for path in ("/server_info", "/get_server_info"):
        try:
            async with session.get(url + path) as response:
                if response.status == 200:
                    return await response.json()
        except (aiohttp.ClientError, ValueError):
            break
    return {}


async def flush_cache(session: aiohttp.ClientSession, url: str) -> None:
    """Empty the server's prefix caches (``--flush-cache``); RuntimeError if it will not."""
    try:
        async with session.post(url + "/flush_cache") as response:
            if response.status != 200:
                raise RuntimeError(f"POST {url}/flush_cache answered {response.status}: "
                                   f"{(await response.text())[:300]}")
    except aiohttp.ClientError as exc:
        raise RuntimeError(f"POST {url}/flush_cache failed: {exc}") from None


def time_scale(info: dict) -> float:
    """Wall-clock seconds per simulated second of the server (``--sim-time-scale``)."""
    if info.get("executor") != "sim":
        return 1.0
    scale = float(info.get("sim_time_scale", 1.0))
    if not scale > 0:
        raise RuntimeError(f"server reports sim_time_scale {scale}; expected > 0")
    return scale


def to_model_time(r: RequestResult, start: float, scale: float) -> RequestResult:
    """``r`` with its times (taken on a server stretched ``scale`` times) in simulated
    time: the send time relative to ``start`` and every duration divided by ``scale``."""
    return dataclasses.replace(
        r, start_time=start + (r.start_time - start) / scale if r.start_time else 0.0,
        ttft=r.ttft / scale, latency=r.latency / scale, itl=[g / scale for g in r.itl],
        chunks=[(t / scale, n) for t, n in r.chunks])


def server_summary(info: dict) -> dict:
    simulated = info.get("executor") == "sim"
    out = {"simulated": simulated}
    for key in ("dp_size", "load_balance_method", "disaggregation_mode", "served_model_name"):
        if key in info:
            out[f"server_{key}"] = info[key]
    if simulated:
        out["sim_profile"] = info.get("sim_profile")
        out["sim_lockstep"] = bool(info.get("sim_lockstep", False))
        out["sim_time_scale"] = time_scale(info)
    return out


async def warm_up(session, cfg: BenchConfig, send, model: str | None) -> None:
    warm = random_requests(max(cfg.warmup_requests, 1), 16, 4, 1.0, cfg.seed + 1_000_003,
                           as_text=cfg.backend == "openai", vocab_size=cfg.random_vocab_size)
    for req in warm[:cfg.warmup_requests]:
        result = await send(session, cfg.url, req, model)
        if not result.success:
            raise RuntimeError(f"warm-up request to {cfg.url} failed: {result.error}")


def settings(cfg: BenchConfig) -> dict:
    keep = ("dataset_name", "random_input_len", "random_output_len", "random_range_ratio",
            "num_prompts", "seed")
    for dataset, prefix in (("generated-shared-prefix", "gsp_"), ("multi-turn", "mt_")):
        if cfg.dataset_name == dataset:
            keep = ("dataset_name", "seed", "flush_cache",
                    *(f.name for f in dataclasses.fields(cfg) if f.name.startswith(prefix)))
    return {"url": cfg.url, **{k: getattr(cfg, k) for k in keep}, "timestamp": time.time()}


def describe_run(cfg: BenchConfig) -> str:
    """The line printed before a run."""
    if cfg.dataset_name == "generated-shared-prefix":
        turns = f" x {cfg.gsp_num_turns} turns" if cfg.gsp_num_turns > 1 else ""
        dataset = (f"generated-shared-prefix: {cfg.gsp_num_groups} groups x "
                   f"{cfg.gsp_prompts_per_group} prompts{turns}, system prompt "
                   f"{cfg.gsp_system_prompt_len}, question {cfg.gsp_question_len}, output "
                   f"{cfg.gsp_output_len} tokens (range ratio {cfg.gsp_range_ratio})")
        if cfg.gsp_group_distribution == "zipf":
            dataset += f", groups drawn by Zipf alpha {cfg.gsp_zipf_alpha}"
    elif cfg.dataset_name == "multi-turn":
        dataset = (f"multi-turn: {cfg.mt_num_conversations} conversations x "
                   f"{cfg.mt_num_turns} turns ({cfg.mt_num_conversations * cfg.mt_num_turns} "
                   f"requests), {cfg.mt_turn_len} tokens per user message, output "
                   f"{cfg.mt_output_len} tokens per turn")
    else:
        dataset = (f"{cfg.num_prompts} prompts, input <= {cfg.random_input_len}, output <= "
                   f"{cfg.random_output_len} tokens (range ratio {cfg.random_range_ratio})")
    return (f"{cfg.backend} benchmark of {cfg.url}: {dataset}, rate "
            f"{format_rate(cfg.request_rate)}/s, max concurrency "
            f"{cfg.max_concurrency or 'not set'}")


def request_record(r: RequestResult, start: float) -> dict:
    return {"start_s": r.start_time - start, "ttft_s": r.ttft, "latency_s": r.latency,
            "prompt_len": r.prompt_len, "output_len": r.output_len, "dp_rank": r.dp_rank,
            "success": r.success, "chunks": r.chunks}


def write_jsonl(path: str, figures: dict) -> None:
    row = {k: v for k, v in figures.items() if k != "requests"}
    if math.isinf(row.get("request_rate", 0.0)):
        row["request_rate"] = "inf"  # JSON has no Infinity
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


# ---- CLI -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.client.serving",
                                     description=__doc__.splitlines()[0])
    for f in dataclasses.fields(BenchConfig):
        if f.metadata.get("cli", True) is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + " (default: %(default)s)"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        kind = f.metadata.get("type") or {"int": int, "float": float}.get(
            str(f.type).split(" ")[0], str)
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text,
                            choices=f.metadata.get("choices"))
    return parser


def parse_config(argv: list[str] | None = None) -> BenchConfig:
    parser = build_parser()
    try:
        return BenchConfig(**vars(parser.parse_args(argv)))
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    print(describe_run(cfg))
    try:
        figures = asyncio.run(run_benchmark(cfg))
    except RuntimeError as exc:  # the server is not there or cannot serve
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return interrupted("the run's figures are incomplete; nothing written")
    if figures["simulated"]:
        lockstep = ", lockstep" if figures.get("sim_lockstep") else ""
        scale = figures.get("sim_time_scale", 1.0)
        stretched = (f"; steps ran {scale:g}x slower, figures are in simulated time"
                     if scale != 1.0 else "")
        print(f"NOTE: simulated accelerator (profile {figures['sim_profile']}{lockstep}): "
              f"times come from a cost model, not a model's forward pass{stretched}")
    print(format_summary(figures))
    if "requests_per_dp_rank" in figures:
        print("Requests per dp_rank:", figures["requests_per_dp_rank"])
    if figures["failed"]:
        print(f"{figures['failed']} request(s) failed; first errors: {figures['first_errors']}",
              file=sys.stderr)
    if cfg.output_file:
        write_jsonl(cfg.output_file, figures)
    return 0 if figures["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
