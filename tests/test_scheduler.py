"""The rank scheduler: board truth after every batch, aborts, admission errors.

These run the real ``Scheduler`` in-process over a real board with the zero-cost
simulated executor (``instant`` profile), so they test scheduling and accounting,
not the model (tests/test_engine_scheduler.py runs the same with the real model).
"""

from __future__ import annotations

import random

import pytest

from engine.sampling import SamplingParams
from scheduler.config import SchedulerConfig
from scheduler.messages import AbortReq, GenerateReq, ShutdownReq
from scheduler.scheduler import Scheduler
from sim.executor import SimExecutor, load_profile
from shm.board import LoadBoard, RankStatus
from shm.segment import new_launch_id
from tests.board_helpers import read_effective

FOREVER = 1 << 62


@pytest.fixture
def board():
    b = LoadBoard.create(1, 2, launch_id=new_launch_id())
    try:
        yield b
    finally:
        b.close()


def make_scheduler(board, pool_tokens=4096, **cfg_kw):
    cfg = SchedulerConfig(dp_rank=0, board_name=board.name, num_dispatchers=2, executor="sim",
                          sim_profile="instant", **cfg_kw)
    row = board.rank_writer(0)
    row.set_status(RankStatus.READY)
    sent = []
    sched = Scheduler(cfg, SimExecutor(load_profile("instant"), pool_tokens), row, sent.append)
    writers = [board.dispatcher_writer(d) for d in range(2)]
    real_step = sched.step

    def step(messages):
        """Dispatch first, as the API does: bump the board, then deliver."""
        for m in messages:
            if isinstance(m, GenerateReq):
                writers[m.dispatcher_id].bump(0, m.counted_tokens)
        real_step(messages)

    sched.step = step
    return sched, sent


def gen(rid, prompt_len, max_new, dispatcher=0, **params):
    return GenerateReq(rid=rid, input_ids=list(range(1, prompt_len + 1)),
                       sampling_params=SamplingParams(max_new_tokens=max_new, temperature=0.0, **params),
                       dispatcher_id=dispatcher, counted_tokens=prompt_len)


def assert_board_matches(board, sched):
    snap = board.snapshot()
    held = sched.running + list(sched.waiting)
    assert snap.num_reqs[0] == len(held)
    assert snap.num_waiting_reqs[0] == len(sched.waiting)
    # Cached prefixes running requests read count once; unread cached tokens not at all.
    locked = sched.cache.protected_size if sched.cache is not None else 0
    expected_tokens = locked + sum(
        r.num_computed - r.prefix_len + (r.fill_len - r.num_computed if r.is_prefilling else 0)
        for r in sched.running) + sum(r.fill_len - r.queued_cached for r in sched.waiting)
    assert snap.num_tokens[0] == expected_tokens
    expected_prefill = (sum(r.fill_len - r.num_computed for r in sched.running if r.is_prefilling)
                        + sum(r.fill_len - r.queued_cached for r in sched.waiting))
    assert snap.num_prefill_tokens[0] == expected_prefill
    cached = sched.cache.total_size if sched.cache is not None else 0
    assert sched.executor.kv.num_used == cached + sum(len(r.slots) - r.prefix_len
                                                      for r in sched.running)
    # Everything received is acknowledged, so the in-flight term is exactly zero.
    assert snap.in_flight_reqs[0] == 0


def test_board_row_equals_scheduler_state_after_every_batch(board):
    sched, sent = make_scheduler(board, chunked_prefill_size=64, max_running_requests=8)
    rng = random.Random(0)
    msgs = [gen(f"r{i}", rng.randint(1, 200), rng.randint(1, 30), dispatcher=i % 2) for i in range(40)]
    steps = 0
    while msgs or sched.has_work:
        batch_in = [msgs.pop(0) for _ in range(min(len(msgs), rng.randint(0, 5)))]
        sched.step(batch_in)
        assert_board_matches(board, sched)
        steps += 1
        assert steps < 10_000
    finished = {o.rid: o for b in sent for o in b.outputs if o.finish_reason}
    assert len(finished) == 40
    assert all(o.finish_reason["type"] == "length" for o in finished.values())
    reqs, toks, _ = read_effective(board, FOREVER)
    assert (reqs, toks) == ([0], [0])
    assert sched.num_kv_in_use == 0


def test_outputs_are_cumulative_per_request_and_one_message_per_batch(board):
    sched, sent = make_scheduler(board)
    sched.step([gen("a", 5, 4), gen("b", 3, 2)])
    while sched.has_work:
        sched.step([])
    tokens = {}
    for batch in sent:
        assert len({o.rid for o in batch.outputs}) == len(batch.outputs)
        for o in batch.outputs:
            tokens.setdefault(o.rid, []).extend(o.new_token_ids)
            assert o.completion_tokens == len(tokens[o.rid])
    assert len(tokens["a"]) == 4 and len(tokens["b"]) == 2


def test_abort_frees_kv_and_load_at_once(board):
    sched, sent = make_scheduler(board, chunked_prefill_size=8)
    sched.step([gen("long", 100, 50), gen("queued", 10, 5)])
    assert sched.num_kv_in_use > 0
    sched.step([AbortReq(rid="long"), AbortReq(rid="queued")])
    assert sched.num_kv_in_use == 0
    assert not sched.has_work
    assert_board_matches(board, sched)
    aborted = [o for b in sent for o in b.outputs if o.finish_reason and o.finish_reason["type"] == "abort"]
    assert {o.rid for o in aborted} == {"long", "queued"}
    sched.step([AbortReq(rid="long")])  # aborting twice is harmless


def test_request_that_can_never_fit_gets_a_clear_error_and_leaves_no_load(board):
    sched, sent = make_scheduler(board, pool_tokens=256)
    sched.step([gen("big", 200, 100), gen("ok", 10, 3)])
    errors = {o.rid: o.finish_reason for b in sent for o in b.outputs if o.finish_reason}
    assert errors["big"]["type"] == "abort"
    assert "KV tokens" in errors["big"]["message"]
    while sched.has_work:
        sched.step([])
    reqs, toks, _ = read_effective(board, FOREVER)
    assert (reqs, toks) == ([0], [0])


def test_full_pool_queues_instead_of_failing(board):
    sched, sent = make_scheduler(board, pool_tokens=100)
    sched.step([gen(f"q{i}", 40, 10) for i in range(4)])
    assert len(sched.running) == 2 and len(sched.waiting) == 2
    while sched.has_work:
        sched.step([])
    done = [o for b in sent for o in b.outputs if o.finish_reason]
    assert sorted(o.rid for o in done) == ["q0", "q1", "q2", "q3"]


@pytest.mark.parametrize("cache", [True, False])
def test_requests_past_their_reservation_grow_and_the_newest_are_retracted(board, cache):
    """Reserving 16 new tokens each, eight requests of 300 run at once in a pool that
    holds two whole; decoding on, the pool fills, the newest give way (back to the queue
    head, their KV into the cache) and are computed again. Every request ends with all
    its tokens, the same as alone, with the board exact after every batch and no slot
    left."""
    sched, sent = make_scheduler(board, pool_tokens=800, clip_max_new_tokens_estimation=16,
                                 chunked_prefill_size=256, disable_radix_cache=not cache)
    msgs = [gen(f"g{i}", 50 + i, 300) for i in range(8)]
    sched.step(msgs)
    most_running, steps = len(sched.running), 0
    while sched.has_work:
        sched.step([])
        assert_board_matches(board, sched)
        most_running = max(most_running, len(sched.running))
        steps += 1
        assert steps < 20_000
    assert most_running >= 4 and sched.num_retracted > 0
    tokens = {}
    for batch in sent:
        for o in batch.outputs:
            tokens.setdefault(o.rid, []).extend(o.new_token_ids)
            assert o.completion_tokens == len(tokens[o.rid])
    finished = {o.rid: o.finish_reason for b in sent for o in b.outputs if o.finish_reason}
    assert all(f == {"type": "length", "length": 300} for f in finished.values()), finished
    alone, alone_sent = make_scheduler(board, pool_tokens=800)
    for m in msgs:  # one at a time, never short of KV
        alone.step([m])
        while alone.has_work:
            alone.step([])
    assert alone.num_retracted == 0
    expected = {}
    for batch in alone_sent:
        for o in batch.outputs:
            expected.setdefault(o.rid, []).extend(o.new_token_ids)
    assert tokens == expected
    assert sched.num_kv_in_use == 0 and read_effective(board, FOREVER)[:2] == ([0], [0])


def test_no_request_is_retracted_while_the_pool_has_the_slot_this_step_needs(board):
    """Two requests that fit together to the end (about 380 of 400 slots) though not with
    64-slot growth steps: growth falls back to one slot, and nothing is retracted (a
    retraction here recomputed 179 tokens 11 before the request ended)."""
    sched, sent = make_scheduler(board, pool_tokens=400, clip_max_new_tokens_estimation=16,
                                 disable_radix_cache=True, chunked_prefill_size=64)
    sched.step([gen("A", 100, 250), gen("B", 100, 90)])
    while sched.has_work:
        sched.step([])
        assert_board_matches(board, sched)
    assert sched.num_retracted == 0
    finished = {o.rid: o.finish_reason for b in sent for o in b.outputs if o.finish_reason}
    assert finished == {"A": {"type": "length", "length": 250},
                        "B": {"type": "length", "length": 90}}


def test_shutdown_aborts_what_is_held(board):
    sched, sent = make_scheduler(board)
    sched.step([gen("x", 10, 100)])
    sched.step([ShutdownReq()])
    assert sched.stopped
    sched.abort_all("shutting down")
    assert sched.num_kv_in_use == 0
    assert any(o.rid == "x" and o.finish_reason and o.finish_reason["type"] == "abort" for b in sent for o in b.outputs)


@pytest.mark.parametrize("lockstep", [False, True])
def test_board_during_a_forward_shows_step_end_load_only_in_lockstep(board, lockstep):
    """Lockstep ranks publish, before each forward, the load left when it ends: a
    request sampling its last allowed token is not counted while that pass runs.
    Independent ranks show the load from before the pass (work in flight counts).
    The prompts share prefixes; without the cache every token is computed."""
    sched, sent = make_scheduler(board, chunked_prefill_size=64, disable_radix_cache=True)
    sched.executor.steps_in_lockstep = lockstep  # as a lockstep member's executor says
    seen = []
    real_forward = sched.executor.forward

    def forward(items):
        reqs, tokens, _ = read_effective(board, FOREVER)  # rows + dispatched, not yet acked
        prefill = int(board.snapshot().effective_prefill_tokens[0])
        seen.append(({i.req.rid for i in items}, reqs[0], tokens[0], prefill))
        return real_forward(items)

    sched.executor.forward = forward
    # "one" leaves in its first pass (max_new_tokens=1); "two" needs two passes;
    # "chunked" is 100 tokens in chunks of at most 64.
    sched.step([gen("one", 10, 1), gen("two", 20, 2)])
    while sched.has_work:
        sched.step([gen("chunked", 100, 1)] if len(seen) == 1 else [])
    # Prompt tokens still to prefill: in lockstep, without those this pass computes.
    rids, reqs, tokens, prefill = seen[0]
    assert rids == {"one", "two"}
    assert (reqs, tokens, prefill) == ((1, 20, 0) if lockstep else (2, 30, 30))
    rids, reqs, tokens, prefill = seen[1]  # "two" samples its last token; "chunked" starts
    assert rids == {"two", "chunked"}
    assert (reqs, tokens, prefill) == ((1, 100, 36) if lockstep else (2, 120, 100))
    rids, reqs, tokens, prefill = seen[2]  # the last 36 of "chunked": it leaves in this pass
    assert rids == {"chunked"}
    assert (reqs, tokens, prefill) == ((0, 0, 0) if lockstep else (1, 100, 36))
    assert len(seen) == 3
    assert_board_matches(board, sched)


import msgspec  # noqa: E402


def test_a_queued_request_counts_only_what_the_cache_does_not_hold(board):
    """A request waiting for room whose prompt's beginning is cached loads the board
    with its uncached tokens only: the rank will reuse the rest (cache_aware compares
    ranks by this prefill queue)."""
    sched, _ = make_scheduler(board, pool_tokens=300, max_running_requests=1)
    sched.step([gen("first", 120, 2)])
    while sched.has_work:
        sched.step([])  # "first" ends: tokens 1..120 are cached
    miss = msgspec.structs.replace(gen("miss", 30, 2), input_ids=list(range(500, 530)))
    sched.step([gen("long", 100, 50), gen("hit", 150, 2), miss])
    assert [r.rid for r in sched.waiting] == ["hit", "miss"]  # one running at a time
    assert [r.queued_cached for r in sched.waiting] == [120, 0]
    snap = board.snapshot()
    assert snap.num_prefill_tokens[0] == (sum(r.prompt_len - r.num_computed for r in sched.running
                                              if r.is_prefilling) + (150 - 120) + 30)
    assert_board_matches(board, sched)


def test_a_duplicate_rid_from_another_api_process_is_refused_beside_the_running_one(board):
    """Two API processes may send one rid to one rank: the second is refused (400) in
    the very step the first one's next token goes out, and both outputs are sent (the
    refusal once replaced the token in the step's outbox, and that client waited for
    ever)."""
    sched, sent = make_scheduler(board)
    sched.step([gen("dup", 5, 6, dispatcher=0)])
    before = len(sent)
    sched.step([gen("dup", 3, 2, dispatcher=1)])
    outs = [o for b in sent[before:] for o in b.outputs]
    refused = [o for o in outs if o.finish_reason and o.finish_reason["type"] == "abort"]
    assert len(refused) == 1 and "duplicate rid" in refused[0].finish_reason["message"]
    assert any(o.new_token_ids and o.finish_reason is None for o in outs), outs
    while sched.has_work:
        sched.step([])
    finished = [o for b in sent for o in b.outputs if o.finish_reason]
    assert [o.finish_reason["type"] for o in finished] == ["abort", "length"]
    assert_board_matches(board, sched)
    assert read_effective(board, FOREVER)[:2] == ([0], [0])
