"""The bootstrap table: cross-process look-up, probing, expiry, claims, torn reads."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shm.bootstrap import (EMPTY, FAILED, KV_READY, MAX_ROOM, PLACED, TOMBSTONE, BootstrapTable,
                           BootstrapTableError, BootstrapTableFullError, DuplicateRoomError,
                           home_slot)
from shm.segment import (SharedSegment, ShmLayoutError, ShmNotReadyError, find_segment,
                         list_segments,
                         new_launch_id, pid_alive, reclaim_stale_segments, segment_name)
from tests.bootstrap_helpers import BootstrapTimeoutError, async_wait_for, wait_for

FAR = 10**15  # a deadline that never comes during a test
LAUNCH_IDS: list[str] = []


def _launch_id() -> str:
    launch_id = "bt" + new_launch_id()
    LAUNCH_IDS.append(launch_id)
    return launch_id


@pytest.fixture(scope="module", autouse=True)
def no_bootstrap_segment_left():
    yield
    left = [n for n in list_segments() if any(i in n for i in LAUNCH_IDS)]
    assert not left, f"bootstrap segments left in /dev/shm: {left}"


@pytest.fixture
def make_table():
    """Create tables that are closed (and unlinked) whatever the test does."""
    tables = []

    def make(num_regions=1, slots_per_region=64, num_decode_ranks=1):
        table = BootstrapTable.create(num_regions, slots_per_region, _launch_id(),
                                      num_decode_ranks=num_decode_ranks)
        tables.append(table)
        return table

    yield make
    for table in tables:
        table.close()


def _rooms_with_home(home: int, slots: int, count: int, start: int = 1) -> list[int]:
    rooms, room = [], start
    while len(rooms) < count:
        if home_slot(room, slots) == home:
            rooms.append(room)
        room += 1
    return rooms


def _join_or_kill(proc, timeout: float = 20) -> None:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
        pytest.fail(f"child {proc.pid} did not finish within {timeout} s")


# ---- layout and lifetime ----------------------------------------------------------------
def test_attach_reads_the_layout_and_rejects_other_segments(make_table):
    table = make_table(num_regions=3, slots_per_region=10, num_decode_ranks=2)
    other = BootstrapTable.attach(table.name)
    try:
        assert (other.num_regions, other.slots_per_region, other.num_decode_ranks) == (3, 10, 2)
    finally:
        other.close()
    assert table.name in list_segments(), "an attacher must never unlink"
    name = segment_name("notatable", _launch_id())
    with SharedSegment.create(name, 4096):
        with pytest.raises(ShmLayoutError):
            BootstrapTable.attach(name)
    with pytest.raises(ValueError):
        BootstrapTable.create(0, 8, _launch_id())


def test_rooms_span_the_full_unsigned_64_bit_range(make_table):
    table = make_table()
    writer = table.region_writer(0)
    for room in (0, 2**63 - 1, 2**63, MAX_ROOM):
        writer.insert(room, prefill_rank=1, deadline_ns=FAR)
        assert table.lookup(room).room == room
    with pytest.raises(ValueError):
        writer.insert(-1, 0, FAR)
    with pytest.raises(ValueError):
        writer.insert(2**64, 0, FAR)
    assert table.num_live() == 4


# ---- across processes -------------------------------------------------------------------
def _child_insert(name: str, rooms: list[int], done) -> None:
    table = BootstrapTable.attach(name)
    writer = table.region_writer(1)
    for i, room in enumerate(rooms):
        slot = writer.insert(room, prefill_rank=i, deadline_ns=FAR, decode_rank=7)
        if i == 0:
            writer.update(slot, state=KV_READY, kv_location=1234, kv_len=56, first_token=99)
    done.set()
    writer.close()  # entries stay: they belong to the table, not to the process
    table.close()


def _child_lookup(name: str, rooms: list[int], results) -> None:
    table = BootstrapTable.attach(name)
    entries = [table.lookup(r) for r in rooms]
    results.put([e and (e.room, e.prefill_rank) for e in entries])
    table.close()


def test_insert_in_one_process_find_in_another(make_table):
    ctx = mp.get_context("spawn")
    table = make_table(num_regions=2)
    rooms = [2**63 + 5, 17, 2**40]
    done = ctx.Event()
    child = ctx.Process(target=_child_insert, args=(table.name, rooms, done), daemon=True)
    child.start()
    try:
        assert done.wait(30), "child never inserted"
    finally:
        _join_or_kill(child)
    assert child.exitcode == 0
    ready = table.lookup(rooms[0])
    assert (ready.state, ready.kv_location, ready.kv_len, ready.first_token) == \
        (KV_READY, 1234, 56, 99)
    assert (ready.region, ready.prefill_rank, ready.decode_rank) == (1, 0, 7)
    assert [table.lookup(r).prefill_rank for r in rooms] == [0, 1, 2]
    assert table.lookup(3) is None

    # And the other way: this process writes, a child reads.
    table.region_writer(0).insert(555, prefill_rank=4, deadline_ns=FAR)
    results = ctx.Queue()
    reader = ctx.Process(target=_child_lookup, args=(table.name, [555, 17, 3], results),
                         daemon=True)
    reader.start()
    try:
        got = results.get(timeout=30)
    finally:
        _join_or_kill(reader)
    assert got == [(555, 4), (17, 1), None]


def _insert_later(name: str, room: int, delay_s: float) -> None:
    table = BootstrapTable.attach(name)
    writer = table.region_writer(0)
    time.sleep(delay_s)
    slot = writer.insert(room, prefill_rank=2, deadline_ns=FAR)
    time.sleep(delay_s)
    writer.update(slot, state=KV_READY, first_token=5)
    writer.close()
    table.close()


def test_wait_for_sleeps_until_another_process_places_the_room(make_table):
    ctx = mp.get_context("spawn")
    table = make_table()
    child = ctx.Process(target=_insert_later, args=(table.name, 42, 0.3), daemon=True)
    child.start()
    try:
        cpu0, wall0 = time.process_time(), time.monotonic()
        placed = wait_for(table, 42, timeout_s=20)
        ready = wait_for(table, 42, timeout_s=20, states=(KV_READY,))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    finally:
        _join_or_kill(child)
    assert placed.prefill_rank == 2 and ready.first_token == 5
    assert wall >= 0.3
    assert cpu < 0.5 * wall, f"waiting burnt {cpu:.3f} s of CPU in {wall:.3f} s"


def test_wait_for_times_out_with_a_clear_error_and_returns_failed_at_once(make_table):
    table = make_table()
    with pytest.raises(BootstrapTimeoutError, match="no prefill placed it"):
        wait_for(table, 9, timeout_s=0.05)
    slot = table.region_writer(0).insert(9, prefill_rank=0, deadline_ns=FAR)
    with pytest.raises(BootstrapTimeoutError, match="still PLACED"):
        asyncio.run(async_wait_for(table, 9, timeout_s=0.05, states=(KV_READY,)))
    table.region_writer(0).update(slot, state=FAILED)
    assert wait_for(table, 9, timeout_s=5, states=(KV_READY,)).state == FAILED
    assert asyncio.run(async_wait_for(table, 9, 5, states=(KV_READY,))).state == FAILED


def test_async_wait_for_sees_a_later_insert(make_table):
    table = make_table()
    writer = table.region_writer(0)

    async def scenario():
        waiter = asyncio.create_task(async_wait_for(table, 77, timeout_s=10))
        await asyncio.sleep(0.02)
        assert not waiter.done()
        writer.insert(77, prefill_rank=3, deadline_ns=FAR)
        return await asyncio.wait_for(waiter, 10)

    assert asyncio.run(scenario()).prefill_rank == 3


# ---- probing, collisions, capacity ------------------------------------------------------
def test_collisions_probe_past_tombstones_and_reuse_them(make_table):
    slots = 8
    table = make_table(slots_per_region=slots)
    writer = table.region_writer(0)
    rooms = _rooms_with_home(5, slots, 5)
    placed = [writer.insert(r, prefill_rank=i, deadline_ns=FAR) for i, r in enumerate(rooms)]
    assert placed == [5, 6, 7, 0, 1], "linear probing wraps around the region"
    writer.remove(placed[1])
    assert writer.num_tombstones == 1
    found = [table.lookup(r) for r in rooms]
    assert [e.prefill_rank if e else None for e in found] == [0, None, 2, 3, 4]
    newcomer = _rooms_with_home(5, slots, 1, start=rooms[-1] + 1)[0]
    assert writer.insert(newcomer, prefill_rank=9, deadline_ns=FAR) == 6, "tombstone reused"
    assert table.lookup(newcomer).prefill_rank == 9 and table.lookup(rooms[4]).prefill_rank == 4
    for room in (rooms[4], rooms[3], rooms[2], newcomer, rooms[0]):
        writer.remove(writer.slot_of(room))
    assert writer.num_tombstones == 0, "freeing the chain's end cleans the tombstones before it"
    states = {table._mv[table.layout.entry(0, s) + 1] for s in range(slots)}
    assert states == {EMPTY} and table.num_live() == 0


@pytest.mark.parametrize(
    "pattern", ["sequential", "stride_4096", "shifted_40", "timestamps_ns", "high_half"])
def test_home_slot_spreads_common_room_patterns(pattern):
    """At 75% load, structured rooms probe no longer than random ones (~1.5 slots)."""
    slots, n = 4096, 3072
    rooms = {"sequential": range(n), "stride_4096": range(0, n * 4096, 4096),
             "shifted_40": (i << 40 for i in range(n)),
             "timestamps_ns": (1_700_000_000_000_000_000 + i * 1000 for i in range(n)),
             "high_half": (2**63 + (i << 32) for i in range(n))}[pattern]
    taken, probes = [False] * slots, 0
    for room in rooms:
        slot = home_slot(room, slots)
        while taken[slot]:
            slot, probes = (slot + 1) % slots, probes + 1
        taken[slot] = True
    assert probes / n < 2.0


def test_full_region_is_a_named_error_never_an_overwrite(make_table):
    table = make_table(num_regions=2, slots_per_region=4)
    writer = table.region_writer(0)
    for room in range(4):
        writer.insert(room, prefill_rank=room, deadline_ns=FAR)
    with pytest.raises(BootstrapTableFullError, match="region 0"):
        writer.insert(100, prefill_rank=0, deadline_ns=FAR)
    assert [table.lookup(r).prefill_rank for r in range(4)] == [0, 1, 2, 3]
    table.region_writer(1).insert(100, prefill_rank=1, deadline_ns=FAR)  # other region has room
    writer.remove(writer.slot_of(2))
    writer.insert(101, prefill_rank=5, deadline_ns=FAR)
    assert table.lookup(101).prefill_rank == 5
    for room in (0, 1, 3):  # a region whose free slots are all tombstones still works
        writer.remove(writer.slot_of(room))
    assert table.lookup(0) is None and table.lookup(101).prefill_rank == 5


def test_duplicate_room_in_a_region_is_a_named_error(make_table):
    table = make_table(num_regions=2)
    table.region_writer(0).insert(8, prefill_rank=0, deadline_ns=FAR)
    with pytest.raises(DuplicateRoomError):
        table.region_writer(0).insert(8, prefill_rank=1, deadline_ns=FAR)
    assert table.lookup(8).prefill_rank == 0


# ---- expiry and the decode claim ---------------------------------------------------------
def test_expire_frees_entries_past_their_deadline_and_returns_them(make_table):
    table = make_table()
    writer = table.region_writer(0)
    t0 = 1_000_000_000
    for room, deadline in ((1, t0 + 10), (2, t0 + 20), (3, t0 + 30)):
        writer.insert(room, prefill_rank=room, deadline_ns=deadline, kv_location=room * 100)
    writer.update(writer.slot_of(3), deadline_ns=t0 + 5)  # brought forward
    writer.update(writer.slot_of(1), deadline_ns=t0 + 50)  # pushed back
    assert writer.expire(now_ns=t0) == []
    gone = writer.expire(now_ns=t0 + 20)
    assert sorted((e.room, e.kv_location) for e in gone) == [(2, 200), (3, 300)]
    assert table.lookup(2) is None and table.lookup(1) is not None and table.num_live() == 1
    assert [e.room for e in writer.expire(now_ns=t0 + 50)] == [1]
    assert table.num_live() == 0 and writer.expire(now_ns=t0 + 10**12) == []
    for i in range(5000):  # churn without expiry must not grow the writer's expiry heap
        writer.remove(writer.insert(i, prefill_rank=0, deadline_ns=FAR))
    assert len(writer._heap) <= 2 * writer.num_live + 1024


def test_claim_holds_expiry_off_and_release_lets_prefill_free_the_kv(make_table):
    table = make_table(num_decode_ranks=2)
    writer, claimer = table.region_writer(0), table.decode_claimer(1)
    now = time.monotonic_ns()
    slot = writer.insert(11, prefill_rank=0, deadline_ns=now + 10**9)
    assert not claimer.claim(table.lookup(11)), "only KV_READY entries are claimed"
    writer.update(slot, state=KV_READY, kv_location=7)
    entry = table.lookup(11)
    assert not claimer.claim(entry, now_ns=entry.deadline_ns - 1), "too close to the deadline"
    assert claimer.claim(entry)
    assert writer.claim_of(slot) == (1, False)
    assert writer.expire(now_ns=entry.deadline_ns) == [], "claimed: held for the grace period"
    assert writer.reap_released() == []
    assert claimer.release(entry)
    assert [e.room for e in writer.reap_released()] == [11] and table.num_live() == 0

    # A copy that outlived the grace: the entry expired under it, release says so.
    slot = writer.insert(12, prefill_rank=0, deadline_ns=now + 10**9, state=KV_READY)
    entry = table.lookup(12)
    assert claimer.claim(entry)
    assert [e.room for e in writer.expire(now_ns=entry.deadline_ns, claim_grace_ns=0)] == [12]
    assert not claimer.release(entry)
    # The stale release of the old occupancy does not release the slot's next entry.
    writer.insert(12, prefill_rank=1, deadline_ns=now + 10**9, state=KV_READY)
    assert writer.reap_released() == [] and table.num_live() == 1
    # Released but not reaped yet when its deadline comes: no grace (no copy runs).
    slot = writer.insert(13, prefill_rank=0, deadline_ns=now + 10**9, state=KV_READY)
    entry = table.lookup(13)
    assert claimer.claim(entry) and claimer.release(entry)
    assert 13 in [e.room for e in writer.expire(now_ns=entry.deadline_ns)]


def test_one_writer_per_region_and_takeover_repairs_a_half_written_entry(make_table):
    table = make_table()
    writer = table.region_writer(0)
    slot = writer.insert(21, prefill_rank=1, deadline_ns=FAR)
    writer.insert(22, prefill_rank=2, deadline_ns=FAR)
    off = table.layout.entry(0, slot)
    table._mv[off] += 1  # as if the writer died between the seq stores
    writer.close()
    table._mv[table.layout.region_hdr(0)] = os.getppid()  # a live process holds region 0
    with pytest.raises(BootstrapTableError, match="live pid"):
        table.region_writer(0)
    table._mv[table.layout.region_hdr(0)] = 0
    again = table.region_writer(0)
    assert table._mv[off] % 2 == 0, "the odd seq was repaired"
    assert table.lookup(21) is None and table.lookup(22).prefill_rank == 2
    assert again.num_live == 1 and table.num_live() == 1
    again.insert(21, prefill_rank=3, deadline_ns=FAR)
    assert table.lookup(21).prefill_rank == 3


def test_an_entry_left_mid_write_is_a_clear_error_not_a_hang(make_table, monkeypatch):
    import shm.bootstrap
    monkeypatch.setattr(shm.bootstrap, "MAX_READ_STALL_S", 0.05)
    table = make_table()
    slot = table.region_writer(0).insert(31, prefill_rank=1, deadline_ns=FAR)
    table._mv[table.layout.entry(0, slot)] += 1  # odd seq: a writer that never finishes
    with pytest.raises(BootstrapTableError, match="mid-write"):
        table.lookup(31)
    table._mv[table.layout.entry(0, slot)] += 1
    assert table.lookup(31).prefill_rank == 1


def _create_table_and_hang(launch_id: str, ready) -> None:
    BootstrapTable.create(1, 16, launch_id)
    ready.set()
    signal.pause()


def _start_table_creator(launch_id: str):
    """A child that creates launch_id's table and hangs; waits until the table is there."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_create_table_and_hang, args=(launch_id, ready), daemon=True)
    child.start()
    if not ready.wait(30):
        child.kill()
        _join_or_kill(child)
        pytest.fail("child never created its table")
    return child


def test_table_of_a_sigkilled_creator_is_reclaimed():
    launch_id = _launch_id()
    child = _start_table_creator(launch_id)
    os.kill(child.pid, signal.SIGKILL)
    _join_or_kill(child)
    name = segment_name("bootstrap", launch_id, pid=child.pid)
    assert name in list_segments()
    assert name in reclaim_stale_segments()
    assert name not in list_segments()


def test_table_of_a_killed_but_unreaped_creator_is_reclaimed():
    # Until its parent reaps it, a killed creator is a zombie: kill(pid, 0) still
    # succeeds, yet it will never unlink its table.
    launch_id = _launch_id()
    child = _start_table_creator(launch_id)
    try:
        name = segment_name("bootstrap", launch_id, pid=child.pid)
        assert find_segment("bootstrap", launch_id) == name and pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _state_is_zombie(child.pid):
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.01)
        assert not pid_alive(child.pid)
        assert find_segment("bootstrap", launch_id) is None
        assert name in reclaim_stale_segments()
        assert name not in list_segments()
    finally:
        if child.is_alive():
            child.kill()
        _join_or_kill(child)


def _state_is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] == b"Z"


# ---- model test ------------------------------------------------------------------------------
SLOTS = 6
# Mostly rooms that collide (home 4, whose chain wraps past the end, and home 0), so
# chains, tombstones and full regions are common.
COLLIDING = _rooms_with_home(4, SLOTS, 4) + _rooms_with_home(0, SLOTS, 2)
POOL = COLLIDING + [2**63, MAX_ROOM]
ROOMS = st.sampled_from(POOL)
STATES = st.sampled_from([PLACED, KV_READY, FAILED])


class BootstrapModel(RuleBasedStateMachine):
    """Two regions, tiny and collision-heavy, against a dict per region."""

    @initialize()
    def open_table(self):
        self.table = BootstrapTable.create(2, SLOTS, _launch_id(), num_decode_ranks=0)
        self.writers = [self.table.region_writer(0), self.table.region_writer(1)]
        self.model: list[dict[int, dict]] = [{}, {}]
        self.now = 0

    def teardown(self):
        if hasattr(self, "table"):
            self.table.close()

    @rule(region=st.integers(0, 1), room=ROOMS, rank=st.integers(0, 7),
          ttl=st.integers(1, 50), state=STATES)
    def insert(self, region, room, rank, ttl, state):
        model, writer = self.model[region], self.writers[region]
        if room in model:
            with pytest.raises(DuplicateRoomError):
                writer.insert(room, rank, self.now + ttl, state=state)
        elif len(model) == SLOTS:
            with pytest.raises(BootstrapTableFullError):
                writer.insert(room, rank, self.now + ttl, state=state)
        else:
            writer.insert(room, rank, self.now + ttl, state=state, now_ns=self.now)
            model[room] = dict(state=state, prefill_rank=rank, deadline_ns=self.now + ttl,
                               decode_rank=-1, kv_location=-1, kv_len=0, first_token=-1)

    @precondition(lambda self: self.model[0] or self.model[1])
    @rule(data=st.data(), state=STATES, value=st.integers(-1, 2**40), ttl=st.integers(1, 50))
    def update(self, data, state, value, ttl):
        region = data.draw(st.sampled_from([r for r in (0, 1) if self.model[r]]))
        room = data.draw(st.sampled_from(sorted(self.model[region])))
        fields = dict(state=state, kv_location=value, kv_len=value // 2, first_token=value % 7,
                      decode_rank=value % 3, deadline_ns=self.now + ttl)
        fields = {k: v for k, v in fields.items() if data.draw(st.booleans(), label=k)}
        self.writers[region].update(self.writers[region].slot_of(room), **fields)
        self.model[region][room].update(fields)

    @precondition(lambda self: self.model[0] or self.model[1])
    @rule(data=st.data())
    def remove(self, data):
        region = data.draw(st.sampled_from([r for r in (0, 1) if self.model[r]]))
        room = data.draw(st.sampled_from(sorted(self.model[region])))
        self.writers[region].remove(self.writers[region].slot_of(room))
        del self.model[region][room]

    @rule(step=st.integers(0, 10))
    def expire(self, step):
        self.now += step
        for region in (0, 1):
            got = sorted(e.room for e in self.writers[region].expire(now_ns=self.now))
            due = sorted(r for r, f in self.model[region].items() if f["deadline_ns"] <= self.now)
            assert got == due
            for room in due:
                del self.model[region][room]

    @invariant()
    def every_lookup_matches_the_model(self):
        if not hasattr(self, "table"):
            return
        for room in POOL:
            entry = self.table.lookup(room)
            # The first region that has it, preferring one whose entry is not FAILED.
            holders = [r for r in (0, 1) if room in self.model[r]]
            live = [r for r in holders if self.model[r][room].get("state") != FAILED]
            region = (live or holders or [None])[0]
            if region is None:
                assert entry is None
            else:
                assert entry is not None and (entry.region, entry.room) == (region, room)
                assert {k: getattr(entry, k) for k in self.model[region][room]} == \
                    self.model[region][room]

    @invariant()
    def counts_and_scan_agree(self):
        if not hasattr(self, "table"):
            return
        assert self.table.num_live() == len(self.model[0]) + len(self.model[1])
        scanned = sorted((e.region, e.room) for e in self.table.entries())
        assert scanned == sorted((r, room) for r in (0, 1) for room in self.model[r])
        for region in (0, 1):
            states = [self.table._mv[self.table.layout.entry(region, s) + 1] for s in range(SLOTS)]
            assert states.count(TOMBSTONE) == self.writers[region].num_tombstones


BootstrapModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestBootstrapModel = BootstrapModel.TestCase


# ---- torn reads --------------------------------------------------------------------------------
def _churn(name: str, rooms: list[int], stop, started, counter) -> None:
    """Update entries flat out (every field a function of k) and re-insert them."""
    table = BootstrapTable.attach(name)
    writer = table.region_writer(0)
    slots = {room: writer.insert(room, 0, FAR, kv_location=0, kv_len=0, first_token=0,
                                 decode_rank=0) for room in rooms}
    k = 0
    started.set()
    while not stop.is_set():
        for room in rooms:
            k += 1
            if k % 2 == 0:  # free and re-place: a probe may meet it mid-insert
                writer.remove(slots[room])
                slots[room] = writer.insert(room, k, FAR, kv_location=k, kv_len=2 * k,
                                            first_token=3 * k, decode_rank=k % 5)
            else:
                writer.update(slots[room], kv_location=k, kv_len=2 * k, first_token=3 * k,
                              decode_rank=k % 5)
    counter.value = k
    writer.close()
    table.close()


def test_no_torn_entries_while_another_process_writes_flat_out(make_table):
    ctx = mp.get_context("spawn")
    table = make_table(slots_per_region=16)
    rooms = _rooms_with_home(3, 16, 4) + [2**63 + 1]  # a collision chain and a loner
    stop, started, counter = ctx.Event(), ctx.Event(), ctx.Value("q", 0)
    writer = ctx.Process(target=_churn, args=(table.name, rooms, stop, started, counter),
                         daemon=True)
    writer.start()
    reads = torn = misses = 0
    seen = set()
    try:
        assert started.wait(30), "writer never started"
        # At least 2 s, and on until enough reads met the writer at work: a loaded
        # machine gets more time, not a failure (60 s at most).
        start = time.monotonic()
        while time.monotonic() - start < 60 and (time.monotonic() - start < 2.0
                                                   or reads <= 10_000 or len(seen) <= 100):
            for room in rooms:
                entry = table.lookup(room)
                reads += 1
                if entry is None:
                    misses += 1  # between a remove and its re-insert
                    continue
                k = entry.kv_location
                seen.add(k)
                if entry.room != room or (entry.kv_len, entry.first_token, entry.decode_rank) != (
                        2 * k, 3 * k, k % 5):
                    torn += 1
    finally:
        stop.set()
        _join_or_kill(writer)
    assert torn == 0
    assert counter.value > 1000 and len(seen) > 100, "the writer was not writing during the reads"
    assert reads > 10_000 and misses < reads


def test_an_entry_is_claimed_once_by_any_decode_rank(make_table):
    """A hand-off belongs to one request: after rank 1 claimed (or released) an entry,
    neither rank 1 nor rank 0 can claim it again; a claim racing another rank's backs
    off; the entry keeps the prompt hash and cached tokens its writer gave it."""
    table = make_table(num_decode_ranks=2)
    writer = table.region_writer(0)
    first, second = table.decode_claimer(1), table.decode_claimer(0)
    now = time.monotonic_ns()
    writer.insert(21, prefill_rank=0, deadline_ns=now + 10**10, state=KV_READY, prompt_hash=-77,
                  cached_tokens=1984)
    entry = table.lookup(21)
    assert entry.prompt_hash == -77 and entry.cached_tokens == 1984
    assert not first.was_claimed(entry)
    assert first.claim(entry)
    assert second.was_claimed(entry) and not second.claim(entry), "claimed by rank 1"
    assert first.release(entry)
    assert not first.claim(entry) and not second.claim(entry), "released: claimed once"
    assert [e.room for e in writer.reap_released()] == [21]

    writer.insert(22, prefill_rank=0, deadline_ns=now + 10**10, state=KV_READY)
    entry = table.lookup(22)
    table._mv[table.layout.claims(entry.region, entry.slot) + 0] = entry.gen  # rank 0, mid-claim
    assert not first.claim(entry), "a concurrent claim by another rank: back off"
    assert table._mv[table.layout.claims(entry.region, entry.slot) + 1] == 0, "own cell cleared"


def test_a_table_being_created_is_not_ready_rather_than_broken():
    """The decode server of a PD pair may find the prefill server's table between its
    O_EXCL create and its sizing, or before its header is written: attaching then says
    "not ready" (the decode server tries again), never crashes on an empty mapping."""
    import posix_ipc
    name = segment_name("handoff", new_launch_id())
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=0)
    try:
        shm.close_fd()
        with pytest.raises(ShmNotReadyError):
            SharedSegment.attach(name)
    finally:
        posix_ipc.unlink_shared_memory(name)
    launch_id = new_launch_id()
    with BootstrapTable.create(1, 8, launch_id, kind="handoff") as table:
        table_name = table.name
        magic = table.segment.buf[0:8]
        table.segment.buf[0:8] = bytes(8)  # as seen before create's last store
        with pytest.raises(ShmNotReadyError):
            BootstrapTable.attach(table_name)
        table.segment.buf[0:8] = magic
        BootstrapTable.attach(table_name).close()
