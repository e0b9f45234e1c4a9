"""A lower bound on the mean TTFT any router can reach on ``bench.compare.cache``'s
shared-prefix load, from the simulated profile's costs and the run's own arrivals.

    python -m bench.models.cache_bound --ranks 4 --rate 4.656 --seeds 1 101 201 301 401

It rebuilds the prompts and arrival times a ``bench.compare.cache`` repeat sends (same
scenario, seed and rate; the rate is in that run's ``summary.json``) and bounds, in the
profile's cost model (``sim.executor``), what any placement on ``--ranks`` independent
ranks with this engine must cost, with or without prefixes shared across ranks:

- a group's first request finds its system prompt in no cache: it computes the whole
  prompt, a miss (work ``p``, the prefill of its tokens from position 0, in a step that
  also costs ``base_s``);
- misses queue: the k-th miss to start (ordering every miss by when its own work
  starts, as if each step ran its prompts one after the other) starts no earlier than
  ``base_s`` after the k-th release, and no earlier than ``p`` after the (k - ranks)-th
  (of any ranks + 1 of them two share a rank, and a rank does one's work after the
  other's). Starting every miss at that earliest time is a schedule, so the sum of their
  completions is at least its sum (equal work: no order does better);
- any other request costs at least its own step alone: ``base_s`` plus its uncached
  tokens' prefill over the cached system prompt, and if it arrives before its group's
  first request could have finished (arrival + the miss alone), it waits for that or
  computes the prompt itself, whichever is less.

What it leaves out, so the true optimum is higher: the steps every hit and decode add to
its rank (a request arriving mid-step waits for the step to end), hits queued behind
misses, and evictions. The bound counts the dataset's token lengths (the served text
prompts tokenize to the same counts with the tiny tokenizer; a BOS token only adds work).
"""

from __future__ import annotations

import argparse
import json

from bench.cli import DefaultsHelpFormatter, positive_float, positive_int, sim_profile
from bench.client.dataset import arrival_offsets
from bench.client.serving import make_requests
from bench.compare.cache import SCENARIOS
from sim.executor import load_profile


def prefill_s(profile, tokens: int, start: int) -> float:
    """Work of prefilling ``tokens`` prompt tokens after ``start`` cached ones (no base)."""
    return profile.prefill_token_s * tokens + profile.prefill_attn_s * tokens * (start + tokens / 2)


def bound(profile, ranks: int, rate: float, seed: int, kv_tokens: int,
          prompts_per_group: int | None = None) -> dict:
    scenario = SCENARIOS["shared-prefix"].fitted(kv_tokens, None, prompts_per_group)
    cfg = scenario.config(ranks, "http://unused", rate, seed)
    requests = make_requests(cfg)
    offsets = arrival_offsets(len(requests), rate, seed)
    system_len = scenario.dataset["gsp_system_prompt_len"]
    base = profile.base_s
    first_at: dict = {}
    misses, hits = [], []  # (arrival, prompt tokens)
    for req, at in sorted(zip(requests, offsets), key=lambda x: x[1]):
        group = req.prompt[:system_len]
        if group not in first_at:
            first_at[group] = (at, req.prompt_len)
            misses.append((at, req.prompt_len))
        else:
            hits.append((at, req.prompt_len, first_at[group]))
    p = min(prefill_s(profile, n, 0) for _, n in misses)
    starts: list[float] = []
    for k, (release, _) in enumerate(misses):  # already in release order
        s = release + base
        if k >= ranks:
            s = max(s, starts[k - ranks] + p)
        starts.append(s)
    miss_sum = sum(s + p - r for s, (r, _) in zip(starts, misses))
    miss_alone = sum(base + prefill_s(profile, n, 0) for _, n in misses)
    hit_sum = 0.0
    for at, n, (first, first_len) in hits:
        alone_hit = base + prefill_s(profile, n - system_len, system_len)
        alone_miss = base + prefill_s(profile, n, 0)
        ready = first + base + prefill_s(profile, first_len, 0)
        hit_sum += min(alone_miss, alone_hit + max(0.0, ready - at))
    total = len(misses) + len(hits)
    return {"seed": seed, "rate": rate, "requests": total, "misses": len(misses),
            "mean_ttft_bound_ms": round((miss_sum + hit_sum) / total * 1e3, 1),
            "mean_ttft_no_queueing_ms": round((miss_alone + hit_sum) / total * 1e3, 1),
            "miss_queueing_ms_of_mean": round((miss_sum - miss_alone) / total * 1e3, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.models.cache_bound",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--ranks", type=positive_int, default=4, help="data-parallel ranks")
    ap.add_argument("--request-rate", "--rate", dest="rate", type=positive_float, required=True,
                    help="req/s: the run's request rate at 0.9x (request_rate in its "
                         "summary.json)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1],
                    help="the repeats' seeds: bench.compare.cache --seed S gives S, S+100, ...")
    ap.add_argument("--sim-profile", type=sim_profile, default="seed-qwen3-235b-dp4",
                    help="the simulated accelerator: a name in sim/profiles/ or a profile file")
    ap.add_argument("--gsp-prompts-per-group", type=positive_int, default=None,
                    help="questions per system prompt, as the run had (default: "
                         "bench.compare.cache's, 4)")
    ap.add_argument("--compare", type=positive_float, nargs="*", default=None,
                    help="measured mean TTFTs (ms), one per seed: prints bound / measured")
    args = ap.parse_args(argv)
    profile = load_profile(args.sim_profile)
    rows = [bound(profile, args.ranks, args.rate, s, profile.max_total_num_tokens,
                  args.gsp_prompts_per_group) for s in args.seeds]
    if args.compare:
        if len(args.compare) != len(rows):
            ap.error("--compare needs one figure per seed")
        for row, measured in zip(rows, args.compare):
            row["measured_ms"] = measured
            row["bound_over_measured"] = round(row["mean_ttft_bound_ms"] / measured, 3)
    for row in rows:
        print(json.dumps(row))
    if args.compare:
        ratios = [r["bound_over_measured"] for r in rows]
        print(f"mean bound / measured over the seeds: {sum(ratios) / len(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
