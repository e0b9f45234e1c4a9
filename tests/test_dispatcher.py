"""The dispatcher on a real load board, fed by simulated schedulers.

``SimRank`` plays one rank's scheduler as the real one behaves towards the board: a
request reaches it some time after dispatch (its pipe), is acked when received, grows
its KV while decoding, finishes, and every ``publish`` writes the row through a
``RankWriter``. Beside that it keeps an oracle at the level of single requests: a
request must count on the board from its dispatch until a report says it finished,
with its prompt length until a report covers it and its reported tokens after. The
board's effective loads are compared with that oracle, never with the board's formula.

Every board is created through the ``new_board`` fixture, which closes and unlinks it
even when the test fails and checks that none of its segments is left in /dev/shm.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from scheduler.dispatcher import (Dispatcher, InvalidDpRankError, MissingBootstrapRoomError,
                                  NoLiveRankError, RankUnavailableError)
from scheduler.policy import (InvalidLoadBalanceMethod, LoadBalanceMethod, RotationState,
                              cache_aware, prefill_tokens, total_requests, total_tokens)
from scheduler.prefix_hash import BLOCK_LEN, block_keys, chain_hashes, first_hash
from scheduler.prefix_traffic import HOT_MIN_REQUESTS, PrefixTraffic
from shm.prefix_summary import PrefixSummary
from shm.board import LoadBoard, RankStatus
from shm.segment import SHM_DIR, new_launch_id
from tests.example_helpers import Draws

# The factory fixture is shared by a test's examples on purpose: each example makes
# (and closes) its own board through it.
PROPS = settings(max_examples=100, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
# cache_aware also reads prefix-cache summaries: tested with them below.
METHODS = [m for m in LoadBalanceMethod
           if m not in (LoadBalanceMethod.AUTO, LoadBalanceMethod.CACHE_AWARE)]


@pytest.fixture
def new_board():
    """``with new_board(num_ranks, num_dispatchers) as board``: closed and unlinked on exit,
    and again at teardown for any block a failure left open."""
    open_boards: list[LoadBoard] = []
    names: list[str] = []

    @contextmanager
    def make(num_ranks: int, num_dispatchers: int = 1):
        board = LoadBoard.create(num_ranks, num_dispatchers, launch_id=new_launch_id())
        open_boards.append(board)
        names.append(board.name)
        try:
            yield board
        finally:
            open_boards.remove(board)
            board.close()

    try:
        yield make
    finally:
        for board in open_boards:
            board.close()
        left = [n for n in names if os.path.exists(os.path.join(SHM_DIR, n.lstrip("/")))]
        assert not left, f"segments left in {SHM_DIR}: {left}"


@dataclass(eq=False)
class SimReq:
    dispatcher_id: int | None  # None: load that was there before any dispatch
    counted_tokens: int  # what the dispatcher put on the board (the prompt length)
    kv_tokens: int  # what the scheduler holds now
    board_tokens: int  # what the board must count for it now (the oracle)
    prefilled: bool = False  # its prompt is computed (its first decode step ran)
    board_prefill: int | None = None  # prompt tokens the board must count as not
    # prefilled yet (the oracle); None: its prompt length, until a report covers it


class SimRank:
    """One rank's scheduler, simulated, plus the request-level oracle for its row."""

    def __init__(self, board: LoadBoard, rank: int, base_reqs: int = 0, base_tokens: int = 0):
        self.writer = board.rank_writer(rank)
        num_d = board.num_dispatchers
        self.pipe: deque[SimReq] = deque()  # dispatched, not received yet
        self.running: list[SimReq] = []
        self.finished_unreported: list[SimReq] = []
        self.acked_reqs = [0] * num_d
        self.acked_tokens = [0] * num_d
        self.counted: set[SimReq] = set()  # oracle: every request the board must count
        for i in range(base_reqs):
            share = base_tokens // base_reqs + (i < base_tokens % base_reqs)
            self._start(SimReq(None, share, share, share, prefilled=True, board_prefill=0))
        self.writer.set_status(RankStatus.READY)
        self.publish()

    def deliver(self, dispatcher_id: int, num_tokens: int) -> None:
        req = SimReq(dispatcher_id, num_tokens, num_tokens, num_tokens)
        self.counted.add(req)
        self.pipe.append(req)

    def receive(self, k: int) -> None:
        for _ in range(min(k, len(self.pipe))):
            req = self.pipe.popleft()
            self.acked_reqs[req.dispatcher_id] += 1
            self.acked_tokens[req.dispatcher_id] += req.counted_tokens
            self.running.append(req)

    def decode(self) -> None:
        for req in self.running:
            req.kv_tokens += 1
            req.prefilled = True

    def finish(self, k: int) -> None:
        done, self.running = self.running[:k], self.running[k:]
        self.finished_unreported += done

    def publish(self) -> None:
        prefill = sum(r.counted_tokens for r in self.running if not r.prefilled)
        self.writer.publish(len(self.running), 0, sum(r.kv_tokens for r in self.running),
                            self.acked_reqs, self.acked_tokens, num_prefill_tokens=prefill,
                            num_kv_tokens=sum(r.kv_tokens for r in self.running))
        self.writer.heartbeat()
        for req in self.running:
            req.board_tokens = req.kv_tokens
            req.board_prefill = 0 if req.prefilled else req.counted_tokens
        self.counted.difference_update(self.finished_unreported)
        self.finished_unreported = []

    def drain(self) -> None:
        self.receive(len(self.pipe))
        self.finish(len(self.running))
        self.publish()

    def expected(self) -> tuple[int, int, int]:
        prefill = sum(r.counted_tokens if r.board_prefill is None else r.board_prefill
                      for r in self.counted)
        return len(self.counted), sum(r.board_tokens for r in self.counted), prefill

    def _start(self, req: SimReq) -> None:
        self.counted.add(req)
        self.running.append(req)


def effective(board: LoadBoard) -> tuple[list[int], list[int], list[int]]:
    snap = board.snapshot()
    return (snap.effective_reqs.tolist(), snap.effective_tokens.tolist(),
            snap.effective_prefill_tokens.tolist())


def assert_board_matches_oracle(board: LoadBoard, ranks: list[SimRank]) -> None:
    reqs, toks, prefill = effective(board)
    assert list(zip(reqs, toks, prefill)) == [r.expected() for r in ranks]


def dispatch(disp: Dispatcher, ranks: list[SimRank], num_tokens: int, **kw) -> int:
    rank = disp.pick(num_tokens, **kw)
    ranks[rank].deliver(disp.dispatcher_id, num_tokens)
    return rank


# One scheduler-side event: ("recv", rank, k) | ("fin", rank, k) | ("dec", rank) | ("pub", rank)
sched_op = st.one_of(
    st.tuples(st.just("recv"), st.integers(0, 7), st.integers(1, 8)),
    st.tuples(st.just("fin"), st.integers(0, 7), st.integers(1, 4)),
    st.tuples(st.just("dec"), st.integers(0, 7)),
    st.tuples(st.just("pub"), st.integers(0, 7)),
)


def apply_sched_op(op: tuple, ranks: list[SimRank]) -> None:
    sim = ranks[op[1] % len(ranks)]
    if op[0] == "recv":
        sim.receive(op[2])
    elif op[0] == "fin":
        sim.finish(op[2])
    elif op[0] == "dec":
        sim.decode()
    else:
        sim.publish()


# ---- invariant 1 -----------------------------------------------------------------------
@PROPS
@given(n=st.integers(2, 6), num_d=st.integers(1, 3), data=st.data(), equal=st.booleans())
def test_total_requests_always_picks_min_effective(new_board, n, num_d, data, equal):
    """Invariant 1 (total_requests, no completions): from any reported loads, after any
    number of dispatches from any mix of dispatchers (with acks and reports between),
    the chosen rank had the minimum effective load; from equal loads, max - min <= 1
    after every step."""
    if equal:
        base = [data.draw(st.integers(0, 20))] * n
    else:
        base = data.draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    ops = data.draw(st.lists(st.one_of(
        st.tuples(st.just("disp"), st.integers(0, num_d - 1), st.integers(1, 500)),
        st.tuples(st.just("ack"), st.integers(0, n - 1), st.integers(1, 8))), max_size=60))
    with new_board(n, num_d) as board:
        ranks = [SimRank(board, r, base_reqs=base[r], base_tokens=7 * base[r]) for r in range(n)]
        disps = [Dispatcher(board, d, "total_requests") for d in range(num_d)]
        for op in ops:
            if op[0] == "ack":  # received and reported: load moves, never changes
                ranks[op[1]].receive(op[2])
                ranks[op[1]].publish()
            else:
                before = effective(board)[0]
                rank = dispatch(disps[op[1]], ranks, op[2])
                assert before[rank] == min(before)
            assert_board_matches_oracle(board, ranks)
            if equal:
                reqs = effective(board)[0]
                assert max(reqs) - min(reqs) <= 1


# ---- the board's read paths feed the policy functions what the snapshot holds ------------
@PROPS
@given(n=st.integers(1, 12), num_d=st.integers(1, 3), data=st.data(),
       method=st.sampled_from(["total_requests", "total_tokens", "prefill_tokens"]))
# Rank 0's two requests are prefilled (10 tokens, no prefill); the first pick puts a
# 3-token prompt on rank 1, so the second sees rank 0 ahead in tokens, behind in prefill.
@example(n=2, num_d=1, method="prefill_tokens",
         data=Draws([2, 0], set(), [("disp", 0, 3), ("disp", 0, 3)]))
def test_pick_picks_what_the_policy_picks(new_board, n, num_d, method, data):
    """Dispatcher.pick reads the board through the single-cell read (total_requests) or
    the seqlocked row read (the token methods); on the same boards and the same picks it
    chooses exactly what scheduler.policy chooses from the snapshot's effective loads
    and the dispatcher's rotation, with and without dead ranks (NoLiveRankError when
    none lives)."""
    base = data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    dead = data.draw(st.sets(st.integers(0, n - 1)))
    ops = data.draw(st.lists(st.one_of(
        st.tuples(st.just("disp"), st.integers(0, num_d - 1), st.integers(0, 300)),
        st.tuples(st.just("ack"), st.integers(0, n - 1), st.integers(1, 4)),
        st.tuples(st.just("dec"), st.integers(0, n - 1), st.just(0)),
        st.tuples(st.just("revive"), st.integers(0, n - 1), st.just(0))), max_size=40))
    policy_fn = {"total_requests": lambda e, a, rot: total_requests(e[0], a, rot),
                 "total_tokens": lambda e, a, rot: total_tokens(e[1], e[0], a, rot),
                 "prefill_tokens": lambda e, a, rot: prefill_tokens(e[2], e[1], e[0], a, rot),
                 }[method]
    with new_board(n, num_d) as board:
        ranks = [SimRank(board, r, base_reqs=base[r], base_tokens=5 * base[r]) for r in range(n)]
        for r in dead:
            ranks[r].writer.set_status(RankStatus.DEAD)
        disps = [Dispatcher(board, d, method) for d in range(num_d)]
        sides = [(board, ranks, disps)]
        for op in ops:
            picks = []
            for board, ranks, disps in sides:
                if op[0] == "ack":
                    ranks[op[1]].receive(op[2])
                    ranks[op[1]].publish()
                    continue
                if op[0] == "dec":  # the prompts received are prefilled, and reported
                    ranks[op[1]].decode()
                    ranks[op[1]].publish()
                    continue
                if op[0] == "revive":
                    ranks[op[1]].writer.set_status(RankStatus.READY)
                    continue
                disp = disps[op[1]]
                snap = board.snapshot()
                eff = (snap.effective_reqs.tolist(), snap.effective_tokens.tolist(),
                       snap.effective_prefill_tokens.tolist())
                alive = tuple(int(s) == RankStatus.READY for s in snap.status)
                expected_rotation = RotationState(disp.rotation.next_start)
                try:
                    expected = policy_fn(eff, alive, expected_rotation)
                except NoLiveRankError:
                    with pytest.raises(NoLiveRankError):
                        disp.pick(op[2])
                    picks.append(None)
                    continue
                rank = dispatch(disp, ranks, op[2])
                assert rank == expected
                assert disp.rotation.next_start == expected_rotation.next_start
                picks.append(rank)


# ---- invariant 2 -----------------------------------------------------------------------
@PROPS
@given(num_d=st.integers(1, 3), data=st.data())
def test_seed_burst_is_exact_and_reports_never_double_count(new_board, num_d, data):
    """Invariant 2 (the seed's burst): 4 ranks, 100 requests dispatched before any report
    arrives -> exactly 25 on each rank; then receives, decode steps, finishes and reports
    arrive in any order and interleaving, and every effective load equals the requests
    not yet reported finished (tokens: as last reported, else the prompt length), never
    counting one twice or losing one."""
    who = data.draw(st.lists(st.integers(0, num_d - 1), min_size=100, max_size=100))
    sizes = data.draw(st.lists(st.integers(1, 4096), min_size=100, max_size=100))
    with new_board(4, num_d) as board:
        ranks = [SimRank(board, r) for r in range(4)]
        disps = [Dispatcher(board, d, "total_requests") for d in range(num_d)]
        for d, size in zip(who, sizes):
            dispatch(disps[d], ranks, size)
        assert [len(r.pipe) for r in ranks] == [25] * 4
        assert effective(board)[0] == [25] * 4
        assert_board_matches_oracle(board, ranks)
        for op in data.draw(st.lists(sched_op, max_size=80)):
            apply_sched_op(op, ranks)
            assert_board_matches_oracle(board, ranks)


# ---- invariant 3 -----------------------------------------------------------------------
@PROPS
@given(n=st.integers(2, 8), num_d=st.integers(1, 3), base=st.integers(0, 10_000),
       reqs=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 8192)), min_size=1, max_size=80))
def test_total_tokens_spread_bounded_by_largest_request(new_board, n, num_d, base, reqs):
    """Invariant 3 (total_tokens): from equal starts, for any sequence of request sizes
    from any mix of dispatchers, max - min of effective tokens <= the largest single
    request dispatched so far, after every dispatch."""
    with new_board(n, num_d) as board:
        ranks = [SimRank(board, r, base_reqs=1, base_tokens=base) for r in range(n)]
        disps = [Dispatcher(board, d, "total_tokens") for d in range(num_d)]
        largest = 0
        for d, size in reqs:
            dispatch(disps[d % num_d], ranks, size)
            largest = max(largest, size)
            toks = effective(board)[1]
            assert max(toks) - min(toks) <= largest


# ---- invariant 4 on the board (the property itself is in test_policy.py) -----------------
@pytest.mark.parametrize("method", ["round_robin", "total_requests", "total_tokens"])
def test_dead_and_stale_ranks_are_never_picked(new_board, method):
    """Invariant 4 on the board: a rank DEAD, DRAINING or silent past stale_ns is skipped
    by every method, and comes back once READY and fresh; none alive -> NoLiveRankError."""
    stale_ns = 1_000_000_000
    with new_board(4) as board:
        ranks = [SimRank(board, r) for r in range(4)]
        disp = Dispatcher(board, 0, method, stale_ns=stale_ns)
        ranks[1].writer.set_status(RankStatus.DEAD)
        ranks[2].writer.set_status(RankStatus.DRAINING)
        # Rank 3's scheduler hung 2 * stale_ns ago. Written raw: the writer itself
        # refuses to move a heartbeat back in time (readers rely on it only growing).
        board.cells[board.layout.heartbeat_cell(3)] = time.monotonic_ns() - 2 * stale_ns
        assert {disp.pick(10) for _ in range(12)} == {0}
        ranks[1].writer.set_status(RankStatus.READY)
        ranks[3].writer.heartbeat()
        picks = {disp.pick(10) for _ in range(12)}
        assert {1, 3} <= picks <= {0, 1, 3}  # least-loaded methods first fill 1 and 3
        for sim in ranks:
            sim.writer.set_status(RankStatus.DEAD)
        with pytest.raises(NoLiveRankError):
            disp.pick(10)


# ---- invariant 5 -----------------------------------------------------------------------
@PROPS
@given(n=st.integers(1, 8), rooms=st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=30))
def test_follow_bootstrap_room_is_room_mod_n(new_board, n, rooms):
    """Invariant 5a: with follow_bootstrap_room the rank is always room % n."""
    with new_board(n) as board:
        ranks = [SimRank(board, r) for r in range(n)]
        disp = Dispatcher(board, 0, "follow_bootstrap_room")
        for room in rooms:
            assert dispatch(disp, ranks, 5, bootstrap_room=room) == room % n


@PROPS
@given(n=st.integers(1, 8), method=st.sampled_from(METHODS), data=st.data())
def test_routed_dp_rank_is_always_obeyed(new_board, n, method, data):
    """Invariant 5b: a routed_dp_rank wins over every method whatever the loads; out of
    range is InvalidDpRankError and a dead target RankUnavailableError, and a refused
    request is never counted."""
    base = data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    targets = data.draw(st.lists(st.integers(-2, n + 1), min_size=1, max_size=30))
    dead = data.draw(st.integers(0, n - 1))
    with new_board(n) as board:
        ranks = [SimRank(board, r, base_reqs=base[r], base_tokens=base[r]) for r in range(n)]
        ranks[dead].writer.set_status(RankStatus.DEAD)
        disp = Dispatcher(board, 0, method)
        for target in targets:
            before = board.snapshot().dispatched_reqs.sum()
            if not 0 <= target < n:
                with pytest.raises(InvalidDpRankError):
                    disp.pick(3, routed_dp_rank=target, bootstrap_room=7)
            elif target == dead:
                with pytest.raises(RankUnavailableError):
                    disp.pick(3, routed_dp_rank=target, bootstrap_room=7)
            else:
                assert dispatch(disp, ranks, 3, routed_dp_rank=target, bootstrap_room=7) == target
                continue
            assert board.snapshot().dispatched_reqs.sum() == before


def test_construction_and_request_errors(new_board):
    with new_board(2) as board:
        with pytest.raises(InvalidLoadBalanceMethod):
            Dispatcher(board, 0, "auto")  # auto is resolved at start-up, not per request
        with pytest.raises(InvalidLoadBalanceMethod):
            Dispatcher(board, 0, "shortest_queue")  # so are the deprecated aliases
        with pytest.raises(InvalidLoadBalanceMethod, match="summaries"):
            Dispatcher(board, 0, "cache_aware")  # nothing to read what ranks cache from
        disp = Dispatcher(board, 0, "follow_bootstrap_room")
        SimRank(board, 0), SimRank(board, 1)
        with pytest.raises(MissingBootstrapRoomError):
            disp.pick(5)



# ---- cache_aware: the summaries and the board feed the policy ------------------------------
def _common_len(a: tuple, b: tuple) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@PROPS
@given(n=st.integers(1, 5), data=st.data())
def test_cache_aware_pick_is_the_policy_over_summaries_and_loads(new_board, n, data):
    """Dispatcher.pick with cache_aware chooses exactly what scheduler.policy.cache_aware
    chooses from each rank's cached prefix (what the ranks' caches hold, in whole
    blocks) and the snapshot's effective loads; with nothing cached, prefill_tokens."""
    system = tuple(range(1000, 1000 + 3 * BLOCK_LEN - 20))
    prompts = [system + tuple(range(q, q + 90)) for q in (1, 2, 3)] + [tuple(range(7, 300))]
    ops = data.draw(st.lists(st.one_of(
        st.tuples(st.just("cache"), st.integers(0, n - 1), st.integers(0, 3)),
        st.tuples(st.just("pick"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("ack"), st.integers(0, n - 1), st.integers(1, 4)),
        st.tuples(st.just("dec"), st.integers(0, n - 1), st.just(0))), max_size=30))
    with new_board(n) as board, PrefixSummary.create(n, 64, new_launch_id()) as summary:
        ranks = [SimRank(board, r) for r in range(n)]
        writers = [summary.writer(r) for r in range(n)]
        held: list[list[tuple]] = [[] for _ in range(n)]  # the paths each rank's cache holds
        # The summaries alone (no memory of recent misses: the test below has it).
        disp = Dispatcher(board, 0, "cache_aware", summary=summary, pending_s=0)
        traffic = PrefixTraffic()  # the oracle's count of the prefixes reused
        for op, a, b in ops:
            if op == "cache":
                path = prompts[b]
                start = max((_common_len(path, p) for p in held[a]), default=0)
                writers[a].on_cached(path, start)
                held[a].append(path)
            elif op == "ack":
                ranks[a].receive(b)
                ranks[a].publish()
            elif op == "dec":
                ranks[a].decode()
                ranks[a].publish()
            else:
                prompt = prompts[a]
                cached = [max((_common_len(prompt, p) for p in held[r]), default=0)
                          // BLOCK_LEN * BLOCK_LEN for r in range(n)]
                reqs, toks, prefill = effective(board)
                expected_rotation = RotationState(disp.rotation.next_start)
                depth = max(cached) // BLOCK_LEN
                count = traffic.note(block_keys(prompt)[depth - 1] if depth else None)
                expected = cache_aware(cached if any(cached) else None, prefill, toks, reqs,
                                       (True,) * n, expected_rotation,
                                       depth > 0 and traffic.is_hot(count, n))
                if not any(cached):
                    assert expected == prefill_tokens(prefill, toks, reqs, (True,) * n,
                                                      RotationState(disp.rotation.next_start))
                assert dispatch(disp, ranks, len(prompt), input_ids=prompt) == expected
                assert disp.rotation == expected_rotation
        del writers


def test_cache_aware_spreads_a_hot_prefix_sooner(new_board):
    """A prefix rank 0 caches, on ranks that each carry 10 requests: while few requests
    have reused it, rank 0 takes them up to the loose guard (twice the mean); once it
    carries more than half a rank's share of the requests (and HOT_MIN_REQUESTS of them)
    the tight guard applies, and the next one goes elsewhere."""
    system = list(range(1000, 1000 + 3 * BLOCK_LEN))
    with new_board(4) as board, PrefixSummary.create(4, 64, new_launch_id()) as summary:
        ranks = [SimRank(board, r, base_reqs=10, base_tokens=1000) for r in range(4)]
        for r in ranks:
            r.publish()
        writer = summary.writer(0)
        writer.on_cached(system, 0)
        disp = Dispatcher(board, 0, "cache_aware", summary=summary)
        picks = [dispatch(disp, ranks, 200, input_ids=system + [q] * 9)
                 for q in range(HOT_MIN_REQUESTS)]
        # The 8th: rank 0 at 17 requests, mean 11.75: under 2 x 11.75, above the mean
        # (the hot guard).
        assert picks == [0] * (HOT_MIN_REQUESTS - 1) + [picks[-1]] and picks[-1] != 0
        del writer


def test_cancel_takes_back_a_pick_that_was_never_sent(new_board):
    """A request counted by ``pick`` whose send failed leaves no load behind."""
    with new_board(3) as board:
        disp = Dispatcher(board, 0, "total_requests")
        for r in range(3):
            SimRank(board, r)
        rank = disp.pick(40)
        counted = [40 if r == rank else 0 for r in range(3)]
        assert effective(board) == ([1 if r == rank else 0 for r in range(3)], counted, counted)
        disp.cancel(rank, 40)
        assert effective(board) == ([0, 0, 0], [0, 0, 0], [0, 0, 0])
        with pytest.raises(ValueError):
            disp.cancel(rank, 40)  # nothing left to take back
        rank = disp.pick(40)
        with pytest.raises(ValueError):
            disp.cancel(rank, 41)  # more tokens than were counted: refused, nothing moved
        assert effective(board)[1] == [40 if r == rank else 0 for r in range(3)]


# ---- invariant 6 -----------------------------------------------------------------------
@PROPS
@given(n=st.integers(1, 5), methods=st.lists(st.sampled_from(METHODS), min_size=1, max_size=3),
       data=st.data())
def test_conservation_everything_reported_means_zero_load(new_board, n, methods, data):
    """Invariant 6 (conservation): for any interleaving of dispatches (any methods, any
    dispatchers), receives, decode steps, finishes and reports, once every dispatched
    request is received, finished and reported, every effective load is 0, in requests,
    tokens and prefill tokens."""
    num_d = len(methods)
    ops = data.draw(st.lists(st.one_of(
        st.tuples(st.just("disp"), st.integers(0, num_d - 1), st.integers(1, 2048),
                  st.integers(0, 2**63 - 1)),
        sched_op), max_size=100))
    drain_order = data.draw(st.permutations(range(n)))
    with new_board(n, num_d) as board:
        ranks = [SimRank(board, r) for r in range(n)]
        disps = [Dispatcher(board, d, m) for d, m in enumerate(methods)]
        for op in ops:
            if op[0] == "disp":
                dispatch(disps[op[1]], ranks, op[2], bootstrap_room=op[3])
            else:
                apply_sched_op(op, ranks)
        assert_board_matches_oracle(board, ranks)
        for r in drain_order:
            ranks[r].drain()
            assert_board_matches_oracle(board, ranks)
        assert effective(board) == ([0] * n, [0] * n, [0] * n)


# ---- invariant 7 -----------------------------------------------------------------------
def _dispatch_in_child(board_name: str, dispatcher_id: int, num_requests: int, barrier) -> None:
    """Child process: one dispatcher (as one API process would be) sending a burst."""
    board = LoadBoard.attach(board_name)
    try:
        disp = Dispatcher(board, dispatcher_id, "total_requests")
        barrier.wait()
        for i in range(num_requests):
            disp.pick(1 + i % 97)
        del disp
    finally:
        board.close()


def _ack_everything_dispatched(board: LoadBoard, writers: list) -> int:
    """Every rank receives all that was sent to it (no completions) and reports.
    Returns the spread (max - min) of requests dispatched per rank so far."""
    snap = board.snapshot()
    for r, writer in enumerate(writers):
        acked_reqs = snap.dispatched_reqs[:, r].tolist()
        acked_tokens = snap.dispatched_tokens[:, r].tolist()
        writer.publish(sum(acked_reqs), 0, sum(acked_tokens), acked_reqs, acked_tokens,
                       num_prefill_tokens=0, num_kv_tokens=sum(acked_tokens))
        writer.heartbeat()
    per_rank = snap.dispatched_reqs.sum(axis=0)
    return int(per_rank.max() - per_rank.min())


def test_two_dispatcher_processes_balance_as_one(new_board):
    """Invariant 7: two dispatcher processes dispatching concurrently onto one board,
    while the schedulers ack and report, end with per-rank totals that differ by
    <= 1 + number of dispatchers under total_requests (and never differ by more at
    any moment sampled during the run: each dispatcher has at most one pick between
    its read and its bump, so each adds at most one request the others did not see)."""
    num_ranks, num_d, per_child = 4, 2, 20000
    ctx = multiprocessing.get_context("spawn")
    with new_board(num_ranks, num_d) as board:
        writers = [board.rank_writer(r) for r in range(num_ranks)]
        for w in writers:
            w.set_status(RankStatus.READY)
            w.heartbeat()
        barrier = ctx.Barrier(num_d, timeout=60)
        children = [ctx.Process(target=_dispatch_in_child, args=(board.name, d, per_child, barrier))
                    for d in range(num_d)]
        try:
            for child in children:
                child.start()
            deadline = time.monotonic() + 90
            max_spread = 0
            while any(c.is_alive() for c in children) and time.monotonic() < deadline:
                # Concurrent seqlocked reports while the dispatchers read.
                max_spread = max(max_spread, _ack_everything_dispatched(board, writers))
            for child in children:
                child.join(timeout=max(0.0, deadline - time.monotonic()))
            exitcodes = [c.exitcode for c in children]
            assert exitcodes == [0] * num_d, f"a dispatcher process failed or hung: {exitcodes}"
        finally:
            for child in children:
                if child.is_alive():
                    child.kill()
                    child.join(5)
        del writers
        snap = board.snapshot()
        per_rank = snap.dispatched_reqs.sum(axis=0).tolist()
        assert sum(per_rank) == num_d * per_child
        assert max(per_rank) - min(per_rank) <= 1 + num_d, per_rank
        assert max_spread <= 1 + num_d
        assert snap.effective_reqs.tolist() == per_rank  # acks moved load, never lost it


def test_cache_aware_sends_a_prompt_to_where_its_prefix_is_being_prefilled(new_board):
    """No rank caches anything yet: a prompt that shares whole blocks with one just sent
    goes where that one went (it will find the prefix there once prefilled), whatever
    the rotation, until the guard spills it; a prompt sharing nothing is placed
    on the loads alone."""
    system = list(range(1000, 1000 + 3 * BLOCK_LEN))
    with new_board(4) as board, PrefixSummary.create(4, 64, new_launch_id()) as summary:
        ranks = [SimRank(board, r) for r in range(4)]
        disp = Dispatcher(board, 0, "cache_aware", summary=summary)
        first = dispatch(disp, ranks, 200, input_ids=system + [1, 2, 3])
        for q in range(5):
            assert dispatch(disp, ranks, 200, input_ids=system + [q] * 9) == first
        # Six requests against a mean of 1.5: over the guard (mean + GUARD_SLACK); the
        # prefix is not hot yet (HOT_MIN_REQUESTS), so the loose guard.
        assert dispatch(disp, ranks, 200, input_ids=system + [5] * 9) != first
        other = dispatch(disp, ranks, 200, input_ids=list(range(5, 300)))
        assert other != first


def test_cache_aware_counts_traffic_by_the_deepest_cached_block(new_board):
    """Two prompt families share their first block and part after it; rank 0 caches both,
    three blocks deep. Requests of family A count for A's three-block prefix, not for
    the block both families share."""
    shared = list(range(1000, 1000 + BLOCK_LEN))
    family_a = shared + list(range(2000, 2000 + 2 * BLOCK_LEN))
    family_b = shared + list(range(3000, 3000 + 2 * BLOCK_LEN))
    with new_board(2) as board, PrefixSummary.create(2, 64, new_launch_id()) as summary:
        ranks = [SimRank(board, r) for r in range(2)]
        writer = summary.writer(0)
        writer.on_cached(family_a, 0)
        writer.on_cached(family_b, BLOCK_LEN)
        disp = Dispatcher(board, 0, "cache_aware", summary=summary)
        for q in range(5):
            dispatch(disp, ranks, 200, input_ids=family_a + [q] * 9)
        a_hashes = chain_hashes(tuple(family_a), 3, [])
        assert disp.traffic.count(a_hashes[2]) == 5
        assert disp.traffic.count(a_hashes[0]) == 0
        del writer


def test_cache_aware_shares_a_hot_prefix_among_the_live_ranks_only(new_board):
    """Rank 3 is dead. Of the last 50 requests, 8 reused rank 0's prefix: not more than
    half of one of 3 live ranks' share (8 * 3 <= 25), so the loose guard applies and rank
    0, one request above the mean, keeps the request. Counted over all 4 ranks the
    prefix would be hot (8 * 4 > 25) and the request would go elsewhere."""
    system = list(range(1000, 1000 + 3 * BLOCK_LEN))
    with new_board(4) as board, PrefixSummary.create(4, 64, new_launch_id()) as summary:
        ranks = [SimRank(board, r, base_reqs=reqs, base_tokens=100 * reqs)
                 for r, reqs in enumerate([11, 10, 10, 0])]
        ranks[3].writer.set_status(RankStatus.DEAD)
        writer = summary.writer(0)
        writer.on_cached(system, 0)
        disp = Dispatcher(board, 0, "cache_aware", summary=summary)
        key = chain_hashes(tuple(system), 3, [])[2]
        for _ in range(42):
            disp.traffic.note(None)
        for _ in range(HOT_MIN_REQUESTS - 1):
            disp.traffic.note(key)
        assert dispatch(disp, ranks, 200, input_ids=system + [1] * 9) == 0
        assert disp.traffic.count(key) == HOT_MIN_REQUESTS and len(disp.traffic) == 50
        del writer


def test_cache_aware_counts_traffic_for_a_pending_prefix(new_board):
    """No rank caches anything: a burst of prompts sharing three blocks goes where the
    first went, and each one after the first counts as reusing the three-block prefix
    under the key the summaries will give it."""
    system = list(range(1000, 1000 + 3 * BLOCK_LEN))
    with new_board(4) as board, PrefixSummary.create(4, 64, new_launch_id()) as summary:
        ranks = [SimRank(board, r) for r in range(4)]
        disp = Dispatcher(board, 0, "cache_aware", summary=summary)
        for q in range(4):
            dispatch(disp, ranks, 200, input_ids=system + [q] * 9)
        key = disp.pending.prefix_key(first_hash(system), 3)
        assert key == chain_hashes(tuple(system), 3, [])[2]
        assert disp.traffic.count(key) == 3


def test_cache_aware_weighs_shared_caches_where_the_summary_keeps_slot_records(new_board):
    """Ranks whose summary keeps slot records copy each other's prefixes: rank 0 holds
    the prompt's three blocks but has 400 prompt tokens queued, so the request goes to
    an idle peer (cache_aware with shared caches), where without sharing rank 0 wins."""
    system = list(range(1000, 1000 + 3 * BLOCK_LEN))
    prompt = system + [1] * 9
    with new_board(4) as board, PrefixSummary.create(4, 64, new_launch_id(),
                                                     slot_records=True) as summary:
        ranks = [SimRank(board, r) for r in range(4)]
        writer = summary.writer(0)
        writer.on_cached(system, 0)
        disp = Dispatcher(board, 0, "cache_aware", summary=summary)
        assert disp.shared_prefixes
        dispatch(disp, ranks, 400, routed_dp_rank=0)
        reqs, toks, prefill = effective(board)
        cached, alive = [3 * BLOCK_LEN, 0, 0, 0], (True,) * 4
        start = disp.rotation.next_start
        plain = cache_aware(cached, prefill, toks, reqs, alive, RotationState(start))
        expected = cache_aware(cached, prefill, toks, reqs, alive, RotationState(start),
                               shared=True)
        assert plain == 0 and expected != 0
        assert dispatch(disp, ranks, len(prompt), input_ids=prompt) == expected
        del writer


def test_forget_prefixes_empties_the_traffic_window(new_board):
    """After the caches are flushed no prefix is hot: the traffic window starts over."""
    with new_board(2) as board, PrefixSummary.create(2, 64, new_launch_id()) as summary:
        disp = Dispatcher(board, 0, "cache_aware", summary=summary)
        for _ in range(3 * HOT_MIN_REQUESTS):
            disp.traffic.note(12345)
        disp.forget_prefixes()
        assert len(disp.traffic) == 0
        assert disp.traffic.count(12345) == 0
