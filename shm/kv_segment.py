"""A rank's KV pool in POSIX shared memory, plus its hand-off slot-list arena.

A prefill rank keeps its KV pool in one of these so that decode ranks on the node map
it (zero-copy, ``torch.frombuffer`` over the mmap) and copy a request's KV out of it;
the arena next to the pool tells them which slots hold that KV. Layout (bytes)::

    0                         HEADER_BYTES       kv_off                arena_off
    +-------+---------+----------+-------------+------+---------+-----+---------------+
    | magic | version | capacity | token_bytes |kv_off|arena_off| ... | kv pool | arena |
    +-------+---------+----------+-------------+------+---------+-----+---------------+
    header cells (int64): magic, version, capacity (tokens), token_bytes (KV bytes of one
    token over all layers), kv_off, arena_off, arena_len (int32 entries), owner_pid.
    kv pool: ``capacity * token_bytes`` bytes, in ``engine.kv_cache.KVPool``'s layout
             [layers, capacity, 2, kv_heads, head_dim] (64-byte aligned).
    arena:   ``arena_len`` int32 cells; a hand-off record at offset o (``kv_location``
             in the hand-off table) is ``[logprob bits, k, id_0, logprob bits_0, ...,
             id_{k-1}, logprob bits_{k-1}, slot_0, ..., slot_{n-1}]``: the first token's
             logprob (float32 bits), its top-k list (k = -1: none asked, no pairs) as
             (token id, float32 logprob) pairs, then the n KV slots in position order.

Who writes what (one writer per byte):
- header: the creator, once, before it publishes the segment's existence;
- kv pool: the owning rank's forward passes (decode ranks only read);
- arena: the owning rank's hand-off publisher (``scheduler.pd_prefill``) only. It
  writes a record before it inserts the hand-off entry that points to it, and frees
  the record only after a decode rank released that entry (or it expired), so a
  reader holding a claim never sees it change (x86-64 store order, see ``shm.board``).

Ownership: the rank that holds the KV creates the segment (``create``, named
``segment_name(kind, launch_id)`` so its own pid is in the name) and unlinks it at
exit (``close``); if it crashes, ``shm.segment.reclaim_stale_segments`` removes it
(dead owner pid) and the launcher reclaims by its ranks' pids right after they stop.
Peers ``attach`` by name and never unlink. The simulated executor makes one with
``token_bytes == 0`` (no KV data, the same hand-off protocol).

With CUDA the pool would live in device memory and peers would map it through CUDA
IPC handles (``torch.cuda`` / ``cudaIpcGetMemHandle``) published in this header; this
CPU build only implements the shared-memory path (see ``engine.kv_transfer``).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable

import numpy as np

from shm.segment import SharedSegment, ShmError, ShmLayoutError

MAGIC = 0x4450534B5653_4547  # "DPSKVSEG"
LAYOUT_VERSION = 2
HEADER_BYTES = 64
ALIGN = 64
_HEADER = struct.Struct("<8q")
# The arena holds every live hand-off's slot list; live lists never total more than the
# pool's capacity (each slot belongs to one request), so twice that leaves first-fit
# room for fragmentation. A record also carries the first token's logprob and top list.
ARENA_FACTOR = 2

logger = logging.getLogger(__name__)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class KVSegment:
    """A mapped KV segment: ``kv_buf`` (memoryview of the pool bytes), ``arena`` (int32)."""

    def __init__(self, segment: SharedSegment):
        self.segment = segment
        self.name = segment.name
        header = _HEADER.unpack_from(segment.buf, 0)
        magic, version, capacity, token_bytes, kv_off, arena_off, arena_len, owner = header
        if magic != MAGIC or version != LAYOUT_VERSION:
            segment.close()
            raise ShmLayoutError(f"{segment.name} is not a KV segment of layout {LAYOUT_VERSION}")
        if arena_off + 4 * arena_len > segment.size or kv_off + capacity * token_bytes > arena_off:
            segment.close()
            raise ShmLayoutError(f"{segment.name}: header does not fit the segment size")
        self.capacity = capacity
        self.token_bytes = token_bytes
        self.owner_pid = owner
        mv = memoryview(segment.buf)
        self.kv_buf = mv[kv_off:kv_off + capacity * token_bytes]
        self.arena = np.frombuffer(segment.buf, dtype=np.int32, count=arena_len, offset=arena_off)
        self._mv = mv

    @classmethod
    def create(cls, name: str, capacity: int, token_bytes: int,
               arena_len: int | None = None) -> "KVSegment":
        """Make the segment for a pool of ``capacity`` tokens of ``token_bytes`` each."""
        if capacity < 1 or token_bytes < 0:
            raise ValueError(f"bad KV segment shape: capacity {capacity}, token_bytes {token_bytes}")
        arena_len = arena_len or ARENA_FACTOR * capacity + 1024
        kv_off = _align(HEADER_BYTES)
        arena_off = _align(kv_off + capacity * token_bytes)
        seg = SharedSegment.create(name, arena_off + 4 * arena_len)
        try:
            _HEADER.pack_into(seg.buf, 0, MAGIC, LAYOUT_VERSION, capacity, token_bytes, kv_off,
                              arena_off, arena_len, os.getpid())
            return cls(seg)
        except BaseException:
            seg.__exit__(None, None, None)
            raise

    @classmethod
    def attach(cls, name: str) -> "KVSegment":
        return cls(SharedSegment.attach(name))

    @property
    def is_owner(self) -> bool:
        return self.segment.is_owner

    def read_record(self, offset: int, num_slots: int
                    ) -> tuple[float, list[tuple[float, int]] | None, np.ndarray]:
        """``(first-token logprob, its top list or None, slot array)`` of the hand-off
        record at ``offset``. The slots are a copy: the caller may keep them after the
        release."""
        arena = self.arena
        logprob = float(arena[offset:offset + 1].view(np.float32)[0])
        k = int(arena[offset + 1])
        top = None
        if k >= 0:
            pairs = arena[offset + 2:offset + 2 + 2 * k].reshape(k, 2)
            top = list(zip(pairs[:, 1].copy().view(np.float32).tolist(),
                           pairs[:, 0].tolist()))
        start = offset + 2 + 2 * max(k, 0)
        return logprob, top, arena[start:start + num_slots].copy()

    def write_record(self, offset: int, logprob: float, slots,
                     top: list[tuple[float, int]] | None = None) -> None:
        """Write a hand-off record of ``record_len(len(slots), top)`` cells at ``offset``;
        ``top``: the first token's top list, (logprob, token id) pairs, or None."""
        arena = self.arena
        arena[offset:offset + 1].view(np.float32)[0] = logprob
        arena[offset + 1] = -1 if top is None else len(top)
        if top:
            pairs = arena[offset + 2:offset + 2 + 2 * len(top)].reshape(len(top), 2)
            pairs[:, 0] = [token for _, token in top]
            pairs[:, 1] = np.array([lp for lp, _ in top], dtype=np.float32).view(np.int32)
        start = offset + 2 + 2 * len(top or ())
        arena[start:start + len(slots)] = slots

    @staticmethod
    def record_len(num_slots: int, top: list | None = None) -> int:
        """Arena cells of a record with ``num_slots`` slots and the top list ``top``."""
        return 2 + 2 * len(top or ()) + num_slots

    def close(self, unmap: bool = False) -> None:
        """Unlink the name if owner; unmap only if ``unmap``.

        Why not unmap by default: ``torch.frombuffer`` does not pin the mmap (measured:
        the mapping closes under a live tensor, and reading it then segfaults), and a
        rank keeps tensors over ``kv_buf`` (its own pool; a peer's until the executor
        forgets it, ``PeerSegments``). The OS unmaps at exit; pass ``unmap=True`` only
        when no tensor over ``kv_buf`` can be used again.
        """
        if self.segment.is_owner:
            self.segment.unlink()
        if not unmap:
            return
        self.arena = None
        for view in (self.kv_buf, self._mv):
            view.release()
        self.segment.close()

    def __enter__(self) -> "KVSegment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PeerSegments:
    """Peers' KV segments by rank: each mapped on first use, and again once the rank
    restarted (a new pid names a new segment). ``name_of(rank, pid)`` is the segment's
    name.

    A mapping that is replaced (the rank restarted), or dropped by ``clear`` (the peers'
    server restarted: new tables, new segments), is *retired*: ``on_retire(segment)``
    first (the executor drops its tensors over the segment's pool, which do not pin the
    mapping: ``KVSegment.close``), then unmapped, so the old pool's memory goes back
    once its owner unlinked it. Without this a decode rank kept every pool of every
    prefill server it had followed mapped until it exited: /dev/shm grew by the prefill
    server's whole KV on each of its restarts. A mapping some view still pins
    (``BufferError``) is left to the process's end."""

    def __init__(self, name_of, what: str = "rank",
                 on_retire: Callable[[KVSegment], None] | None = None):
        self._name_of = name_of
        self._what = what
        self._on_retire = on_retire
        self._segments: dict[int, KVSegment] = {}

    def get(self, rank: int, pid: int) -> "KVSegment | None":
        seg = self._segments.get(rank)
        if seg is not None and seg.owner_pid == pid:
            return seg
        if seg is not None:
            self._retire(self._segments.pop(rank))
        if not pid:
            return None
        try:
            seg = KVSegment.attach(self._name_of(rank, pid))
        except ShmError as exc:
            logger.warning("%s %d: %s", self._what, rank, exc)
            return None
        self._segments[rank] = seg
        return seg

    def prune(self, pid_of: Callable[[int], int]) -> None:
        """Retire each mapping whose rank's process is no longer its owner
        (``pid_of(rank)``: the rank's pid now, 0 when it is gone)."""
        for rank, seg in list(self._segments.items()):
            if seg.owner_pid != pid_of(rank):
                self._retire(self._segments.pop(rank))

    def clear(self) -> None:
        segments, self._segments = self._segments, {}
        for seg in segments.values():
            self._retire(seg)

    def _retire(self, seg: KVSegment) -> None:
        if self._on_retire is not None:
            self._on_retire(seg)
        try:
            seg.close(unmap=True)
        except BufferError:
            logger.debug("%s stays mapped: a view still uses it", seg.name)
