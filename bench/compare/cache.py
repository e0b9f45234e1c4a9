"""``python -m bench.compare.cache``: ``cache_aware`` against the load-only methods and smg's
own cache-aware routing, on prompts that share prefixes, side by side in one run.

    python -m bench.compare.cache --ranks 4 --out out/cache --json out/cache/summary.json

Scenarios (plain DP, mixed ranks, the simulated accelerator; every server runs the same
prefix cache, ``--executor sim`` pays only the uncached prefill):
- ``shared-prefix``: SGLang's ``generated-shared-prefix`` shape, 16 groups per rank of a
  2,048-token system prompt and 128-token questions (4 per group; 64 output tokens to
  keep runs short). The system prompts of all groups exceed one rank's KV pool and fit
  in all of them: where a group's requests land decides what can be reused.
- ``hot-prefix``: the same, with group 0 carrying half of the requests.
- ``zipf-prefix``: the same, each request's group drawn by Zipf's law (SGLang's
  ``--gsp-group-distribution zipf --gsp-zipf-alpha 1``: group k's share is proportional
  to 1/(k+1); at 4 ranks group 0 carries 21% of the requests, the 32 least asked groups 14%
  together), the skew of real system-prompt popularity.
- ``multi-turn``: conversations that resend their history (``bench.client.dataset``).
- ``no-reuse``: random prompts of the shared-prefix lengths: nothing to reuse.

Each scenario's capacity is ``round_robin``'s saturation throughput; each method then
runs at ``LOAD`` x that rate and (shared-prefix) saturated. Saturated: every request
sent at once with at most ``SATURATION_CONCURRENCY`` per rank in flight (SGLang's
``--max-concurrency``), whose completed requests per second are the saturation
throughput. (An open-loop overload instead fills every KV pool with queued prompts,
which evicts every cached prefix whatever the method: it measures thrashing. Until
2026-12-08 the capacity run was such an overload; on shared-prefix at 4 ranks it gave
about what the capped run gives, 4.656 against 4.56 req/s on other prompts.) Every run starts
from empty caches (``/flush_cache``, which also empties the dispatcher's memory of prompts
and hot prefixes) and each rate has its own prompts (the same for every method): nothing a
run leaves cached helps the next. ``smg`` is smg 1.13 (``python -m smg launch --policy
cache_aware --dp-aware``, a fresh gateway per run, so its routing tree starts empty as
the caches do) in front of the same engine (whose ``routed_dp_rank``s it then sets; the
engine's own method is unused).
Every method sends text prompts (``--text-prompts``), since smg's tree routes by text.

The KV pool per rank is the profile's (``seed-qwen3-235b-dp4``: 52,600 tokens, from the
published runs' logs, ``bench/PROFILES.md``), reported with every figure. The number of
shared-prefix groups follows from it: each rank's share of the system prompts is
``PREFIX_SHARE`` of its pool (16 groups of 2,048 tokens per rank on that profile), so
together they exceed any one rank's pool and fit in all of them, whatever the executor.

Other shapes, servers and samples:
- ``--repeats N``: N runs at ``LOAD`` per method, each with its own prompts and arrivals
  (the same for every method), from empty caches. One load's mean TTFT moves with its
  arrivals (how many first questions come together while the caches are cold), so a
  single run's ratio carries that; the keys are then the means of the N paired ratios,
  with 95% intervals (Student's t) under ``ci95`` and each repeat's under ``per_repeat``.
- ``--saturated-repeats N`` (default 1): N saturated runs per method, each with its own
  prompts (the throughput gain is then a mean of N paired ratios); ``--repeats 0`` with
  it runs only those.
- ``--gsp-prompts-per-group 16``: SGLang's default shape (16 questions per system prompt);
  ``--gsp-groups-per-rank N`` fixes the groups instead of deriving them from the pool.
- ``--executor real``: the tiny model on this machine (``--model-path``), every length
  ``REAL_DIVISOR`` times shorter; the pool is what the engine sizes on this host (on CPU:
  16 full contexts per rank).
- ``--pd``: one PD server (as many decode ranks as prefill ranks); each method places
  requests on the prefill ranks, decode ranks use ``auto``. smg does not run there.
- ``--request-rate R``: the repeats run at R instead of ``LOAD`` x round robin's measured
  capacity (no capacity run), so that two runs with different server flags share one
  load.
- ``--cross-rank-prefix-cache``: every server runs with
  ``--enable-cross-rank-prefix-cache`` (a rank copies a prompt's cached prefix from the
  rank that holds it; the profile's peer bandwidth prices the copy), for every method.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time
import urllib.request
from dataclasses import dataclass

from tqdm import tqdm

from bench.cli import (DefaultsHelpFormatter, interrupted, model_path, non_negative_int,
                       out_folder, positive_float, positive_int, rank_count, sim_profile)
from bench.client.server import ServerProcess, exit_on_sigterm
from bench.client.serving import BenchConfig, run_benchmark
from bench.compare.cache_summary import (LOAD, SATURATED, SMG, describe, flag_lines, headline,
                                         write_summary)
from bench.compare.scenarios import SIM_CHUNKED_PREFILL_SIZE
from bench.compare.smg import SmgGateway

SATURATION_CONCURRENCY = 8  # per rank, in the saturated runs
# A rank's share of all system prompts over its KV pool (16 x 2,048 / 52,600 on the profile).
PREFIX_SHARE = 16 * 2048 / 52_600
ZIPF_ALPHA = 1.0  # zipf-prefix: Zipf's own exponent
REAL_DIVISOR = 2  # --executor real: lengths over this (the tiny model's context is 2,048)
KEEP = ("completed", "failed", "duration_s", "request_throughput", "mean_ttft_ms",
        "p99_ttft_ms", "mean_tpot_ms", "cache_hit_rate", "hit_requests", "mean_ttft_hit_ms",
        "mean_ttft_miss_ms", "requests_per_dp_rank", "first_errors")


@dataclass(frozen=True)
class CacheScenario:
    name: str
    methods: tuple[str, ...]
    dataset: dict  # BenchConfig fields; gsp_num_groups / mt_num_conversations per rank
    saturated: bool = False  # also run every method SATURATED

    def config(self, ranks: int, url: str, rate: float, seed: int,
               max_concurrency: int | None = None) -> BenchConfig:
        fields = dict(self.dataset)
        for key in ("gsp_num_groups", "mt_num_conversations", "num_prompts"):
            if key in fields:
                fields[key] *= ranks
        return BenchConfig(base_url=url, request_rate=rate, seed=seed, disable_tqdm=True,
                           text_prompts=True, max_concurrency=max_concurrency, **fields)

    def shortened(self, divisor: int) -> "CacheScenario":
        """Every token length over ``divisor`` (``--executor real``)."""
        lengths = ("gsp_system_prompt_len", "gsp_question_len", "gsp_output_len",
                   "mt_turn_len", "mt_output_len", "random_input_len", "random_output_len")
        return dataclasses.replace(self, dataset={
            k: max(2, v // divisor) if k in lengths else v for k, v in self.dataset.items()})

    def fitted(self, kv_tokens: int | None, groups_per_rank: int | None = None,
               prompts_per_group: int | None = None) -> "CacheScenario":
        """Shared-prefix groups per rank for a pool of ``kv_tokens`` (``PREFIX_SHARE``)."""
        d = dict(self.dataset)
        if "gsp_num_groups" not in d:
            return self
        if groups_per_rank is None and kv_tokens:
            groups_per_rank = round(PREFIX_SHARE * kv_tokens / d["gsp_system_prompt_len"])
        if groups_per_rank is not None:
            d["gsp_num_groups"] = max(1, groups_per_rank)
        if prompts_per_group is not None:
            d["gsp_prompts_per_group"] = prompts_per_group
        return dataclasses.replace(self, dataset=d)


GSP = dict(dataset_name="generated-shared-prefix", gsp_num_groups=16, gsp_prompts_per_group=4,
           gsp_system_prompt_len=2048, gsp_question_len=128, gsp_output_len=64)
SCENARIOS = {s.name: s for s in (
    CacheScenario("shared-prefix", ("round_robin", "cache_aware", "total_tokens",
                                    "prefill_tokens", SMG), GSP, saturated=True),
    CacheScenario("hot-prefix", ("round_robin", "cache_aware", "total_tokens"),
                  {**GSP, "gsp_hot_share": 0.5}),
    CacheScenario("zipf-prefix", ("round_robin", "cache_aware", "total_tokens", SMG),
                  {**GSP, "gsp_group_distribution": "zipf", "gsp_zipf_alpha": ZIPF_ALPHA}),
    CacheScenario("multi-turn", ("round_robin", "cache_aware", "total_tokens", "prefill_tokens",
                                 SMG),
                  dict(dataset_name="multi-turn", mt_num_conversations=8, mt_num_turns=4,
                       mt_turn_len=512, mt_output_len=64)),
    CacheScenario("no-reuse", ("round_robin", "cache_aware", "total_tokens", "prefill_tokens"),
                  dict(dataset_name="random", random_input_len=2176, random_output_len=64,
                       random_range_ratio=1.0, num_prompts=64)),
)}
METHODS = tuple(dict.fromkeys(m for s in SCENARIOS.values() for m in s.methods))


def server_flags(method: str, ranks: int, profile: str, executor: str = "sim",
                 model_path: str = "tiny", pd: bool = False,
                 cross_rank: bool = False) -> list[str]:
    if executor == "sim":
        flags = ["--executor", "sim", "--sim-profile", profile,
                 "--chunked-prefill-size", str(SIM_CHUNKED_PREFILL_SIZE)]
    else:
        flags = ["--executor", "real", "--model-path", model_path]
    flags += ["--log-level", "warning"]
    if cross_rank:
        flags.append("--enable-cross-rank-prefix-cache")
    method = "round_robin" if method == SMG else method
    if pd:
        return flags + ["--disaggregation-mode", "pd", "--prefill-dp-size", str(ranks),
                        "--decode-dp-size", str(ranks), "--prefill-load-balance-method", method]
    return flags + ["--dp-size", str(ranks), "--load-balance-method", method]


def kv_tokens_per_rank(url: str) -> int | None:
    with urllib.request.urlopen(url + "/server_info", timeout=5) as r:
        return json.load(r).get("max_total_num_tokens")


def flush_cache(engine_url: str) -> None:
    """Empty every rank's prefix cache (refused while requests run: retried a while)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(
                    engine_url + "/flush_cache", method="POST"), timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def one_run(s: CacheScenario, ranks: int, url: str, fraction: float | str, capacity: float,
            seed: int, engine_url: str | None = None) -> dict:
    """One benchmark run from empty caches (``engine_url``: the engine behind ``url``)."""
    flush_cache(engine_url or url)
    if fraction == SATURATED:
        rate, cap = math.inf, SATURATION_CONCURRENCY * ranks
    else:
        rate, cap = fraction * capacity, None
    figures = asyncio.run(run_benchmark(s.config(ranks, url, rate, seed, cap)))
    run = {k: figures.get(k) for k in KEEP}
    per_rank = figures.get("requests_per_dp_rank") or {}
    counts = [per_rank.get(str(r), 0) for r in range(ranks)]  # a rank given nothing counts
    if sum(counts):
        run["max_over_mean_requests"] = max(counts) / (sum(counts) / ranks)
    run["request_rate"] = rate if math.isfinite(rate) else "inf"
    run["fraction"] = fraction
    return run


def run_scenario(s: CacheScenario, ranks: int, args, bar: tqdm) -> dict:
    sim = args.executor == "sim"
    if not sim:
        s = s.shortened(REAL_DIVISOR)
    result = {"scenario": s.name, "ranks": ranks, "simulated": sim,
              "profile": args.sim_profile if sim else None,
              "executor": args.executor if sim else f"real ({args.model_path})",
              "pd": args.pd, "cross_rank_prefix_cache": args.cross_rank_prefix_cache,
              "runs": {}}
    methods = [m for m in s.methods if not (args.pd and m == SMG)]
    for method in methods:
        tag = f"{s.name}_{ranks}_{method}" + ("_pd" if args.pd else "")
        log = os.path.join(args.out, "logs", f"{tag}.log")
        flags = server_flags(method, ranks, args.sim_profile, args.executor, args.model_path,
                             args.pd, args.cross_rank_prefix_cache)
        with ServerProcess(flags, log) as server:
            result["kv_tokens_per_rank"] = kv_tokens_per_rank(server.url)
            if "capacity_req_s" not in result:  # the first method: round_robin
                s = s.fitted(result["kv_tokens_per_rank"], args.gsp_groups_per_rank,
                             args.gsp_prompts_per_group)
                result["dataset"] = s.dataset
                if args.request_rate is not None:  # LOAD x capacity is this rate
                    result["capacity_req_s"] = args.request_rate / LOAD
                    result["capacity_given"] = True
                elif args.repeats == 0:  # saturated runs only: no rate to derive
                    result["capacity_req_s"] = None
                else:
                    bar.set_postfix_str(f"{s.name} x{ranks}: capacity")
                    # Saturated as the saturated runs are (at most SATURATION_CONCURRENCY
                    # per rank), not a burst of every request at once: the same measure
                    # of saturation throughput everywhere.
                    cap = one_run(s, ranks, server.url, SATURATED, math.inf, args.seed + 7)
                    bar.update(1)
                    result["capacity_req_s"] = cap["request_throughput"]
                    result["capacity_run"] = cap
            # Each run its own prompts (the same for every method), from empty caches:
            # LOAD once per repeat, then (shared-prefix) SATURATED once per saturated repeat.
            fractions = [LOAD] * args.repeats + [SATURATED] * (
                args.saturated_repeats if s.saturated else 0)
            seeds = [args.seed + 100 * i for i in range(len(fractions))]
            cap = result["capacity_req_s"]
            runs = []
            for k, (f, seed) in enumerate(zip(fractions, seeds)):
                bar.set_postfix_str(f"{s.name} x{ranks}: {method} @ {f}")
                if method == SMG:  # a gateway per run: its routing tree starts empty too
                    with SmgGateway(server.url, ranks,
                                    log.replace(".log", f"_gateway_{k}.log")) as gw:
                        runs.append(one_run(s, ranks, gw.url, f, cap, seed, server.url))
                else:
                    runs.append(one_run(s, ranks, server.url, f, cap, seed))
                bar.update(1)
        result["runs"][method] = runs
        bar.write(f"{s.name} x{ranks}{' pd' if args.pd else ''} {method}: "
                  + ", ".join(describe(r) for r in runs))
    return result


def num_runs(scenarios: list[CacheScenario], args) -> int:
    """The benchmark runs ahead (the progress bar's total): per scenario a capacity run
    (unless --request-rate gives the rate or --repeats is 0), then per method the repeats
    and the saturated repeats."""
    total = 0
    for s in scenarios:
        methods = [m for m in s.methods if not (args.pd and m == SMG)]
        total += int(args.request_rate is None and args.repeats > 0)
        total += len(methods) * (args.repeats + (args.saturated_repeats if s.saturated else 0))
    return total


GSP_FLAGS = ("--gsp-prompts-per-group", "--gsp-groups-per-rank")
DEFAULT_SIM_PROFILE = "seed-qwen3-235b-dp4"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare.cache",
                                description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS),
                   help="scenarios to run (default: all)")
    p.add_argument("--ranks", nargs="+", type=rank_count, default=[4],
                   help="rank counts, one run of every scenario each")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="only these of each scenario's methods (round_robin, which measures "
                        "capacity, always runs)")
    p.add_argument("--sim-profile", type=sim_profile, default=DEFAULT_SIM_PROFILE,
                   help="--executor sim: a name in sim/profiles/ or a profile file")
    p.add_argument("--out", default="out/cache", help="folder for the summary and server logs")
    p.add_argument("--json", default=None, help="write every figure here (default: "
                   "OUT/summary.json)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the first repeat's prompts and arrivals (repeat k: +100k)")
    p.add_argument("--repeats", type=non_negative_int, default=1,
                   help="runs at 0.9x per method, each with its own prompts and arrivals "
                        "(the same for every method); the keys are then means over the "
                        "repeats, with 95%% intervals under ci95 from 2 on")
    p.add_argument("--saturated-repeats", type=non_negative_int, default=1,
                   help="saturated runs per method (shared-prefix), each with its own "
                        "prompts; with --repeats 0 only these run")
    p.add_argument("--executor", choices=("sim", "real"), default="sim",
                   help="real: the model at --model-path on this machine, lengths "
                        f"{REAL_DIVISOR}x shorter (at most 4 ranks)")
    p.add_argument("--model-path", type=model_path, default=None,
                   help="--executor real: the model (default: tiny)")
    p.add_argument("--pd", action="store_true",
                   help="a PD server: methods place requests on its prefill ranks")
    p.add_argument("--gsp-prompts-per-group", type=positive_int, default=None,
                   help="shared-prefix scenarios: questions per system prompt (default 4; "
                        "SGLang's default is 16)")
    p.add_argument("--gsp-groups-per-rank", type=positive_int, default=None,
                   help="shared-prefix scenarios: system prompts per rank (default: "
                        "PREFIX_SHARE of the pool)")
    p.add_argument("--request-rate", type=positive_float, default=None,
                   help="req/s: run the 0.9x repeats at this rate instead of 0.9x round "
                        "robin's measured capacity (to compare engine flags at one load: take "
                        "the request_rate of the other run's summary.json)")
    p.add_argument("--cross-rank-prefix-cache", action="store_true",
                   help="every server (for every method, smg's engine too) runs with "
                        "--enable-cross-rank-prefix-cache")
    return p


def check_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for runs that cannot be made and flags the run would ignore."""
    if args.repeats + args.saturated_repeats == 0:
        p.error("nothing to run: --repeats and --saturated-repeats are both 0")
    if args.request_rate is not None and args.repeats == 0:
        p.error("--request-rate sets the rate of the 0.9x repeats: --repeats 0 runs none")
    if args.executor == "real":
        if max(args.ranks) > 4:
            p.error("--executor real runs at most 4 ranks here: --ranks too large")
        if args.sim_profile != DEFAULT_SIM_PROFILE:
            p.error("--sim-profile needs --executor sim (--executor real ignores it)")
    elif args.model_path is not None:
        p.error("--model-path needs --executor real (--executor sim ignores it)")
    args.model_path = args.model_path or "tiny"
    given = [f for f in GSP_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None]
    if given and not any("gsp_num_groups" in SCENARIOS[n].dataset for n in args.scenarios):
        p.error(f"{given[0]} shapes the shared-prefix scenarios; --scenarios "
                f"{' '.join(args.scenarios)} has none")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_flags(p, args)
    summary_path = out_folder(p, args, "summary.json")
    started = time.time()
    by_ranks = {}
    scenarios = [SCENARIOS[name] for name in args.scenarios]
    if args.methods:
        scenarios = [dataclasses.replace(s, methods=tuple(
            m for m in s.methods if m == "round_robin" or m in args.methods))
            for s in scenarios]
    try:
        with tqdm(total=num_runs(scenarios, args) * len(args.ranks), desc="cache runs",
                  file=sys.stderr) as bar:
            for n in args.ranks:
                results = [run_scenario(s, n, args, bar) for s in scenarios]
                by_ranks[str(n)] = {**headline(results), "results": results}
    except KeyboardInterrupt:  # each server and gateway was stopped by its ``with`` block
        if not by_ranks:
            return interrupted("no rank count finished; nothing written")
        write_summary(summary_path, by_ranks, args, started)
        return interrupted(f"the finished rank count(s) {', '.join(by_ranks)} written to "
                           f"{summary_path}")
    summary = write_summary(summary_path, by_ranks, args, started)
    print(json.dumps({k: v for k, v in summary.items() if k != "by_ranks"}, indent=1))
    for n, h in by_ranks.items():
        for line in flag_lines(h):
            print(f"{n} ranks: {line}")
    if args.repeats == 1:
        print("one repeat: the ratios above carry no interval (--repeats N, N >= 2, gives "
              "each a 95% interval under ci95)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    raise SystemExit(main())
