"""Rooms whose decode half ended without the KV: release their hand-offs for them.

With two servers (``--disaggregation-mode prefill`` and ``decode``) a gateway sends one
body to both. When the decode half ends without taking its KV (the decode server
refused it, its client left, ``/abort_request`` ended it, its rank died), the prefill
half may be done already (the KV held in a hand-off entry, ``scheduler.pd_prefill``) or
still coming, and nobody would release that entry: the prefill rank would hold the KV,
refuse to flush its cache, and with enough of them stall admission, until
``--disaggregation-bootstrap-timeout`` (300 s by default). A decode rank releases the
entry of a parked request it drops, now or when the entry appears
(``DecodeReceiver.discard``), but a request the decode server refused never reached a
rank, and a rank that died releases nothing; the prefill server cannot tell which rooms
are orphans.

The decode server's API process knows each request's room and prompt. ``OrphanedRooms``
writes the release a decode rank would have written, for the entry with the request's
room and prompt (never another request's), once the entry is there: looked for every
``POLL_S``, by the rules a decode rank's late releases follow (``scheduler.pd_late``:
given up when the room's route shows its prefill ended without one, when no route came
within a second, or at the bootstrap timeout; a new request with the room arriving here
ends the watch, ``forget``; an entry released only after a poll unclaimed). It writes
in its own claim column, the hand-off table's last (a prefill server keeps one for the
decode server's API processes, ``server.pd``: one writer per cell, as decode ranks
have theirs), unless the request's decode rank died holding a claim: that claim would
keep the entry held, so the release goes into the dead rank's cell instead, once its
process has exited (never beside it).

An entry another decode request claimed is left to that claim (its own release frees
it). One per decode API process; each releases only its own requests' rooms (a room
sent to two at once is a client error the decode ranks refuse). At most ``MAX_ROOMS``
are watched (the oldest dropped first: their KV expires at the timeout, as before).
When the prefill server restarts (new tables, as the decode ranks find them:
``scheduler.pd_peers``), rooms of the old one are dropped and the new tables used.
Event-loop thread only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from scheduler.pd import HANDOFF_KIND, ROUTE_KIND, attach_tables, prompt_hash
from scheduler.pd_late import RELEASE, WAIT, Watch, next_step
from shm.bootstrap import BootstrapTable
from shm.segment import ShmError, find_segment, launch_id_of, owner_pid, pid_alive

logger = logging.getLogger(__name__)

POLL_S = 0.1
MAX_ROOMS = 4096  # about 2 us a poll each: a few ms per poll at most


@dataclass(slots=True)
class Orphan:
    watch: Watch  # when to release, wait or give up: scheduler.pd_late's rules
    lost_rank: int  # the decode rank that died with it, -1 if none did
    lost_pid: int  # that rank's process: nothing is written while it lives


class OrphanedRooms:
    def __init__(self, route: BootstrapTable | None, handoff: BootstrapTable, timeout_s: float):
        self._set_tables(route, handoff)
        self.launch_id = launch_id_of(handoff.name)
        self.timeout_ns = int(timeout_s * 1e9)
        self._rooms: dict[int, Orphan] = {}
        self.num_released = 0

    def _set_tables(self, route: BootstrapTable | None, handoff: BootstrapTable) -> None:
        self.route = route
        self.handoff = handoff
        self.column = handoff.num_decode_ranks - 1  # the decode API processes' claim column
        self._owner = owner_pid(handoff.name)

    def refresh(self) -> bool:
        """If the prefill server that made the tables is gone and a new one made new
        ones, switch to them and forget the old rooms; True on a switch."""
        if self._owner is None or pid_alive(self._owner):
            return False
        try:
            handoff_name = find_segment(HANDOFF_KIND, self.launch_id)
            route_name = find_segment(ROUTE_KIND, self.launch_id)
        except ShmError:
            return False
        if handoff_name is None or route_name is None or handoff_name == self.handoff.name:
            return False  # the new prefill server is not up yet
        route, handoff = attach_tables(route_name, handoff_name)
        old = (self.route, self.handoff)
        self._set_tables(route, handoff)
        for table in old:
            if table is not None:
                table.close()
        self._rooms.clear()  # their KV died with the old prefill server
        logger.info("the prefill server restarted: releasing rooms in %s", handoff_name)
        return True

    def __len__(self) -> int:
        return len(self._rooms)

    def adopt(self, room: int, input_ids: list[int], lost_rank: int = -1, lost_pid: int = 0,
              now_ns: int | None = None) -> None:
        """Release ``room``'s hand-off (for the prompt ``input_ids``) once it is there;
        ``lost_rank``/``lost_pid``: the request's decode rank died (its process)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        self.refresh()
        self._rooms.pop(room, None)
        watch = Watch.of(room, None, prompt_hash(input_ids), now, self.timeout_ns,
                         self.route is not None)
        self._rooms[room] = Orphan(watch, lost_rank, lost_pid)
        while len(self._rooms) > MAX_ROOMS:
            del self._rooms[next(iter(self._rooms))]

    def forget(self, room: int) -> None:
        """A new request with ``room`` arrived here: whatever comes for the room is its."""
        self._rooms.pop(room, None)

    def poll(self, now_ns: int | None = None) -> int:
        """Release every watched room whose hand-off is due (``next_step``); forget those
        released, someone else's, ended without one, or past their bound. Returns how
        many were released."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        released = 0
        for room, orphan in list(self._rooms.items()):
            if orphan.lost_pid and pid_alive(orphan.lost_pid):
                continue  # still exiting: its cells may still be written by it
            placed = self.route.lookup(room) if self.route is not None else None  # first
            entry = self.handoff.lookup(room)
            claimer = self._claimer_for(entry, orphan) if entry is not None else None
            step = next_step(orphan.watch, placed, entry, claimer is None, now)
            if step == WAIT:
                continue
            del self._rooms[room]
            if step == RELEASE:
                claimer.release(entry)
                released += 1
                logger.info("bootstrap_room %d: its decode request ended without the KV; "
                            "released what prefill rank %d held for it", room, entry.region)
        self.num_released += released
        return released

    def _claimer_for(self, entry, orphan: Orphan):
        """The claim cell to write the release in, or None when a live decode request
        claimed the entry (or it was released already): the dead decode rank's own cell
        if it died holding a claim, else the decode API's column."""
        lost = orphan.lost_rank
        if 0 <= lost < self.handoff.num_decode_ranks:
            claimer = self.handoff.decode_claimer(lost)
            if not claimer.claimed_by_other(entry):
                return claimer  # the dead rank's cell: no other writer now
        claimer = self.handoff.decode_claimer(self.column)
        return None if claimer.was_claimed(entry) else claimer

    def close(self) -> None:
        self._rooms.clear()
        for table in (self.handoff, self.route):
            if table is not None:
                table.close()
