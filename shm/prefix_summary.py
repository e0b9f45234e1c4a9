"""Prefix-cache summaries: which prompt prefixes each rank caches, read lock-free.

Every rank publishes the keys (``scheduler.prefix_hash``: chained hashes of 64-token
blocks) of the full blocks its prefix cache holds; the dispatcher hashes a new prompt
and probes every rank at once for the longest prefix each one holds. One POSIX segment
of uint64 cells (native little-endian)::

    cell 0                                                                  HEADER_LEN
    +-------+---------+-----------+-------------+------+-----------+-----------+-----+
    | magic | version | num_ranks | num_buckets | ways | block_len | owner_pid | pad |
    +-------+---------+-----------+-------------+------+-----------+-----------+-----+
    rank lines, rank r at HEADER_LEN + r * LINE (LINE = 8 cells, 64 bytes):
    +------------+----------+-------------+-----+
    | writer_pid | num_keys | num_dropped | pad |
    +------------+----------+-------------+-----+
    table at table_off = HEADER_LEN + num_ranks * LINE, bucket-major; bucket b holds
    WAYS cells per rank, side by side (cell (b * num_ranks + r) * WAYS + w):
    +----------------------+----------------------+-----+------------------------+
    | rank 0: key[0..WAYS) | rank 1: key[0..WAYS) | ... | rank N-1: key[0..WAYS) |
    +----------------------+----------------------+-----+------------------------+
      ... then bucket b + 1. A key k lives in bucket ``bucket_of(k)`` (Fibonacci hashing
      of the key's bits), in either way of its rank's cells there; 0 marks a free way.

Who writes what (one writer per cell):
- header: the creator (the launcher, ``PrefixSummary.create``), once, before anyone
  attaches.
- rank line r and rank r's cells of every bucket (its region): rank r's scheduler,
  through its ``SummaryWriter`` (the prefix cache's observer), as it inserts, evicts
  and flushes.

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
ranks (a probe touches one 1 KiB row per block, whatever the size).

Ownership: the launcher creates the segment (``create``) and unlinks it at close;
ranks and dispatchers ``attach`` and never unlink.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from scheduler.prefix_hash import BLOCK_LEN, block_keys, chain_hashes, first_hash, summary_key
from shm.board import check_memory_order
from shm.segment import SharedSegment, ShmError, ShmLayoutError, pid_alive, segment_name

__all__ = ["PrefixSummary", "SummaryWriter", "buckets_for", "WAYS", "BLOCK_LEN"]

MAGIC = 0x44505350_52464958  # "DPSP" "RFIX"
LAYOUT_VERSION = 1
HEADER_LEN = 8
H_MAGIC, H_VERSION, H_NUM_RANKS, H_NUM_BUCKETS, H_WAYS, H_BLOCK_LEN, H_OWNER = range(7)
LINE = 8  # cells per rank line: 64 bytes
L_WRITER_PID, L_NUM_KEYS, L_NUM_DROPPED = range(3)
WAYS = 2
_WAYS_AS_ONE = np.uint16  # WAYS booleans side by side, read as one integer
FIB = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: Fibonacci hashing
MASK = (1 << 64) - 1
# The dispatcher checks whether any rank holds the last block of each run of this many
# blocks before hashing further: hashing stops within STRIDE blocks of the deepest one
# any rank holds, at one cheap check per STRIDE blocks.
STRIDE = 8


def buckets_for(max_cached_tokens: int) -> int:
    """Buckets (a power of two, at least 64) for a rank caching up to this many tokens."""
    blocks = max(1, max_cached_tokens // BLOCK_LEN)
    return max(64, 1 << (2 * blocks // WAYS - 1).bit_length())


class PrefixSummary:
    """A mapped summary segment. ``create`` (the launcher) or ``attach``.

    Readers call ``cached_tokens(prompt)``; rank r gets its writer with ``writer(r)``.
    """

    def __init__(self, segment: SharedSegment, num_ranks: int, num_buckets: int):
        self.segment = segment
        self.name = segment.name
        self.num_ranks = num_ranks
        self.num_buckets = num_buckets
        self._shift = 64 - (num_buckets.bit_length() - 1)
        self.table_off = HEADER_LEN + num_ranks * LINE
        self.cells = memoryview(segment.buf).cast("Q")
        arr = np.frombuffer(segment.buf, dtype=np.uint64)
        self._lines = arr[HEADER_LEN:self.table_off].reshape(num_ranks, LINE)
        # [bucket, rank * WAYS + way]: one row per bucket, every rank's line side by side.
        self._table = arr[self.table_off:].reshape(num_buckets, num_ranks * WAYS)
        self._np_shift = np.uint64(self._shift)
        self._np_fib = np.uint64(FIB)
        self._depths = self._depth_tokens(1024)
        self._bucket_bytes = num_ranks * WAYS * 8
        self._table_byte = self.table_off * 8

    # ---- lifetime -------------------------------------------------------------------
    @classmethod
    def create(cls, num_ranks: int, num_buckets: int, launch_id: str,
               kind: str = "prefix") -> "PrefixSummary":
        check_memory_order()
        if not 1 <= num_ranks <= 4096:
            raise ValueError(f"num_ranks must be in [1, 4096], got {num_ranks}")
        if num_buckets < 1 or num_buckets & (num_buckets - 1) or num_buckets > 1 << 24:
            raise ValueError(f"num_buckets must be a power of two in [1, 2**24], got {num_buckets}")
        num_cells = HEADER_LEN + num_ranks * LINE + num_buckets * num_ranks * WAYS
        seg = SharedSegment.create(segment_name(kind, launch_id), num_cells * 8)
        summary = cls(seg, num_ranks, num_buckets)
        cells = summary.cells
        for cell, value in ((H_VERSION, LAYOUT_VERSION), (H_NUM_RANKS, num_ranks),
                            (H_NUM_BUCKETS, num_buckets), (H_WAYS, WAYS),
                            (H_BLOCK_LEN, BLOCK_LEN), (H_OWNER, os.getpid())):
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
        return cls(seg, header[H_NUM_RANKS], header[H_NUM_BUCKETS])

    def close(self) -> None:
        """Drop every view, then unmap (and unlink if this process created it)."""
        self.cells.release()
        del self._lines, self._table
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

    def any_holds(self, key: int) -> bool:
        """Whether some rank's summary has ``key``: one search of its bucket's row."""
        start = self._table_byte + self.bucket_of(key) * self._bucket_bytes
        end = start + self._bucket_bytes
        needle = key.to_bytes(8, "little")
        find = self.segment.buf.find
        pos = find(needle, start, end)
        while pos >= 0 and (pos - start) & 7:  # a match across two cells is no match
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
        self._where: dict[int, int] = {}
        self._num_dropped = 0
        self.on_flush()  # a restarted rank's cache starts empty
        self._cells[self._line + L_WRITER_PID] = os.getpid()

    # ---- the CacheObserver interface ---------------------------------------------------
    def on_cached(self, tokens: Sequence[int], start: int) -> None:
        """``tokens[start:]`` were just cached (``tokens[:start]`` were already): publish
        the blocks that became full."""
        for key in block_keys(tokens, start // BLOCK_LEN):
            self._insert(key)
        self._publish_counts()

    def on_evicted(self, tokens: Sequence[int], start: int) -> None:
        """``tokens[start:]`` were just evicted (``tokens[:start]`` stay): withdraw the
        blocks that are no longer full."""
        for key in block_keys(tokens, start // BLOCK_LEN):
            self._remove(key)
        self._publish_counts()

    def on_flush(self) -> None:
        """The cache is empty: clear every line of this rank."""
        s = self.summary
        s._table.reshape(s.num_buckets, s.num_ranks, WAYS)[:, self.rank, :] = 0
        self._where.clear()
        self._publish_counts()

    # ---- cells ----------------------------------------------------------------------------
    def _insert(self, key: int) -> None:
        if key in self._where:
            return  # already published (the same full block reported again)
        s = self.summary
        base = s.table_off + (s.bucket_of(key) * s.num_ranks + self.rank) * WAYS
        cells = self._cells
        for cell in range(base, base + WAYS):
            if cells[cell] == 0:
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
