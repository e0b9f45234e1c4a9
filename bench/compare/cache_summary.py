"""What ``bench.compare.cache`` prints and writes: each run's line, the issue's keys
computed from the runs (``headline``), and the summary file.

A run is a ``bench.client.serving`` result kept with its ``fraction`` (``LOAD`` of round
robin's capacity, or ``SATURATED``) under its method's name (``SMG`` for the gateway).
"""

from __future__ import annotations

import json
import time

from bench.stats import mean_ci95

LOAD = 0.9
SATURATED = "saturated"  # rate inf, a bounded number in flight per rank
SMG = "smg"  # the gateway as a method name


def _ms(value: float | None) -> str:
    """A figure in ms, "-" where there is none (no hit request: no hit TTFT)."""
    return "-" if value is None else f"{value:.0f}"


def describe(run: dict) -> str:
    """One run's line: TTFTs, throughput and hit rate; a missing figure prints as "-"."""
    tput, hit = run.get("request_throughput"), run.get("cache_hit_rate")
    return (f"{run['fraction']}: ttft {_ms(run.get('mean_ttft_ms'))} ms "
            f"(p99 {_ms(run.get('p99_ttft_ms'))}; hits {_ms(run.get('mean_ttft_hit_ms'))}, "
            f"misses {_ms(run.get('mean_ttft_miss_ms'))}), "
            f"{'-' if tput is None else f'{tput:.2f}'} req/s completed, "
            f"hit {'-' if hit is None else f'{hit:.2f}'}")


def headline(results: list[dict]) -> dict:
    """The issue's keys (``None`` where a scenario or method did not run)."""
    def runs(scenario, method, frac=LOAD) -> list[dict]:
        """The method's runs at ``frac``, in repeat order (one seed each)."""
        return [x for r in results if r["scenario"] == scenario
                for x in r["runs"].get(method, []) if x["fraction"] == frac]

    def ratios(scenario, a, b, key, frac=LOAD) -> list[float]:
        """``a``'s figure over ``b``'s, one per repeat (the same prompts for both)."""
        return [x[key] / y[key] for x, y in zip(runs(scenario, a, frac), runs(scenario, b, frac))
                if x.get(key) and y.get(key)]

    def spread(scenario) -> list[float]:
        """Max over mean of the requests each rank took, one per ``cache_aware`` run."""
        return [x["max_over_mean_requests"] for x in runs(scenario, "cache_aware")
                if x.get("max_over_mean_requests")]

    found = {
        "shared_prefix_ttft_ratio_rr": ratios("shared-prefix", "cache_aware", "round_robin", "mean_ttft_ms"),
        "shared_prefix_ttft_ratio_smg": ratios("shared-prefix", "cache_aware", SMG, "mean_ttft_ms"),
        "shared_prefix_throughput_gain": [g - 1 for g in ratios(
            "shared-prefix", "cache_aware", "round_robin", "request_throughput", SATURATED)],
        "shared_prefix_p99_ratio_tt": ratios("shared-prefix", "cache_aware", "total_tokens", "p99_ttft_ms"),
        "hot_prefix_max_over_mean": spread("hot-prefix"),
        "zipf_prefix_ttft_ratio_rr": ratios("zipf-prefix", "cache_aware", "round_robin", "mean_ttft_ms"),
        "zipf_prefix_ttft_ratio_smg": ratios("zipf-prefix", "cache_aware", SMG, "mean_ttft_ms"),
        "zipf_prefix_p99_ratio_tt": ratios("zipf-prefix", "cache_aware", "total_tokens", "p99_ttft_ms"),
        "zipf_prefix_max_over_mean": spread("zipf-prefix"),
        "no_reuse_ttft_ratio_tt": ratios("no-reuse", "cache_aware", "total_tokens", "mean_ttft_ms"),
        "no_reuse_ttft_ratio_pt": ratios("no-reuse", "cache_aware", "prefill_tokens", "mean_ttft_ms"),
        "multi_turn_ttft_ratio_rr": ratios("multi-turn", "cache_aware", "round_robin", "mean_ttft_ms"),
        "multi_turn_ttft_ratio_smg": ratios("multi-turn", "cache_aware", SMG, "mean_ttft_ms"),
    }
    # With --repeats N: the mean over the repeats, and its 95% interval in "ci95".
    keys = {k: sum(v) / len(v) if v else None for k, v in found.items()}
    ci95 = {k: mean_ci95(v) for k, v in found.items() if len(v) > 1}
    return {
        **keys,
        **({"ci95": ci95, "per_repeat": {k: found[k] for k in ci95}} if ci95 else {}),
        "cache_hit_rate": {r["scenario"]: {m: mean_of(x.get("cache_hit_rate") for x in runs_
                                                      if x["fraction"] == LOAD)
                                           for m, runs_ in r["runs"].items()} for r in results},
        "kv_tokens_per_rank": {r["scenario"]: r.get("kv_tokens_per_rank") for r in results},
    }


def mean_of(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_summary(path: str, by_ranks: dict, args, started: float) -> dict:
    first = next(iter(by_ranks.values()))
    summary = {**{k: v for k, v in first.items() if k != "results"},
               "simulated": args.executor == "sim", "pd": args.pd,
               "cross_rank_prefix_cache": args.cross_rank_prefix_cache,
               "ranks": [int(n) for n in by_ranks], "by_ranks": by_ranks,
               "elapsed_s": time.time() - started}
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary
