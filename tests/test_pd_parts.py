"""PD building blocks and failure paths: the arena allocator, the KV segment, the
router's refusals, and every way a parked decode request ends without its KV."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampling import SamplingParams
from scheduler.pd_decode import MAX_SLEEP_S
from scheduler.pd_late import POLL_NS as LATE_POLL_NS
from scheduler.range_alloc import RangeAllocator
from shm.bootstrap_layout import (FAILED, KV_READY, R_WRITER_PID, BootstrapTableFullError,
                                  DuplicateRoomError)
from shm.kv_segment import KVSegment
from shm.segment import SharedSegment, ShmLayoutError, list_segments, new_launch_id, segment_name
from tests.pd_local import FOREVER_NS, LocalPD, sim_executor_factory
from tests.board_helpers import read_effective


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


@pytest.fixture
def pd():
    with LocalPD(2, 2, sim_executor_factory("instant", 4096), bootstrap_timeout_s=0.3,
                 waiting_timeout_s=0.3) as cluster:
        yield cluster


def run_until_finished(pd: LocalPD, rid: str, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while pd.finish_reason(rid) is None:
        assert time.monotonic() < deadline, f"{rid} never finished"
        pd.step()
        time.sleep(0.001)
    return pd.finish_reason(rid)


# ---- range allocator -------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=200))
def test_range_allocator_never_overlaps_and_coalesces(ops):
    alloc = RangeAllocator(300)
    live: dict[int, int] = {}
    for do_alloc, n in ops:
        if do_alloc or not live:
            start = alloc.alloc(n)
            if start is None:
                assert sum(live.values()) + n > 300 or alloc.num_free_ranges > 1
                continue
            cells = set(range(start, start + n))
            assert start + n <= 300
            assert not any(cells & set(range(s, s + m)) for s, m in live.items())
            live[start] = n
        else:
            start = sorted(live)[n % len(live)]
            alloc.free(start, live.pop(start))
        assert alloc.num_used == sum(live.values())
    for start, n in list(live.items()):
        alloc.free(start, n)
    assert alloc.num_used == 0 and alloc.num_free_ranges == 1 and alloc.alloc(300) == 0


def test_range_allocator_refuses_double_free():
    alloc = RangeAllocator(10)
    start = alloc.alloc(4)
    alloc.free(start, 4)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(start, 4)


# ---- KV segment --------------------------------------------------------------------------
def test_kv_segment_records_round_trip_and_owner_unlinks():
    name = segment_name("kv-test", new_launch_id())
    seg = KVSegment.create(name, capacity=64, token_bytes=16)
    try:
        peer = KVSegment.attach(name)
        seg.write_record(10, -0.25, [5, 3, 9])
        logprob, top, slots = peer.read_record(10, 3)
        assert logprob == -0.25 and top is None and slots.tolist() == [5, 3, 9]
        asked = [(-0.25, 7), (-1.5, 2)]  # the first token's top list travels with it
        seg.write_record(20, -0.25, [4, 1], asked)
        assert KVSegment.record_len(2, asked) == 8
        logprob, top, slots = peer.read_record(20, 2)
        assert top == asked and slots.tolist() == [4, 1]
        seg.write_record(30, -0.5, [6], [])  # logprobs asked, no top list
        assert peer.read_record(30, 1)[1] == []
        assert peer.capacity == 64 and peer.token_bytes == 16 and peer.owner_pid == os.getpid()
        assert len(peer.kv_buf) == 64 * 16 and not peer.is_owner
        peer.close(unmap=True)
    finally:
        seg.close(unmap=True)
    assert name not in list_segments()


def test_peer_segments_unmap_the_pools_they_stop_using():
    """A decode rank follows restarted prefill ranks and servers: each pool it stops
    using is forgotten by the executor (its tensor view dropped) and unmapped, so the
    memory goes back once the owner unlinked it (it stayed mapped until the rank exited,
    a whole KV pool per prefill restart)."""
    import numpy as np
    import torch

    from engine.config import ModelConfig
    from engine.kv_transfer import KVImporter
    from engine.tiny import TINY_HF_CONFIG
    from shm.kv_segment import PeerSegments

    config = ModelConfig.from_hf_dict(TINY_HF_CONFIG)
    token_bytes = config.kv_bytes_per_token(4)
    names = [segment_name("kv-test", new_launch_id()) for _ in range(2)]
    owners = [KVSegment.create(name, capacity=8, token_bytes=token_bytes) for name in names]
    dst = torch.zeros(config.num_hidden_layers, 8, 2, config.num_key_value_heads,
                      config.head_dim)
    importer = KVImporter(config, dst)
    current = {"name": names[0]}
    retired = []

    def forget(seg):
        retired.append(seg)
        importer.forget(seg)

    peers = PeerSegments(lambda rank, pid: current["name"], on_retire=forget)
    try:
        first = peers.get(0, os.getpid())
        importer.import_kv(first, np.array([1, 2]), [3, 4])  # a view over its pool
        assert peers.get(0, os.getpid()) is first and not retired
        assert peers.get(0, 0) is None  # the rank is gone: its pool is let go
        assert retired == [first] and first.segment.buf.closed and not importer._views
        current["name"] = names[1]
        second = peers.get(0, os.getpid())
        importer.import_kv(second, np.array([0]), [0])
        peers.clear()  # the prefill server restarted: new tables, new pools
        assert retired == [first, second] and second.segment.buf.closed
        assert not importer._views
    finally:
        for owner in owners:
            owner.close(unmap=True)
    assert not set(names) & set(list_segments())


def test_kv_segment_attach_refuses_other_segments():
    name = segment_name("not-kv", new_launch_id())
    with SharedSegment.create(name, 4096):
        with pytest.raises(ShmLayoutError, match="not a KV segment"):
            KVSegment.attach(name)


# ---- router ------------------------------------------------------------------------------
def test_router_refuses_a_live_room_and_a_full_table_without_counting(pd):
    router = pd.router
    router.dispatch_prefill(7, 10)
    before = read_effective(pd.boards["prefill"], FOREVER_NS)[0]
    with pytest.raises(DuplicateRoomError):
        router.dispatch_prefill(7, 10)
    route = router.route
    full, route.num_slots = route.num_slots, route.num_live  # pretend every slot is live
    try:
        with pytest.raises(BootstrapTableFullError):
            router.dispatch_prefill(8, 10)
    finally:
        route.num_slots = full
    assert read_effective(pd.boards["prefill"], FOREVER_NS)[0] == before
    router.prefill_finished(7)
    assert pd.route_table.num_live() == 0


def test_a_pick_whose_route_insert_fails_is_taken_back(pd, monkeypatch):
    """The prefill rank is picked (and counted) before the route is published: when the
    insert fails, its error reaches the caller and the pick leaves no load behind."""
    router = pd.router
    before = read_effective(pd.boards["prefill"], FOREVER_NS)[:2]

    def insert(*args, **kwargs):
        raise OSError("route table unwritable")

    monkeypatch.setattr(router.route, "insert", insert)
    with pytest.raises(OSError, match="route table unwritable"):
        router.dispatch_prefill(7, 10)
    assert read_effective(pd.boards["prefill"], FOREVER_NS)[:2] == before == ([0, 0], [0, 0])


def test_a_refusal_leaves_a_room_live_in_another_api_process_alone():
    """A room placed by one API process and refused by another (a second request with
    it): the refusing process publishes nothing, whichever region holds the live route."""
    from types import SimpleNamespace as NS

    from scheduler.pd import create_tables
    from scheduler.pd_router import PDRouter

    route, handoff = create_tables(new_launch_id(), 1, 1, num_prefill_dispatchers=2)
    picks = NS(pick=lambda *a: 0, cancel=lambda *a: None)
    try:
        first, second = (PDRouter(picks, None, route.region_writer(d)) for d in (0, 1))
        second.dispatch_prefill(9, 3)
        first.refused(9)
        assert first.route.num_live == 0 and first.route.slot_of(9) is None
        assert route.lookup(9).state != FAILED and route.lookup(9).region == 1
    finally:
        handoff.close()
        route.close()


def test_a_room_live_in_another_api_process_is_refused():
    """Two API processes, a route region each: a room one of them placed is refused by
    the other (each checked its own region only)."""
    from types import SimpleNamespace as NS

    from scheduler.pd import create_tables
    from scheduler.pd_router import PDRouter

    route, handoff = create_tables(new_launch_id(), 1, 1, num_prefill_dispatchers=2)
    picks = NS(pick=lambda *a: 0, cancel=lambda *a: None)
    try:
        first, second = (PDRouter(picks, None, route.region_writer(d)) for d in (0, 1))
        first.dispatch_prefill(9, 3)
        with pytest.raises(DuplicateRoomError):
            second.dispatch_prefill(9, 3)
        first.prefill_finished(9)
        second.dispatch_prefill(9, 3)  # free again once its request is done with it
    finally:
        handoff.close()
        route.close()


def test_a_refused_room_is_failed_for_its_decode_half_and_free_for_a_new_request():
    """A prefill server's refusal publishes the room FAILED (its decode half must not wait
    for a prefill that never comes); a live room is left alone; a new request for the room
    replaces this process's FAILED entry, and one placed by another process is what
    readers find, not the other's FAILED entry; refusals never take more than half the
    table."""
    from types import SimpleNamespace as NS

    from scheduler.pd import create_tables
    from scheduler.pd_router import PDRouter

    route, handoff = create_tables(new_launch_id(), 1, 1, num_prefill_dispatchers=2)
    picks = NS(pick=lambda *a: 0, cancel=lambda *a: None)
    try:
        first, second = (PDRouter(picks, None, route.region_writer(d)) for d in (0, 1))
        first.refused(5)
        assert route.lookup(5).state == FAILED
        first.dispatch_prefill(5, 3)  # a retry with the room, through the same process
        assert route.lookup(5).state != FAILED and first.route.num_live == 1
        first.refused(5)  # a second request with a live room: the first one's route stands
        assert route.lookup(5).state != FAILED
        first.prefill_finished(5)
        first.refused(6)
        second.dispatch_prefill(6, 3)  # through another process: its entry is found
        assert route.lookup(6).state != FAILED and route.lookup(6).region == 1
        second.prefill_finished(6)
        assert route.lookup(6).state == FAILED  # until it expires
        full = first.route.num_slots
        for room in range(100, 100 + full):
            first.refused(room)
        assert first.route.num_live == full // 2
    finally:
        handoff.close()
        route.close()


# ---- a parked decode request that never gets its KV ----------------------------------------
def test_prefill_lost_in_the_api_fails_decode_at_once(pd):
    pd.router.dispatch_prefill(11, 3)  # placed, but its prefill is never delivered
    pd.router.prefill_finished(11, ok=False)  # the API lost it (its rank died)
    pd.submit("d", [1, 2, 3], greedy(4), room=11, prefill=False)
    assert "prefill request failed" in run_until_finished(pd, "d", 0.2)["message"]


def test_a_refusal_fails_only_its_own_decode_half_and_only_while_it_lingers(pd):
    """A refused room (``PDRouter.refused``) fails a decode half with the refused prompt
    at once; a later request that reuses the room with another prompt, or with the same
    prompt once the refusal is past its linger, parks and is served as usual."""
    pd.router.refused(31, [1, 2, 3])
    pd.submit("same", [1, 2, 3], greedy(4), room=31, prefill=False)
    assert "prefill request failed" in run_until_finished(pd, "same", 0.2)["message"]
    pd.submit("other", [1, 2, 4], greedy(4), room=31, prefill=False)  # decode half first
    for _ in range(20):
        pd.step()
    assert pd.finish_reason("other") is None  # parked, not failed by the refusal
    pd.submit("other", [1, 2, 4], greedy(4), room=31, decode=False)
    assert run_until_finished(pd, "other")["type"] == "length"
    pd.router.refused(33, [1, 2, 3])  # two refusals with one room, two prompts:
    pd.router.refused(33, [1, 2, 5])  # the mark fails either's decode half
    for rid, ids in (("first", [1, 2, 3]), ("second", [1, 2, 5])):
        pd.submit(rid, ids, greedy(4), room=33, prefill=False)
        assert "prefill request failed" in run_until_finished(pd, rid, 0.2)["message"]
    pd.router.refused_linger_ns = 1_000_000  # 1 ms
    pd.router.refused(32, [5, 6, 7])
    time.sleep(0.01)
    pd.submit("late", [5, 6, 7], greedy(4), room=32, prefill=False)
    for _ in range(20):
        pd.step()
    assert pd.finish_reason("late") is None
    pd.submit("late", [5, 6, 7], greedy(4), room=32, decode=False)
    assert run_until_finished(pd, "late")["type"] == "length"
    pd.run()
    assert not any(pd.leftovers().values()), pd.leftovers()


def test_a_retry_failed_by_a_refusal_has_its_kv_released_at_once():
    """A retry with the refused request's room and prompt whose decode half comes first
    fails with the refusal (documented); its prefill half, still sent, hands its KV off
    a moment later: the decode rank's watch of the room releases it then, not at the
    bootstrap timeout (a refusal's mark ended the watch at once, and the KV stayed)."""
    with LocalPD(1, 1, sim_executor_factory("instant", 4096), bootstrap_timeout_s=60,
                 waiting_timeout_s=60) as pd:
        pd.router.refused(41, [1, 2, 3])
        pd.submit("retry", [1, 2, 3], greedy(4), room=41, prefill=False)
        assert "prefill request failed" in run_until_finished(pd, "retry", 0.5)["message"]
        pd.submit("retry", [1, 2, 3], greedy(4), room=41, decode=False)
        deadline = time.monotonic() + 5
        while any(pd.leftovers().values()):
            assert time.monotonic() < deadline, pd.leftovers()  # was: held for 60 s
            pd.step()
            time.sleep(0.001)


def test_prefill_refused_fails_decode_at_once():
    def small_prefill_pool(cfg):
        pool = 64 if cfg.role == "prefill" else 4096
        return sim_executor_factory("instant", pool)(cfg)
    with LocalPD(1, 1, small_prefill_pool) as pd:
        pd.submit("big", list(range(3, 103)), greedy(4), room=12)  # 100 > prefill's 64
        reason = run_until_finished(pd, "big", 0.2)
        assert reason["type"] == "abort" and "failed the request" in reason["message"]
        assert "pool holds 64" in pd.prefill_outputs["big"][-1].finish_reason["message"]
        pd.run()
        assert not any(pd.leftovers().values()), pd.leftovers()


def test_mismatched_bodies_fail_instead_of_mixing_kv(pd):
    pd.submit("a", [1, 2, 3], greedy(4), room=13, decode=False)
    pd.submit("a", [1, 2, 3, 4], greedy(4), room=13, prefill=False)
    reason = run_until_finished(pd, "a")
    assert "belongs to another request" in reason["message"] and reason["status_code"] == 400


def test_placed_but_never_ready_times_out_with_the_waiting_timeout(pd):
    pd.router.dispatch_prefill(14, 3)  # placed on a prefill rank that never gets it
    pd.submit("w", [1, 2, 3], greedy(4), room=14, prefill=False)
    assert "was not ready within 0.3 s" in run_until_finished(pd, "w")["message"]
    pd.router.prefill_finished(14)


def test_dead_prefill_rank_fails_its_waiting_requests(pd):
    handoff = pd.handoff_table
    cell = handoff.layout.region_hdr(1) + R_WRITER_PID
    live_pid, handoff._mv[cell] = handoff._mv[cell], 2**22 + 12345  # no such process
    try:
        pd.submit("x", [1, 2, 3], greedy(4), room=15, prefill=False, explicit_prefill_rank=True)
        pd.inbox[("decode", pd.ranks_of["x"][1])][-1].disagg_prefill_dp_rank = 1
        assert "prefill rank 1 is not running" in run_until_finished(pd, "x")["message"]
    finally:
        handoff._mv[cell] = live_pid


def test_out_of_range_prefill_rank_is_refused(pd):
    pd.submit("y", [1, 2, 3], greedy(4), room=16, prefill=False)
    pd.inbox[("decode", pd.ranks_of["y"][1])][-1].disagg_prefill_dp_rank = 5
    assert "not in [0, 2)" in run_until_finished(pd, "y")["message"]


def test_parked_requests_count_as_waiting_and_back_off_instead_of_spinning(pd):
    pd.submit("z", list(range(3, 23)), greedy(4), room=17, prefill=False)
    pd.step()
    decode = pd.schedulers["decode"][pd.ranks_of["z"][1]]
    snap = pd.boards["decode"].snapshot()
    rank = pd.ranks_of["z"][1]
    assert (snap.num_reqs[rank], snap.num_waiting_reqs[rank], snap.num_tokens[rank]) == (1, 1, 20)
    assert snap.num_prefill_tokens[rank] == 0  # a decode rank prefills nothing
    waits = [decode.poll_timeout(0.05) for _ in range(12)]
    assert waits[0] < waits[3] < waits[-1] == MAX_SLEEP_S
    assert "no prefill placed it" in run_until_finished(pd, "z")["message"]


def test_aborting_a_parked_request_releases_kv_already_handed_off(pd):
    pd.submit("r", [1, 2, 3, 4], greedy(4), room=18, decode=False)
    pd.step()
    assert pd.leftovers()["prefill_held"] == 1 and pd.leftovers()["prefill_kv_used"] == 4
    pd.submit("r", [1, 2, 3, 4], greedy(4), room=18, prefill=False)
    pd.abort("r", prefill=False)  # arrives with it: parked, then aborted
    pd.step()
    pd.step()  # the prefill rank reaps the release: long before the 0.3 s deadline
    assert pd.finish_reason("r")["type"] == "abort"
    assert not any(pd.leftovers().values()), pd.leftovers()


def test_a_hand_off_written_after_its_decode_half_was_dropped_is_released():
    """A decode rank that drops a parked request before its KV arrives watches the room
    and releases the hand-off when it comes. Only it can: when the request's API process
    died, the rank ended the request, and the KV was held until the bootstrap timeout
    (300 s) with no API left to release it."""
    with LocalPD(1, 1, sim_executor_factory("instant", 4096)) as pd:  # 300 s timeouts
        pd.submit("r", [1, 2, 3, 4], greedy(4), room=19, prefill=False)
        pd.step()
        pd.abort("r", prefill=False)  # as retire_dispatcher ends it: parked, no KV yet
        pd.step()
        assert pd.finish_reason("r")["type"] == "abort"
        pd.submit("r", [1, 2, 3, 4], greedy(4), room=19, decode=False)
        pd.step()
        assert pd.leftovers()["prefill_held"] == 1  # prefilled: its KV waits for decode
        deadline = time.monotonic() + 5
        while any(pd.leftovers().values()):
            assert time.monotonic() < deadline, pd.leftovers()  # held until 300 s before
            pd.step()
            time.sleep(0.005)


def test_a_dropped_request_whose_prefill_its_api_aborted_leaves_no_failed_entry():
    """The API that aborts a prefill removes its route first; the rank writes the FAILED
    hand-off entry at its next step. The dropped decode request's watch waits for it
    (it stopped at the missing route, and the entry held a slot until the timeout)."""
    with LocalPD(1, 1, sim_executor_factory("instant", 4096)) as pd:  # 300 s timeouts
        pd.submit("r", [1, 2, 3, 4], greedy(4), room=23)
        pd.step(("decode",))  # parked; the route is there
        pd.abort("r", prefill=False)
        pd.step(("decode",))  # dropped: its room watched
        pd.router.prefill_finished(23)  # the API ends the prefill half: its route goes
        time.sleep(LATE_POLL_NS / 1e9 * 1.5)
        pd.step(("decode",))  # the watch looks: no route, no hand-off yet
        pd.abort("r", decode=False)  # then its rank hears of it
        deadline = time.monotonic() + 5
        while any(pd.leftovers().values()):
            assert time.monotonic() < deadline, pd.leftovers()  # until 300 s before
            pd.step()
            time.sleep(0.005)


def test_a_late_release_waits_a_poll_for_each_occupancy_of_the_slot():
    """The patience before a release belongs to one hand-off entry: when the dropped
    request's entry is freed by another releaser and a retry's is written in its place
    before the next poll, the retry's is not released at first sight."""
    from types import SimpleNamespace as NS

    from scheduler.pd_late import LateReleases

    class Claimer:
        def __init__(self):
            self.released = []

        def was_claimed(self, entry):
            return entry.gen in self.released or entry.gen == getattr(self, "taken", None)

        def release(self, entry):
            self.released.append(entry.gen)

    handoff, claimer = NS(entry=None), Claimer()
    handoff.lookup = handoff.lookup_in = lambda *room: handoff.entry
    late = LateReleases(NS(route=None, handoff=handoff, claimer=claimer), 300 * 10**9)
    t = 10**12
    late.drop(7, None, 42, t)  # nothing there yet: watched
    handoff.entry = NS(gen=1, prompt_hash=42, region=0, slot=5, state=KV_READY)
    late.poll(t + LATE_POLL_NS)  # the dropped request's entry, seen
    claimer.taken = 1  # another releaser frees it; a retry's takes the slot
    handoff.entry = NS(gen=2, prompt_hash=42, region=0, slot=5, state=KV_READY)
    late.poll(t + 2 * LATE_POLL_NS)
    assert claimer.released == []  # gen 2 was seen once: not yet
    late.poll(t + 3 * LATE_POLL_NS)
    assert claimer.released == [2]  # unclaimed for a whole poll: nobody waits for it


def test_a_retry_right_after_an_abort_supersedes_its_failed_entry():
    """Both halves aborted, then at once the same room and prompt again: the prefill
    rank's FAILED entry for the first (kept so a late decode half fails at once) gives
    way to the retry's hand-off (the retry's prefill was refused: "already live"), and
    the retry's decode half, seeing that entry while the retry's prefill runs, waits
    for its own (it failed: "prefill failed the request")."""
    with LocalPD(1, 1, sim_executor_factory("instant", 4096)) as pd:
        pd.submit("r1", [1, 2, 3, 4], greedy(4), room=25)
        pd.step(("decode",))  # parked
        pd.abort("r1", prefill=False)
        pd.step(("decode",))  # dropped before any KV: its room watched
        pd.router.prefill_finished(25)  # its API aborts the prefill: the route goes first
        pd.abort("r1", decode=False)
        for _ in range(2):  # then the rank: its FAILED entry stays for a late decode half
            pd.step(("prefill",))
        assert pd.finish_reason("r1")["type"] == "abort"
        assert pd.leftovers()["route_entries"] == 0 and pd.leftovers()["handoff_entries"] == 1
        pd.submit("r2", [1, 2, 3, 4], greedy(4), room=25)
        pd.step(("decode",))  # r2's decode first: the old FAILED entry, r2's route live
        assert pd.finish_reason("r2") is None, pd.finish_reason("r2")
        assert run_until_finished(pd, "r2")["type"] == "length", pd.finish_reason("r2")
        deadline = time.monotonic() + 5
        while any(pd.leftovers().values()):
            assert time.monotonic() < deadline, pd.leftovers()
            pd.step()
            time.sleep(0.005)


@pytest.mark.parametrize("num_decode", [1, 2])
def test_a_retry_with_the_room_of_a_dropped_request_keeps_its_kv(num_decode):
    """A decode half dropped before any prefill came (its prefill half was refused), then
    a retry with the same room and prompt, both halves, on the same decode rank or the
    other: the retry gets its KV, not a 400 (the dropped request's watch released it)."""
    with LocalPD(1, num_decode, sim_executor_factory("instant", 4096)) as pd:
        pd.submit("r1", [1, 2, 3, 4], greedy(4), room=21, prefill=False)
        pd.step()
        pd.abort("r1", prefill=False)
        pd.step()
        time.sleep(0.03)
        pd.submit("r2", [1, 2, 3, 4], greedy(4), room=21)
        assert run_until_finished(pd, "r2")["type"] == "length", pd.finish_reason("r2")
        pd.run()
        assert not any(pd.leftovers().values()), pd.leftovers()


# ---- what a prefill rank's board row counts ------------------------------------------------
@pytest.mark.parametrize("lockstep", [False, True])
def test_prefill_rank_counts_prompt_work_left(lockstep):
    """A PD prefill rank's num_tokens (and num_prefill_tokens) is the prompt work not
    done (its KV leaves with the hand-off). Independent: the chunk being computed still counts; lockstep: the row
    shows the load as the pass will leave it (scheduler.scheduler)."""
    with LocalPD(1, 1, sim_executor_factory("instant", 4096), chunked_prefill_size=64) as pd:
        sched = pd.schedulers["prefill"][0]
        sched.executor.steps_in_lockstep = lockstep
        seen = []
        forward = sched.executor.forward

        def watched(items):
            reqs, tokens, _ = read_effective(pd.boards["prefill"], FOREVER_NS)
            prefill = pd.boards["prefill"].snapshot().effective_prefill_tokens[0]
            assert prefill == tokens[0]  # a prefill rank's tokens are all prefill work
            seen.append((reqs[0], tokens[0]))
            return forward(items)

        sched.executor.forward = watched
        pd.submit("p", list(range(3, 103)), greedy(4), room=5)
        run_until_finished(pd, "p")
        assert seen == ([(1, 36), (0, 0)] if lockstep else [(1, 100), (1, 36)])
        assert read_effective(pd.boards["prefill"], FOREVER_NS)[:2] == ([0], [0])


# ---- a hand-off belongs to one request; decode fails fast --------------------------------
def test_a_room_hijack_gets_400_and_the_owner_its_own_output():
    """An intruder's decode request carries the owner's room but another prompt, and
    arrives first (parked on the same decode rank): it fails with 400 without touching
    the hand-off, and the owner receives exactly what it gets without an intruder."""
    outputs = {}
    for intruder in (False, True):
        with LocalPD(1, 1, sim_executor_factory("instant", 4096)) as pd:
            if intruder:
                pd.submit("intruder", [9, 9, 9], greedy(6), room=41, prefill=False)
                pd.step()  # parked, waiting for room 41
            pd.submit("owner", [5, 6, 7, 8], greedy(6), room=41)
            pd.run()
            assert pd.finish_reason("owner") == {"type": "length", "length": 6}
            outputs[intruder] = pd.output_ids("owner")
            if intruder:
                reason = pd.finish_reason("intruder")
                assert reason["type"] == "abort" and reason["status_code"] == 400, reason
                assert "belongs to another request" in reason["message"]
            assert not any(pd.leftovers().values()), pd.leftovers()
    assert outputs[True] == outputs[False]


def test_a_hand_off_is_claimed_once_even_with_the_same_prompt():
    """Two decode requests with one room and the same prompt: the first parked takes the
    KV, the second fails with 400 (never a second copy of one hand-off)."""
    with LocalPD(1, 1, sim_executor_factory("instant", 4096)) as pd:
        pd.submit("first", [5, 6, 7], greedy(4), room=42, prefill=False)
        pd.submit("second", [5, 6, 7], greedy(4), room=42, prefill=False)
        pd.step()
        pd.submit("prefill", [5, 6, 7], greedy(4), room=42, decode=False)
        pd.run()
        assert pd.finish_reason("first") == {"type": "length", "length": 4}
        reason = pd.finish_reason("second")
        assert reason["status_code"] == 400 and "already claimed" in reason["message"], reason
        assert not any(pd.leftovers().values()), pd.leftovers()


def test_full_hand_off_table_fails_decode_at_once():
    """Prefill's hand-off region (1 slot) is held by a prefill whose decode never came;
    the next request's prefill cannot hand off (nor even write FAILED): its decode
    half fails with 503 right away, not after the 30 s waiting timeout."""
    timeout_s = 30.0
    with LocalPD(1, 1, sim_executor_factory("instant", 4096), handoff_slots=1,
                 bootstrap_timeout_s=timeout_s, waiting_timeout_s=timeout_s) as pd:
        pd.submit("holder", [1, 2, 3], greedy(4), room=50, decode=False)
        pd.run()
        assert pd.leftovers()["prefill_held"] == 1
        started = time.monotonic()
        pd.submit("late", [4, 5, 6], greedy(4), room=51, decode_first=True)
        reason = run_until_finished(pd, "late", timeout_s / 2)
        assert time.monotonic() - started < timeout_s / 6
        assert reason["status_code"] == 503 and "prefill request failed" in reason["message"], reason
        prefill = pd.prefill_outputs["late"][-1].finish_reason
        assert prefill["status_code"] == 503 and "all 1 slots live" in prefill["message"], prefill


def test_frozen_prefill_rank_fails_decode_within_the_stale_bound():
    """The prefill ranks stop stepping (as under SIGSTOP): the parked decode request
    fails once prefill's heartbeat is older than stale_after_s, with 503, long before
    the waiting timeout."""
    stale_s, timeout_s = 0.5, 60.0
    with LocalPD(1, 1, sim_executor_factory("instant", 4096), stale_after_s=stale_s,
                 bootstrap_timeout_s=timeout_s, waiting_timeout_s=timeout_s) as pd:
        pd.run()  # a first heartbeat from every rank
        started = time.monotonic()
        pd.submit("f", [1, 2, 3], greedy(4), room=60)
        deadline = started + timeout_s / 4
        while pd.finish_reason("f") is None and time.monotonic() < deadline:
            pd.step(roles=("decode",))  # prefill frozen
            time.sleep(0.005)
        elapsed = time.monotonic() - started
        reason = pd.finish_reason("f")
        assert reason is not None and reason["status_code"] == 503, reason
        assert "prefill rank 0 has not stepped" in reason["message"], reason
        assert elapsed < stale_s + timeout_s / 4  # the message says it was not early


# ---- a decode server releases the rooms its requests left without the KV ---------------
def test_orphaned_rooms_release_only_their_own_unclaimed_hand_offs():
    """``server.pd_orphans``: a room whose decode request ended without the KV is
    released in the API's own claim column once its hand-off is there; never another
    prompt's entry, never one a live decode rank claimed; a dead rank's own claim is
    released in its cell once its process is gone; a room whose prefill ended without
    a hand-off (after a grace), or that never came, is forgotten."""
    from scheduler.pd import create_tables, prompt_hash
    from server.pd_orphans import OrphanedRooms
    from shm.bootstrap import BootstrapTable

    route, handoff = create_tables(new_launch_id(), 2, 3)  # 2 decode ranks + the API's
    try:
        writer, placer = handoff.region_writer(1), route.region_writer(0)
        orphans = OrphanedRooms(BootstrapTable.attach(route.name),
                                BootstrapTable.attach(handoff.name), timeout_s=1.0)
        far = time.monotonic_ns() + 60 * 10**9
        ids = {room: [room, room + 1] for room in range(11, 18)}
        for room in (11, 12, 13, 14, 16):
            orphans.adopt(room, ids[room], now_ns=0)
        orphans.adopt(15, ids[15], lost_rank=0, lost_pid=os.getpid())  # dying: wait for it
        orphans.adopt(17, ids[17], lost_rank=0)  # its rank died holding a claim
        placer.insert(16, 1, far)  # 16's prefill is running
        assert orphans.poll(now_ns=1) == 0 and len(orphans) == 7  # nothing handed off yet
        slots = {room: writer.insert(room, 1, far, state=KV_READY,
                                     prompt_hash=prompt_hash(ids[room] if room != 12 else [0]))
                 for room in (11, 12, 13, 15, 17)}
        handoff.decode_claimer(1).claim(writer.entry(slots[13]))  # a live rank took it
        handoff.decode_claimer(0).claim(writer.entry(slots[17]))  # the dead rank's claim
        placer.remove(placer.slot_of(16))  # 16's prefill ended without a hand-off
        assert orphans.poll(now_ns=2) == 0  # seen: released once unclaimed for a poll
        assert orphans.poll(now_ns=2 + LATE_POLL_NS) == 2
        assert sorted(e.room for e in writer.reap_released()) == [11, 17]
        assert writer.claim_of(slots[13]) == (1, False) and writer.claim_of(slots[12]) is None
        # 14 (no hand-off yet), 15 (its rank still runs), 16 (its route just went: a
        # failure its rank publishes would come within the grace)
        assert len(orphans) == 3
        assert orphans.poll(now_ns=3 * 10**9) == 0 and len(orphans) == 1  # 14, 16 given up
        orphans.adopt(18, [18], now_ns=3 * 10**9)
        orphans.forget(18)  # a new request with the room came: what comes is its
        assert len(orphans) == 1
        orphans.close()
    finally:
        handoff.close()
        route.close()


def test_a_prefill_aborted_by_its_api_fails_the_waiting_decode_with_a_503():
    """The prefill API aborts a request (its client left): the route goes at once, the
    rank publishes the failure at its next step. A decode waiting on the room meanwhile
    waits for that (not a 400 for a room "claimed by another request") and fails with
    the prefill's failure, a 503 a gateway retries."""
    with LocalPD(1, 1, sim_executor_factory("instant", 4096)) as pd:
        pd.submit("r", [5, 6, 7], greedy(4), room=42)
        pd.step(roles=("decode",))  # parked, the route seen
        pd.router.prefill_finished(pd.rooms.pop("r"))  # as the API's abort does
        pd.abort("r", decode=False)
        for _ in range(20):
            pd.step(roles=("decode",))
        assert pd.finish_reason("r") is None  # within the grace: waits for prefill's word
        _fails_as_prefill_failed(pd, "r")


def test_a_decode_arriving_after_its_handed_off_prefill_was_aborted_fails_at_once():
    """Prefill hands off, then its API aborts the request (its client left): the KV is
    freed at once and the entry stays FAILED, so a decode request arriving later fails
    with a 503 at once instead of waiting the bootstrap timeout for a prefill that
    ended (it could tell no route from a prefill not come yet)."""
    with LocalPD(1, 1, sim_executor_factory("instant", 4096)) as pd:
        pd.submit("r", [5, 6, 7], greedy(4), room=42, decode=False)
        pd.run()
        assert pd.schedulers["prefill"][0].pd.num_held == 1
        pd.ranks_of["r"] = (0, None)
        pd.abort("r", decode=False)
        pd.step()
        assert pd.schedulers["prefill"][0].pd.num_held == 0  # the KV is free
        pd.submit("r", [5, 6, 7], greedy(4), room=42, prefill=False)
        _fails_as_prefill_failed(pd, "r")


def test_orphaned_rooms_follow_a_restarted_prefill_server():
    """The prefill server that made the tables died and a new one made new ones (same
    launch id): the decode API's release switches to them, as the decode ranks do."""
    import subprocess
    import sys

    from scheduler.pd import create_tables
    from server.pd_orphans import OrphanedRooms
    from shm.bootstrap import BootstrapTable
    from shm.segment import find_segment, reclaim_stale_segments

    launch = new_launch_id()
    make = ("import os, sys; from scheduler.pd import create_tables; "
            f"create_tables({launch!r}, 1, 2); print('made', flush=True); sys.stdin.read()")
    old = subprocess.Popen([sys.executable, "-c", make], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert old.stdout.readline().strip() == "made"
        orphans = OrphanedRooms(BootstrapTable.attach(find_segment("route", launch)),
                                BootstrapTable.attach(find_segment("handoff", launch)), 1.0)
        old_name = orphans.handoff.name
        assert not orphans.refresh()  # its maker still runs
    finally:
        old.kill()
        old.wait(10)
    route, handoff = create_tables(launch, 1, 2)
    try:
        orphans.adopt(7, [1, 2])
        assert orphans.handoff.name == handoff.name != old_name and len(orphans) == 1
        orphans.close()
    finally:
        handoff.close()
        route.close()
        reclaim_stale_segments()


def _fails_as_prefill_failed(pd: LocalPD, rid: str) -> None:
    """Run to the end: ``rid`` failed with a 503 naming its prefill, nothing left."""
    pd.run()
    reason = pd.finish_reason(rid)
    assert reason["status_code"] == 503 and "failed the request" in reason["message"], reason
    pd.step()  # prefill frees the FAILED entry decode released
    assert not any(pd.leftovers().values()), pd.leftovers()
