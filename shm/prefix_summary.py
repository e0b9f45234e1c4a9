"""Prefix-cache summaries: which prompt prefixes each rank caches, read lock-free.

Every rank publishes the keys (``scheduler.prefix_hash``: chained hashes of 64-token
blocks) of the full blocks its prefix cache holds; the dispatcher hashes a new prompt
and probes every rank at once for the longest prefix each one holds. One POSIX segment
of uint64 cells (native little-endian)::

    cell 0                                                                  HEADER_LEN
    +-------+---------+-----------+-------------+------+-----------+-----------+-------+
    | magic | version | num_ranks | num_buckets | ways | block_len | owner_pid | slots |
    +-------+---------+-----------+-------------+------+-----------+-----------+-------+
    rank lines, rank r at HEADER_LEN + r * LINE (LINE = 8 cells, 64 bytes):
    +------------+----------+-------------+-----------+-----+
    | writer_pid | num_keys | num_dropped | evictions | pad |
    +------------+----------+-------------+-----------+-----+
    table at table_off = HEADER_LEN + num_ranks * LINE, bucket-major; bucket b holds
    WAYS cells per rank, side by side (cell (b * num_ranks + r) * WAYS + w):
    +----------------------+----------------------+-----+------------------------+
    | rank 0: key[0..WAYS) | rank 1: key[0..WAYS) | ... | rank N-1: key[0..WAYS) |
    +----------------------+----------------------+-----+------------------------+
      ... then bucket b + 1. A key k lives in bucket ``bucket_of(k)`` (Fibonacci hashing
      of the key's bits), in either way of its rank's cells there; 0 marks a free way.
    only when the header's ``slots`` is 1 (ranks share cached prefixes,
    ``scheduler.prefix_share``), two more parts:
    stash at stash_off = table_off + num_buckets * num_ranks * WAYS, rank-major: rank r
      has num_buckets / 16 stash buckets of STASH_WAYS cells (stash bucket of key k:
      k's low bits), where its keys go whose table bucket is full;
    slot records, int32 after the stash, RECORD_LEN each: key cell c (table or stash)
      has record c - table_off: the KV slots, in the rank's own pool, of the block whose
      key the cell holds (BLOCK_LEN cells), then that block's ``prefix_digests`` digest
      (16 bytes), which a copier compares with its own prompt's: the keys are not
      collision-proof, the digest is.
    Probes read the table only; a copy needs every block's record, so the stash keeps a
    dropped key's record (a prefix of 32 blocks in a full table would otherwise miss
    one of them more often than not).

Who writes what (one writer per cell):
- header: the creator (the launcher, ``PrefixSummary.create``), once, before anyone
  attaches.
- rank line r and rank r's cells of every bucket (its region), and their slot
  records: rank r's scheduler, through its ``SummaryWriter`` (the prefix cache's
  observer), as it inserts, evicts and flushes. It writes a record before the key
  that points to it, and bumps its line's ``evictions`` whenever its cache lets slots
  go: after withdrawing their keys, before the slots can be allocated again and
  written by a forward pass.

How a peer copies a block's KV without its owner (``scheduler.prefix_share``): read
``evictions``, find the key and read its record, copy those slots of the owner's pool,
read ``evictions`` again; equal, and the copy is the block's KV (the owner frees a
cached slot only by evicting, and writes one only after allocating it again, after
the bump: x86-64 store order); changed, and the copy is thrown away. The owner
withdraws the keys before the bump: a copier whose first read saw the bump would
otherwise still find a key whose slots are free, and no later bump would warn it
that the next forward pass rewrote them.

Why bucket-major: a probe reads, for each block of the prompt, the same bucket of every
rank, so one bucket is one contiguous row and the dispatcher gathers the rows of all
the prompt's blocks in one numpy ``take`` and compares them with the keys at once.
Why two ways: the probe compares ``WAYS`` cells per block per rank (64 x 64 x WAYS
cells for a 4,096-token prompt at 64 ranks), and a dropped key costs little (below).

Readers (the dispatchers) read single cells without locks: a key cell changes from 0
to a key (insert) or from a key to 0 (evict) in one aligned 8-byte store, atomic on
the CPUs ``shm.board.check_memory_order`` admits, so a reader sees either the old or
the new value. A summary is as fresh as the rank's last insert or evict; a prefix
evicted between a probe and the request's arrival just misses in the rank's cache.

How a probe is exact: a key stands for a whole prefix (it chains every earlier block),
so a rank that has key ``j`` holds ``tokens[:(j + 1) * BLOCK_LEN]``, whether or not the
earlier keys fit in its table. The probe reports, per rank, the deepest block whose key
it finds. The table may miss keys (a bucket whose ``WAYS`` ways are full drops a new
key, counted in ``num_dropped``): that is a false negative, which only under-states a
prefix, and only when the dropped key is the deepest one the prompt shares with the
rank: the probe then credits the deepest key it finds on the path instead, one block
(64 tokens) less per consecutive dropped key. A false positive needs another prefix with the same 64-bit key in the same
bucket of the same rank: at most ``WAYS`` candidates per probe of one block on one
rank, so fewer than ``WAYS * 2**-64`` (about 1e-19) per probe. Its cost: one request
is sent to a rank for a prefix it does not hold, and that rank computes those tokens
(a slower first token for that request, never a wrong output: the rank's own cache
compares tokens, never keys).

Sizing: ``buckets_for(max_cached_tokens)`` gives a rank twice the cells of the blocks
it can cache. Full (a KV pool of cached prompts), keys land Poisson(1) per bucket and
about 10% are dropped, which under-states a shared prefix by about 7 tokens on
average. A 1M-token KV pool per rank is 16,384 buckets, 256 KiB per rank, 16 MiB at 64
ranks (a probe touches one 1 KiB row per block, whatever the size). Slot records add
272 bytes per cell and the stash a quarter of the cells, about 11 bytes per token of
the pool (11 MiB per rank at 1M tokens: next to the KV of a token, hundreds of KiB on a
large model, nothing), in pages the kernel backs only once a rank writes them.

Ownership: the launcher creates the segment (``create``) and unlinks it at close;
ranks and dispatchers ``attach`` and never unlink.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from scheduler.prefix_hash import (BLOCK_LEN, DIGEST_BYTES, block_keys, chain_hashes, first_hash,
                                   prefix_digests, summary_key)
from shm.board import check_memory_order
from shm.segment import SharedSegment, ShmError, ShmLayoutError, pid_alive, segment_name

__all__ = ["PrefixSummary", "SummaryWriter", "buckets_for", "WAYS", "BLOCK_LEN"]

MAGIC = 0x44505350_52464958  # "DPSP" "RFIX"
LAYOUT_VERSION = 2
HEADER_LEN = 8
H_MAGIC, H_VERSION, H_NUM_RANKS, H_NUM_BUCKETS, H_WAYS, H_BLOCK_LEN, H_OWNER, H_SLOTS = range(8)
LINE = 8  # cells per rank line: 64 bytes
L_WRITER_PID, L_NUM_KEYS, L_NUM_DROPPED, L_EVICTIONS = range(4)
WAYS = 2
STASH_WAYS = 8
RECORD_LEN = BLOCK_LEN + DIGEST_BYTES // 4  # int32 cells: the slots, then the digest
_WAYS_AS_ONE = np.uint16  # WAYS booleans side by side, read as one integer
FIB = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: Fibonacci hashing
MASK = (1 << 64) - 1
# The dispatcher checks whether any rank holds the last block of each run of this many
# blocks before hashing further: hashing stops within STRIDE blocks of the deepest one
# any rank holds, at one cheap check per STRIDE blocks.
STRIDE = 8


def stash_shape(num_ranks: int, num_buckets: int, slot_records: bool) -> tuple[int, int]:
    """(stash buckets per rank, stash cells in all): none without slot records. A
    rank's stash has a quarter of its table's cells: a full table drops about 10%."""
    if not slot_records:
        return 1, 0
    buckets = max(1, num_buckets // 16)
    return buckets, num_ranks * buckets * STASH_WAYS


def buckets_for(max_cached_tokens: int) -> int:
    """Buckets (a power of two, at least 64) for a rank caching up to this many tokens."""
    blocks = max(1, max_cached_tokens // BLOCK_LEN)
    return max(64, 1 << (2 * blocks // WAYS - 1).bit_length())


class PrefixSummary:
    """A mapped summary segment. ``create`` (the launcher) or ``attach``.

    Readers call ``cached_tokens(prompt)``; rank r gets its writer with ``writer(r)``.
    """

    def __init__(self, segment: SharedSegment, num_ranks: int, num_buckets: int,
                 slot_records: bool = False):
        self.segment = segment
        self.name = segment.name
        self.num_ranks = num_ranks
        self.num_buckets = num_buckets
        self._shift = 64 - (num_buckets.bit_length() - 1)
        self.table_off = HEADER_LEN + num_ranks * LINE
        table_len = num_buckets * num_ranks * WAYS
        self.stash_off = self.table_off + table_len
        self.stash_buckets, stash_len = stash_shape(num_ranks, num_buckets, slot_records)
        self.cells = memoryview(segment.buf).cast("Q")
        arr = np.frombuffer(segment.buf, dtype=np.uint64, count=self.stash_off + stash_len)
        self._lines = arr[HEADER_LEN:self.table_off].reshape(num_ranks, LINE)
        # [bucket, rank * WAYS + way]: one row per bucket, every rank's line side by side.
        self._table = arr[self.table_off:self.stash_off].reshape(num_buckets, num_ranks * WAYS)
        self._stash = arr[self.stash_off:].reshape(num_ranks, -1)
        # [key cell - table_off, RECORD_LEN]: the KV slots of the block the cell's key
        # names, then the block's digest.
        num_records = table_len + stash_len
        self.records = (np.frombuffer(segment.buf, dtype=np.int32, count=num_records * RECORD_LEN,
                                      offset=(self.stash_off + stash_len) * 8)
                        .reshape(num_records, RECORD_LEN) if slot_records else None)
        self._np_shift = np.uint64(self._shift)
        self._np_fib = np.uint64(FIB)
        self._depths = self._depth_tokens(1024)
        self._bucket_bytes = num_ranks * WAYS * 8
        self._table_byte = self.table_off * 8

    # ---- lifetime -------------------------------------------------------------------
    @classmethod
    def create(cls, num_ranks: int, num_buckets: int, launch_id: str,
               kind: str = "prefix", slot_records: bool = False) -> "PrefixSummary":
        """``slot_records``: keep each cached block's KV slots beside its key, for ranks
        that copy each other's cached prefixes (``scheduler.prefix_share``)."""
        check_memory_order()
        if not 1 <= num_ranks <= 4096:
            raise ValueError(f"num_ranks must be in [1, 4096], got {num_ranks}")
        if num_buckets < 1 or num_buckets & (num_buckets - 1) or num_buckets > 1 << 24:
            raise ValueError(f"num_buckets must be a power of two in [1, 2**24], got {num_buckets}")
        table_len = num_buckets * num_ranks * WAYS
        stash_len = stash_shape(num_ranks, num_buckets, slot_records)[1]
        size = (HEADER_LEN + num_ranks * LINE + table_len + stash_len) * 8
        if slot_records:
            size += (table_len + stash_len) * RECORD_LEN * 4
        seg = SharedSegment.create(segment_name(kind, launch_id), size)
        summary = cls(seg, num_ranks, num_buckets, slot_records)
        cells = summary.cells
        for cell, value in ((H_VERSION, LAYOUT_VERSION), (H_NUM_RANKS, num_ranks),
                            (H_NUM_BUCKETS, num_buckets), (H_WAYS, WAYS),
                            (H_BLOCK_LEN, BLOCK_LEN), (H_OWNER, os.getpid()),
                            (H_SLOTS, int(slot_records))):
            cells[cell] = value
        cells[H_MAGIC] = MAGIC  # last (x86 store order): seen only over a whole header
        return summary

    @classmethod
    def attach(cls, name: str) -> "PrefixSummary":
        check_memory_order()
        seg = SharedSegment.attach(name)
        header = np.frombuffer(seg.buf, dtype=np.uint64, count=HEADER_LEN).tolist()
        if header[H_MAGIC] != MAGIC or header[H_VERSION] != LAYOUT_VERSION \
                or header[H_WAYS] != WAYS or header[H_BLOCK_LEN] != BLOCK_LEN:
            seg.close()
            raise ShmLayoutError(f"{name} is not a prefix summary of layout version "
                                 f"{LAYOUT_VERSION} with {WAYS} ways of {BLOCK_LEN}-token blocks")
        return cls(seg, header[H_NUM_RANKS], header[H_NUM_BUCKETS], bool(header[H_SLOTS]))

    def close(self) -> None:
        """Drop every view, then unmap (and unlink if this process created it)."""
        self.cells.release()
        del self._lines, self._table, self._stash, self.records
        self.segment.__exit__(None, None, None) if self.segment.is_owner else self.segment.close()

    def __enter__(self) -> "PrefixSummary":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def writer(self, rank: int) -> "SummaryWriter":
        """Rank ``rank``'s writer (its scheduler's cache observer). Refused while another
        live process holds the rank; a new writer starts from an empty region."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} out of range [0, {self.num_ranks})")
        holder = self.writer_pid(rank)
        if holder not in (0, os.getpid()) and pid_alive(holder):
            raise ShmError(f"{self.name}: rank {rank}'s summary is held by live pid {holder}")
        return SummaryWriter(self, rank)

    # ---- reading ----------------------------------------------------------------------
    def bucket_of(self, key: int) -> int:
        return ((key * FIB) & MASK) >> self._shift

    def writer_pid(self, rank: int) -> int:
        return self.cells[HEADER_LEN + rank * LINE + L_WRITER_PID]

    def num_keys(self, rank: int) -> int:
        return self.cells[HEADER_LEN + rank * LINE + L_NUM_KEYS]

    def num_dropped(self, rank: int) -> int:
        return self.cells[HEADER_LEN + rank * LINE + L_NUM_DROPPED]

    def evictions(self, rank: int) -> int:
        """How many times rank ``rank``'s cache has let slots go: unchanged across a copy
        of its KV means the copy is good (module docstring)."""
        return self.cells[HEADER_LEN + rank * LINE + L_EVICTIONS]

    def block_slots(self, rank: int, hashes: Sequence[int], digests: Sequence[bytes],
                    first: int, end: int) -> list:
        """The KV slots of blocks ``first..end-1`` (chained hashes ``hashes``, digests
        ``digests[j - first]``) in rank ``rank``'s pool, up to the first block whose key
        its cells lack or whose record has another digest: a list of int32 arrays,
        copies. Read ``evictions(rank)`` before and after using them."""
        if self.records is None:
            raise ValueError(f"{self.name} keeps no slot records")
        cells, out = self.cells, []
        for j in range(first, end):
            key = summary_key(hashes[j])
            base = self.table_off + (self.bucket_of(key) * self.num_ranks + rank) * WAYS
            stash = self.stash_cell(rank, key)
            for cell in (*range(base, base + WAYS), *range(stash, stash + STASH_WAYS)):
                if cells[cell] == key:
                    record = self.records[cell - self.table_off].copy()
                    break
            else:
                break
            if record[0] < 0 or record[BLOCK_LEN:].tobytes() != digests[j - first]:
                break  # published without its slots, or another prefix with this key
            out.append(record[:BLOCK_LEN])
        return out

    def stash_cell(self, rank: int, key: int) -> int:
        """The first cell of ``key``'s stash bucket in rank ``rank``'s stash."""
        bucket = key & (self.stash_buckets - 1)
        return self.stash_off + (rank * self.stash_buckets + bucket) * STASH_WAYS

    def any_holds(self, key: int) -> bool:
        """Whether some rank's summary has ``key``: one search of its bucket's row."""
        return self.held_by_other(-1, key)

    def held_by_other(self, rank: int, key: int) -> bool:
        """Whether a rank other than ``rank`` has ``key`` in its table (as a probe finds
        it: the stash is not searched): one search of the key's bucket row."""
        start = self._table_byte + self.bucket_of(key) * self._bucket_bytes
        end = start + self._bucket_bytes
        needle = key.to_bytes(8, "little")
        find = self.segment.buf.find
        pos = find(needle, start, end)
        # A match across two cells is no match; nor is one in ``rank``'s own cells.
        while pos >= 0 and ((pos - start) & 7 or (pos - start) // (8 * WAYS) == rank):
            pos = find(needle, pos + 1, end)
        return pos >= 0

    def cached_tokens(self, tokens: Sequence[int], first: int | None = None) -> list[int] | None:
        """Per rank, how many leading tokens of ``tokens`` its cache holds, as its summary
        says (a multiple of ``BLOCK_LEN``); None when no rank holds even the first block.
        ``first``: ``first_hash(tokens)`` when the caller has it already."""
        return self.lookup(tokens, first)[0]

    def lookup(self, tokens: Sequence[int], first: int | None = None
               ) -> tuple[list[int] | None, list[int]]:
        """``cached_tokens``, and the chained hashes (``scheduler.prefix_hash``) of the
        blocks it hashed: block j's is the key of ``tokens[:(j + 1) * BLOCK_LEN]``, so
        the one at the deepest cached block names the prefix the request reuses.

        Hashing is most of the cost, so it stops within ``STRIDE`` blocks of the deepest
        block any rank holds; one vectorised probe then reads every rank's lines for
        the blocks hashed.
        """
        num_blocks = len(tokens) // BLOCK_LEN
        if num_blocks == 0:
            return None, []
        hashes = [first_hash(tokens) if first is None else first]
        if not self.any_holds(summary_key(hashes[0])):
            return None, hashes  # the common miss: one block hashed, one row searched
        if num_blocks > 1:
            tokens = tuple(tokens)
            while len(hashes) < num_blocks:
                chain_hashes(tokens, min(len(hashes) + STRIDE, num_blocks), hashes)
                if not self.any_holds(summary_key(hashes[-1])):
                    break
        return self.probe(hashes), hashes

    def probe(self, hashes: list[int]) -> list[int]:
        """Per rank, ``BLOCK_LEN`` times (1 + the deepest j whose key ``hashes[j]`` is in
        its summary), 0 where none is: one gather of the buckets' rows, one compare."""
        keys = np.maximum(np.array(hashes, dtype=np.int64).view(np.uint64), 1)
        rows = self._table.take((keys * self._np_fib) >> self._np_shift, axis=0)
        # Each rank's WAYS booleans side by side are one integer: nonzero if any matched.
        hits = (rows == keys[:, None]).view(_WAYS_AS_ONE) != 0  # [block, rank]
        if len(hashes) > len(self._depths):
            self._depths = self._depth_tokens(2 * len(hashes))
        return (hits * self._depths[:len(hashes)]).max(axis=0).tolist()

    @staticmethod
    def _depth_tokens(num_blocks: int) -> np.ndarray:
        """Row j: the tokens up to the end of block j, ``(j + 1) * BLOCK_LEN``."""
        return np.arange(BLOCK_LEN, (num_blocks + 1) * BLOCK_LEN, BLOCK_LEN, dtype=np.int64)[:, None]


class SummaryWriter:
    """Rank r's side: keeps its region equal to the full blocks its prefix cache holds.

    It is the prefix cache's ``CacheObserver`` (``scheduler.radix_cache``): the cache
    calls it with the whole path from the root as it inserts and evicts. A private map
    key -> cell remembers where each key is, so this writer never searches its own
    cells to evict.
    """

    def __init__(self, summary: PrefixSummary, rank: int):
        self.summary = summary
        self.rank = rank
        self._cells = summary.cells
        self._line = HEADER_LEN + rank * LINE
        # No view of the records is kept here: a writer can outlive the summary's close (a
        # rank's scheduler referenced from an exception's traceback), and a live view
        # would make the unmap fail.
        self._has_records = summary.records is not None
        # The radix cache passes each path's slots to on_cached only when this is set.
        self.wants_slots = summary.records is not None
        self._where: dict[int, int] = {}
        self._num_dropped = 0
        self.on_flush()  # a restarted rank's cache starts empty
        self._cells[self._line + L_WRITER_PID] = os.getpid()

    # ---- the CacheObserver interface ---------------------------------------------------
    def on_cached(self, tokens: Sequence[int], start: int,
                  slots: Sequence[int] | None = None) -> None:
        """``tokens[start:]`` were just cached (``tokens[:start]`` were already): publish
        the blocks that became full. ``slots``: the KV slots of the whole path, one per
        token, when the summary keeps slot records."""
        first = start // BLOCK_LEN
        keys = block_keys(tokens, first)
        digests = (prefix_digests(tokens, first + len(keys), first)
                   if slots and self._has_records else [None] * len(keys))
        for j, key, digest in zip(range(first, first + len(keys)), keys, digests):
            block = slots[j * BLOCK_LEN:(j + 1) * BLOCK_LEN] if digest is not None else None
            self._insert(key, block, digest)
        self._publish_counts()

    def on_evicted(self, tokens: Sequence[int], start: int) -> None:
        """``tokens[start:]`` were just evicted (``tokens[:start]`` stay): withdraw the
        blocks that are no longer full. The keys go before the count moves: a copier
        that reads the new count must find none of them (module docstring)."""
        for key in block_keys(tokens, start // BLOCK_LEN):
            self._remove(key)
        self._bump_evictions()
        self._publish_counts()

    def on_flush(self) -> None:
        """The cache is empty: clear every line of this rank, then count it (as
        ``on_evicted``)."""
        s = self.summary
        s._table.reshape(s.num_buckets, s.num_ranks, WAYS)[:, self.rank, :] = 0
        s._stash[self.rank] = 0
        self._bump_evictions()
        self._where.clear()
        self._publish_counts()

    # ---- cells ----------------------------------------------------------------------------
    def _bump_evictions(self) -> None:
        self._cells[self._line + L_EVICTIONS] = self._cells[self._line + L_EVICTIONS] + 1

    def _insert(self, key: int, block_slots: Sequence[int] | None,
                digest: bytes | None = None) -> None:
        if key in self._where:
            return  # already published (the same full block reported again)
        s = self.summary
        base = s.table_off + (s.bucket_of(key) * s.num_ranks + self.rank) * WAYS
        cells = self._cells
        cells_to_try = range(base, base + WAYS)
        if self._has_records:  # a full bucket's key goes to the stash
            stash = s.stash_cell(self.rank, key)
            cells_to_try = (*cells_to_try, *range(stash, stash + STASH_WAYS))
        for cell in cells_to_try:
            if cells[cell] == 0:
                if self._has_records:  # before the key; -1: slots not known
                    record = s.records[cell - s.table_off]
                    if block_slots is None:
                        record[:] = -1
                    else:
                        record[:BLOCK_LEN] = block_slots
                        record[BLOCK_LEN:] = np.frombuffer(digest, dtype=np.int32)
                cells[cell] = key
                self._where[key] = cell
                return
        self._num_dropped += 1  # a full bucket: this prefix is under-stated, never wrong

    def _remove(self, key: int) -> None:
        cell = self._where.pop(key, None)
        if cell is not None:
            self._cells[cell] = 0

    def _publish_counts(self) -> None:
        self._cells[self._line + L_NUM_KEYS] = len(self._where)
        self._cells[self._line + L_NUM_DROPPED] = self._num_dropped

    def close(self) -> None:
        """Give the rank's region up (its keys stay until the next writer flushes)."""
        self._cells[self._line + L_WRITER_PID] = 0
