"""``python -m bench.compare``: every balancing method of a scenario, side by side, in one run.

    python -m bench.compare --quick --out out/compare --json out/compare/summary.json
    python -m bench.compare --executor sim --ranks 4 8 16 32 64 --out out/compare-full

For each scenario (``bench.compare.scenarios``) and rank count (every method's server
first gets the same untimed warm-up burst, ``WARM_UP_PROMPTS`` per rank):
1. capacity, measured once: a saturating run (request rate ``inf``, with the
   scenario's concurrency cap) on the first method's server; capacity = its completed
   requests per second (decode-bound PD shapes: while it was full, ``steady_capacity``).
   Rates are then ``fraction x capacity``;
2. per method, one ``engine.serve`` subprocess on a free loopback port (restarted per
   method, always stopped in ``finally``), one ``bench.client.serving`` run per rate with
   ``/v1/loads`` sampled every 75 ms (``bench.client.server``);
3. the markdown table, the plots and the JSON (``bench.compare.report``).

Dispatch overhead: the server times its front door (``EngineClient.submit``: checks,
pick, encode, pipe send; ``/server_info`` ``dispatch``); each run records the mean.
``--dispatch-ranks`` also times ``Dispatcher.pick`` + message encoding in this process
at 4..64 ranks without starting servers (``dispatch_probe``).

Every report made with ``--executor sim`` says "simulated".

``--sim-time-scale K`` starts the servers with steps K times slower than modelled
(``sim.executor``), for rank counts whose scheduling work overloads the
host's cores; ``bench.client.serving`` converts every figure back to simulated time, so the
tables read as without it, and the run takes about K times as long. The default,
``auto``, picks K per scenario and rank count (``auto_time_scale``): 1 up to
``PROCESSES_PER_CORE`` rank processes per core, more above.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import sys
import time

from tqdm import tqdm

from bench.cli import DefaultsHelpFormatter, interrupted, out_folder, rank_count, sim_profile
from bench.client.server import LoadSampler, ServerProcess, dispatch_stats, exit_on_sigterm
from bench.client.serving import BenchConfig, run_benchmark
from bench.compare.report import write_reports
from bench.compare.scenarios import DEFAULT_SCENARIOS, SCENARIOS, Scenario, get_scenarios, server_flags
from server.args import InvalidServerArgs, check_sim_time_scale

DEFAULT_SIM_PROFILE = "seed-qwen3-235b-dp4"
KEEP = ("completed", "failed", "duration_s", "request_throughput", "output_throughput",
        "input_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
        "p99_tpot_ms", "mean_itl_ms", "mean_e2e_latency_ms", "requests_per_dp_rank",
        "input_tokens_per_dp_rank", "first_errors")


def bench_config(s: Scenario, ranks: int, url: str, rate: float, num_prompts: int,
                 seed: int, return_requests: bool = False) -> BenchConfig:
    return BenchConfig(base_url=url, random_input_len=s.input_len,
                       random_output_len=s.output_len, random_range_ratio=s.range_ratio,
                       num_prompts=num_prompts, request_rate=rate,
                       max_concurrency=s.max_concurrency(ranks), seed=seed, disable_tqdm=True,
                       return_requests=return_requests, seeded_bootstrap_rooms=s.pd)


def capacity_prompts(s: Scenario, ranks: int) -> int:
    """Prompts of the saturating run: twice the concurrency cap, and for decode-bound
    shapes (``DECODE_BOUND_OUTPUT_LEN``) at least the scenario's own run size, so that
    the server stays full for a while (``steady_capacity``)."""
    n = max(4 * ranks, (s.max_concurrency(ranks) or 0) * 2)
    return max(n, s.prompts(ranks)) if s.output_len >= DECODE_BOUND_OUTPUT_LEN else n


DECODE_BOUND_OUTPUT_LEN = 32
WARM_UP_PROMPTS = 2  # per rank, before a server's first measured run


def steady_capacity(records: list[dict], min_requests: int = 8) -> float | None:
    """Requests per second a decode-bound server sustained while the saturating run
    kept it full; ``None`` for prefill-bound shapes (mean output below
    ``DECODE_BOUND_OUTPUT_LEN``: their ramp and drain are short, ``completed /
    duration`` measures them well) and when the window below is empty or fewer than
    ``min_requests`` requests decode or complete in it (the caller then uses
    ``completed / duration``, and the larger of the two otherwise).

    With every request sent at once (or as soon as the concurrency cap lets it), the
    server ramps up until the first request completes and has work waiting until the
    last request gets its first token; after that it only drains. With long outputs
    ``completed / duration`` counts a long ramp and drain (16 prompts of up to 400
    output tokens measured 1.17 req/s). This counts the output tokens that arrived in
    that window (each record's ``chunks``: seconds since sent, tokens) and divides by
    the mean output length less the first token.

    Only for ranks that do nothing but decode (PD's decode side): it counts decode work
    alone, and where the same ranks also prefill, most prefill is done before the window
    opens (``capacity_estimate``).
    """
    ok = [r for r in records if r.get("success")]
    if not ok:
        return None
    mean_out = sum(r["output_len"] for r in ok) / len(ok)
    if mean_out < DECODE_BOUND_OUTPUT_LEN:
        return None
    ends = [r["start_s"] + r["latency_s"] for r in ok]
    firsts = [r["start_s"] + r["ttft_s"] for r in ok]
    t0, t1 = min(ends), max(firsts)
    if t1 <= t0:
        return None
    tokens, active = 0, 0
    for r, first, end in zip(ok, firsts, ends):
        if min(end, t1) > max(first, t0):  # decoding in the window: its tokens may count
            active += 1
            # The first chunk brought the first token, which the division leaves out.
            tokens += sum(n for since, n in r["chunks"][1:] if t0 < r["start_s"] + since <= t1)
    completions = sum(1 for end in ends if end <= t1)
    if active < min_requests or completions < min_requests:
        return None  # everything fitted at once: the server never had work waiting
    return tokens / (t1 - t0) / (mean_out - 1)


def saturating_capacity(completed_per_s: float, steady: float | None) -> float:
    """Capacity from a saturating run: the larger of its completed requests per second
    and ``steady_capacity``. The rate while the server is full is at least the whole
    run's, as ramp and drain only lower it; a smaller steady figure means its window
    measured something else (a prefill-bound PD shape with 128 output tokens, 96
    prompts at 16 lockstep ranks: 3.19 req/s for 10.73 completed per second)."""
    return max(steady or 0.0, completed_per_s)


def capacity_estimate(figures: dict, pd: bool) -> tuple[float, float | None]:
    """(capacity, steady figure) of a saturating run made with ``return_requests``.

    ``steady_capacity`` counts decode work only, so it is used for PD shapes alone. Where
    the ranks prefill and decode both (plain DP), the saturating run does most of its
    prefill before the first request completes: its window is decode-rich and overstates
    the rate (`mixed`, 4 ranks: 4.14 req/s in the window, 2.10 completed / duration, and
    an open-loop run at 3.3 req/s already built a queue). There ``completed / duration``
    stands, which ramp and drain make a lower bound."""
    steady = steady_capacity(figures["requests"]) if pd else None
    return saturating_capacity(figures["request_throughput"], steady), steady


async def measured_run(cfg: BenchConfig, role: str | None = None,
                       time_scale: float = 1.0) -> tuple[dict, list[dict]]:
    async with LoadSampler(cfg.base_url, role=role, time_scale=time_scale) as sampler:
        figures = await run_benchmark(cfg)
    return figures, sampler.samples


def run_scenario(s: Scenario, ranks: int, args, bar: tqdm) -> dict:
    """Every method of ``s`` at ``ranks`` ranks: capacity, then one run per rate."""
    result = {"scenario": s.name, "ranks": ranks, "baseline": s.baseline,
              "methods": list(s.methods), "fractions": list(s.fractions),
              "input_len": s.input_len, "output_len": s.output_len,
              "range_ratio": s.range_ratio, "prompts": s.prompts(ranks),
              "max_concurrency": s.max_concurrency(ranks), "pd": s.pd,
              "pd_balanced": s.pd_balanced if s.pd else None,
              "decode_ranks": s.decode_ranks(ranks) if s.pd else None,
              "ttft_output_len": s.ttft_output_len,
              "ttft_prompts": s.ttft_prompts(ranks) if s.ttft_output_len else None,
              "lockstep": s.lockstep and args.executor == "sim", "runs": {}, "dispatch": {}}
    # SGLang PR #20435's way of measuring TTFT: the same prompts with ttft_output_len output
    # tokens, at the same fractions of that shape's own capacity.
    ttft_shape = dataclasses.replace(s, output_len=s.ttft_output_len) if s.ttft_output_len else None
    scale = 1.0
    if args.executor == "sim":
        scale = (auto_time_scale(s, ranks) if args.sim_time_scale == "auto"
                 else args.sim_time_scale)
    result["sim_time_scale"] = scale if args.executor == "sim" else None

    def capacity(shape: Scenario, url: str) -> tuple[float, dict]:
        cap, _ = asyncio.run(measured_run(bench_config(
            shape, ranks, url, math.inf, capacity_prompts(shape, ranks), args.seed + 7,
            return_requests=True), shape.sampled_role, scale))
        rate, steady = capacity_estimate(cap, shape.pd)
        run = {k: cap.get(k) for k in KEEP}
        run["steady_request_throughput"] = steady
        result["simulated"] = result.get("simulated") or cap.get("simulated", False)
        return rate, run

    def warm_up(url: str) -> None:
        """The same untimed burst on every method's server before anything is measured
        (the first server's capacity run would otherwise warm it alone): random prompts
        of the shape, none of which the measured runs share."""
        asyncio.run(run_benchmark(bench_config(s, ranks, url, math.inf, WARM_UP_PROMPTS * ranks,
                                               args.seed + 11)))

    timelines = {}
    for i, method in enumerate(s.methods):
        flags = server_flags(s, method, ranks, args.executor, args.sim_profile, scale)
        log = os.path.join(args.out, "logs", f"{s.key}_{ranks}_{method}.log")
        with ServerProcess(flags, log) as server:
            bar.set_postfix_str(f"{s.name} x{ranks}: {method} warm-up")
            warm_up(server.url)
            if i == 0:
                bar.set_postfix_str(f"{s.name} x{ranks}: capacity")
                result["capacity_req_s"], result["capacity_run"] = capacity(s, server.url)
                if ttft_shape is not None:
                    result["ttft_capacity_req_s"], result["ttft_capacity_run"] = capacity(
                        ttft_shape, server.url)
            runs = result["runs"].setdefault(method, [])
            for frac in s.fractions:
                bar.set_postfix_str(f"{s.name} x{ranks}: {method} @ {frac:g}x")
                rate = frac * result["capacity_req_s"]
                figures, samples = asyncio.run(measured_run(bench_config(
                    s, ranks, server.url, rate, s.prompts(ranks), args.seed), s.sampled_role,
                    scale))
                run = {"fraction": frac, "request_rate": rate,
                       **{k: figures.get(k) for k in KEEP}}
                if ttft_shape is not None:
                    ttft_rate = frac * result["ttft_capacity_req_s"]
                    probe, _ = asyncio.run(measured_run(bench_config(
                        ttft_shape, ranks, server.url, ttft_rate, s.ttft_prompts(ranks), args.seed),
                        ttft_shape.sampled_role, scale))
                    run["ttft_pass"] = {"request_rate": ttft_rate,
                                        **{k: probe.get(k) for k in KEEP}}
                runs.append(run)
                timelines[(method, frac)] = samples
                bar.update(1)
            result["dispatch"][method] = dispatch_stats(server.url)
    result["timelines"] = timelines
    return result


# Rank processes per host core that still keep simulated steps on time (2-core VM,
# decode-heavy --quick, TPOT at the same per-rank load): 16 processes (8 ranks) at
# --sim-time-scale 1 ran 5% slower than at 4; 128 (64 ranks) at 1 ran 91% slower, at 4
# 13% and at 8 7% slower than 8 ranks at 4 (one run each).
PROCESSES_PER_CORE = 8


def rank_processes(s: Scenario, ranks: int) -> int:
    return ranks + (s.decode_ranks(ranks) if s.pd else 0)


def auto_time_scale(s: Scenario, ranks: int, cores: int | None = None) -> float:
    """``--sim-time-scale auto``: 1 while the scenario's rank processes are at most
    ``PROCESSES_PER_CORE`` per core of this host, else the factor that brings the work
    per stretched step down to that."""
    cores = cores or len(os.sched_getaffinity(0))
    return float(max(1, math.ceil(rank_processes(s, ranks) / (PROCESSES_PER_CORE * cores))))


def parse_time_scale(value: str) -> float | str:
    """``--sim-time-scale``: ``auto`` or a factor ``engine.serve`` accepts."""
    if value == "auto":
        return value
    try:
        scale = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sim-time-scale must be auto or a number, "
                                         f"got {value!r}") from None
    try:
        check_sim_time_scale(scale)
    except InvalidServerArgs as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return scale


def dispatch_probe(rank_counts: list[int], calls: int = 2000, method: str = "total_tokens") -> dict:
    """Median us of ``Dispatcher.pick`` (``method``) + ``GenerateReq`` encoding, per
    rank count, on a board whose ranks are all live: the front door's rank-dependent
    work (the pipe write costs the same whatever the rank count)."""
    from bench.micro.board import FOREVER_NS, live_board, median_us
    from engine.sampling import SamplingParams
    from scheduler.dispatcher import Dispatcher
    from scheduler.messages import GenerateReq, encode
    ids, params = list(range(1000)), SamplingParams(max_new_tokens=16)
    out = {}
    for n in rank_counts:
        with live_board(n) as board:
            d = Dispatcher(board, 0, method, stale_ns=FOREVER_NS)

            def one():
                rank = d.pick(len(ids))
                encode(GenerateReq(rid="r", input_ids=ids, sampling_params=params,
                                   dispatcher_id=0, counted_tokens=len(ids),
                                   arrival_time=time.time()))
                return rank
            out[str(n)] = median_us(one, calls, 9)
    return out


def with_lockstep(scenarios: list[Scenario], mode: str) -> list[Scenario]:
    """``--lockstep``: each scenario's own setting ("scenario"), or "on"/"off" for all
    (SGLang PR #20435's servers, for one, ran DP without DP attention: ``variable-length`` with
    ``off`` is that configuration)."""
    if mode == "scenario":
        return scenarios
    if mode not in ("on", "off"):
        raise ValueError(f"--lockstep must be scenario, on or off; got {mode!r}")
    return [dataclasses.replace(s, lockstep=mode == "on") for s in scenarios]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS),
                   choices=list(SCENARIOS),
                   help="scenarios to run (default: %(default)s, the published SGLang "
                        "runs' shapes)")
    p.add_argument("--executor", choices=("real", "sim"), default="sim",
                   help="sim: the simulated accelerator (--sim-profile); real: the tiny model "
                        "on this machine")
    p.add_argument("--sim-profile", type=sim_profile, default=DEFAULT_SIM_PROFILE,
                   help="--executor sim: a name in sim/profiles/ or a profile file")
    p.add_argument("--sim-time-scale", type=parse_time_scale, default="auto",
                   help="--executor sim: steps take this many times their modelled time "
                        "(engine.serve --sim-time-scale; figures stay in simulated time, a run "
                        "takes that much longer); auto: 1 up to %d rank processes per core, "
                        "more above" % PROCESSES_PER_CORE)
    p.add_argument("--ranks", nargs="+", type=rank_count, default=None,
                   help="rank counts (default: 4; --executor real: 2)")
    p.add_argument("--quick", action="store_true", help="the reduced set, < 3 minutes")
    p.add_argument("--lockstep", choices=("scenario", "on", "off"), default="scenario",
                   help="--executor sim: --sim-lockstep as each scenario says, or on/off for "
                        "all of them")
    p.add_argument("--dispatch-ranks", nargs="*", type=rank_count, default=[4, 8, 16, 32, 64],
                   help="rank counts at which to time Dispatcher.pick + encoding in this "
                        "process (us; no servers); none given: skip")
    p.add_argument("--out", default="out/compare",
                   help="folder for the report, plots, timelines and server logs")
    p.add_argument("--json", default=None,
                   help="write every figure here (default: OUT/summary.json)")
    p.add_argument("--seed", type=int, default=1, help="seed of prompts, lengths and arrivals")
    return p


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for flags the executor would ignore or cannot run."""
    if args.executor == "real":
        for flag, value, default in (("--sim-time-scale", args.sim_time_scale, "auto"),
                                     ("--sim-profile", args.sim_profile, DEFAULT_SIM_PROFILE),
                                     ("--lockstep", args.lockstep, "scenario")):
            if value != default and not (flag == "--sim-time-scale" and value == 1.0):
                parser.error(f"{flag} needs --executor sim (--executor real ignores it)")
        if args.ranks and max(args.ranks) > 4:
            parser.error("--executor real runs at most 4 ranks here (2 cores): "
                         "--ranks too large for --executor real")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    ranks = args.ranks or ([2] if args.executor == "real" else [4])
    args.json = out_folder(parser, args, "summary.json")
    scenarios = with_lockstep(get_scenarios(args.scenarios, args.quick), args.lockstep)
    if args.executor == "real":
        scenarios = [s.for_real() for s in scenarios]
    total = sum(len(s.methods) * len(s.fractions) for s in scenarios) * len(ranks)
    results = []
    started = time.time()
    # The probe first: it starts no server, and a failure there loses no run.
    probe = dispatch_probe(args.dispatch_ranks) if args.dispatch_ranks else {}
    try:
        with tqdm(total=total, desc="compare runs", file=sys.stderr) as bar:
            for s in scenarios:
                for n in ranks:
                    results.append(run_scenario(s, n, args, bar))
    except KeyboardInterrupt:  # each server was stopped by its ``with`` block
        if not results:
            return interrupted("no scenario finished; nothing written")
        write_reports(results, probe, args, time.time() - started)
        return interrupted(f"{len(results)} finished scenario run(s) written to {args.json} "
                           f"and {args.out}/report.md")
    summary = write_reports(results, probe, args, time.time() - started)
    print(summary)
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    raise SystemExit(main())
