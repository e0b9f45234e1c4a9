"""A decode rank's late releases: the KV of requests it dropped before their KV came.

A parked decode request that ends without its KV (its client left, ``/abort_request``,
its API process exited) may have a prefill half still running: the hand-off it will
write would be held by its prefill rank until the bootstrap timeout (300 s), refusing
``/flush_cache`` and taking pool space. ``DecodeReceiver.discard`` releases an entry
already there; ``LateReleases`` watches the room for one still to come and releases it
when it appears (its prompt's, unclaimed). The decode server's API does the same for
its own requests (``server.pd_orphans``, by the same rules: ``next_step``), but when
that API process is the one that died, the rank that ended its requests
(``scheduler.rank_io.retire_dispatcher``) is the only one left to do it.

A room is reused once its request is done with it (a gateway's retry may send the same
room and prompt again), so a watch must not take the KV of the room's next request:
- the room's route entry seen (its prefill was dispatched): watched while that route
  lives, and ``ROUTE_GONE_GRACE_NS`` after: a prefill rank writes its hand-off before
  its route entry goes (``scheduler.pd``), but a prefill its API aborted loses its route
  first and its rank writes the FAILED entry a step later; a second request with the
  room is refused while the route lives;
- no route seen yet: watched for ``UNROUTED_NS`` only, about the time a gateway's
  prefill half takes to arrive beside its decode half, then given up (its prefill half
  was refused, or never sent);
- a new request with the room parked on this rank ends the watch at once (``forget``);
- a hand-off that appears is released only once the same entry (its slot and
  occupancy) has stayed unclaimed for a poll (``POLL_NS``): a live decode request
  waiting for it (a retry parked on another rank) claims it within its own next poll,
  a fraction of a millisecond. A FAILED entry holds no KV and is released at once.
A retry parked on another rank that cannot take its KV for that long (its pool full)
may still lose it to the watch: its decode then fails with a 400 and can be sent again.
At most ``MAX_WATCHED`` rooms are watched (the oldest given up first: their KV waits for
the timeout, as before), each looked at every ``POLL_NS``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from scheduler.pd import ROUTE_GONE_GRACE_NS
from shm.bootstrap_layout import FAILED

logger = logging.getLogger(__name__)

POLL_NS = 100_000_000
UNROUTED_NS = 1_000_000_000
MAX_WATCHED = 4096


@dataclass(slots=True)
class Watch:
    room: int
    prefill_rank: int | None
    prompt_hash: int
    unrouted_until_ns: int  # given up then unless its route was seen
    until_ns: int  # the bootstrap timeout: prefill's own expiry frees the KV after it
    saw_route: bool = False
    route_gone_ns: int = 0  # when the route it saw was first missing
    ready: tuple[int, int, int] | None = None  # (region, slot, gen) of the entry seen
    ready_since_ns: int = 0  # when that entry was first seen, unclaimed

    @classmethod
    def of(cls, room: int, prefill_rank: int | None, prompt_hash: int, now: int,
           timeout_ns: int, has_route: bool = True) -> "Watch":
        """A watch from ``now``; without a route table (``has_route``) only the timeout
        bounds it."""
        unrouted = UNROUTED_NS if has_route else timeout_ns
        return cls(room, prefill_rank, prompt_hash, now + unrouted, now + timeout_ns)


WAIT, DONE, RELEASE = range(3)


def next_step(watch: Watch, placed, entry, claimed: bool, now: int,
              patience_ns: int = POLL_NS) -> int:
    """What to do about a watched room, given its route entry ``placed`` and hand-off
    ``entry`` as just read (either may be None; the route read first: ``scheduler.pd``)
    and whether ``entry`` is claimed: ``RELEASE`` it, ``WAIT``, or ``DONE`` (nothing more
    to wait for). The rules are the module docstring's."""
    if entry is not None:
        if entry.prompt_hash != watch.prompt_hash or claimed:
            return DONE  # another request's, or taken by one
        if entry.state == FAILED:
            return RELEASE  # no KV to take from anyone: the slot goes back at once
        seen = (entry.region, entry.slot, entry.gen)
        if watch.ready != seen:  # patience restarts for another occupancy
            watch.ready, watch.ready_since_ns = seen, now
        return RELEASE if now - watch.ready_since_ns >= patience_ns else WAIT
    if placed is not None and placed.state == FAILED and placed.prefill_rank < 0:
        placed = None  # a refusal's mark (PDRouter.refused): no prefill ran for it, but a
        # new request with the room may hand off; watched as a room with no route
    if placed is not None:
        watch.saw_route, watch.route_gone_ns = True, 0
        return DONE if placed.state == FAILED or now > watch.until_ns else WAIT
    if watch.saw_route:  # gone with no hand-off: none will come, after the grace
        watch.route_gone_ns = watch.route_gone_ns or now
        return DONE if now - watch.route_gone_ns > ROUTE_GONE_GRACE_NS else WAIT
    return DONE if now > watch.unrouted_until_ns else WAIT


class LateReleases:
    def __init__(self, peers, bootstrap_ns: int):
        """``peers``: the rank's ``PDPeers`` (its tables and claimer, which change when
        the prefill server restarts)."""
        self.peers = peers
        self.bootstrap_ns = bootstrap_ns
        self._watched: dict[int, Watch] = {}  # by room, oldest first
        self._next_poll_ns = 0

    def __bool__(self) -> bool:
        return bool(self._watched)

    def drop(self, room: int, prefill_rank: int | None, prompt_hash: int, now: int) -> None:
        """A parked request of ``room`` was dropped: release its hand-off now if it is
        there, else watch for it."""
        watch = Watch.of(room, prefill_rank, prompt_hash, now, self.bootstrap_ns,
                         self.peers.route is not None)
        if self._done(watch, now, patience_ns=0):  # one there already is the dropped one's
            return
        if len(self._watched) >= MAX_WATCHED:
            del self._watched[next(iter(self._watched))]
        self._watched[room] = watch

    def forget(self, room: int) -> None:
        """A new request with ``room`` arrived: whatever comes for the room is its."""
        self._watched.pop(room, None)

    def clear(self) -> None:
        """The prefill server restarted: the rooms of the old one died with it."""
        self._watched.clear()

    def poll(self, now: int) -> None:
        if not self._watched or now < self._next_poll_ns:
            return
        self._next_poll_ns = now + POLL_NS
        for room, watch in list(self._watched.items()):
            if self._done(watch, now):
                del self._watched[room]

    def _done(self, watch: Watch, now: int, patience_ns: int = POLL_NS) -> bool:
        """Release the room's hand-off when ``next_step`` says so; True when there is
        nothing more to wait for."""
        route, handoff, claimer = self.peers.route, self.peers.handoff, self.peers.claimer
        placed = route.lookup(watch.room) if route is not None else None  # first
        p = watch.prefill_rank
        entry = handoff.lookup(watch.room) if p is None else handoff.lookup_in(p, watch.room)
        step = next_step(watch, placed, entry,
                         entry is not None and claimer.was_claimed(entry), now, patience_ns)
        if step == RELEASE:
            claimer.release(entry)
            logger.info("bootstrap_room %d: its decode request ended without the KV; "
                        "released what prefill rank %d held for it", watch.room, entry.region)
        return step != WAIT
