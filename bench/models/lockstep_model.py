"""A queueing model of ranks that step in lockstep: which load signal balances them best.

No processes, no board: a discrete-event model of N ranks whose every step lasts as
long as the slowest rank's (DP attention with expert parallelism; ``--sim-lockstep``),
with the step costs of a simulation profile (``sim.executor``). It runs in
under a minute, so it can average over many prompt sets where one ``bench.compare`` run
takes minutes; it checks the engine's design, it does not replace the benchmark.

Prefill: requests arrive (Poisson, at fractions of the capacity a saturating burst
measures, as ``bench.compare`` does) and join one rank's FIFO queue; each step a rank
takes up to ``chunk`` prompt tokens (chunked, oldest first); a request's TTFT ends with
the step that computes its last prompt token. Signals compared:

- ``round_robin``;
- ``total_tokens (in flight)``: uncomputed prompt tokens including the chunk the rank
  is computing now (what the board shows for independent ranks, and showed for
  lockstep ranks before they published at step start);
- ``total_tokens (step end)``: the same without the chunk in flight (what lockstep
  ranks publish now);
- ``total_requests``: requests held (lockstep: those finishing in the step in flight
  excluded, as lockstep ranks publish);
- ``follow_bootstrap_room``: ``bootstrap_room % ranks`` with random 63-bit rooms, as a
  gateway draws them (prefill-heavy's baseline).

Picks go through the engine's own ``scheduler.policy`` functions, so ties rotate as
they do in the dispatcher (with fixed prompt lengths most picks are ties).

The same prefill table is printed for ranks that step on their own, where the chunk in
flight does delay a new request (the contrast case). Each table gives the engine's
signal over round_robin and over follow_bootstrap_room as the ratio of the mean TTFTs
and one set's min-max; ``--input-len 3500 --range-ratio 1`` is prefill-heavy's shape.

Decode: requests arrive with prompt KV and an output length, are admitted while the
rank's pool holds prompt + output (as the engine reserves), and decode one token per
step; TPOT = (end - start) / (output - 1). Signals: ``round_robin``, ``total_requests``,
``total_tokens`` (KV held + parked prompts, as the decode board counts), and
``ideal (bound)``: requests and KV split evenly over the ranks at every step, as if
they moved between ranks for free, which no placement at arrival can beat; with the
seed profile it caps what balancing can take off lockstep TPOT.

    python -m bench.models.lockstep_model               # three tables, 4 ranks, 20 prompt sets
    python -m bench.models.lockstep_model --reps 40 --chunk 4096
    python -m bench.models.lockstep_model --input-len 3500 --range-ratio 1 --skip-decode --reps 40 \
        --fractions 0.6 0.8 0.9 1.0
"""

from __future__ import annotations

import argparse
import heapq
import json
from collections import deque

import numpy as np

from bench.cli import (DefaultsHelpFormatter, positive_float, positive_int, sim_profile,
                       unit_fraction, writable_file)
from bench.client.dataset import MAX_ROOM
from scheduler import policy
from scheduler.policy import RotationState
from sim.executor import SimProfile, load_profile

IN_FLIGHT, STEP_END = "total_tokens (in flight)", "total_tokens (step end)"
ROOM = "follow_bootstrap_room"
PREFILL_SIGNALS = ("round_robin", IN_FLIGHT, STEP_END, "total_requests", ROOM)
IDEAL = "ideal (bound)"
DECODE_SIGNALS = ("round_robin", "total_requests", "total_tokens", IDEAL)


def _chunk_cost(p: SimProfile, start: int, n: int) -> float:
    return p.prefill_token_s * n + p.prefill_attn_s * n * (start + n / 2)


def _pick(signal: str, state: RotationState, left: np.ndarray, in_flight: np.ndarray,
          requests, room: int) -> int:
    """The rank ``signal`` picks, with the engine's own policy functions (ties rotate;
    total_tokens breaks ties by requests)."""
    ranks = len(left)
    alive = (True,) * ranks
    reqs = [int(x) for x in requests]
    if signal == "round_robin":
        return policy.round_robin(alive, state)
    if signal == ROOM:
        return policy.follow_bootstrap_room(int(room), alive)
    if signal == IN_FLIGHT:
        return policy.total_tokens([int(x) for x in left], reqs, alive, state)
    if signal == STEP_END:
        return policy.total_tokens([int(x) for x in left - in_flight], reqs, alive, state)
    if signal == "total_requests":
        return policy.total_requests(reqs, alive, state)
    raise ValueError(f"unknown signal {signal!r}")


def _next_batch(queue: list[list[int]], chunk: int) -> list[tuple[list[int], int]]:
    """(request, tokens) of one rank's next forward: oldest first, ``chunk`` tokens."""
    budget, items = chunk, []
    for item in queue:
        if budget <= 0:
            break
        k = min(budget, item[2] - item[1])
        items.append((item, k))
        budget -= k
    return items


def _rooms(n: int, rooms: np.ndarray | None) -> np.ndarray:
    """Bootstrap rooms of ``n`` requests: as given, or random 63-bit ones (seeded) as a
    gateway draws them."""
    if rooms is None:
        return np.random.default_rng(0).integers(0, MAX_ROOM, n, dtype=np.int64)
    if len(rooms) != n:
        raise ValueError(f"{len(rooms)} rooms for {n} requests")
    return rooms


def prefill_ttft(p: SimProfile, arrivals: np.ndarray, lens: np.ndarray, ranks: int,
                 signal: str, chunk: int, rooms: np.ndarray | None = None) -> np.ndarray:
    """Per-request TTFT (s) of lockstep prefill ranks under one dispatch signal."""
    n = len(arrivals)
    rooms = _rooms(n, rooms)
    queues: list[list[list[int]]] = [[] for _ in range(ranks)]  # [request, done, length]
    left = np.zeros(ranks)  # uncomputed prompt tokens, chunk in flight included
    in_flight = np.zeros(ranks)  # tokens of the chunk each rank is computing now
    leaving = np.zeros(ranks)  # requests whose last chunk is in flight
    finish = np.zeros(n)
    t, nxt, done = 0.0, 0, 0
    state = RotationState()

    def dispatch(j: int) -> None:
        r = _pick(signal, state, left, in_flight, np.array([len(q) for q in queues]) - leaving,
                  rooms[j])
        queues[r].append([j, 0, int(lens[j])])
        left[r] += lens[j]

    while done < n:
        if not any(queues):  # idle: jump to the next arrival
            t = max(t, arrivals[nxt])
            dispatch(nxt)
            nxt += 1
            continue
        batches = []
        for r, q in enumerate(queues):
            items = _next_batch(q, chunk)
            batches.append(items)
            in_flight[r] = sum(k for _, k in items)
            leaving[r] = sum(1 for item, k in items if item[1] + k == item[2])
        end = t + p.base_s + max(sum(_chunk_cost(p, item[1], k) for item, k in items)
                                 for items in batches)
        while nxt < n and arrivals[nxt] < end:
            dispatch(nxt)
            nxt += 1
        for r, items in enumerate(batches):
            for item, k in items:
                item[1] += k
                left[r] -= k
                if item[1] == item[2]:
                    finish[item[0]] = end
                    queues[r].remove(item)
                    done += 1
        in_flight[:] = 0
        leaving[:] = 0
        t = end
    return finish - arrivals


def prefill_ttft_independent(p: SimProfile, arrivals: np.ndarray, lens: np.ndarray, ranks: int,
                             signal: str, chunk: int,
                             rooms: np.ndarray | None = None) -> np.ndarray:
    """The same without lockstep: each rank steps on its own (the contrast case)."""
    n = len(arrivals)
    rooms = _rooms(n, rooms)
    queues: list[list[list[int]]] = [[] for _ in range(ranks)]
    left, in_flight = np.zeros(ranks), np.zeros(ranks)
    batches: list[list | None] = [None] * ranks
    finish = np.zeros(n)
    # (time, 0 = arrival | 1 = step end, request | rank)
    events = [(float(a), 0, j) for j, a in enumerate(arrivals)]
    heapq.heapify(events)
    state = RotationState()

    def start(r: int, t: float) -> None:
        items = _next_batch(queues[r], chunk)
        batches[r] = items or None
        in_flight[r] = sum(k for _, k in items)
        if items:
            heapq.heappush(events, (t + p.base_s + sum(_chunk_cost(p, item[1], k)
                                                       for item, k in items), 1, r))

    while events:
        t, kind, x = heapq.heappop(events)
        if kind == 0:
            r = _pick(signal, state, left, in_flight, [len(q) for q in queues], rooms[x])
            queues[r].append([x, 0, int(lens[x])])
            left[r] += lens[x]
            if batches[r] is None:
                start(r, t)
        else:
            for item, k in batches[x]:
                item[1] += k
                left[x] -= k
                if item[1] == item[2]:
                    finish[item[0]] = t
                    queues[x].remove(item)
            start(x, t)
    return finish - arrivals


def decode_tpot(p: SimProfile, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray,
                ranks: int, signal: str, pool: int) -> np.ndarray:
    """Per-request TPOT (s) of lockstep decode ranks under one dispatch signal.

    ``IDEAL`` is no placement but a bound on every placement: one queue and one pool of
    ``ranks x pool`` tokens whose requests and KV are split evenly over the ranks at
    every step (a step costs ``ceil(requests / ranks)`` and ``ceil(KV / ranks)``), as if
    requests moved between ranks for free.
    """
    if len(arrivals) and int((prompts + outputs).max()) > pool:
        raise ValueError(f"a request needs {int((prompts + outputs).max())} KV tokens but the "
                         f"pool holds {pool}: it could never start")
    split = 1
    if signal == IDEAL:
        split, pool, ranks, signal = ranks, pool * ranks, 1, "round_robin"
    n = len(arrivals)
    waiting = [deque() for _ in range(ranks)]
    running: list[list[int]] = [[] for _ in range(ranks)]
    used = np.zeros(ranks)
    made = np.zeros(n, dtype=np.int64)  # tokens decoded so far
    start, end = np.zeros(n), np.zeros(n)
    t, nxt, done = 0.0, 0, 0
    state, alive = RotationState(), (True,) * ranks

    def pick() -> int:
        if signal == "round_robin":
            return policy.round_robin(alive, state)
        reqs = [len(waiting[r]) + len(running[r]) for r in range(ranks)]
        if signal == "total_requests":
            return policy.total_requests(reqs, alive, state)
        tokens = [sum(int(prompts[j] + made[j]) for j in running[r])
                  + sum(int(prompts[j]) for j in waiting[r]) for r in range(ranks)]
        return policy.total_tokens(tokens, reqs, alive, state)

    while done < n:
        while nxt < n and arrivals[nxt] <= t:
            r = pick()
            waiting[r].append(nxt)
            nxt += 1
        for r in range(ranks):
            while waiting[r] and used[r] + prompts[waiting[r][0]] + outputs[waiting[r][0]] <= pool:
                j = waiting[r].popleft()
                running[r].append(j)
                used[r] += prompts[j] + outputs[j]
                start[j] = t
        if not any(running):
            t = arrivals[nxt]
            continue
        t += max(p.base_s + p.decode_seq_s * -(-len(run) // split)
                 + p.decode_kv_s * -(-sum(int(prompts[j] + made[j]) for j in run) // split)
                 for run in running)
        for r, run in enumerate(running):
            keep = []
            for j in run:
                made[j] += 1
                if made[j] >= outputs[j] - 1:
                    end[j] = t
                    used[r] -= prompts[j] + outputs[j]
                    done += 1
                else:
                    keep.append(j)
            running[r] = keep
    return (end - start) / (outputs - 1)


def prefill_table(p: SimProfile, ranks: int, reps: int, prompts: int, fractions, chunk: int,
                  lo: int, hi: int, seed: int, lockstep: bool = True) -> dict:
    """Mean TTFT (ms) per signal and fraction over ``reps`` prompt sets, and the spread
    of the per-set ratio of the engine's total_tokens (step end with lockstep, in
    flight without) to round_robin."""
    model = prefill_ttft if lockstep else prefill_ttft_independent
    engine = STEP_END if lockstep else IN_FLIGHT
    rng = np.random.default_rng(seed)
    out = {}
    for frac in fractions:
        ttft = {s: [] for s in PREFILL_SIGNALS}
        for _ in range(reps):
            burst = rng.integers(lo, hi + 1, 4 * ranks)  # bench.compare's saturating run
            cap = len(burst) / model(p, np.zeros(len(burst)), burst, ranks,
                                     engine, chunk).max()
            lens = rng.integers(lo, hi + 1, prompts)
            arrivals = np.cumsum(rng.exponential(1 / (frac * cap), prompts))
            rooms = rng.integers(0, MAX_ROOM, prompts, dtype=np.int64)
            for s in PREFILL_SIGNALS:
                ttft[s].append(model(p, arrivals, lens, ranks, s, chunk, rooms).mean() * 1e3)
        out[str(frac)] = {"mean_ttft_ms": {s: float(np.mean(v)) for s, v in ttft.items()}}
        for base in ("round_robin", ROOM):
            ratio = np.array(ttft[engine]) / np.array(ttft[base])
            # the ratio of the mean TTFTs; the mean, min and max of the per-set ratios
            out[str(frac)][f"ratio_engine_total_tokens_{base}"] = {
                "of_means": float(np.mean(ttft[engine]) / np.mean(ttft[base])),
                "mean": float(ratio.mean()), "min": float(ratio.min()),
                "max": float(ratio.max())}
    return out


def decode_table(p: SimProfile, ranks: int, reps: int, prompts: int, rates, pool: int,
                 in_lo: int, in_hi: int, out_lo: int, out_hi: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for rate in rates:
        tpot = {s: [] for s in DECODE_SIGNALS}
        for _ in range(reps):
            ins = rng.integers(in_lo, in_hi + 1, prompts)
            outs = rng.integers(max(2, out_lo), out_hi + 1, prompts)
            arrivals = np.cumsum(rng.exponential(1 / rate, prompts))
            for s in DECODE_SIGNALS:
                tpot[s].append(decode_tpot(p, arrivals, ins, outs, ranks, s, pool).mean() * 1e3)
        out[str(rate)] = {"mean_tpot_ms": {s: float(np.mean(v)) for s, v in tpot.items()}}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.models.lockstep_model",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--sim-profile", "--profile", dest="profile", type=sim_profile,
                    default="seed-qwen3-235b-dp4",
                    help="the simulated accelerator: a name in sim/profiles/ or a profile file")
    ap.add_argument("--ranks", type=positive_int, default=4, help="data-parallel ranks")
    ap.add_argument("--reps", type=positive_int, default=20, help="prompt sets averaged per figure")
    ap.add_argument("--num-prompts", "--prompts", dest="prompts", type=positive_int, default=96,
                    help="prefill prompts per set")
    ap.add_argument("--decode-prompts", type=positive_int, default=200,
                    help="requests per decode run")
    ap.add_argument("--chunk", type=positive_int, default=16384, help="--chunked-prefill-size")
    ap.add_argument("--fractions", type=positive_float, nargs="+", default=[0.8, 0.9, 1.0],
                    help="request rates as fractions of the prefill capacity")
    ap.add_argument("--decode-rates", type=positive_float, nargs="+", default=[1.0, 2.0],
                    help="decode arrivals, req/s over all ranks")
    ap.add_argument("--pool", type=positive_int, default=None, help="decode KV pool per rank "
                    "in tokens (default: the profile's)")
    ap.add_argument("--random-input-len", "--input-len", dest="input_len", type=positive_int,
                    default=4096, help="max input length in tokens")
    ap.add_argument("--random-output-len", "--output-len", dest="output_len", type=positive_int,
                    default=2048, help="max output length in tokens")
    ap.add_argument("--random-range-ratio", "--range-ratio", dest="range_ratio",
                    type=unit_fraction, default=0.1,
                    help="lengths are uniform in [len * ratio, len]")
    ap.add_argument("--seed", type=int, default=1, help="seed of prompts, lengths and arrivals")
    ap.add_argument("--skip-decode", action="store_true", help="the prefill tables only")
    ap.add_argument("--json", type=writable_file, help="write the figures here")
    a = ap.parse_args(argv)
    p = load_profile(a.profile)
    in_lo, out_lo = int(a.input_len * a.range_ratio), int(a.output_len * a.range_ratio)
    result = {"model": "bench.models.lockstep_model (queueing model, simulated costs)",
              "profile": p.name, "ranks": a.ranks, "reps": a.reps, "chunk": a.chunk}
    for lockstep in (True, False):
        key = "prefill" if lockstep else "prefill_independent"
        result[key] = prefill_table(p, a.ranks, a.reps, a.prompts, a.fractions, a.chunk,
                                    max(1, in_lo), a.input_len, a.seed, lockstep)
        print(f"{'lockstep' if lockstep else 'independent (no lockstep)'} prefill, {a.ranks} "
              f"ranks, profile {p.name} (simulated), inputs {max(1, in_lo)}-{a.input_len}, "
              f"chunk {a.chunk}, mean TTFT (ms) over {a.reps} sets of {a.prompts} prompts")
        print(f"{'capacity':>8} | " + " | ".join(f"{s:>24}" for s in PREFILL_SIGNALS)
              + f" | {STEP_END if lockstep else IN_FLIGHT} over round_robin; over {ROOM}: "
              "ratio of the means (one set's min-max)")
        for frac, row in result[key].items():
            r = row["ratio_engine_total_tokens_round_robin"]
            b = row[f"ratio_engine_total_tokens_{ROOM}"]
            print(f"{float(frac):>7.2f}x | " + " | ".join(
                f"{row['mean_ttft_ms'][s]:>24.0f}" for s in PREFILL_SIGNALS)
                + f" | {r['of_means']:.2f} ({r['min']:.2f}-{r['max']:.2f}); "
                f"{b['of_means']:.2f} ({b['min']:.2f}-{b['max']:.2f})")
        print()
    if not a.skip_decode:
        pool = a.pool or p.max_total_num_tokens
        result["decode"] = decode_table(p, a.ranks, a.reps, a.decode_prompts, a.decode_rates,
                                        pool, max(1, in_lo), a.input_len, out_lo, a.output_len,
                                        a.seed)
        result["decode_pool"] = pool
        print(f"lockstep decode, {a.ranks} ranks, pool {pool} tokens per rank, outputs "
              f"{out_lo}-{a.output_len}, mean TPOT (ms) over {a.reps} sets of "
              f"{a.decode_prompts} prompts")
        print(f"{'req/s':>8} | " + " | ".join(f"{s:>14}" for s in DECODE_SIGNALS))
        # IDEAL: requests and KV split evenly at every step, a floor for any placement
        for rate, row in result["decode"].items():
            print(f"{float(rate):>8.2f} | " + " | ".join(
                f"{row['mean_tpot_ms'][s]:>14.1f}" for s in DECODE_SIGNALS))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
