"""``python -m bench.compare.scale``: the front door's cost per request, from 4 to 64 ranks.

    python -m bench.compare.scale --ranks 4 8 16 32 64 --json out/scale.json

For each rank count and method: one ``engine.serve --executor sim --sim-profile
instant`` server (every forward pass is free, so nothing but the serving path costs
time), a warm-up, then one ``bench.client.serving`` run of ``--num-prompts`` random prompts
at ``--max-concurrency``. Reported per run:

- ``dispatch_cpu_us`` / ``dispatch_us``: the server's own timing of its front door per
  request (``EngineClient.submit``: checks, ``Dispatcher.pick``, encode, pipe send;
  read from ``/server_info``), which is the part that can grow with the rank count, as
  the median of the API thread's CPU time over the last 4,096 requests and as mean wall
  time (which also counts the moments the woken rank or another process held the CPU;
  ``dispatch_mean_cpu_us`` is the mean CPU time);
- ``mean_ttft_ms`` / ``mean_e2e_ms`` at the client: the whole path with a free model,
  which on this 2-core machine also carries N scheduler processes sharing the CPU.

The headline is ``dispatch_ratio_<max>_vs_<min>_<method>`` (CPU time): the target is
that it stays within 2x; ``wall_dispatch_ratio_...`` is the same for wall time. Every figure is simulated (no model runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from tqdm import tqdm

from bench.cli import DefaultsHelpFormatter, out_folder, positive_int, rank_count
from bench.client.server import ServerProcess, dispatch_stats, exit_on_sigterm
from bench.client.serving import BenchConfig, run_benchmark

METHODS = ("total_requests", "total_tokens")


def run_one(ranks: int, method: str, args) -> dict:
    flags = ["--executor", "sim", "--sim-profile", "instant", "--log-level", "warning",
             "--dp-size", str(ranks), "--load-balance-method", method]
    log = os.path.join(args.out, "logs", f"scale_{ranks}_{method}.log")
    with ServerProcess(flags, log) as server:
        cfg = BenchConfig(base_url=server.url, random_input_len=args.input_len,
                          random_output_len=args.output_len, random_range_ratio=0.5,
                          num_prompts=args.num_prompts, request_rate=float("inf"),
                          max_concurrency=args.max_concurrency, seed=args.seed,
                          disable_tqdm=True)
        figures = asyncio.run(run_benchmark(cfg))
        dispatch = dispatch_stats(server.url) or {}
    return {"ranks": ranks, "method": method, "dispatch_us": dispatch.get("mean_us"),
            "dispatch_cpu_us": dispatch.get("median_cpu_us"),
            "dispatch_mean_cpu_us": dispatch.get("mean_cpu_us"),
            "dispatched": dispatch.get("num_requests"), "completed": figures.get("completed"),
            "failed": figures.get("failed"), "mean_ttft_ms": figures.get("mean_ttft_ms"),
            "mean_e2e_ms": figures.get("mean_e2e_latency_ms"),
            "request_throughput": figures.get("request_throughput"),
            "requests_per_dp_rank": figures.get("requests_per_dp_rank")}


def summarize(rows: list[dict], ranks: list[int]) -> dict:
    """Every row, and per method the ratios of the largest rank count's figures to the
    smallest's (none with one rank count: a ratio to itself says nothing)."""
    lo, hi = min(ranks), max(ranks)
    out = {"simulated": True, "rows": rows}
    if lo == hi:
        return out
    for method in {r["method"] for r in rows}:
        by_n = {r["ranks"]: r for r in rows if r["method"] == method}
        for key, name in (("dispatch_cpu_us", "dispatch_ratio"), ("dispatch_us", "wall_dispatch_ratio")):
            if by_n.get(lo, {}).get(key) and by_n.get(hi, {}).get(key):
                out[f"{name}_{hi}_vs_{lo}_{method}"] = by_n[hi][key] / by_n[lo][key]
    return out


def _cell(value: float | None, width: int, fmt: str) -> str:
    """A figure right-aligned in ``width``; "-" where there is none (no request succeeded)."""
    return f"{'-' if value is None else format(value, fmt):>{width}}"


def print_table(summary: dict) -> None:
    print("simulated (sim executor, instant profile): front door cost per request")
    print(f"{'method':<16}{'ranks':>6}{'cpu us':>8}{'wall us':>9}{'TTFT ms':>10}{'E2E ms':>9}"
          f"{'done/s':>8}{'failed':>8}")
    for r in summary["rows"]:
        print(f"{r['method']:<16}{r['ranks']:>6}{_cell(r['dispatch_cpu_us'], 8, '.1f')}"
              f"{_cell(r['dispatch_us'], 9, '.1f')}{_cell(r['mean_ttft_ms'], 10, '.2f')}"
              f"{_cell(r['mean_e2e_ms'], 9, '.2f')}{_cell(r['request_throughput'], 8, '.1f')}"
              f"{r['failed'] or 0:>8}")
    ratios = {k: v for k, v in summary.items() if "dispatch_ratio" in k}
    for key, value in ratios.items():
        print(f"{key}: {value:.2f} (target <= 2)")
    if not ratios:
        print("dispatch ratio: n/a (one rank count; give --ranks two or more to compare)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare.scale",
                                description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--ranks", nargs="+", type=rank_count, default=[4, 8, 16, 32, 64],
                   help="rank counts, one server per count and method")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="balancing methods")
    p.add_argument("--num-prompts", type=positive_int, default=400, help="requests per run")
    p.add_argument("--max-concurrency", type=positive_int, default=16,
                   help="requests in flight at most")
    p.add_argument("--random-input-len", "--input-len", dest="input_len", type=positive_int,
                   default=256, help="max input length in tokens (range ratio 0.5)")
    p.add_argument("--random-output-len", "--output-len", dest="output_len", type=positive_int,
                   default=4, help="max output length in tokens (range ratio 0.5)")
    p.add_argument("--seed", type=int, default=1, help="seed of prompts and lengths")
    p.add_argument("--out", default="out/scale", help="folder for the summary and server logs")
    p.add_argument("--json", default=None, help="write every figure here (default: OUT/scale.json)")
    args = p.parse_args(argv)
    path = out_folder(p, args, "scale.json")
    rows = []
    with tqdm(total=len(args.ranks) * len(args.methods), desc="bench.compare.scale") as bar:
        for ranks in args.ranks:
            for method in args.methods:
                bar.set_postfix_str(f"{method} x{ranks}")
                rows.append(run_one(ranks, method, args))
                bar.update(1)
    summary = summarize(rows, args.ranks)
    print_table(summary)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    raise SystemExit(main())
