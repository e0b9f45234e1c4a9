"""``python -m bench.compare``: every balancing method of a scenario, side by side, in one run.

    python -m bench.compare --quick --out out/compare --json out/compare/summary.json
    python -m bench.compare --executor sim --ranks 4 8 16 32 64 --out out/compare-full

For each scenario (``bench.scenarios``) and rank count:
1. capacity, measured once: a saturating run (request rate ``inf``, with the
   scenario's concurrency cap) on the first method's server; capacity = its completed
   requests per second. Rates are then ``fraction x capacity``;
2. per method, one ``engine.serve`` subprocess on a free loopback port (restarted per
   method, always stopped in ``finally``), one ``bench.serving`` run per rate with
   ``/v1/loads`` sampled every 75 ms (``bench.compare_server``);
3. the markdown table, the plots and the JSON (``bench.compare_report``).

Dispatch overhead: the server times its front door (``EngineClient.submit``: checks,
pick, encode, pipe send; ``/server_info`` ``dispatch``); each run records the mean.
``--dispatch-ranks`` also times ``Dispatcher.pick`` + message encoding in this process
at 4..64 ranks without starting servers (``dispatch_probe``).

Every report made with ``--executor sim`` says "simulated".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time

from tqdm import tqdm

from bench.compare_report import write_reports
from bench.compare_server import LoadSampler, ServerProcess
from bench.scenarios import SCENARIOS, Scenario, get_scenarios, server_flags
from bench.serving import BenchConfig, run_benchmark

DEFAULT_SIM_PROFILE = "seed-qwen3-235b-dp4"
KEEP = ("completed", "failed", "duration_s", "request_throughput", "output_throughput",
        "input_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
        "p99_tpot_ms", "mean_itl_ms", "mean_e2e_latency_ms", "requests_per_dp_rank",
        "input_tokens_per_dp_rank")


def bench_config(s: Scenario, ranks: int, url: str, rate: float, num_prompts: int,
                 seed: int) -> BenchConfig:
    return BenchConfig(base_url=url, random_input_len=s.input_len,
                       random_output_len=s.output_len, random_range_ratio=s.range_ratio,
                       num_prompts=num_prompts, request_rate=rate,
                       max_concurrency=s.max_concurrency(ranks), seed=seed, disable_tqdm=True)


async def measured_run(cfg: BenchConfig) -> tuple[dict, list[dict]]:
    async with LoadSampler(cfg.base_url) as sampler:
        figures = await run_benchmark(cfg)
    return figures, sampler.samples


def dispatch_stats(url: str) -> dict | None:
    import urllib.request
    with urllib.request.urlopen(url + "/server_info", timeout=10) as r:
        return json.load(r).get("dispatch")


def run_scenario(s: Scenario, ranks: int, args, bar: tqdm) -> dict:
    """Every method of ``s`` at ``ranks`` ranks: capacity, then one run per rate."""
    result = {"scenario": s.name, "ranks": ranks, "baseline": s.baseline,
              "methods": list(s.methods), "fractions": list(s.fractions),
              "input_len": s.input_len, "output_len": s.output_len,
              "range_ratio": s.range_ratio, "max_concurrency": s.max_concurrency(ranks),
              "pd": s.pd, "lockstep": s.lockstep and args.executor == "sim", "runs": {},
              "dispatch": {}}
    timelines = {}
    for i, method in enumerate(s.methods):
        flags = server_flags(s, method, ranks, args.executor, args.sim_profile)
        log = os.path.join(args.out, "logs", f"{s.key}_{ranks}_{method}.log")
        with ServerProcess(flags, log) as server:
            if i == 0:
                bar.set_postfix_str(f"{s.name} x{ranks}: capacity")
                cap_prompts = max(4 * ranks, (s.max_concurrency(ranks) or 0) * 2)
                cap, _ = asyncio.run(measured_run(bench_config(
                    s, ranks, server.url, math.inf, cap_prompts, args.seed + 7)))
                result["capacity_req_s"] = cap["request_throughput"]
                result["capacity_run"] = {k: cap.get(k) for k in KEEP}
                result["simulated"] = cap.get("simulated", False)
            runs = result["runs"].setdefault(method, [])
            for frac in s.fractions:
                bar.set_postfix_str(f"{s.name} x{ranks}: {method} @ {frac:g}x")
                rate = frac * result["capacity_req_s"]
                figures, samples = asyncio.run(measured_run(bench_config(
                    s, ranks, server.url, rate, s.prompts(ranks), args.seed)))
                runs.append({"fraction": frac, "request_rate": rate,
                             **{k: figures.get(k) for k in KEEP}})
                timelines[(method, frac)] = samples
                bar.update(1)
            result["dispatch"][method] = dispatch_stats(server.url)
    result["timelines"] = timelines
    return result


def dispatch_probe(rank_counts: list[int], calls: int = 2000) -> dict:
    """Median us of ``Dispatcher.pick`` (total_tokens) + ``GenerateReq`` encoding, per
    rank count, on a board whose ranks are all live: the front door's rank-dependent
    work (the pipe write costs the same whatever the rank count)."""
    from bench.board import FOREVER_NS, _live_board, median_us
    from engine.sampling import SamplingParams
    from scheduler.dispatcher import Dispatcher
    from scheduler.messages import GenerateReq, encode
    ids, params = list(range(1000)), SamplingParams(max_new_tokens=16)
    out = {}
    for n in rank_counts:
        with _live_board(n) as board:
            d = Dispatcher(board, 0, "total_tokens", stale_ns=FOREVER_NS)

            def one():
                rank = d.pick(len(ids))
                encode(GenerateReq(rid="r", input_ids=ids, sampling_params=params,
                                   dispatcher_id=0, counted_tokens=len(ids),
                                   arrival_time=time.time()))
                return rank
            out[str(n)] = median_us(one, calls, 9)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--executor", choices=("real", "sim"), default="sim")
    p.add_argument("--sim-profile", default=DEFAULT_SIM_PROFILE)
    p.add_argument("--ranks", nargs="+", type=int, default=None,
                   help="rank counts (default: 4; --executor real: 2)")
    p.add_argument("--quick", action="store_true", help="the reduced set, < 3 minutes")
    p.add_argument("--dispatch-ranks", nargs="*", type=int, default=[4, 8, 16, 32, 64])
    p.add_argument("--out", default="out/compare")
    p.add_argument("--json", default=None, help="write every figure here (default: OUT/summary.json)")
    p.add_argument("--seed", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ranks = args.ranks or ([2] if args.executor == "real" else [4])
    if args.executor == "real" and max(ranks) > 4:
        print("--executor real runs at most 4 ranks here (2 cores)", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    scenarios = get_scenarios(args.scenarios, args.quick)
    if args.executor == "real":
        scenarios = [s.for_real() for s in scenarios]
    total = sum(len(s.methods) * len(s.fractions) for s in scenarios) * len(ranks)
    results = []
    started = time.time()
    with tqdm(total=total, desc="compare runs", file=sys.stderr) as bar:
        for s in scenarios:
            for n in ranks:
                results.append(run_scenario(s, n, args, bar))
    probe = dispatch_probe(args.dispatch_ranks) if args.dispatch_ranks else {}
    summary = write_reports(results, probe, args, time.time() - started)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
