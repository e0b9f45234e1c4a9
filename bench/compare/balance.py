"""`python -m bench.compare.balance [--json PATH]`: how evenly each method spreads a burst trace.

Replays one synthetic burst-and-report trace against every balancing method, through
the real ``Dispatcher`` on a real load board, with simulated schedulers that receive,
decode, finish and publish through ``RankWriter`` as the real one does.

The trace (seeded, identical for every method). Time runs in ticks; each of the
``--ranks`` (4) ranks runs one scheduler step every ``--ticks-per-step`` (4) ticks,
staggered, so reports reach the board at different times as real batches do. A step
publishes the load (decoding one token per running request, dropping finished ones),
then takes every request sent so far off its pipe; those are acked and counted only at
the next publish, so each report misses what was sent during the step. Arrivals:
Poisson background traffic of ``--rate`` requests per step plus, every
``--burst-every`` steps, a burst of ``--burst`` (100, the burst of SGLang PR #11469) requests spread
over ``--burst-ticks`` ticks. Prompts are mixed (70% lognormal around 300 tokens,
16-2048; 30% uniform 2048-8192), outputs uniform 8-200 tokens, rooms random 63-bit.

Metrics, each a max over ranks divided by the mean over ranks (1.0 is perfect). A
rank's load is its in-flight work from the simulation's own bookkeeping (never from
the board): requests dispatched to it and not finished, and their tokens (the prompt
until received, then the KV held). It is sampled after the dispatches of every tick.
- ``max_over_mean_requests_<m>`` / ``max_over_mean_tokens_<m>`` (the headline): each
  rank's peak load during the trace, max over mean of those peaks. A rank that herds a
  burst peaks high: SGLang PR #11469's "28 requests on one rank where 25 was fair".
- ``lockstep_max_over_mean_*_<m>``: sum over ticks of the max load over ranks divided
  by the sum over ticks of the mean load. With DP attention in lockstep the most loaded
  rank sets each step's time, so this is the time lost to imbalance.
- ``assigned_max_over_mean_*_<m>``: requests (prompt tokens) assigned to each rank over
  the whole trace. Load-aware methods need not equalise it (a rank whose requests end
  sooner rightly receives more); round_robin equalises request counts whatever the load.
Each least-loaded method balances one quantity (total_requests requests, total_tokens
tokens); the other column shows what that choice costs.

``reported_only_baseline`` is not a method: SGLang's piggyback scheme (a rank's report
overwrites the dispatcher's count for it, each dispatch adds one), which loses the
requests in flight when the report lands; it shows the herding the board removes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np

from bench.cli import (DefaultsHelpFormatter, dispatcher_count, non_negative_float,
                       non_negative_int, positive_int, rank_count, writable_file)
from scheduler.dispatcher import Dispatcher
from scheduler.policy import LoadBalanceMethod, RotationState, total_requests
from shm.board import LoadBoard, RankStatus
from shm.segment import new_launch_id

METHODS = ("round_robin", "follow_bootstrap_room", "total_requests", "total_tokens")
BASELINE = "reported_only_baseline"


@dataclass(frozen=True)
class TraceReq:
    prompt_len: int
    output_len: int
    bootstrap_room: int


def make_trace(args) -> list[list[TraceReq]]:
    """The requests arriving at each tick."""
    rng = np.random.default_rng(args.seed)
    num_ticks = args.steps * args.ticks_per_step
    burst_every = args.burst_every * args.ticks_per_step
    ticks = []
    for tick in range(num_ticks):
        count = int(rng.poisson(args.rate / args.ticks_per_step))
        burst_tick = tick % burst_every - burst_every // 2
        if 0 <= burst_tick < args.burst_ticks:  # the burst, split evenly over its ticks
            count += args.burst // args.burst_ticks + (burst_tick < args.burst % args.burst_ticks)
        long = rng.random(count) < 0.3
        short_len = np.clip(rng.lognormal(np.log(300), 0.8, count), 16, 2048)
        prompt = np.where(long, rng.integers(2048, 8193, count), short_len).astype(int)
        output = rng.integers(8, 201, count)
        rooms = rng.integers(0, 2**63 - 1, count, dtype=np.int64)
        ticks.append([TraceReq(int(p), int(o), int(r)) for p, o, r in zip(prompt, output, rooms)])
    return ticks


class TraceRank:
    """One simulated scheduler: a pipe in, running requests, a publish per step."""

    def __init__(self, board: LoadBoard, rank: int, ticks_per_step: int):
        self.rank = rank
        self.writer = board.rank_writer(rank)
        self.ticks_per_step = ticks_per_step
        self.phase = rank * ticks_per_step // board.num_ranks  # staggered steps
        self.pipe: list = []  # (dispatcher_id, TraceReq) sent, not received yet
        self.running: list[list[int]] = []  # [kv_tokens, output tokens left]
        self.acked_reqs = [0] * board.num_dispatchers
        self.acked_tokens = [0] * board.num_dispatchers
        self.writer.set_status(RankStatus.READY)
        self.publish()

    def is_step_boundary(self, tick: int) -> bool:
        return tick % self.ticks_per_step == self.phase

    def step(self) -> None:
        """End the current step (decode, finish, publish), then receive for the next."""
        for entry in self.running:
            entry[0] += 1
            entry[1] -= 1
        self.running = [e for e in self.running if e[1] > 0]
        self.publish()
        for dispatcher_id, req in self.pipe:
            self.acked_reqs[dispatcher_id] += 1
            self.acked_tokens[dispatcher_id] += req.prompt_len
            self.running.append([req.prompt_len, req.output_len])
        self.pipe = []

    def publish(self) -> None:
        self.writer.publish(len(self.running), 0, sum(e[0] for e in self.running),
                            self.acked_reqs, self.acked_tokens, num_prefill_tokens=0,
                            num_kv_tokens=sum(e[0] for e in self.running))
        self.writer.heartbeat()

    def load(self) -> tuple[int, int]:
        """In-flight load from the simulation itself (requests, tokens)."""
        return (len(self.pipe) + len(self.running),
                sum(r.prompt_len for _, r in self.pipe) + sum(e[0] for e in self.running))


class ReportedOnlyPicker:
    """SGLang's piggyback scheme: a report overwrites the local count, a dispatch adds 1."""

    dispatcher_id = 0

    def __init__(self, board: LoadBoard):
        self.board = board
        self.loads = [0] * board.num_ranks
        self.state = RotationState()
        self._writer = board.dispatcher_writer(0)  # keeps the board's counters honest

    def on_report(self, rank: int) -> None:
        self.loads[rank] = int(self.board.snapshot().num_reqs[rank])

    def pick(self, num_tokens: int, bootstrap_room: int | None = None) -> int:
        rank = total_requests(self.loads, (True,) * len(self.loads), self.state)
        self.loads[rank] += 1
        self._writer.bump(rank, num_tokens)
        return rank


def ratio(values) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


def replay(trace: list[list[TraceReq]], method: str, args) -> dict[str, float]:
    """Run the trace with one method on a fresh board; return its ratios."""
    n = args.ranks
    num_d = 1 if method == BASELINE else args.dispatchers
    board = LoadBoard.create(n, num_d, launch_id=new_launch_id(), kind="benchbalance")
    try:
        ranks = [TraceRank(board, r, args.ticks_per_step) for r in range(n)]
        if method == BASELINE:
            pickers = [ReportedOnlyPicker(board)]
        else:
            pickers = [Dispatcher(board, d, LoadBalanceMethod(method)) for d in range(num_d)]
        assigned = np.zeros((2, n), dtype=np.int64)
        peak = np.zeros((2, n), dtype=np.int64)
        sum_max = np.zeros(2)
        sum_mean = np.zeros(2)
        turn = 0
        for tick, arrivals in enumerate(trace):
            for req in arrivals:
                picker = pickers[turn % num_d]  # API processes take turns
                turn += 1
                rank = picker.pick(req.prompt_len, bootstrap_room=req.bootstrap_room)
                ranks[rank].pipe.append((picker.dispatcher_id, req))
                assigned[:, rank] += (1, req.prompt_len)
            loads = np.array([r.load() for r in ranks]).T  # [kind, rank]
            peak = np.maximum(peak, loads)
            sum_max += loads.max(axis=1)
            sum_mean += loads.mean(axis=1)
            for r in ranks:
                if r.is_step_boundary(tick):
                    r.step()
                    if method == BASELINE:
                        pickers[0].on_report(r.rank)
        del pickers, ranks
    finally:
        board.close()
    return {
        "max_over_mean_requests": ratio(peak[0].tolist()),
        "max_over_mean_tokens": ratio(peak[1].tolist()),
        "lockstep_max_over_mean_requests": float(sum_max[0] / sum_mean[0]),
        "lockstep_max_over_mean_tokens": float(sum_max[1] / sum_mean[1]),
        "assigned_max_over_mean_requests": ratio(assigned[0].tolist()),
        "assigned_max_over_mean_tokens": ratio(assigned[1].tolist()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare.balance",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--json", metavar="PATH", type=writable_file,
                        help="also write the ratios to PATH")
    parser.add_argument("--ranks", type=rank_count, default=4, help="ranks on the board")
    parser.add_argument("--dispatchers", type=dispatcher_count, default=1,
                        help="API processes taking turns")
    parser.add_argument("--steps", type=positive_int, default=300, help="scheduler steps per rank")
    parser.add_argument("--ticks-per-step", type=positive_int, default=4,
                        help="trace ticks per scheduler step (arrivals land on ticks)")
    parser.add_argument("--rate", type=non_negative_float, default=2.0,
                        help="background requests per step")
    parser.add_argument("--burst", type=non_negative_int, default=100,
                        help="requests per burst")
    parser.add_argument("--burst-ticks", type=positive_int, default=8, help="ticks one burst spans")
    parser.add_argument("--burst-every", type=positive_int, default=50,
                        help="steps between bursts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trace")
    args = parser.parse_args(argv)
    trace = make_trace(args)
    num_reqs = sum(len(s) for s in trace)
    if num_reqs == 0:  # every ratio would be 0 / 0
        parser.error(f"--rate {args.rate:g} and --burst {args.burst} give a trace with no request")
    print(f"burst-and-report trace: {args.ranks} ranks, {args.dispatchers} dispatcher(s), "
          f"{args.steps} steps of {args.ticks_per_step} ticks, {num_reqs} requests (bursts of "
          f"{args.burst} over {args.burst_ticks} ticks every {args.burst_every} steps), "
          f"seed {args.seed}")
    print("max/mean over ranks       peak in-flight     lockstep in-flight  assigned (cumulative)")
    print(f"{'method':24s}" + f"{'reqs':>10s}{'tokens':>9s}" * 3)
    results = {}
    for method in (*METHODS, BASELINE):
        r = replay(trace, method, args)
        cells = "".join(f"{r[f'{kind}requests']:10.3f}{r[f'{kind}tokens']:9.3f}" for kind in
                        ("max_over_mean_", "lockstep_max_over_mean_", "assigned_max_over_mean_"))
        print(f"{method:24s}{cells}")
        results.update({f"{key}_{method}": round(value, 4) for key, value in r.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
