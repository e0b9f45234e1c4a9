"""The API side of PD: pick the prefill rank, publish the room's route, pick the decode rank.

One ``PDRouter`` per API process (event-loop thread only, like the ``Dispatcher``s
inside it). A PD front door (``--disaggregation-mode pd``) has both halves; a prefill
server only the prefill half, a decode server only the decode half.

Per request, in this order (``scheduler.pd`` explains why the order matters):
1. ``dispatch_prefill``: refuse a room already live here (400) or a full route table
   (503) *before* counting anything on the board, then pick the prefill rank with the
   prefill method (``routed_dp_rank`` wins) and insert ``room -> rank`` (PLACED);
2. send the request to that prefill rank; ``dispatch_decode`` picks the decode rank
   with the decode method (``routed_dp_rank`` wins) and the request goes there, with
   ``disagg_prefill_dp_rank`` if the client gave one;
3. ``prefill_finished(room, ok)`` when the prefill rank's last output arrives (its KV is
   in the hand-off table by then): remove the route entry; if the prefill failed in
   the API (its rank was lost), mark the entry FAILED instead so a waiting decode
   fails at once, and let it expire ``failed_linger_s`` later.

A prefill server that refuses a request (``refused``: a 400, or a 503 such as full
queues) publishes its room FAILED for ``REFUSED_LINGER_S``, with its prompt's hash: the
decode half, which the gateway sent to the decode server at the same time, then fails
at once instead of waiting ``--disaggregation-bootstrap-timeout`` for a prefill that
will never come. A FAILED room is free for a new request: dispatching one removes this
process's FAILED entry for it (another API process's stays until it expires; readers
prefer a live entry of another region to a FAILED one, ``BootstrapTable.lookup``).
Decode reads a FAILED entry past its deadline, or with another prompt's hash, as no
entry; so only a new request with the refused one's prompt and room whose decode half
comes before its prefill half is placed, within the linger, fails with it.
"""

from __future__ import annotations

import secrets
import time
from typing import Sequence

from scheduler.pd import prompt_hash
from shm.bootstrap_layout import FAILED, BootstrapTableFullError, DuplicateRoomError

MAX_GENERATED_ROOM = 2**63  # what SGLang's gateways draw below
# How long a refused room stays FAILED: its decode half arrives at about the same time
# as the prefill half (a gateway sends both at once), well within this.
REFUSED_LINGER_S = 10.0


def new_room() -> int:
    """A random ``bootstrap_room`` for a client that sent none."""
    return secrets.randbelow(MAX_GENERATED_ROOM)


class PDRouter:
    def __init__(self, prefill=None, decode=None, route_writer=None,
                 failed_linger_s: float = 30.0):
        """``prefill``/``decode``: ``scheduler.dispatcher.Dispatcher`` over the prefill
        (decode) ranks' board; ``route_writer``: this API process's region of the route
        table (``BootstrapTable.region_writer``), with ``prefill``."""
        if (prefill is None) != (route_writer is None):
            raise ValueError("the prefill half needs both a dispatcher and a route writer")
        self.prefill = prefill
        self.decode = decode
        self.route = route_writer
        self.failed_linger_ns = int(failed_linger_s * 1e9)
        self.refused_linger_ns = int(min(failed_linger_s, REFUSED_LINGER_S) * 1e9)

    def dispatch_prefill(self, room: int, num_tokens: int, routed_dp_rank: int | None = None,
                         input_ids: Sequence[int] = (),
                         has_room: Sequence[bool] | None = None) -> int:
        """Pick the prefill rank for ``room`` and publish the route (``input_ids``: the
        prompt, for ``cache_aware``; ``has_room``: the ranks whose queues take it; see
        ``Dispatcher.pick``). Raises
        ``DuplicateRoomError`` / ``BootstrapTableFullError`` with nothing counted, or
        the dispatcher's errors."""
        route = self.route
        route.expire()  # FAILED entries past their linger
        # Every region: with several API processes the room may be another's.
        placed = route.table.lookup(room)
        if placed is not None:
            if placed.state != FAILED:
                raise DuplicateRoomError(f"bootstrap_room {room} is already in flight; every "
                                         "request needs its own room")
            if (slot := route.slot_of(room)) is not None:  # an ended request's: a retry
                route.remove(slot)
        if route.num_live >= route.num_slots:
            raise BootstrapTableFullError(
                f"{route.num_live} rooms in flight fill the route table; retry later")
        rank = self.prefill.pick(num_tokens, routed_dp_rank, room, input_ids, has_room)
        try:
            # Never expires by itself: removed when the prefill request ends, however it ends.
            route.insert(room, rank, _FOREVER)
        except BaseException:
            self.prefill.cancel(rank, num_tokens)  # nothing stays counted (see the docstring)
            raise
        return rank

    def dispatch_decode(self, room: int, num_tokens: int, routed_dp_rank: int | None = None) -> int:
        return self.decode.pick(num_tokens, routed_dp_rank, room)

    def prefill_finished(self, room: int, ok: bool = True) -> None:
        """The prefill request of ``room`` ended (``ok``: it reached its rank's end,
        finished or aborted there; not ok: the API lost it, e.g. its rank died)."""
        route = self.route
        slot = route.slot_of(room)
        if slot is None:
            return
        if ok:
            route.remove(slot)
        else:
            route.update(slot, state=FAILED, deadline_ns=time.monotonic_ns() + self.failed_linger_ns)
        route.expire()

    def refused(self, room: int, input_ids: Sequence[int] = ()) -> None:
        """This server refused the request of ``room`` before placing it: publish the
        room FAILED (module docstring). Not where the room is live (the refused request
        was a second one with it: the first one's route stands), nor once half the
        route table is live: a flood of refusals never fills the table that requests
        being served need. A mark this process has for the room already is renewed, for
        any prompt if the two refusals' prompts differ."""
        route = self.route
        route.expire()
        placed = route.table.lookup(room)
        if placed is not None and placed.state != FAILED:
            return
        # With the prompt's hash: a decode half with another prompt (a later request that
        # reuses the room) is not failed by this one's refusal (scheduler.pd_decode).
        hashed = prompt_hash(list(input_ids)) if input_ids else 0
        slot = route.slot_of(room)
        if slot is not None:  # this process's mark of an earlier refusal (or loss): one
            # mark for both, for any prompt where theirs differ, from now
            if route.entry(slot).prompt_hash != hashed:
                hashed = 0
            route.remove(slot)
        elif 2 * route.num_live >= route.num_slots:
            return
        route.insert(room, -1, time.monotonic_ns() + self.refused_linger_ns, state=FAILED,
                     prompt_hash=hashed)

    @property
    def num_rooms(self) -> int:
        return self.route.num_live if self.route is not None else 0


_FOREVER = 2**63 - 1
