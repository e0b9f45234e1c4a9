"""What a decode rank maps of the prefill side: the two tables and the prefill ranks'
KV segments, re-found when the prefill side restarts.

- ``route`` / ``handoff``: the PD tables (``scheduler.pd``), attached, never unlinked;
  ``claimer`` is this rank's single-writer handle on its claim cells.
- ``kv_segment(p)``: prefill rank p's KV segment, mapped on first use and again when p
  restarted (its pid, read from hand-off region p's header, names the segment).
- ``down_reason(p)``: why prefill rank p cannot finish a hand-off, or None: its process
  is gone, or it has not stepped (hand-off region heartbeat) for the stale bound, as
  when it is frozen by SIGSTOP or stuck (checked at most every 100 ms).
- ``refresh()``: in two-server mode the prefill server owns the tables; if it died and
  a new one (same ``--disaggregation-bootstrap-port``) created new tables, switch to
  them (checked at most every 200 ms, only by a rank that is waiting for something).
  Returns True on a switch: the caller then fails requests tied to the old prefill
  ranks. In ``pd`` mode the launcher owns the tables and this never fires.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from scheduler.pd import HANDOFF_KIND, ROUTE_KIND, kv_segment_kind
from shm.bootstrap import BootstrapTable
from shm.kv_segment import KVSegment, PeerSegments
from shm.segment import ShmError, find_segment, owner_pid, pid_alive, segment_name

logger = logging.getLogger(__name__)

LIVENESS_EVERY_NS = 100_000_000
REFRESH_EVERY_NS = 200_000_000


class PDPeers:
    def __init__(self, route: BootstrapTable | None, handoff: BootstrapTable, launch_id: str,
                 decode_rank: int, stale_ns: int,
                 on_retire: Callable[[KVSegment], None] | None = None):
        """``on_retire``: called with a prefill rank's KV segment before it is unmapped
        (``PeerSegments``; the executor's ``forget_peer``)."""
        self.launch_id = launch_id
        self.on_retire = on_retire
        self.decode_rank = decode_rank
        self.stale_ns = stale_ns
        self._set_tables(route, handoff)
        self._next_refresh_ns = 0

    def _set_tables(self, route, handoff) -> None:
        self.route = route
        self.handoff = handoff
        self.claimer = handoff.decode_claimer(self.decode_rank)
        self._segments = PeerSegments(
            lambda rank, pid: segment_name(kv_segment_kind(rank), self.launch_id, pid),
            "prefill rank", self.on_retire)
        self._down_at: dict[int, tuple[int, str | None]] = {}
        self._owner = owner_pid(handoff.name)

    def kv_segment(self, prefill_rank: int) -> KVSegment | None:
        return self._segments.get(prefill_rank, self.handoff.region_writer_pid(prefill_rank))

    def down_reason(self, prefill_rank: int, now_ns: int) -> str | None:
        checked = self._down_at.get(prefill_rank)
        if checked is not None and now_ns - checked[0] < LIVENESS_EVERY_NS:
            return checked[1]
        pid = self.handoff.region_writer_pid(prefill_rank)
        beat = self.handoff.region_heartbeat_ns(prefill_rank)
        reason = None
        if not pid or not pid_alive(pid):
            reason = "is not running"
        elif now_ns - beat > self.stale_ns:
            reason = (f"has not stepped for {(now_ns - beat) / 1e9:.1f} s (stale after "
                      f"{self.stale_ns / 1e9:g} s: stopped or stuck)")
        self._down_at[prefill_rank] = (now_ns, reason)
        return reason

    def none_running(self, now_ns: int) -> str | None:
        """Why no prefill rank can place a room now (every one down), or None if one can."""
        reasons = [self.down_reason(r, now_ns) for r in range(self.handoff.num_regions)]
        if any(reason is None for reason in reasons):
            return None
        return "; ".join(f"prefill rank {r} {why}" for r, why in enumerate(reasons))

    def refresh(self, now_ns: int) -> bool:
        if now_ns < self._next_refresh_ns:
            return False
        self._next_refresh_ns = now_ns + REFRESH_EVERY_NS
        if self._owner is None or pid_alive(self._owner):
            return False
        try:
            handoff_name = find_segment(HANDOFF_KIND, self.launch_id)
            route_name = find_segment(ROUTE_KIND, self.launch_id)
        except ShmError as exc:  # e.g. another user's segment under the name: never use it
            logger.error("not switching to new PD tables: %s", exc)
            return False
        if handoff_name is None or (self.route is not None and route_name is None):
            return False  # the new prefill server is not up yet
        handoff = BootstrapTable.attach(handoff_name)
        if handoff.num_decode_ranks <= self.decode_rank:
            logger.error("the restarted prefill server takes claims from %d decode ranks; "
                         "this is rank %d: not switching", handoff.num_decode_ranks,
                         self.decode_rank)
            handoff.close()
            return False
        route = BootstrapTable.attach(route_name) if self.route is not None else None
        old = (self.route, self.handoff)
        self._segments.clear()  # the old server's pools: unmapped (PeerSegments)
        self._set_tables(route, handoff)
        for table in old:
            if table is not None:
                table.close()
        logger.warning("the prefill server restarted: now using %s", handoff_name)
        return True

    def close(self) -> None:
        self._segments.clear()
        self.handoff.close()
        if self.route is not None:
            self.route.close()
