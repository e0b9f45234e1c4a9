"""``python -m bench.compare.pool``: several ``bench.compare`` runs (one per seed) as one table.

One run's mean TTFT moves with its prompt set, and ``follow_bootstrap_room``'s also with
the rooms drawn (prefill-heavy at 1.0x capacity: 0.33x to 0.65x over seeds 1-5), so a
target on a mean is read on the pooled runs:

    for s in 1 2 3 4 5; do python -m bench.compare --scenarios prefill-heavy --seed $s \\
        --out out/ph-seed$s; done
    python -m bench.compare.pool out/ph-seed1 out/ph-seed2 out/ph-seed3 out/ph-seed4 out/ph-seed5

Each input is a ``bench.compare`` output folder (its ``summary.json``) or a summary file.
Runs of the same scenario, rank count and shape are pooled per method and rate: mean
TTFT and TPOT weighted by completed requests (the mean over every successful request of
every run), output throughput and offered request rate averaged, failed requests summed;
P99s are not pooled. The table has ``bench.compare``'s layout, plus each method's per-run
ratio to the baseline (min-max, and with two runs or more the 95% interval of its mean,
Student's t, under ``ci95``); a run without a mean TTFT on either side is left out of
those, and counted under ``spread_dropped``. The headline JSON keys are
``bench.compare``'s, computed on the pooled figures, with ``failed`` naming the keys
read on runs with failed requests. An input run in which no request succeeded adds
nothing to a pooled mean: each one is named in a warning line (and under ``empty_runs``).

Pooled runs must be independent samples of one thing: the same input twice, two runs of
one ``--seed`` (the same prompts and arrivals), and runs of another executor, simulation
profile or ``--sim-time-scale`` are refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench.cli import DefaultsHelpFormatter, writable_file
from bench.compare.report import (failed_section, headline, method_run, scenario_table,
                                   ttft_figures)
from bench.stats import mean_ci95

# What must match for two runs to be pooled.
SHAPE = ("scenario", "ranks", "baseline", "methods", "fractions", "input_len", "output_len",
         "range_ratio", "pd", "pd_balanced", "decode_ranks", "lockstep", "ttft_output_len",
         "max_concurrency", "sim_time_scale")
# ...and for the runs' summaries to be pooled at all (the same hardware, real or simulated).
SERVER = ("executor", "sim_profile")
WEIGHTED = ("mean_ttft_ms", "mean_tpot_ms")
AVERAGED = ("output_throughput", "request_rate")


class PoolError(ValueError):
    """Inputs that cannot be pooled (missing, unreadable or of different shapes)."""


def summary_file(path: str) -> str:
    """The summary file an input names (a ``bench.compare`` --out folder or the file)."""
    return os.path.join(path, "summary.json") if os.path.isdir(path) else path


def check_independent(sources: list[str], summaries: list[dict]) -> None:
    """PoolError when two inputs are one run (the same file) or hold runs of one seed
    that would be pooled together (the same scenario and ranks: the same prompts and
    arrivals, one sample counted twice)."""
    seen: dict[str, str] = {}
    for source in sources:
        real = os.path.realpath(summary_file(source))
        if real in seen:
            raise PoolError(f"{source} and {seen[real]} are the same run; pool each run once")
        seen[real] = source
    seen_seeds: dict[tuple, str] = {}  # (scenario, ranks, seed): runs pooled together
    for source, summary in zip(sources, summaries):
        seed = summary.get("seed")
        if seed is None:
            continue
        for r in summary["scenarios"]:
            key = (r["scenario"], r["ranks"], seed)
            if key in seen_seeds and seen_seeds[key] != source:
                raise PoolError(f"{source} and {seen_seeds[key]} both ran {r['scenario']} at "
                                f"{r['ranks']} ranks with --seed {seed} (the same prompts and "
                                "arrivals): pool runs of different seeds")
            seen_seeds[key] = source


def load_summary(path: str) -> dict:
    file = summary_file(path)
    try:
        with open(file) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        raise PoolError(f"{file}: not a bench.compare summary ({e})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("scenarios"), list):
        raise PoolError(f"{file}: not a bench.compare summary (no 'scenarios' list)")
    return summary


def _pool_runs(runs: list[dict], fraction: float) -> dict:
    """One pooled run from the same method and rate of several runs; ``failed`` sums
    theirs (None where no input recorded it)."""
    done = [r for r in runs if r.get("completed")]
    total = sum(r["completed"] for r in done)
    counted = [r["failed"] for r in runs if r.get("failed") is not None]
    out: dict = {"fraction": fraction, "completed": total, "pooled_runs": len(runs),
                 "failed": sum(counted) if counted else None}
    for key in WEIGHTED:
        have = [r for r in done if r.get(key) is not None]
        n = sum(r["completed"] for r in have)
        out[key] = sum(r[key] * r["completed"] for r in have) / n if n else None
    for key in AVERAGED:
        have = [r[key] for r in runs if r.get(key) is not None]
        out[key] = sum(have) / len(have) if have else None
    return out


def _empty_runs(runs: list[dict], sources: list[str], method: str, frac: float,
                probe: bool) -> list[dict]:
    """The runs (or TTFT passes) in which no request succeeded: they add nothing to a
    pooled mean, which then stands on the other inputs alone."""
    empty = []
    for run, source in zip(runs, sources):
        parts = [("run", run)] + ([("TTFT pass", ttft_figures(run))] if probe else [])
        for part, figures in parts:
            if not figures.get("completed"):
                empty.append({"source": source, "method": method, "fraction": frac,
                              "part": part, "failed": figures.get("failed")})
    return empty


def pool(summaries: list[dict], sources: list[str] | None = None) -> list[dict]:
    """The pooled results, one per (scenario, ranks), in the order first seen.
    ``sources`` names the inputs in ``empty_runs`` (default "input 1", ...)."""
    sources = sources or [f"input {i + 1}" for i in range(len(summaries))]
    for summary, source in zip(summaries[1:], sources[1:]):
        diff = [k for k in SERVER if summary.get(k) != summaries[0].get(k)]
        if diff:
            raise PoolError(f"{source} and {sources[0]} differ in {', '.join(diff)}; pool "
                            "runs of one server (only --seed may differ)")
    groups: dict[tuple, list[dict]] = {}
    origin: dict[tuple, list[str]] = {}
    for summary, source in zip(summaries, sources):
        for r in summary["scenarios"]:
            groups.setdefault((r["scenario"], r["ranks"]), []).append(r)
            origin.setdefault((r["scenario"], r["ranks"]), []).append(source)
    pooled = []
    for (name, ranks), results in groups.items():
        first = results[0]
        for r in results[1:]:
            diff = [k for k in SHAPE if r.get(k) != first.get(k)]
            if diff:
                raise PoolError(f"{name} at {ranks} ranks: runs differ in {', '.join(diff)}; "
                                "pool runs of one shape (only --seed may differ)")
        merged = {k: first.get(k) for k in SHAPE}
        merged.update(prompts=sum(r.get("prompts") or 0 for r in results),
                      simulated=any(r.get("simulated") for r in results),
                      pooled_runs=len(results), runs={}, spread={}, ci95={},
                      spread_dropped={}, empty_runs=[])
        base = first["baseline"]
        for m in first["methods"]:
            for frac in first["fractions"]:
                runs = [method_run(r, m, frac) for r in results]
                if any(run is None for run in runs):
                    continue
                run = _pool_runs(runs, frac)
                probe = bool(first.get("ttft_output_len"))
                if probe:
                    run["ttft_pass"] = _pool_runs([ttft_figures(x) for x in runs], frac)
                merged["runs"].setdefault(m, []).append(run)
                merged["empty_runs"] += _empty_runs(runs, origin[(name, ranks)], m, frac, probe)
                if m == base:
                    continue
                ratios = [a / b for x, r in zip(runs, results)
                          if (a := ttft_figures(x).get("mean_ttft_ms"))
                          and (b := ttft_figures(method_run(r, base, frac)).get("mean_ttft_ms"))]
                if len(ratios) < len(runs):  # a side without a figure: say so, not a smaller n
                    merged["spread_dropped"][f"{m}@{frac:g}"] = len(runs) - len(ratios)
                if ratios:
                    merged["spread"][f"{m}@{frac:g}"] = [min(ratios), max(ratios)]
                if len(ratios) > 1:
                    merged["ci95"][f"{m}@{frac:g}"] = mean_ci95(ratios)
        pooled.append(merged)
    return pooled


def report(pooled: list[dict], sources: list[str]) -> tuple[str, dict]:
    simulated = any(r["simulated"] for r in pooled)
    parts = [f"# bench.compare.pool{' (simulated)' if simulated else ''}: {len(sources)} runs pooled",
             "", "sources: " + ", ".join(sources), ""]
    for r in pooled:
        parts += [f"## {r['scenario']}, {r['ranks']} ranks: {r['pooled_runs']} runs, "
                  f"{r['prompts']} prompts per method and rate", "",
                  *empty_run_warnings(r),
                  "mean TTFT/TPOT: over every successful request of every run (ms); offered "
                  "req/s and out tok/s: the runs' average; failed: the runs' sum; P99: not "
                  "pooled", "", scenario_table(r), "",
                  f"one run's mean TTFT over {r['baseline']} (min-max; mean's 95% interval): "
                  + ", ".join(_spread(r, k) for k in {**r["spread"], **r["spread_dropped"]}), ""]
    summary = {**headline(pooled, simulated), "sources": sources, "scenarios": pooled}
    parts += ["## headline (pooled)", "", "```", json.dumps(
        {k: v for k, v in summary.items() if k != "scenarios"}, indent=1), "```"]
    parts += failed_section(summary)
    return "\n".join(parts), summary


def empty_run_warnings(r: dict) -> list[str]:
    """A warning line per input run of ``r`` in which no request succeeded."""
    lines = [f"warning: {e['source']}: {e['method']} at {e['fraction']:g}x ({e['part']}) had "
             f"no successful request ({_count(e['failed'])} failed); the pooled figures of "
             f"{e['method']} at {e['fraction']:g}x stand on the other runs"
             for e in r.get("empty_runs", [])]
    return [*lines, ""] if lines else []


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)


def _spread(r: dict, key: str) -> str:
    """``key``'s min-max of the per-run ratios, their interval, and the runs left out."""
    text = f"{key} " + ("{:.2f}-{:.2f}".format(*r["spread"][key]) if key in r["spread"] else "-")
    if key in r.get("ci95", {}):
        text += "; {:.2f}-{:.2f}".format(*r["ci95"][key])
    if dropped := r.get("spread_dropped", {}).get(key):
        text += f" ({dropped} run(s) without a mean TTFT left out)"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare.pool",
                                description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="bench.compare --out folders or summary files")
    p.add_argument("--json", type=writable_file, help="write the pooled figures here")
    args = p.parse_args(argv)
    try:
        summaries = [load_summary(x) for x in args.inputs]
        check_independent(args.inputs, summaries)
        text, summary = report(pool(summaries, args.inputs), args.inputs)
    except PoolError as e:
        print(f"bench.compare.pool: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
