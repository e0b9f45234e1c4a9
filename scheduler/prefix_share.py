"""Cached prefixes shared across ranks: copy a peer's KV instead of computing it.

With ``--enable-cross-rank-prefix-cache`` each mixed rank keeps its KV pool in a shared
segment (``shm.kv_segment``, named by ``scheduler.pd.shared_kv_kind``; a PD prefill
rank's pool is in one already, the segment decode reads, and prefill ranks copy from
each other's: ``scheduler.pd.peer_kv_segment_name``) and its prefix
summary keeps, beside each cached block's key, the slots that hold the block's KV
(``shm.prefix_summary``, slot records). When a rank admits a request whose prompt a
peer caches further than its own cache does, it copies those tokens' KV out of the
peer's pool into slots of its own, caches them, and prefills only the rest::

    rank b (admitting)                         rank a (caches the prefix, maybe mid-step)
    own = its cache's match
    lookup(prompt) in the summaries -> a holds `end` tokens
    e0 = evictions(a); records of the blocks own..end
    copy a.pool[records] -> b.pool[new slots]  (a is not involved and not stopped)
    e1 = evictions(a): e1 == e0 -> insert into b's cache; else drop the copy

Why without the peer: the holder is often busy with a long prefill step (the reason
the request went elsewhere); a message would wait for that step. Why the copy is
sound: rank a frees a cached slot only by evicting it, bumps ``evictions`` when it
does, and writes a freed slot only after allocating it again, later; so an unchanged
count after the copy means no slot read was rewritten (``shm.prefix_summary``).

Why a copy can trust what it copies: the summary keys are fast hashes a client could
make collide; each record also holds its block's BLAKE2b digest of the whole prefix
(``scheduler.prefix_hash.prefix_digests``), and the copier compares it with its own
prompt's, so KV is only ever copied for exactly the tokens it was computed for.

What a copy costs: one ``index_select`` + ``index_copy_`` over every layer
(``engine.kv_transfer.copy_kv``), at memory speed on CPU; the simulated accelerator
charges the bytes at its profile's peer bandwidth (``sim.executor``). A block the
holder's summary dropped (full bucket) ends the copy there: the rest is computed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from scheduler.pd import mixed_kv_segment_name
from scheduler.prefix_hash import BLOCK_LEN, prefix_digests, summary_key
from shm.kv_segment import KVSegment, PeerSegments
from shm.prefix_summary import PrefixSummary
from shm.segment import launch_id_of

logger = logging.getLogger(__name__)


@dataclass
class CopyPlan:
    """Copy ``src_slots`` of ``peer``'s pool (``segment``) for prompt tokens
    ``[start, end)``; good if the peer's eviction count is still ``evictions``. ``key``:
    the summary key of ``tokens[:end]`` (the copy's ``copy_key`` in this rank's cache)."""

    peer: int
    segment: KVSegment
    src_slots: np.ndarray
    start: int
    end: int
    evictions: int
    writer_pid: int
    key: int


class PrefixImporter:
    """Rank ``rank``'s reader of its peers' summaries and pools."""

    def __init__(self, summary: PrefixSummary, rank: int,
                 segment_name_of: Callable[[int, int], str] | None = None,
                 on_retire: Callable[[KVSegment], None] | None = None):
        """``segment_name_of(peer, pid)``: the name of a peer's KV segment
        (``scheduler.pd.peer_kv_segment_name``); by default the mixed ranks' of the
        summary's launch. ``on_retire``: called with a peer's segment before it is
        unmapped (``PeerSegments``; the executor's ``forget_peer``)."""
        if summary.records is None:
            raise ValueError(f"{summary.name} keeps no slot records: the launch did not "
                             "enable cross-rank prefix sharing")
        self.summary = summary
        self.rank = rank
        self._segments = PeerSegments(
            segment_name_of or mixed_kv_segment_name(launch_id_of(summary.name)),
            on_retire=on_retire)
        self.num_copied_tokens = 0  # tokens whose KV this rank copied from peers
        self.num_dropped = 0  # copies thrown away: the peer evicted meanwhile

    def peer_best(self, tokens: Sequence[int]) -> tuple[int, int, list[int]]:
        """(peer, how many leading tokens it caches, the prompt's chained hashes) for the
        peer that caches most of ``tokens``; peer -1 and 0 tokens when no peer caches any."""
        cached, hashes = self.summary.lookup(tokens)
        if cached is None:
            return -1, 0, hashes
        best, most = -1, 0
        for r, n in enumerate(cached):
            if n > most and r != self.rank:
                best, most = r, n
        return best, most, hashes

    def shared_len(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` some peer caches (its summary says)."""
        return self.peer_best(tokens)[1]

    def plan(self, tokens: Sequence[int], own: int) -> CopyPlan | None:
        """What to copy so that this rank holds more of ``tokens`` than the ``own``
        leading tokens its cache holds; None when no peer holds a block more."""
        # A peer that died (its summary withdrawn) or restarted: its old pool is let go.
        self._segments.prune(self.summary.writer_pid)
        peer, most, hashes = self.peer_best(tokens)
        if most < (own // BLOCK_LEN + 1) * BLOCK_LEN or most - own < BLOCK_LEN // 2:
            return None
        summary = self.summary
        pid = summary.writer_pid(peer)
        evictions = summary.evictions(peer)  # before the records: see the docstring
        first, end = own // BLOCK_LEN, most // BLOCK_LEN  # the lookup hashed blocks < end
        records = summary.block_slots(peer, hashes, prefix_digests(tokens, end, first),
                                      first, end)
        if not records:
            return None
        segment = self._segments.get(peer, pid)
        if segment is None:
            return None
        end = (first + len(records)) * BLOCK_LEN
        src = np.concatenate(records)[own - first * BLOCK_LEN:]
        return CopyPlan(peer, segment, src, own, end, evictions, pid,
                        summary_key(hashes[end // BLOCK_LEN - 1]))

    def held_by_peer(self, key: int) -> bool:
        """Whether a peer's summary still has ``key`` (a copy's ``key``): the cache then
        evicts the copy first (``scheduler.radix_cache``, "Copies first")."""
        return self.summary.held_by_other(self.rank, key)

    def still_good(self, plan: CopyPlan) -> bool:
        """After the copy: nothing it read was freed (and so rewritten) meanwhile."""
        good = (self.summary.evictions(plan.peer) == plan.evictions
                and self.summary.writer_pid(plan.peer) == plan.writer_pid)
        if good:
            self.num_copied_tokens += plan.end - plan.start
        else:
            self.num_dropped += 1
            logger.debug("rank %d: dropped a copy from rank %d, which evicted meanwhile",
                         self.rank, plan.peer)
        return good
