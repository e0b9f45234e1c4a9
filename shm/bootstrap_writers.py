"""Single-writer handles onto the bootstrap table (layout in ``shm.bootstrap``).

A ``RegionWriter`` lives in the one process that owns a region and is the only one
writing that region's header and entries: in the route table, an API process (its
dispatcher: PLACED, FAILED, removal); in the hand-off table, prefill rank r (KV_READY
entries, reaping and expiry). A ``DecodeClaimer`` lives in one decode rank: it writes
only that rank's claim cells.

The hand-off, as PD uses it (hand-off table)::

    prefill rank r (region r)              decode rank d
    ... prefill runs ...                   entry = lookup(room)   # each step, till KV_READY
    slot = insert(room, rank, deadline,    claimer.claim(entry)   # before reading KV
           state=KV_READY, kv_location=.,  ... copy KV at entry.kv_location ...
           first_token=...)                ok = claimer.release(entry)  # after
    reap_released() -> free their KV       (ok False: the KV may have been freed under
    expire(now)     -> free their KV        the copy; fail the request)

Why a claim: prefill frees the KV once it sees the release, or at the deadline if no
decode ever came. A claim made at least ``CLAIM_MARGIN_NS`` before the deadline holds
expiry off for ``claim_grace_ns`` more, so a KV is never freed under a running copy
unless that copy outlives the grace, and then ``release`` returns False.
"""

from __future__ import annotations

import heapq
import os
import struct
import time
from typing import TYPE_CHECKING

from shm.bootstrap_layout import (
    E_DEADLINE, E_DECODE_RANK, E_FIRST_TOKEN, E_GEN, E_KV_LEN, E_KV_LOCATION, E_ROOM, E_STATE,
    EMPTY, ENTRY_LEN, FIELDS_STRUCT, KV_READY, LIVE_STATES, MAX_ROOM, PLACED, R_HEARTBEAT,
    R_NEXT_GEN, R_NUM_LIVE, R_NUM_TOMBSTONES, R_WRITER_PID, TOMBSTONE, BootstrapEntry, BootstrapTableError,
    BootstrapTableFullError, DuplicateRoomError, hash_modulus)

if TYPE_CHECKING:
    from shm.bootstrap import BootstrapTable

CLAIM_MARGIN_NS = 100_000_000  # decode claims only entries this far from their deadline
DEFAULT_CLAIM_GRACE_NS = 5_000_000_000  # a claimed, unreleased entry outlives its deadline by this
_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1
HEAP_SLACK = 1024  # stale expiry-heap items tolerated before a rebuild (amortised O(1))


class RegionWriter:
    """Inserts, updates and frees the entries of one region. Not thread-safe.

    Keeps a private index (room -> slot, gen and deadline per slot, an expiry heap)
    so it never scans the region on the hot path; ``__init__`` rebuilds it from
    shared memory, which also lets a restarted dispatcher take its region back.
    """

    def __init__(self, table: "BootstrapTable", region: int):
        self.table = table
        self.region = region
        layout = table.layout
        self.num_slots = layout.slots_per_region
        self._modulus = hash_modulus(layout.slots_per_region)
        self._hdr = layout.region_hdr(region)
        self._base = layout.entry(region, 0)
        self._num_decode = layout.num_decode_ranks
        self._claims_base = layout.claims(region, 0)
        self._claims_struct = struct.Struct(f"<{self._num_decode}q")
        self._mv, self._buf = table._mv, table._buf
        self._slot_of_room: dict[int, int] = {}
        self._gen = [0] * self.num_slots  # gen of the live entry in each slot, 0 if free
        self._deadline = [0] * self.num_slots
        self._heap: list[tuple[int, int, int]] = []  # (due_ns, gen, slot), stale items skipped
        self._recover()
        table._mv[self._hdr + R_WRITER_PID] = os.getpid()

    def _recover(self) -> None:
        mv, rooms = self._mv, self.table._rooms
        max_gen = 0
        for slot in range(self.num_slots):
            off = self._base + slot * ENTRY_LEN
            seq = mv[off]
            if seq & 1:  # a dead writer stopped mid-write: drop the entry, keep chains
                mv[off + E_STATE] = TOMBSTONE
                mv[off] = seq + 1
            if mv[off + E_STATE] in LIVE_STATES:
                gen, deadline = mv[off + E_GEN], mv[off + E_DEADLINE]
                self._slot_of_room.setdefault(rooms[off + E_ROOM], slot)
                self._gen[slot], self._deadline[slot] = gen, deadline
                self._heap.append((deadline, gen, slot))
                max_gen = max(max_gen, gen)
        heapq.heapify(self._heap)
        self._next_gen = max(mv[self._hdr + R_NEXT_GEN], max_gen + 1, 1)
        self._num_tombstones = sum(mv[self._base + s * ENTRY_LEN + E_STATE] == TOMBSTONE
                                   for s in range(self.num_slots))
        self._publish_counts()

    # ---- the writer's API -----------------------------------------------------------
    def insert(self, room: int, prefill_rank: int, deadline_ns: int, *, decode_rank: int = -1,
               kv_location: int = -1, kv_len: int = 0, first_token: int = -1,
               state: int = PLACED, now_ns: int | None = None, prompt_hash: int = 0,
               cached_tokens: int = 0) -> int:
        """Add ``room`` (state PLACED by default) and return its slot in this region.

        ``deadline_ns`` (CLOCK_MONOTONIC): when ``expire`` frees the entry if nobody
        removed it. Raises ``DuplicateRoomError`` if the room is live here and
        ``BootstrapTableFullError`` if the region has no free slot; never overwrites.
        """
        slot_of_room = self._slot_of_room
        if room in slot_of_room:
            raise DuplicateRoomError(
                f"bootstrap_room {room} is already live in region {self.region} "
                f"(slot {slot_of_room[room]}); rooms must be unique per request")
        num_slots = self.num_slots
        if len(slot_of_room) >= num_slots:
            raise BootstrapTableFullError(
                f"{self.table.name}: region {self.region} has all {num_slots} slots live; "
                f"retry later or raise slots_per_region")
        if state not in LIVE_STATES:
            raise ValueError(f"insert state must be PLACED, KV_READY or FAILED, got {state}")
        if not 0 <= room <= MAX_ROOM:
            raise ValueError(f"bootstrap_room must be in [0, 2**64), got {room}")
        slot = room % self._modulus  # == home_slot(room, num_slots), inlined: a hot path
        gens = self._gen
        while gens[slot]:  # the chain's first free slot (EMPTY or TOMBSTONE)
            slot = slot + 1 if slot + 1 < num_slots else 0
        gen = self._next_gen
        try:  # pack first: a bad value must not leave the seqlock odd
            data = FIELDS_STRUCT.pack(
                state, room, gen, prefill_rank, decode_rank, kv_location, kv_len, first_token,
                deadline_ns, time.monotonic_ns() if now_ns is None else now_ns, self.region, slot,
                prompt_hash, cached_tokens)
        except struct.error as exc:
            raise ValueError(f"entry field out of int64 range: {exc}") from exc
        mv = self._mv
        off = self._base + slot * ENTRY_LEN
        if mv[off + E_STATE] == TOMBSTONE:
            self._num_tombstones -= 1
            mv[self._hdr + R_NUM_TOMBSTONES] = self._num_tombstones
        seq = mv[off]
        mv[off] = seq + 1
        self._buf[off * 8 + 8:off * 8 + 8 + FIELDS_STRUCT.size] = data
        mv[off] = seq + 2
        self._next_gen = gen + 1
        slot_of_room[room] = slot
        gens[slot] = gen
        self._deadline[slot] = deadline_ns
        heapq.heappush(self._heap, (deadline_ns, gen, slot))
        mv[self._hdr + R_NUM_LIVE] = len(slot_of_room)
        mv[self._hdr + R_NEXT_GEN] = gen + 1
        return slot

    def update(self, slot: int, *, state: int | None = None, decode_rank: int | None = None,
               kv_location: int | None = None, kv_len: int | None = None,
               first_token: int | None = None, deadline_ns: int | None = None) -> None:
        """Change the given fields of the live entry in ``slot``, atomically to readers."""
        gen = self._live_gen(slot)
        if state is not None and state not in LIVE_STATES:
            raise ValueError(f"update state must be PLACED, KV_READY or FAILED, got {state}")
        changes = [(cell, value) for cell, value in (
            (E_STATE, state), (E_DECODE_RANK, decode_rank), (E_KV_LOCATION, kv_location),
            (E_KV_LEN, kv_len), (E_FIRST_TOKEN, first_token), (E_DEADLINE, deadline_ns))
            if value is not None]
        for cell, value in changes:
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise ValueError(f"entry field {cell} out of int64 range: {value}")
        mv = self._mv
        off = self._base + slot * ENTRY_LEN
        seq = mv[off]
        mv[off] = seq + 1
        for cell, value in changes:
            mv[off + cell] = value
        mv[off] = seq + 2
        if deadline_ns is not None:
            if deadline_ns < self._deadline[slot]:
                heapq.heappush(self._heap, (deadline_ns, gen, slot))
            self._deadline[slot] = deadline_ns  # a later one is re-queued when the old pops

    def remove(self, slot: int) -> None:
        """Free the live entry in ``slot`` (the caller frees its KV)."""
        self._live_gen(slot)
        self._free(slot)

    def expire(self, now_ns: int | None = None,
               claim_grace_ns: int = DEFAULT_CLAIM_GRACE_NS) -> list[BootstrapEntry]:
        """Free every entry past its deadline; return them as they were, to free their KV.

        An entry a decode rank has claimed but not released lives ``claim_grace_ns``
        past its deadline (the copy may be running). Cost: O(log n) per due entry.
        """
        now = time.monotonic_ns() if now_ns is None else now_ns
        heap, gens = self._heap, self._gen
        expired = []
        while heap and heap[0][0] <= now:
            _, gen, slot = heapq.heappop(heap)
            if gens[slot] != gen:
                continue  # freed, or re-queued under a new deadline
            due = self._deadline[slot]
            claim = self.claim_of(slot)
            if claim is not None and not claim[1]:
                due += claim_grace_ns
            if due > now:
                heapq.heappush(heap, (due, gen, slot))
                continue
            expired.append(self.entry(slot))
            self._free(slot)
        return expired

    def reap_released(self) -> list[BootstrapEntry]:
        """Free every entry whose decode rank released it; return them to free their KV.

        Scans this region's live entries: O(live * num_decode_ranks) cell reads.
        """
        reaped = []
        for slot in list(self._slot_of_room.values()):
            claim = self.claim_of(slot)
            if claim is not None and claim[1]:
                reaped.append(self.entry(slot))
                self._free(slot)
        return reaped

    def claim_of(self, slot: int) -> tuple[int, bool] | None:
        """``(decode_rank, released)`` of the claim on the live entry in ``slot``, or None.

        A claim still in progress (by any rank) wins over a release.
        """
        gen = self._gen[slot]
        if not gen or not self._num_decode:
            return None
        cells = self._claims_struct.unpack_from(
            self._buf, (self._claims_base + slot * self._num_decode) * 8)
        if gen in cells:
            return cells.index(gen), False
        if -gen in cells:
            return cells.index(-gen), True
        return None

    def entry(self, slot: int) -> BootstrapEntry:
        self._live_gen(slot)
        return self.table.entry_at(self.region, slot)

    def heartbeat(self, now_ns: int | None = None) -> None:
        """Say this writer is stepping (readers: ``BootstrapTable.region_heartbeat_ns``)."""
        self._mv[self._hdr + R_HEARTBEAT] = time.monotonic_ns() if now_ns is None else now_ns

    def slot_of(self, room: int) -> int | None:
        return self._slot_of_room.get(room)

    @property
    def num_live(self) -> int:
        return len(self._slot_of_room)

    @property
    def num_tombstones(self) -> int:
        return self._num_tombstones

    def close(self) -> None:
        """Give the region up (a later ``region_writer`` in any process may take it)."""
        table = self.table
        if table._writers.get(self.region) is self:
            del table._writers[self.region]
            if table._mv[self._hdr + R_WRITER_PID] == os.getpid():
                table._mv[self._hdr + R_WRITER_PID] = 0

    # ---- internals ------------------------------------------------------------------
    def _live_gen(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots or not self._gen[slot]:
            raise BootstrapTableError(f"region {self.region} slot {slot} holds no live entry")
        return self._gen[slot]

    def _free(self, slot: int) -> None:
        """Mark ``slot`` free: EMPTY if the chain ends after it (then clean the
        tombstones before it), else TOMBSTONE so later entries stay reachable."""
        mv, n = self._mv, self.num_slots
        off = self._base + slot * ENTRY_LEN
        del self._slot_of_room[self.table._rooms[off + E_ROOM]]
        self._gen[slot] = 0
        nxt = slot + 1 if slot + 1 < n else 0
        if nxt != slot and mv[self._base + nxt * ENTRY_LEN + E_STATE] != EMPTY:
            self._set_state(off, TOMBSTONE)
            self._num_tombstones += 1
        else:
            self._set_state(off, EMPTY)
            prev = slot - 1 if slot else n - 1
            while prev != slot and mv[self._base + prev * ENTRY_LEN + E_STATE] == TOMBSTONE:
                self._set_state(self._base + prev * ENTRY_LEN, EMPTY)
                self._num_tombstones -= 1
                prev = prev - 1 if prev else n - 1
        self._publish_counts()
        heap = self._heap
        if len(heap) > 2 * len(self._slot_of_room) + HEAP_SLACK:  # drop freed entries' items
            heap[:] = [(self._deadline[s], self._gen[s], s) for s in self._slot_of_room.values()]
            heapq.heapify(heap)  # in place: expire() may be iterating over it

    def _set_state(self, off: int, state: int) -> None:
        mv = self._mv
        seq = mv[off]
        mv[off] = seq + 1
        mv[off + E_STATE] = state
        mv[off] = seq + 2

    def _publish_counts(self) -> None:
        mv, hdr = self._mv, self._hdr
        mv[hdr + R_NUM_LIVE] = len(self._slot_of_room)
        mv[hdr + R_NEXT_GEN] = self._next_gen
        mv[hdr + R_NUM_TOMBSTONES] = self._num_tombstones


class DecodeClaimer:
    """Decode rank ``decode_rank``'s claims: the only writer of its claim cells.

    A hand-off is claimed once: an entry that any decode rank claimed (or released)
    before cannot be claimed again, by that rank or another (``was_claimed``); two
    ranks claiming one entry at the same moment both see the other and both back off.
    """

    def __init__(self, table: "BootstrapTable", decode_rank: int):
        self.table = table
        self.decode_rank = decode_rank

    def claim(self, entry: BootstrapEntry, now_ns: int | None = None,
              margin_ns: int = CLAIM_MARGIN_NS) -> bool:
        """Announce that this rank is about to read ``entry``'s KV; call before reading.

        False (read nothing, fail the request) if the entry is not KV_READY, is within
        ``margin_ns`` of its deadline, was freed meanwhile, or was claimed by anyone
        before (``was_claimed`` tells that case apart).
        """
        now = time.monotonic_ns() if now_ns is None else now_ns
        if entry.state != KV_READY or now > entry.deadline_ns - margin_ns:
            return False
        if self.was_claimed(entry):
            return False
        cell = self._cell(entry)
        self.table._mv[cell] = entry.gen
        if not self._intact(entry) or self.claimed_by_other(entry):
            self.table._mv[cell] = 0
            return False
        return True

    def was_claimed(self, entry: BootstrapEntry) -> bool:
        """Whether some decode rank holds or held a claim on this occupancy of the slot."""
        return any(c in (entry.gen, -entry.gen) for c in self._claims(entry))

    def release(self, entry: BootstrapEntry) -> bool:
        """Tell prefill it may free ``entry``'s KV; call after copying it (or giving up).

        Returns whether the entry stayed live and unchanged up to now: if False, the
        KV may have been freed during the copy and the copy must not be used.
        """
        intact = self._intact(entry)
        self.table._mv[self._cell(entry)] = -entry.gen
        return intact

    def _intact(self, entry: BootstrapEntry) -> bool:
        now = self.table.entry_at(entry.region, entry.slot)
        return now is not None and now.gen == entry.gen and now.state == KV_READY

    def _claims(self, entry: BootstrapEntry):
        table = self.table
        first = table.layout.claims(entry.region, entry.slot)
        return table._mv[first:first + table.num_decode_ranks]

    def claimed_by_other(self, entry: BootstrapEntry) -> bool:
        """Whether a decode rank other than this one holds or held a claim on it."""
        return any(c in (entry.gen, -entry.gen) for d, c in enumerate(self._claims(entry))
                   if d != self.decode_rank)

    def _cell(self, entry: BootstrapEntry) -> int:
        return self.table.layout.claims(entry.region, entry.slot) + self.decode_rank
