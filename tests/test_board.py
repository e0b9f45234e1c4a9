"""Load board: reads always equal a plain-Python model, and are never torn."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import numpy as np

from shm.board import STUCK_NS, LoadBoard, RankStatus
from shm.board_layout import (ACKED, BASE_REQS, BASE_TOKENS, LOAD_COLS, NUM_KV, NUM_PREFILL,
                              NUM_REQS, NUM_TOKENS, NUM_WAITING, PID, SEQ)
from shm.segment import new_launch_id
from tests.board_helpers import read_effective

NUM_RANKS = 3
NUM_DISPATCHERS = 2
FOREVER = 1 << 62


def read_effective_np(board: LoadBoard, stale_ns: int, now_ns: int | None = None):
    """(eff_reqs, eff_tokens, alive) as numpy arrays, from the seqlocked row read."""
    rows = board.read_rows(LOAD_COLS)
    disp = board.snapshot()
    reqs = rows[:, BASE_REQS] + disp.dispatched_reqs.sum(axis=0)
    tokens = rows[:, BASE_TOKENS] + disp.dispatched_tokens.sum(axis=0)
    return reqs, tokens, np.array(board.liveness.check(stale_ns, now_ns), dtype=bool)


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
        self.writer.publish(reqs, 0, toks, self.acked_reqs, self.acked_tokens,
                            num_prefill_tokens=0, num_kv_tokens=toks)
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
        fast_reqs, fast_toks, alive = read_effective(self.board, FOREVER)
        assert (list(fast_reqs), list(fast_toks)) == (reqs, toks)
        assert all(alive)
        single_cell_reqs = self.board.read_requests()
        assert single_cell_reqs == reqs
        np_reqs, np_toks, np_alive = read_effective_np(self.board, FOREVER)
        assert (np_reqs.tolist(), np_toks.tolist()) == (reqs, toks)
        loads = self.board.read_loads()
        assert (loads.reqs, loads.tokens) == (reqs, toks)
        # The bases plus every dispatcher's counters (what a sole dispatcher adds).
        rows = self.board.read_rows(LOAD_COLS)
        base_reqs, base_toks = rows[:, BASE_REQS].tolist(), rows[:, BASE_TOKENS].tolist()
        all_disp = [[sum(self.dispatched[d][r][k] for d in range(NUM_DISPATCHERS))
                     for r in range(len(reqs))] for k in (0, 1)]
        assert [b + x for b, x in zip(base_reqs, all_disp[0])] == reqs
        assert [b + x for b, x in zip(base_toks, all_disp[1])] == toks
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


def test_rows_are_read_before_the_dispatched_counters():
    """A request dispatched and acknowledged while a reader works never reads as
    acknowledged but not dispatched (a negative in-flight count): every read takes the
    rows (acks) first, the dispatchers' counters after."""
    with LoadBoard.create(2, 1, launch_id=new_launch_id()) as board:
        rank, dispatcher = board.rank_writer(1), board.dispatcher_writer(0)
        read_rows = board.read_rows

        def a_request_lands_meanwhile(num_cols):  # dispatched, then acked by its rank
            dispatcher.bump(1, 7)
            rank.publish(1, 0, 7, [len(seen) + 1], [7 * (len(seen) + 1)],
                         num_prefill_tokens=0, num_kv_tokens=0)
            seen.append(num_cols)
            return read_rows(num_cols)

        seen = []
        board.read_rows = a_request_lands_meanwhile
        snap = board.snapshot()
        assert snap.in_flight_reqs.tolist() == [0, 0] and snap.in_flight_tokens.min() == 0
        loads = board.read_loads()
        assert loads.reqs == [0, 1] and loads.tokens == [0, 7]


def test_a_copy_torn_by_a_publish_is_retried_by_the_seqs_read_apart():
    """numpy's copy of the rows may load a row's seq after its fields (memcpy loads out of
    address order), so a publish landing inside the copy gives old fields under the new
    seq. The seqs read apart, before and after the copy, catch it; the copy's own seq
    cells would not."""
    with LoadBoard.create(2, 1, launch_id=new_launch_id()) as board:
        writer = board.rank_writer(1)
        writer.publish(1, 0, 10, [0], [0], num_prefill_tokens=0, num_kv_tokens=0)
        real = board._rows

        class TornOnce:  # the first copy: the old fields, the seq of a publish meanwhile
            torn = False

            def __getitem__(self, key):
                part = real[key]

                class Copy:
                    def copy(_):
                        if TornOnce.torn:
                            return part.copy()
                        old = part.copy()
                        writer.publish(2, 0, 20, [0], [0], num_prefill_tokens=0,
                                       num_kv_tokens=0)
                        old[:, SEQ] = real[:, SEQ]
                        TornOnce.torn = True
                        return old
                return Copy()

        board._rows = TornOnce()
        rows = board.read_rows(LOAD_COLS)
        assert rows[1, BASE_REQS] == 2 and rows[1, BASE_TOKENS] == 20  # the whole new row
        board._rows = real


def _leave_row_mid_write(board: LoadBoard, rank: int, pid: int) -> None:
    """What a writer killed or stopped inside ``publish`` leaves: its row's pid, then its
    seq negative ("writing") with no publish to end it."""
    writer = board.rank_writer(rank)
    writer.set_capacity(100, 10)
    board.cells[board.layout.row(rank) + PID] = pid
    board.cells[board.layout.row(rank) + SEQ] = -(writer._seq + 1)


def _within(seconds: float, fn):
    """``fn()``'s result, failing (not hanging) if it takes longer than ``seconds``."""
    import threading
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"still reading after {seconds} s"
    return out[0]


def test_a_row_whose_writer_died_mid_publish_does_not_hang_readers():
    """A rank killed mid-publish leaves its row mid-write for good: reads return at once
    (its writer's process is gone), with every other row still read under the seqlock;
    the rank's next writer (a restart) makes the row whole again."""
    dead = mp.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    with LoadBoard.create(3, 1, launch_id=new_launch_id()) as board:
        board.rank_writer(0).publish(2, 0, 20, [0], [0], num_prefill_tokens=0, num_kv_tokens=0)
        _leave_row_mid_write(board, 1, dead.pid)
        for _ in range(100):  # was: the first read never returned
            assert _within(5, board.read_loads).reqs[0] == 2
            assert _within(5, board.snapshot).num_reqs[0] == 2
        writer = board.rank_writer(1)  # a restarted rank continues the sequence
        writer.publish(3, 0, 30, [0], [0], num_prefill_tokens=0, num_kv_tokens=0)
        assert board.read_loads().reqs == [2, 3, 0] and board.snapshot().seq.min() >= 0


def test_a_row_whose_writer_stopped_mid_publish_is_waited_for_once():
    """A live writer stopped mid-publish (SIGSTOP): the first read waits ``STUCK_NS`` for
    it, later reads not at all, and once it publishes again its row is read as before."""
    with LoadBoard.create(2, 1, launch_id=new_launch_id()) as board:
        _leave_row_mid_write(board, 1, os.getpid())  # alive: this process
        started = time.monotonic()
        _within(5, board.read_loads)
        assert time.monotonic() - started >= STUCK_NS / 1e9
        started = time.monotonic()
        _within(5, lambda: [board.read_loads() for _ in range(20)])
        assert time.monotonic() - started < 20 * STUCK_NS / 1e9 / 2  # not 20 more waits
        board.rank_writer(1).publish(4, 0, 40, [0], [0], num_prefill_tokens=0, num_kv_tokens=0)
        assert board.read_loads().reqs == [0, 4]


def test_dead_or_stale_ranks_are_not_alive():
    with LoadBoard.create(4, 1, launch_id=new_launch_id()) as board:
        now = time.monotonic_ns()
        for r in range(4):
            w = board.rank_writer(r)
            w.set_status(RankStatus.READY)
            w.heartbeat(now - 5_000_000_000 if r == 2 else now)  # rank 2 went silent 5 s ago
        board.rank_writer(1).set_status(RankStatus.DEAD)
        board.rank_writer(3).set_status(RankStatus.DRAINING)
        _, _, alive = read_effective(board, stale_ns=1_000_000_000, now_ns=now)
        assert list(alive) == [True, False, False, False]
        _, _, alive_np = read_effective_np(board, stale_ns=1_000_000_000, now_ns=now)
        assert alive_np.tolist() == [True, False, False, False]


def test_cached_liveness_is_exact():
    """The liveness cache (shm.board_liveness) answers as a full check would: a status
    change shows at once, a heartbeat that stops shows once it is stale_ns old, a stale
    rank comes back with its next heartbeat; a heartbeat never moves back in time."""
    stale = 1_000_000_000
    with LoadBoard.create(3, 1, launch_id=new_launch_id()) as board:
        t0 = time.monotonic_ns()
        writers = [board.rank_writer(r) for r in range(3)]
        for w in writers:
            w.set_status(RankStatus.READY)
            w.heartbeat(t0)
        live = board.liveness
        assert live.check(stale, t0) is live.all_alive
        assert live.check(stale, t0 + stale) is live.all_alive  # cached, still exact
        writers[1].set_status(RankStatus.DRAINING)
        assert live.check(stale, t0 + stale) == (True, False, True)
        writers[1].set_status(RankStatus.READY)
        writers[0].heartbeat(t0 + stale)
        writers[1].heartbeat(t0 + stale)
        # rank 2 stopped at t0: stale once now - stale_ns passes it, not before
        assert live.check(stale, t0 + stale) is live.all_alive
        assert live.check(stale, t0 + stale + 1) == (True, True, False)
        assert live.check(stale, t0 + stale + 2) == (True, True, False)  # not cached
        writers[2].heartbeat(t0 + stale + 2)
        assert live.check(stale, t0 + stale + 3) is live.all_alive
        with pytest.raises(ValueError, match="older than the last one"):
            writers[0].heartbeat(t0)
        del writers


# ---- torn reads across processes ---------------------------------------------------------

def _hammer(name: str, stop, started) -> None:
    """Publish to every row in turn, as fast as one process can."""
    board = LoadBoard.attach(name)
    writers = [board.rank_writer(r) for r in range(board.num_ranks)]
    k = 0
    started.set()
    while not stop.is_set():
        for _ in range(1000):
            k += 1
            # Every field is a function of k, so a torn row is detectable.
            writer = writers[k % len(writers)]
            writer.publish(k, k % 7, 3 * k, [k // 2], [k],
                           num_prefill_tokens=5 * k, num_kv_tokens=2 * k)
            if k % 5 == 0:  # the capacity cells, under the same seqlock
                writer.set_capacity(k, k)
    del writers
    board.close()


def _row_is_whole(num_reqs, waiting, tokens, acked_reqs, acked_tokens, prefill, kv) -> bool:
    k = num_reqs
    return (waiting == k % 7 and tokens == 3 * k and acked_reqs == k // 2 and acked_tokens == k
            and prefill == 5 * k and kv == 2 * k)


def _fast_row_is_whole(base_reqs: int, base_tokens: int) -> bool:
    """The hot path sees base = (k - k//2, 3k - k) for some k (or the initial zeros)."""
    k, odd = divmod(base_tokens, 2)
    return not odd and base_reqs == k - k // 2


def test_no_torn_reads_while_another_process_writes_flat_out():
    """A writer process publishes every row as fast as it can (hundreds of thousands of
    publishes a second); a reader checks every row it reads, through both read paths,
    for a bounded time. Not one torn row is allowed."""
    ctx = mp.get_context("spawn")
    stop, started = ctx.Event(), ctx.Event()
    with LoadBoard.create(8, 1, launch_id=new_launch_id()) as board:
        writer = ctx.Process(target=_hammer, args=(board.name, stop, started), daemon=True)
        writer.start()
        try:
            assert started.wait(30)
            rows_checked = torn = 0
            seen = set()
            # At least 3 s, and on until enough rows were checked while the writer wrote:
            # a loaded machine gets more time, not a failure (60 s at most).
            start = time.monotonic()
            while time.monotonic() - start < 60 and (time.monotonic() - start < 3.0
                                                       or rows_checked <= 20_000 or len(seen) <= 100):
                for _ in range(20):
                    reqs, toks, _ = read_effective(board, FOREVER)
                    torn += sum(not _fast_row_is_whole(r, t) for r, t in zip(reqs, toks))
                    reqs, toks, prefill = board.read_loads()  # no dispatches: the bases
                    torn += sum(not (_fast_row_is_whole(r, t) and p == 2 * t)
                                for r, t, p in zip(reqs, toks, prefill))
                    rows_checked += 16
                for _ in range(100):
                    snap = board.snapshot()
                    torn += int((snap.max_total_num_tokens != snap.max_running_requests).sum())
                    for r in range(8):
                        k = int(snap.num_reqs[r])
                        torn += not _row_is_whole(k, int(snap.num_waiting_reqs[r]), int(snap.num_tokens[r]),
                                                  int(snap.acked_reqs[r, 0]), int(snap.acked_tokens[r, 0]),
                                                  int(snap.num_prefill_tokens[r]),
                                                  int(snap.num_kv_tokens[r]))
                    seen.add(int(snap.num_reqs[3]))
                    rows_checked += 8
            # Control: the same check on rows copied without the seqlock does catch
            # tearing, so a zero above means something.
            unprotected_torn = 0
            deadline = time.monotonic() + 20.0  # 10 tears seen, or 20 s
            while time.monotonic() < deadline and unprotected_torn < 10:
                layout = board.layout
                rows = np.asarray(board.cells)[layout.row(0):layout.live_off].reshape(
                    board.num_ranks, layout.row_len).copy()
                columns = (NUM_REQS, NUM_WAITING, NUM_TOKENS, ACKED, ACKED + 1, NUM_PREFILL,
                           NUM_KV)
                unprotected_torn += sum(not _row_is_whole(*(int(row[c]) for c in columns))
                                        for row in rows)
        finally:
            stop.set()
            writer.join(10)
            if writer.is_alive():
                writer.kill()
                writer.join(5)
        assert torn == 0
        assert unprotected_torn > 0, "the torn-row check never fired even without the seqlock"
        assert len(seen) > 100, "the writer was not writing during the reads"
        assert rows_checked > 20_000, rows_checked
