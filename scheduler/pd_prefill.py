"""The prefill rank's half of the KV hand-off (see ``scheduler.pd`` for the whole).

A prefill rank runs a request's prompt, samples the first token and then, instead of
decoding, *hands the request off*: it writes the KV slots into its arena
(``shm.kv_segment``), inserts ``room -> KV_READY`` into its own region of the hand-off
table, and finishes the request (``FinishLength(1)`` unless the first
token already stops it), so the prefill server's response ends at once. The KV stays
allocated, *held* for decode, until:
- a decode rank released its claim on the entry (``RegionWriter.reap_released``), or
- the entry's deadline (``bootstrap_timeout_s`` after the hand-off) passed with no
  decode (``RegionWriter.expire``; a claimed entry gets a grace period, see
  ``shm.bootstrap_writers``), or
- the API aborted the finished request because its decode half ended without the KV
  (aborted, or its decode rank died) and no decode rank has claimed the entry
  (``release_handed_off``; a PD front door's, ``server.pd``).
A request aborted or refused before its hand-off gets a FAILED entry (no KV) so the
decode side fails it at once instead of waiting out its timeout.

Held KV is not load: the request is finished for the board (``num_reqs``/``num_tokens``
drop at the hand-off), but its slots are not free for admission until released.
Single writer: this object, in rank p's scheduler, is region p's only writer and the
arena's only writer. Plain Python (no torch): the KV itself was written by the forward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.pd import prompt_hash
from scheduler.pd_role import EMPTY_POLL, PDRole
from scheduler.range_alloc import RangeAllocator
from scheduler.request import Req
from shm.bootstrap import BootstrapTable
from shm.bootstrap_layout import FAILED, KV_READY, BootstrapTableError

logger = logging.getLogger(__name__)

HELD_POLL_S = 0.002  # how often an otherwise idle rank with held KV looks for releases


@dataclass(slots=True)
class Held:
    """What one hand-off entry keeps allocated until it is released or expires."""

    room: int
    req: Req | None  # whose KV (``req.slots``, all it reserved) is held; None: FAILED
    arena_off: int  # record start in the arena, -1 for a FAILED entry
    arena_len: int


class PrefillSender(PDRole):
    hands_off = True

    def __init__(self, cfg, executor, handoff_table: BootstrapTable,
                 free_kv: Callable[[Req], None] | None = None):
        segment = executor.kv_segment
        if segment is None:
            raise RuntimeError("a PD prefill rank needs its KV pool in shared memory "
                               "(the executor made no kv_segment)")
        self.cfg = cfg
        self.dp_rank = cfg.dp_rank
        self.table = handoff_table
        self.writer = handoff_table.region_writer(cfg.dp_rank)
        self.writer.heartbeat()  # decode fails requests waiting on a rank that stops beating
        self.kv = executor.kv
        # Gives a request's KV back once decode is done with it (the scheduler's: into
        # its prefix cache); by default straight to the pool.
        self.free_kv = free_kv or self._free_slots
        self.segment = segment
        self.arena = RangeAllocator(len(segment.arena))
        self.timeout_ns = int(cfg.pd.bootstrap_timeout_s * 1e9)
        self.held: dict[int, Held] = {}  # hand-off table slot -> what it holds
        self.num_freed_aborted = 0  # held KV freed because its decode half ended without it
        self.num_handed_off = 0
        self.num_freed_released = 0
        self.num_freed_expired = 0

    @classmethod
    def from_config(cls, cfg, executor, free_kv: Callable[[Req], None] | None = None
                    ) -> PrefillSender:
        """Attach the hand-off table ``cfg.pd`` names (a ``SchedulerConfig``)."""
        return cls(cfg, executor, BootstrapTable.attach(cfg.pd.handoff_table), free_kv)

    # ---- what the scheduler asks --------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return False  # held KV waits for decode, it is not work for this loop

    @property
    def num_held(self) -> int:
        return sum(1 for held in self.held.values() if held.req is not None)

    def reserve_len(self, req: Req, context_len: int) -> int:
        """Only the prompt's KV: the first sampled token is handed off, never computed."""
        return req.prompt_len

    def admission_error(self, req: Req) -> str | None:
        if req.bootstrap_room is None:
            return "a PD prefill request needs a bootstrap_room"
        return None

    def poll_timeout(self, idle_wait_s: float) -> float:
        return min(idle_wait_s, HELD_POLL_S) if self.held else idle_wait_s

    def pending_load(self) -> tuple[int, int]:
        return 0, 0

    # ---- hand-off -----------------------------------------------------------------------
    def hand_off(self, req: Req, logprob: float) -> str | None:
        """Publish the finished prefill of ``req``; its KV is ``held`` from now on.

        Returns None, or an error message (the table or arena is full, the room is
        already live): the caller then aborts the request and frees its KV as usual.
        """
        n = req.prompt_len
        # The first token's top list, when asked: decode's first output carries it.
        top = (req.output_top_logprobs[-1]
               if req.return_logprob and req.output_top_logprobs else None)
        size = self.segment.record_len(n, top)
        off = self.arena.alloc(size)
        if off is None:
            return (f"prefill rank {self.dp_rank}: hand-off arena full ({self.arena.num_used} "
                    "cells held for decode); decode ranks are not taking requests")
        self.segment.write_record(off, logprob, req.slots[:n], top)
        self._supersede_failed(req.bootstrap_room)
        try:  # the record is written before the entry that points to it (x86 store order)
            slot = self.writer.insert(
                req.bootstrap_room, self.dp_rank, time.monotonic_ns() + self.timeout_ns,
                state=KV_READY, kv_location=off, kv_len=n, first_token=req.output_ids[-1],
                prompt_hash=prompt_hash(req.input_ids), cached_tokens=req.cached_tokens)
        except BootstrapTableError as exc:
            self.arena.free(off, size)
            return f"prefill rank {self.dp_rank}: cannot hand off: {exc}"
        self.held[slot] = Held(req.bootstrap_room, req, off, size)
        req.kv_held = True
        self.num_handed_off += 1
        return None

    def _supersede_failed(self, room: int) -> None:
        """A FAILED entry of an earlier request with ``room`` (aborted, no KV held) is
        kept so that its late decode half fails at once; a new request reaching its
        hand-off with the room (a gateway's retry) owns the room now, and the old entry
        goes (the retry was refused as a room already live here)."""
        slot = self.writer.slot_of(room)
        held = self.held.get(slot) if slot is not None else None
        if held is not None and held.req is None:
            self.writer.remove(slot)
            self._free(slot)

    def on_abort(self, req: Req, message: str) -> None:
        """The request ends before its hand-off: tell decode (FAILED, no KV)."""
        self.publish_failed(req)

    def on_refused(self, req: Req, message: str) -> None:
        self.publish_failed(req)

    def publish_failed(self, req: Req) -> None:
        room = req.bootstrap_room
        if room is None or self.writer.slot_of(room) is not None:
            return  # nothing to tell, or the room is live here already (left as it is)
        try:
            slot = self.writer.insert(room, self.dp_rank, time.monotonic_ns() + self.timeout_ns,
                                      state=FAILED, prompt_hash=prompt_hash(req.input_ids))
        except BootstrapTableError as exc:
            logger.warning("cannot mark bootstrap_room %d failed: %s", room, exc)
            return
        self.held[slot] = Held(room, None, -1, 0)

    def park(self, req: Req) -> bool:
        return False  # a prefill rank computes every request it admits

    def discard(self, req: Req) -> bool:
        return False  # a prefill rank parks nothing

    def release_handed_off(self, rid: str, message: str) -> bool:
        """The request was aborted after its hand-off (its decode half ended without the
        KV, or its prefill client left): free the held KV now, not at the deadline,
        unless a decode rank claimed it (then that claim's release frees it; a claim
        taken between this check and the change finds the entry changed and drops its
        copy, ``claimer.release``). The entry stays, FAILED, until its deadline or a
        decode's release, so a decode request that comes for the room later fails at
        once instead of waiting out the bootstrap timeout for a prefill that ended."""
        for slot, held in self.held.items():
            if held.req is not None and held.req.rid == rid:
                if self.writer.claim_of(slot) is not None:
                    return False
                logger.info("bootstrap_room %d: aborted (%s) before a decode took the KV; "
                            "freed", held.room, message)
                self.writer.update(slot, state=FAILED)  # before the KV can be reused
                self._free(slot)
                self.held[slot] = Held(held.room, None, -1, 0)
                self.num_freed_aborted += 1
                return True
        return False

    # ---- freeing ------------------------------------------------------------------------
    def poll(self, admit=None) -> tuple[tuple, tuple]:
        """Free the KV of entries decode released and of entries past their deadline.
        Returns nothing ready or failed: a prefill rank parks no requests."""
        self.writer.heartbeat()
        if self.held:
            self._free_done()
        return EMPTY_POLL

    def _free_done(self) -> None:
        for entry in self.writer.reap_released():
            self._free(entry.slot)
            self.num_freed_released += 1
        for entry in self.writer.expire():
            if entry.state == KV_READY:
                logger.info("bootstrap_room %d: no decode took the KV within %.0f s; freed",
                            entry.room, self.timeout_ns / 1e9)
            self._free(entry.slot)
            self.num_freed_expired += 1

    def _free(self, slot: int) -> None:
        held = self.held.pop(slot, None)
        if held is None:
            return  # an entry a previous writer of the region left: nothing of ours
        if held.req is not None:
            held.req.kv_held = False
            self.free_kv(held.req)
        if held.arena_off >= 0:
            self.arena.free(held.arena_off, held.arena_len)

    def _free_slots(self, req: Req) -> None:
        self.kv.free(req.slots)
        req.slots = []

    def close(self) -> None:
        """At shutdown: drop every entry of this region and free what it held."""
        for slot in list(self.held):
            try:
                self.writer.remove(slot)
            except BootstrapTableError:
                pass
            self._free(slot)
        self.writer.close()
        self.table.close()
