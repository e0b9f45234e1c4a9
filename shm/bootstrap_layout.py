"""Cell layout, entry type and errors of the bootstrap table.

The layout is drawn, with the writer of every cell, in ``shm.bootstrap``'s docstring;
this module holds its constants so that the table (``shm.bootstrap``) and its writers
(``shm.bootstrap_writers``) share one definition.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from enum import IntEnum

import msgspec

MAGIC = 0x445053_424F4F54  # "DPS" "BOOT"
LAYOUT_VERSION = 4  # 2: home_slot is room mod a prime; 3: prompt_hash, region heartbeat;
# 4: cached_tokens
HEADER_LEN = 8
H_MAGIC, H_VERSION, H_NUM_REGIONS, H_SLOTS, H_ENTRY_LEN, H_NUM_DECODE, H_OWNER = range(7)
REGION_HDR_LEN = 8
R_WRITER_PID, R_NUM_LIVE, R_NEXT_GEN, R_NUM_TOMBSTONES, R_HEARTBEAT = range(5)
ENTRY_LEN = 16
(E_SEQ, E_STATE, E_ROOM, E_GEN, E_PREFILL_RANK, E_DECODE_RANK, E_KV_LOCATION, E_KV_LEN,
 E_FIRST_TOKEN, E_DEADLINE, E_CREATED, E_REGION, E_SLOT, E_PROMPT_HASH, E_CACHED_TOKENS) = range(15)
# ENTRY_STRUCT: cells seq..cached_tokens in BootstrapEntry's field order, read in one struct
# call (room is unsigned); FIELDS_STRUCT: state..cached_tokens, written in one call under
# the seqlock.
# region and slot are stored (constant) so that a hit builds its BootstrapEntry straight
# from the unpacked tuple (~90 ns, vs ~270 ns when extra arguments are spliced in).
ENTRY_STRUCT = struct.Struct("<qqQqqqqqqqqqqqq")
FIELDS_STRUCT = struct.Struct("<qQqqqqqqqqqqqq")

MAX_ROOM = 2**64 - 1
MASK64 = 2**64 - 1


class EntryState(IntEnum):
    EMPTY = 0  # never used since the last clean: probes stop here
    PLACED = 1  # prefill rank chosen, prefill running
    KV_READY = 2  # prefill done; KV at kv_location, first_token set
    FAILED = 3  # prefill failed or was aborted; decode must fail the request
    TOMBSTONE = 4  # freed; probes continue past it, inserts may reuse it


EMPTY, PLACED, KV_READY, FAILED, TOMBSTONE = (int(s) for s in EntryState)
LIVE_STATES = (PLACED, KV_READY, FAILED)


class BootstrapTableError(RuntimeError):
    """Base class of bootstrap-table errors."""


class BootstrapTableFullError(BootstrapTableError):
    """A region has no free slot; the request should fail with 503, never overwrite."""


class DuplicateRoomError(BootstrapTableError):
    """The room is already live in this region (the gateway reused a bootstrap_room)."""


class BootstrapEntry(msgspec.Struct, frozen=True, gc=False):
    """A consistent copy of one live entry. ``state`` is an ``EntryState`` value (int)."""

    seq: int  # the entry's seqlock count when copied: it changes whenever the entry does
    state: int
    room: int
    gen: int  # which occupancy of (region, slot) this is; decode claims carry it
    prefill_rank: int
    decode_rank: int  # -1 until known
    kv_location: int  # where the KV is (slot/offset in the prefill pool or hand-off buffer)
    kv_len: int  # tokens of KV
    first_token: int  # -1 until KV_READY
    deadline_ns: int  # CLOCK_MONOTONIC; the entry expires after it
    created_ns: int  # CLOCK_MONOTONIC at insert
    region: int
    slot: int
    # Which request the entry belongs to (``scheduler.pd.prompt_hash`` of its prompt; 0
    # if the writer did not say): a room is not a secret, so decode checks this too.
    prompt_hash: int = 0
    # How many leading prompt tokens the prefill rank's prefix cache held (0 if the
    # writer did not say): decode reports it as the request's ``cached_tokens``.
    cached_tokens: int = 0


@functools.lru_cache(maxsize=64)
def hash_modulus(slots_per_region: int) -> int:
    """The largest prime <= ``slots_per_region`` (1 for one slot): ``home_slot``'s modulus."""
    for m in range(slots_per_region, 1, -1):
        if all(m % d for d in range(2, math.isqrt(m) + 1)):
            return m
    return 1


def home_slot(room: int, slots_per_region: int) -> int:
    """Where linear probing for ``room`` starts in every region: ``room mod p``, p the
    largest prime <= ``slots_per_region``.

    A prime modulus spreads every arithmetic pattern of rooms whose stride is not a
    multiple of p (sequential rooms, multiples of powers of two, timestamps, rooms
    differing only in high bits: ``tests/test_bootstrap.py`` probes them) as well as
    random rooms, and costs ~35 ns in pure Python, where the Fibonacci multiply-shift
    used before cost ~110 ns of a hit's ~850 ns. Slots at or above p are no one's home
    but still take overflow from the probing, so every slot is usable. The table's
    look-up and insert inline ``room % modulus``; keep them identical.
    """
    return room % hash_modulus(slots_per_region)


@dataclass(frozen=True)
class BootstrapLayout:
    num_regions: int
    slots_per_region: int
    num_decode_ranks: int

    @property
    def entries_off(self) -> int:
        return HEADER_LEN + self.num_regions * REGION_HDR_LEN

    @property
    def claims_off(self) -> int:
        return self.entries_off + self.num_regions * self.slots_per_region * ENTRY_LEN

    @property
    def num_cells(self) -> int:
        return self.claims_off + self.num_regions * self.slots_per_region * self.num_decode_ranks

    def region_hdr(self, region: int) -> int:
        return HEADER_LEN + region * REGION_HDR_LEN

    def entry(self, region: int, slot: int) -> int:
        return self.entries_off + (region * self.slots_per_region + slot) * ENTRY_LEN

    def claims(self, region: int, slot: int) -> int:
        return self.claims_off + (region * self.slots_per_region + slot) * self.num_decode_ranks
