"""Load board: reads always equal a plain-Python model, and are never torn."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shm.board import LoadBoard, RankStatus
from shm.segment import new_launch_id

NUM_RANKS = 3
NUM_DISPATCHERS = 2
FOREVER = 1 << 62


class SimScheduler:
    """What one rank's scheduler holds, and what it last published."""

    def __init__(self, writer):
        self.writer = writer
        self.inbox = {d: deque() for d in range(NUM_DISPATCHERS)}  # sent, not yet received
        self.running = []  # token counts of requests counted in the load
        self.acked_reqs = [0] * NUM_DISPATCHERS
        self.acked_tokens = [0] * NUM_DISPATCHERS
        self.published = (0, 0, [0] * NUM_DISPATCHERS, [0] * NUM_DISPATCHERS)

    def publish(self):
        reqs, toks = len(self.running), sum(self.running)
        self.writer.publish(reqs, 0, toks, self.acked_reqs, self.acked_tokens)
        self.published = (reqs, toks, list(self.acked_reqs), list(self.acked_tokens))


class BoardMachine(RuleBasedStateMachine):
    """Invariant: every read of the board equals the model's effective loads.

    effective(r) = last published reported(r) + sum_d (dispatched[d][r] - last published acked[d][r]).
    Dispatches, receipts (acks), completions and publishes interleave arbitrarily; the
    scheduler's private state only reaches the board when it publishes.
    """

    @initialize()
    def setup(self):
        self.board = LoadBoard.create(NUM_RANKS, NUM_DISPATCHERS, launch_id=new_launch_id())
        self.dispatchers = [self.board.dispatcher_writer(d) for d in range(NUM_DISPATCHERS)]
        self.scheds = []
        for r in range(NUM_RANKS):
            w = self.board.rank_writer(r)
            w.set_status(RankStatus.READY)
            w.heartbeat()
            self.scheds.append(SimScheduler(w))
        self.dispatched = [[[0, 0] for _ in range(NUM_RANKS)] for _ in range(NUM_DISPATCHERS)]

    def teardown(self):
        if hasattr(self, "board"):
            self.board.close()

    @rule(d=st.integers(0, NUM_DISPATCHERS - 1), r=st.integers(0, NUM_RANKS - 1), tokens=st.integers(1, 5000))
    def dispatch(self, d, r, tokens):
        self.dispatchers[d].bump(r, tokens)
        self.dispatched[d][r][0] += 1
        self.dispatched[d][r][1] += tokens
        self.scheds[r].inbox[d].append(tokens)

    @rule(r=st.integers(0, NUM_RANKS - 1), d=st.integers(0, NUM_DISPATCHERS - 1))
    def receive(self, r, d):
        s = self.scheds[r]
        if s.inbox[d]:
            tokens = s.inbox[d].popleft()
            s.running.append(tokens)
            s.acked_reqs[d] += 1
            s.acked_tokens[d] += tokens

    @rule(r=st.integers(0, NUM_RANKS - 1), grow=st.integers(0, 40))
    def decode_step(self, r, grow):
        """Requests grow by generated tokens: reported tokens may differ from dispatched."""
        s = self.scheds[r]
        if s.running:
            s.running[0] += grow

    @rule(r=st.integers(0, NUM_RANKS - 1), data=st.data())
    def finish(self, r, data):
        s = self.scheds[r]
        if s.running:
            s.running.pop(data.draw(st.integers(0, len(s.running) - 1)))

    @rule(r=st.integers(0, NUM_RANKS - 1))
    def publish(self, r):
        self.scheds[r].publish()

    def model_effective(self):
        reqs, toks = [], []
        for r, s in enumerate(self.scheds):
            rep_reqs, rep_toks, ack_reqs, ack_toks = s.published
            reqs.append(rep_reqs + sum(self.dispatched[d][r][0] - ack_reqs[d] for d in range(NUM_DISPATCHERS)))
            toks.append(rep_toks + sum(self.dispatched[d][r][1] - ack_toks[d] for d in range(NUM_DISPATCHERS)))
        return reqs, toks

    @invariant()
    def reads_equal_model(self):
        if not hasattr(self, "board"):
            return
        reqs, toks = self.model_effective()
        fast_reqs, fast_toks, alive = self.board.read_effective(FOREVER)
        assert (list(fast_reqs), list(fast_toks)) == (reqs, toks)
        assert all(alive)
        np_reqs, np_toks, np_alive = self.board.read_effective_np(FOREVER)
        assert (np_reqs.tolist(), np_toks.tolist()) == (reqs, toks)
        snap = self.board.snapshot()
        assert (snap.effective_reqs.tolist(), snap.effective_tokens.tolist()) == (reqs, toks)
        for r, s in enumerate(self.scheds):
            assert snap.num_reqs[r] == s.published[0] and snap.num_tokens[r] == s.published[1]

    @invariant()
    def in_flight_is_never_negative(self):
        if hasattr(self, "board"):
            assert (self.board.snapshot().in_flight_reqs >= 0).all()


TestBoardMachine = BoardMachine.TestCase
TestBoardMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_dead_or_stale_ranks_are_not_alive():
    with LoadBoard.create(4, 1, launch_id=new_launch_id()) as board:
        now = time.monotonic_ns()
        for r in range(4):
            w = board.rank_writer(r)
            w.set_status(RankStatus.READY)
            w.heartbeat(now)
        board.rank_writer(1).set_status(RankStatus.DEAD)
        board.rank_writer(2).heartbeat(now - 5_000_000_000)
        board.rank_writer(3).set_status(RankStatus.DRAINING)
        _, _, alive = board.read_effective(stale_ns=1_000_000_000, now_ns=now)
        assert list(alive) == [True, False, False, False]
        _, _, alive_np = board.read_effective_np(stale_ns=1_000_000_000, now_ns=now)
        assert alive_np.tolist() == [True, False, False, False]


# ---- torn reads across processes ---------------------------------------------------------

def _hammer(name: str, rank: int, stop, started) -> None:
    board = LoadBoard.attach(name)
    w = board.rank_writer(rank)
    k = 0
    started.set()
    while not stop.is_set():
        for _ in range(1000):
            k += 1
            # Every field is a function of k, so a torn row is detectable.
            w.publish(k, k % 7, 3 * k, [k // 2], [k])
    board.close()


def _row_is_whole(num_reqs, waiting, tokens, acked_reqs, acked_tokens) -> bool:
    k = num_reqs
    return waiting == k % 7 and tokens == 3 * k and acked_reqs == k // 2 and acked_tokens == k


def test_no_torn_reads_while_another_process_writes_flat_out():
    """A writer process publishes as fast as it can; a reader checks every row it reads."""
    ctx = mp.get_context("spawn")
    stop, started = ctx.Event(), ctx.Event()
    with LoadBoard.create(8, 1, launch_id=new_launch_id()) as board:
        writer = ctx.Process(target=_hammer, args=(board.name, 3, stop, started), daemon=True)
        writer.start()
        try:
            assert started.wait(30)
            rows_checked = torn = fast_reads = 0
            seen = set()
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                for _ in range(200):
                    reqs, toks, _ = board.read_effective(FOREVER)
                    k_half_up, two_k = reqs[3], toks[3]  # base = k - k//2, 3k - k
                    if two_k % 2 or k_half_up != two_k // 2 - (two_k // 2) // 2:
                        torn += 1
                    fast_reads += 1
                snap = board.snapshot()
                k = int(snap.num_reqs[3])
                seen.add(k)
                if not _row_is_whole(k, int(snap.num_waiting_reqs[3]), int(snap.num_tokens[3]),
                                     int(snap.acked_reqs[3, 0]), int(snap.acked_tokens[3, 0])):
                    torn += 1
                rows_checked += 8
            rows_checked += fast_reads * 8
        finally:
            stop.set()
            writer.join(10)
            if writer.is_alive():
                writer.kill()
                writer.join(5)
        assert torn == 0
        assert len(seen) > 10, "the writer was not writing during the reads"
        assert rows_checked > 100_000
