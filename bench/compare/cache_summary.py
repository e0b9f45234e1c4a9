"""What ``bench.compare.cache`` prints and writes: each run's line, the issue's keys
computed from the runs (``headline``), and the summary file.

A run is a ``bench.client.serving`` result kept with its ``fraction`` (``LOAD`` of round
robin's capacity, or ``SATURATED``) under its method's name (``SMG`` for the gateway).
Its figures are over its successful requests (None where there is none); its line and
its record give ``failed``, and a key read on runs with failed requests, or on fewer
repeats than ran, is flagged (``headline``'s ``failed`` and ``dropped_pairs``,
``flag_lines``).
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
    """One run's line: TTFTs, throughput, hit rate and failed requests; a missing figure
    prints as "-"."""
    tput, hit = run.get("request_throughput"), run.get("cache_hit_rate")
    failed = run.get("failed")
    return (f"{run['fraction']}: ttft {_ms(run.get('mean_ttft_ms'))} ms "
            f"(p99 {_ms(run.get('p99_ttft_ms'))}; hits {_ms(run.get('mean_ttft_hit_ms'))}, "
            f"misses {_ms(run.get('mean_ttft_miss_ms'))}), "
            f"{'-' if tput is None else f'{tput:.2f}'} req/s completed, "
            f"hit {'-' if hit is None else f'{hit:.2f}'}, "
            f"{'-' if failed is None else failed} failed")


# The keys, in the summary's order: (key, scenario, method, baseline, figure,
# fraction): the method's figure over the baseline's, one per repeat (the same prompts for
# both); with no baseline, the method's figure itself (max over mean of the requests each
# rank took).
TTFT, P99, THROUGHPUT, SPREAD = ("mean_ttft_ms", "p99_ttft_ms", "request_throughput",
                                 "max_over_mean_requests")
KEYS = (
    ("shared_prefix_ttft_ratio_rr", "shared-prefix", "cache_aware", "round_robin", TTFT, LOAD),
    ("shared_prefix_ttft_ratio_smg", "shared-prefix", "cache_aware", SMG, TTFT, LOAD),
    ("shared_prefix_throughput_gain", "shared-prefix", "cache_aware", "round_robin", THROUGHPUT,
     SATURATED),
    ("shared_prefix_p99_ratio_tt", "shared-prefix", "cache_aware", "total_tokens", P99, LOAD),
    ("hot_prefix_max_over_mean", "hot-prefix", "cache_aware", None, SPREAD, LOAD),
    ("zipf_prefix_ttft_ratio_rr", "zipf-prefix", "cache_aware", "round_robin", TTFT, LOAD),
    ("zipf_prefix_ttft_ratio_smg", "zipf-prefix", "cache_aware", SMG, TTFT, LOAD),
    ("zipf_prefix_p99_ratio_tt", "zipf-prefix", "cache_aware", "total_tokens", P99, LOAD),
    ("zipf_prefix_max_over_mean", "zipf-prefix", "cache_aware", None, SPREAD, LOAD),
    ("no_reuse_ttft_ratio_tt", "no-reuse", "cache_aware", "total_tokens", TTFT, LOAD),
    ("no_reuse_ttft_ratio_pt", "no-reuse", "cache_aware", "prefill_tokens", TTFT, LOAD),
    ("multi_turn_ttft_ratio_rr", "multi-turn", "cache_aware", "round_robin", TTFT, LOAD),
    ("multi_turn_ttft_ratio_smg", "multi-turn", "cache_aware", SMG, TTFT, LOAD),
)
GAINS = ("shared_prefix_throughput_gain",)  # the ratio less 1


def headline(results: list[dict]) -> dict:
    """The issue's keys (``None`` where a scenario or method did not run, or no repeat
    has a figure on every side). Each key's figures are over successful requests:
    ``failed`` names the keys whose runs had failed requests, with each side's count
    over the repeats; ``dropped_pairs`` the keys that lost repeats for a missing figure
    (no successful request), with how many of how many."""
    failed: dict[str, dict[str, int]] = {}
    dropped: dict[str, dict[str, int]] = {}

    def runs(scenario, method, frac=LOAD) -> list[dict]:
        """The method's runs at ``frac``, in repeat order (one seed each)."""
        return [x for r in results if r["scenario"] == scenario
                for x in r["runs"].get(method, []) if x["fraction"] == frac]

    def per_repeat(name, scenario, method, baseline, key, frac) -> list[float]:
        """The key's figure per repeat that has ``key`` on every side; the repeats
        without are counted in ``dropped``, every repeat's failed requests in ``failed``."""
        sides = (method,) if baseline is None else (method, baseline)
        repeats = list(zip(*(runs(scenario, m, frac) for m in sides)))
        counts = {m: sum(rep[i].get("failed") or 0 for rep in repeats)
                  for i, m in enumerate(sides)}
        if any(counts.values()):
            failed[name] = counts
        # A method's figure may be 0 (a saturated run that completed nothing: a gain of
        # -1, not a missing repeat); a baseline's must not be, it divides.
        kept = [rep for rep in repeats
                if rep[0].get(key) is not None and (baseline is None or rep[1].get(key))]
        if len(kept) < len(repeats):
            dropped[name] = {"dropped": len(repeats) - len(kept), "of": len(repeats)}
        return [rep[0][key] / rep[1][key] if baseline else rep[0][key] for rep in kept]

    found = {spec[0]: per_repeat(*spec) for spec in KEYS}
    for name in GAINS:
        found[name] = [g - 1 for g in found[name]]
    # With --repeats N: the mean over the repeats, and its 95% interval in "ci95".
    keys = {k: sum(v) / len(v) if v else None for k, v in found.items()}
    ci95 = {k: mean_ci95(v) for k, v in found.items() if len(v) > 1}
    return {
        **keys,
        **({"ci95": ci95, "per_repeat": {k: found[k] for k in ci95}} if ci95 else {}),
        "failed": failed, "dropped_pairs": dropped,
        "cache_hit_rate": {r["scenario"]: {m: mean_of(x.get("cache_hit_rate") for x in runs_
                                                      if x["fraction"] == LOAD)
                                           for m, runs_ in r["runs"].items()} for r in results},
        "kv_tokens_per_rank": {r["scenario"]: r.get("kv_tokens_per_rank") for r in results},
    }


def flag_lines(h: dict) -> list[str]:
    """A line per key of ``headline`` ``h`` read on runs with failed requests or on fewer
    repeats than were run: the figure is kept, and says what it stands on."""
    lines = []
    for name, counts in h.get("failed", {}).items():
        sides = ", ".join(f"{m} {n}" for m, n in counts.items())
        lines.append(f"{name} {_fig(h.get(name))} ({sum(counts.values())} failed: {sides}; "
                     f"over the successful requests only)")
    for name, d in h.get("dropped_pairs", {}).items():
        lines.append(f"{name} {_fig(h.get(name))}: {d['dropped']} of {d['of']} repeat(s) "
                     f"dropped for a missing figure (no successful request); the mean is over "
                     f"the other {d['of'] - d['dropped']}")
    return lines


def _fig(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


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
