"""The bootstrap table: ``bootstrap_room -> prefill rank (and KV hand-off)`` in shared memory.

Decode finds the prefill rank holding a request's KV here with zero network hops,
replacing SGLang's HTTP bootstrap server. One POSIX segment of int64 cells (native
little-endian), laid out as::

    cell 0                                                                    HEADER_LEN
    +-------+---------+-------------+-------+-----------+-------------+-----------+...+
    | magic | version | num_regions | slots | entry_len | num_decode  | owner_pid |pad|
    +-------+---------+-------------+-------+-----------+-------------+-----------+...+
    region headers, region r at HEADER_LEN + r * REGION_HDR_LEN:
    +------------+----------+----------+----------------+-----------+-----+
    | writer_pid | num_live | next_gen | num_tombstones | heartbeat | pad |
    +------------+----------+----------+----------------+-----------+-----+
    entries, slot s of region r at entries_off + (r * slots + s) * ENTRY_LEN (128 B):
    +-----+-------+------+-----+--------------+-------------+-------------+--------+
    | seq | state | room | gen | prefill_rank | decode_rank | kv_location | kv_len | ...
    +-----+-------+------+-----+--------------+-------------+-------------+--------+
      ... | first_token | deadline_ns | created_ns | region | slot | prompt_hash | ...
      ... | cached_tokens | reserved |
    decode claims, cell claims_off + (r * slots + s) * num_decode + d:
    +--------------------+--------------------+-----+------------------------+
    | claim[r][s][0]     | claim[r][s][1]     | ... | claim[r][s][num_dec-1] |
    +--------------------+--------------------+-----+------------------------+

Who writes what (exactly one writer per cell; ``+=`` on shared memory is not atomic):
- header: the creator, once, before anyone attaches.
- region header r and every entry of region r: the region's writer (through
  ``table.region_writer(r)``: in the route table the API process that owns region r,
  in the hand-off table prefill rank r), and nobody else.
  It fills an entry on ``insert``; later it may change ``state`` (PLACED -> KV_READY or
  FAILED), ``decode_rank``, ``kv_location``, ``kv_len``, ``first_token`` and
  ``deadline_ns`` (``update``), and frees the slot (``remove``/``expire``). ``room``,
  ``gen``, ``prefill_rank``, ``created_ns``, ``region`` and ``slot`` never change while
  the entry is live.
- ``claim[r][s][d]``: decode rank d only (``table.decode_claimer(d)``). It holds
  ``gen`` while d copies the KV of the entry in slot s ("do not free it yet") and
  ``-gen`` once d is done ("free it"); 0 or any other value means no claim. ``gen``
  numbers occupancies of a slot, so a late write about an old occupancy is ignored.
  An occupancy is claimed once: a claimer refuses an entry whose claim cells (any
  rank's) already hold ``gen`` or ``-gen`` (``DecodeClaimer.claim``).
  Decode needs no other cell: everything else it learns, it reads.

Entries are keyed by the 64-bit ``bootstrap_room`` (0 <= room < 2**64, stored as an
unsigned cell) with linear probing from ``home_slot(room)`` (a prime modulus, see
``shm.bootstrap_layout``) within a region. ``writer_pid`` in a region header names the
process holding that region (0: none), so a second writer is refused. Readers
(decode, any process) probe every region; writers insert only into their own. Free
slots are EMPTY (a probe stops) or TOMBSTONE (a probe continues; an insert may reuse
it). ``remove`` writes EMPTY instead of TOMBSTONE when the next slot is EMPTY, and turns
the tombstones right before it into EMPTY too, so chains stay short; this is safe for
concurrent readers because entries never move: a live entry's chain from its home
slot is non-EMPTY for as long as it lives.

Each entry is written under its own seqlock: the writer stores ``seq+1`` (odd), the
fields, then ``seq+2``; a reader retries while seq is odd or changed. As with the load
board this relies on x86-64 store/load ordering (see ``shm.board.check_memory_order``).
Times (``deadline_ns``, ``created_ns``) are CLOCK_MONOTONIC (``time.monotonic_ns()``),
which every process on the node shares.

Ownership: ``BootstrapTable.create`` makes the segment and unlinks it on ``close``;
``BootstrapTable.attach`` never unlinks.
"""

from __future__ import annotations

import os
import struct
import time
from typing import TYPE_CHECKING, Iterator

from shm.board import check_memory_order
from shm.bootstrap_layout import (  # noqa: F401  (some only re-exported, see __all__)
    E_ROOM, E_SEQ, E_STATE, EMPTY, ENTRY_LEN, ENTRY_STRUCT, FAILED, H_ENTRY_LEN, H_MAGIC,
    H_NUM_DECODE, H_NUM_REGIONS,
    H_SLOTS, H_VERSION, HEADER_LEN, KV_READY, LAYOUT_VERSION, LIVE_STATES, MAGIC, MAX_ROOM,
    PLACED, R_HEARTBEAT, R_NEXT_GEN, R_NUM_LIVE, R_WRITER_PID, TOMBSTONE, BootstrapEntry,
    BootstrapLayout, BootstrapTableError, BootstrapTableFullError,
    DuplicateRoomError, EntryState, hash_modulus, home_slot)
from shm.segment import SharedSegment, ShmLayoutError, ShmNotReadyError, pid_alive, segment_name

if TYPE_CHECKING:
    from shm.bootstrap_writers import DecodeClaimer, RegionWriter

__all__ = ["BootstrapTable", "BootstrapEntry", "EntryState", "BootstrapTableError",
           "BootstrapTableFullError", "DuplicateRoomError", "home_slot",
           "EMPTY", "PLACED", "KV_READY", "FAILED", "TOMBSTONE", "LIVE_STATES", "MAX_ROOM"]

MAX_READ_STALL_S = 1.0  # an entry odd this long was left mid-write by a dead writer


class BootstrapTable:
    """A mapped bootstrap table. ``create`` (owner, unlinks on close) or ``attach``.

    Reader API (any process): ``lookup``, ``lookup_in``, ``entry_at``, ``entries``,
    ``num_live``, ``region_writer_pid``, ``region_heartbeat_ns``.
    Writers get single-writer handles: ``region_writer(r)`` in the one process that
    owns region r, and ``decode_claimer(d)`` in decode rank d.

    PD uses two tables of this layout (``scheduler.pd``): the *route* table, one region
    per prefill dispatcher (room -> prefill rank, written at dispatch), and the
    *hand-off* table, one region per prefill rank (room -> KV_READY/FAILED, the KV's
    place and the first token, written by that rank; decode ranks claim and release).
    """

    def __init__(self, segment: SharedSegment, layout: BootstrapLayout):
        self.segment = segment
        self.layout = layout
        self.name = segment.name
        self.num_regions = layout.num_regions
        self.slots_per_region = layout.slots_per_region
        self.num_decode_ranks = layout.num_decode_ranks
        self._mv = memoryview(segment.buf).cast("q")
        self._rooms = memoryview(segment.buf).cast("Q")  # the room cells are unsigned
        self._buf = segment.buf
        self._region_bases = tuple(layout.entry(r, 0) for r in range(layout.num_regions))
        self._writers: dict[int, RegionWriter] = {}
        self._lookup = self.lookup = self._make_lookup()

    # ---- lifetime -------------------------------------------------------------------
    @classmethod
    def create(cls, num_regions: int, slots_per_region: int, launch_id: str,
               kind: str = "bootstrap", num_decode_ranks: int = 1) -> "BootstrapTable":
        """Make a zeroed table (every slot EMPTY). ``num_regions``: one per prefill dispatcher."""
        check_memory_order()
        if not 1 <= num_regions <= 1024:
            raise ValueError(f"num_regions must be in [1, 1024], got {num_regions}")
        if not 1 <= slots_per_region <= 2**24:
            raise ValueError(f"slots_per_region must be in [1, 2**24], got {slots_per_region}")
        if not 0 <= num_decode_ranks <= 4096:
            raise ValueError(f"num_decode_ranks must be in [0, 4096], got {num_decode_ranks}")
        layout = BootstrapLayout(num_regions, slots_per_region, num_decode_ranks)
        seg = SharedSegment.create(segment_name(kind, launch_id), layout.num_cells * 8)
        header = (0, LAYOUT_VERSION, num_regions, slots_per_region, ENTRY_LEN,
                  num_decode_ranks, os.getpid())
        struct.pack_into(f"<{len(header)}q", seg.buf, 0, *header)
        for r in range(num_regions):
            struct.pack_into("<q", seg.buf, (layout.region_hdr(r) + R_NEXT_GEN) * 8, 1)
        # The magic last (x86 store order): an attacher that sees it sees a whole table;
        # one that comes earlier gets ShmNotReadyError and tries again.
        struct.pack_into("<q", seg.buf, H_MAGIC * 8, MAGIC)
        return cls(seg, layout)

    @classmethod
    def attach(cls, name: str) -> "BootstrapTable":
        check_memory_order()
        seg = SharedSegment.attach(name)
        if seg.size < HEADER_LEN * 8:
            seg.close()
            raise ShmLayoutError(f"{name} is too small to be a bootstrap table")
        header = struct.unpack_from(f"<{HEADER_LEN}q", seg.buf, 0)
        if header[H_MAGIC] == 0:
            seg.close()
            raise ShmNotReadyError(f"{name} is still being created")
        if header[H_MAGIC] != MAGIC or header[H_VERSION] != LAYOUT_VERSION or \
                header[H_ENTRY_LEN] != ENTRY_LEN:
            seg.close()
            raise ShmLayoutError(
                f"{name} is not a bootstrap table of layout version {LAYOUT_VERSION}")
        layout = BootstrapLayout(header[H_NUM_REGIONS], header[H_SLOTS], header[H_NUM_DECODE])
        if layout.num_cells * 8 > seg.size:
            seg.close()
            raise ShmLayoutError(
                f"{name}: {seg.size} bytes, layout {layout} needs {layout.num_cells * 8}")
        return cls(seg, layout)

    def close(self) -> None:
        """Give up this process's regions, drop the views, unmap (and unlink if owner)."""
        for writer in list(self._writers.values()):
            writer.close()
        self._mv.release()
        self._rooms.release()
        if self.segment.is_owner:
            self.segment.__exit__(None, None, None)
        else:
            self.segment.close()

    def __enter__(self) -> "BootstrapTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- single-writer handles ------------------------------------------------------
    def region_writer(self, region: int) -> "RegionWriter":
        """The writer of ``region``, for the prefill dispatcher that owns it.

        Refuses a region another live process writes. A region left by a dead writer
        is taken over: entries it left mid-write are dropped, the rest kept.
        """
        from shm.bootstrap_writers import RegionWriter
        if not 0 <= region < self.num_regions:
            raise ValueError(f"region {region} out of range [0, {self.num_regions})")
        if region not in self._writers:
            holder = self._mv[self.layout.region_hdr(region) + R_WRITER_PID]
            if holder not in (0, os.getpid()) and pid_alive(holder):
                raise BootstrapTableError(
                    f"{self.name}: region {region} is written by live pid {holder}; "
                    f"give each prefill dispatcher its own region")
            self._writers[region] = RegionWriter(self, region)
        return self._writers[region]

    def decode_claimer(self, decode_rank: int) -> "DecodeClaimer":
        from shm.bootstrap_writers import DecodeClaimer
        if not 0 <= decode_rank < self.num_decode_ranks:
            raise ValueError(f"decode rank {decode_rank} out of range [0, {self.num_decode_ranks})")
        return DecodeClaimer(self, decode_rank)

    # ---- readers --------------------------------------------------------------------
    def lookup(self, room: int) -> BootstrapEntry | None:
        """The live entry for ``room``, or None. Hot path. With several regions, the
        first that has it, preferring one not FAILED: a FAILED entry is an ended
        request's, and another region may hold a new request for the room.

        Replaced per instance by the closure ``_make_lookup`` builds; this stub only
        carries the signature and docstring.
        """
        return self._lookup(room)

    def _make_lookup(self):
        """Build ``lookup`` as a closure over the mapping and constants.

        Why a closure: a hot lookup fetching ``self._mv`` and friends (and module
        constants) on every call would spend a good part of its budget on attribute and
        global loads; closure cells are cheap. A probe compares the room cell first (one
        read); only a match is unpacked whole, seq included, and its seq re-read once.
        No numpy: one numpy call costs more than the whole probe.
        """
        num_slots = self.slots_per_region
        modulus = hash_modulus(num_slots)
        mv, rooms, buf = self._mv, self._rooms, self._buf
        unpack, entry_cls, read_cells = ENTRY_STRUCT.unpack_from, BootstrapEntry, self._read_cells
        seq_at, state_at, room_at, empty = E_SEQ, E_STATE, E_ROOM, EMPTY
        first_live, past_live = min(LIVE_STATES), max(LIVE_STATES) + 1
        failed_state = FAILED

        def probe(room: int, home: int, base: int) -> BootstrapEntry | None:
            # home == home_slot(room, num_slots), computed once for every region
            slot = home
            while True:
                off = base + slot * ENTRY_LEN
                if rooms[off + room_at] == room:  # maybe ours: copy it whole
                    cells = unpack(buf, off * 8)
                    if cells[seq_at] & 1 or mv[off + seq_at] != cells[seq_at]:
                        cells = read_cells(off)
                    if cells[room_at] == room and first_live <= cells[state_at] < past_live:
                        return entry_cls(*cells)
                    if cells[state_at] == empty:  # the chain ends
                        return None
                elif mv[off + state_at] == empty:  # the chain ends
                    return None
                slot += 1
                if slot == num_slots:
                    slot = 0
                if slot == home:  # a region without EMPTY slots, all probed
                    return None

        self._probe = probe
        bases = self._region_bases
        if len(bases) == 1:  # one prefill dispatcher, the common case: no region loop
            base0 = bases[0]

            def lookup(room: int) -> BootstrapEntry | None:
                return probe(room, room % modulus, base0)
            return lookup

        def lookup_regions(room: int) -> BootstrapEntry | None:
            home = room % modulus
            failed = None
            for base in bases:
                entry = probe(room, home, base)
                if entry is not None:
                    if entry.state != failed_state:
                        return entry
                    failed = failed or entry
            return failed
        return lookup_regions

    def lookup_in(self, region: int, room: int) -> BootstrapEntry | None:
        """``lookup`` restricted to one region: for a reader that knows which writer
        holds the room (PD decode told the prefill rank, whose region it is)."""
        home = room % hash_modulus(self.slots_per_region)
        return self._probe(room, home, self._region_bases[region])

    def region_writer_pid(self, region: int) -> int:
        """The pid holding ``region``'s writer, 0 if none (a reader's liveness check)."""
        return self._mv[self.layout.region_hdr(region) + R_WRITER_PID]

    def region_heartbeat_ns(self, region: int) -> int:
        """When ``region``'s writer last stepped (CLOCK_MONOTONIC ns), 0 if never."""
        return self._mv[self.layout.region_hdr(region) + R_HEARTBEAT]

    def entry_at(self, region: int, slot: int) -> BootstrapEntry | None:
        """The live entry in ``(region, slot)``, or None if that slot is free."""
        cells = self._read_cells(self.layout.entry(region, slot))
        return BootstrapEntry(*cells) if cells[1] in LIVE_STATES else None

    def entries(self) -> Iterator[BootstrapEntry]:
        """Every live entry, region by region (a scan: for leak checks and metrics)."""
        for region in range(self.num_regions):
            for slot in range(self.slots_per_region):
                entry = self.entry_at(region, slot)
                if entry is not None:
                    yield entry

    def num_live(self) -> int:
        """Live entries over all regions, from the writers' counters (exact when idle)."""
        mv = self._mv
        return sum(mv[self.layout.region_hdr(r) + R_NUM_LIVE] for r in range(self.num_regions))

    def _read_cells(self, off: int) -> tuple[int, ...]:
        """Cells seq..slot of the entry at cell ``off``, consistent (seqlock)."""
        mv, buf = self._mv, self._buf
        spins = 0
        give_up = None
        while True:
            cells = ENTRY_STRUCT.unpack_from(buf, off * 8)
            if not cells[0] & 1 and mv[off] == cells[0]:
                return cells
            spins += 1
            if spins > 64:  # the writer was probably descheduled mid-write: let it run
                os.sched_yield()
                now = time.monotonic()
                give_up = give_up or now + MAX_READ_STALL_S
                if now > give_up:
                    raise BootstrapTableError(
                        f"{self.name}: entry at cell {off} stayed mid-write for "
                        f"{MAX_READ_STALL_S} s; its region writer died. Restart that "
                        f"dispatcher (region_writer() repairs the region).")
