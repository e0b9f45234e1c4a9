"""The decode rank's half of the KV hand-off (see ``scheduler.pd`` for the whole).

A decode request may arrive before its prefill was even dispatched (an external
gateway sends both at once), so it is *parked* here, not queued for a batch, and the
rank loop keeps serving the others. Every step ``poll`` looks at each parked request:

1. resolve the prefill rank p: ``disagg_prefill_dp_rank`` if the request had it, else
   the route table (``lookup``, ~1 us), else the hand-off table over every region (the
   prefill may have finished and its route entry gone already);
2. look for the room in hand-off region p: KV_READY -> reserve this rank's KV
   (``admit``: as at any admission, the prompt and up to
   ``--clip-max-new-tokens-estimation`` new tokens; none while a retracted request
   waits), claim the entry, copy the prompt's
   KV out of p's shared pool (``executor.import_kv``), release the claim, and return
   the request with the first token to run as a decoding request (its
   ``cached_tokens``, what p's prefix cache held, from the entry: the client sees it
   from decode's answer, which is the one a gateway returns); FAILED -> release it
   and fail the request; missing -> keep waiting;
3. fail it if its deadline passed: ``bootstrap_timeout_s`` after arrival while no
   prefill placed the room (an orphan: the gateway retried with a new room), else
   ``waiting_timeout_s``; or at once if prefill rank p's process is gone or has not
   stepped for ``stale_after_s`` (frozen), or the route says its prefill failed, or
   the route entry this request saw is gone with no hand-off entry left (p ended the
   request without one: its hand-off table was full, so it could not even write
   FAILED; ``scheduler.pd`` has the ordering that makes this check sound).

A hand-off belongs to one request: the entry carries ``prompt_hash`` of the prompt it
was computed for, and a request whose own prompt differs (another client reusing the
room) fails with 400 without touching the entry, so the owner still gets its KV. An
entry is claimed once (``DecodeClaimer``): a second request with the same room and
prompt fails with 400 too. Every failure carries the status the API answers with:
400 for the request's fault, 503 for the server's (``scheduler.messages``).

A parked request holds no KV (it is reserved when the KV is ready), so an orphan frees
nothing but its place in the queue; it counts on the board as a waiting request with
its prompt tokens. While only parked requests remain, ``poll_timeout`` backs the
rank's sleep off from 20 us to 500 us instead of spinning a core.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from scheduler.messages import CLIENT_ERROR, SERVER_ERROR
from scheduler.pd import ROUTE_GONE_GRACE_NS, prompt_hash
from scheduler.pd_late import POLL_NS as LATE_POLL_NS
from scheduler.pd_late import LateReleases
from scheduler.pd_peers import PDPeers
from scheduler.pd_role import PDRole
from scheduler.request import Req
from shm.bootstrap import BootstrapTable
from shm.bootstrap_layout import FAILED, KV_READY

logger = logging.getLogger(__name__)

FIRST_SLEEP_S = 20e-6
MAX_SLEEP_S = 500e-6
MAX_STATS = 100_000


@dataclass(slots=True, eq=False)
class Parked:
    req: Req
    arrival_ns: int
    prefill_rank: int | None
    prompt_hash: int
    known_ns: int = 0
    saw_route: bool = False  # the route entry was there once: its prefill was dispatched
    saw_handoff: bool = False  # its own hand-off entry (prompt hash matched) was there once
    route_gone_ns: int = 0  # when the route was first missing with no hand-off seen


class Failure(NamedTuple):
    """A parked request that cannot go on, and the status the API answers with."""

    req: Req
    message: str
    status_code: int


@dataclass(slots=True)
class Ready:
    req: Req
    first_token: int
    logprob: float
    top: list[tuple[float, int]] | None = None  # the first token's top list, if asked


class DecodeReceiver(PDRole):
    def __init__(self, cfg, executor, route_table: BootstrapTable | None,
                 handoff_table: BootstrapTable):
        self.dp_rank = cfg.dp_rank
        self.executor = executor
        self.peers = PDPeers(route_table, handoff_table, cfg.pd.launch_id, cfg.dp_rank,
                             int(cfg.pd.stale_after_s * 1e9), executor.forget_peer)
        self.bootstrap_ns = int(cfg.pd.bootstrap_timeout_s * 1e9)
        self.waiting_ns = int(cfg.pd.waiting_timeout_s * 1e9)
        self.parked: dict[str, Parked] = {}  # by rid, in arrival order
        self._orphaned: list[Failure] = []  # failed by a table switch in park()
        self.late = LateReleases(self.peers, self.bootstrap_ns)  # rooms of dropped requests
        self._sleep_s = FIRST_SLEEP_S
        # Arrival -> prefill rank known, for requests resolved through the tables (ns).
        self.resolve_ns: deque[int] = deque(maxlen=MAX_STATS)
        self.num_received = 0

    @classmethod
    def from_config(cls, cfg, executor) -> DecodeReceiver:
        """Attach the tables ``cfg.pd`` names (a ``SchedulerConfig``; the route table
        only where it names one)."""
        handoff = BootstrapTable.attach(cfg.pd.handoff_table)
        try:
            route = BootstrapTable.attach(cfg.pd.route_table) if cfg.pd.route_table else None
        except BaseException:
            handoff.close()
            raise
        return cls(cfg, executor, route, handoff)

    # ---- what the scheduler asks --------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.parked or self._orphaned)

    def reserve_len(self, req: Req, context_len: int) -> int:
        return req.reserve_len(context_len)

    def admission_error(self, req: Req) -> str | None:
        if req.bootstrap_room is None:
            return "a PD decode request needs a bootstrap_room"
        p = req.disagg_prefill_dp_rank
        num_prefill = self.peers.handoff.num_regions
        if p is not None and not 0 <= p < num_prefill:
            return f"disagg_prefill_dp_rank {p} is not in [0, {num_prefill})"
        return None

    def poll_timeout(self, idle_wait_s: float) -> float:
        if not self.parked:
            return min(idle_wait_s, LATE_POLL_NS / 1e9) if self.late else idle_wait_s
        sleep_s = self._sleep_s
        self._sleep_s = min(sleep_s * 2, MAX_SLEEP_S)
        return min(sleep_s, idle_wait_s)

    def pending_load(self) -> tuple[int, int]:
        """(requests, prompt tokens) parked here: waiting load for the board."""
        return len(self.parked), sum(p.req.prompt_len for p in self.parked.values())

    def hand_off(self, req: Req, logprob: float) -> str | None:
        raise AssertionError("a decode rank never hands a request off")  # hands_off is False

    def park(self, req: Req) -> bool:
        """Hold ``req`` until its KV is ready (always: every decode request waits for
        its prefill's KV). The prefill rank is looked up at once
        (~1 us a table): with the room placed first (the front door's order, a
        gateway's usual one) decode knows it on arrival; else ``poll`` keeps looking."""
        now = time.monotonic_ns()
        self._orphaned += self._refresh(now)  # before parking: req is not of the old tables
        self.late.forget(req.bootstrap_room)  # whatever comes for the room is req's now
        parked = self.parked[req.rid] = Parked(req, now, req.disagg_prefill_dp_rank,
                                               prompt_hash(req.input_ids))
        if parked.prefill_rank is None:
            room = req.bootstrap_room
            placed = self._route_of(room, parked.prompt_hash, now)
            parked.saw_route = placed is not None
            if placed is None:  # prefill may be done already: its route entry is gone
                placed = self.peers.handoff.lookup(room)
                if placed is not None:
                    self._known(parked, placed.region, now)
            elif placed.state != FAILED:
                self._known(parked, placed.prefill_rank, now)
        self._sleep_s = FIRST_SLEEP_S
        return True

    def discard(self, req: Req) -> bool:
        """Drop a parked request (aborted: its client left, ``/abort_request``, its API
        process exited). Its KV, if already waiting in a hand-off entry, is released so
        prefill frees it now, not at the deadline; if not there yet, it is released when
        it comes (``scheduler.pd_late``)."""
        parked = self.parked.pop(req.rid, None)
        if parked is None:
            return False
        self.late.drop(req.bootstrap_room, parked.prefill_rank, parked.prompt_hash,
                       time.monotonic_ns())
        return True

    def on_abort(self, req: Req, message: str) -> None:
        pass  # nothing of a decode request lives in shared memory

    def on_refused(self, req: Req, message: str) -> None:
        pass

    # ---- the step -----------------------------------------------------------------------
    def poll(self, admit) -> tuple[list[Ready], list[Failure]]:
        """Move parked requests on. ``admit(req)`` reserves the request's KV (into
        ``req.slots``) if the rank can run it now. Returns (ready, failed); the caller
        frees whatever ``req.slots`` a failed request holds. Admission keeps arrival
        order: after one request could not be admitted, later ones are only checked
        for failure."""
        ready: list[Ready] = []
        failed, self._orphaned = self._orphaned, []
        now = time.monotonic_ns()
        self.late.poll(now)
        if not self.parked:
            return ready, failed
        failed += self._refresh(now)
        can_admit = True
        for rid, parked in list(self.parked.items()):
            entry, error = self._resolve(parked, now)
            if error is None and entry is not None and entry.state == KV_READY:
                if not can_admit:
                    continue
                if not admit(parked.req):
                    can_admit = False
                    continue
                error = self._receive(parked, entry, ready)
            if error is not None:
                del self.parked[rid]
                failed.append(Failure(parked.req, *error))
            elif ready and ready[-1].req is parked.req:
                del self.parked[rid]
        if ready or failed:
            self._sleep_s = FIRST_SLEEP_S
        return ready, failed

    def _resolve(self, parked: Parked, now: int):
        """(hand-off entry or None, (message, status) or None) for one parked request."""
        room = parked.req.bootstrap_room
        p = parked.prefill_rank
        handoff = self.peers.handoff
        placed = self._route_of(room, parked.prompt_hash, now)  # first: see scheduler.pd
        if placed is not None:
            parked.saw_route = True
            if p is None and placed.state != FAILED:
                p = self._known(parked, placed.prefill_rank, now)
        entry = handoff.lookup(room) if p is None else handoff.lookup_in(p, room)
        if entry is not None and entry.state == FAILED and placed is not None \
                and placed.state != FAILED:
            # A prefill for the room runs now: this FAILED entry is an earlier request's
            # (this one reuses its room; the prefill rank replaces it at the hand-off), or
            # this one's, written a moment before its route goes: as if not there yet.
            entry = None
        if entry is not None and p is None:
            p = self._known(parked, entry.region, now)
        if entry is not None:
            if entry.prompt_hash != parked.prompt_hash:  # someone else's: leave it alone
                return None, (f"bootstrap_room {room} belongs to another request (prefill rank "
                              f"{p} computed a different prompt); every request needs its own "
                              "room", CLIENT_ERROR)
            parked.saw_handoff = True
            if entry.state == FAILED:
                self.peers.claimer.release(entry)  # lets prefill free the entry now
                return None, (f"bootstrap_room {room}: prefill rank {p} failed the request "
                              "(aborted or refused) before this decode request took its KV",
                              SERVER_ERROR)
            return entry, None
        if placed is not None and placed.state == FAILED:
            if placed.prefill_rank < 0:
                # A refusal's mark: this request (with the refused one's prompt) may
                # be a retry whose prefill half hands off after all; release that KV
                # when it comes rather than hold it to the timeout.
                self.late.drop(room, parked.prefill_rank, parked.prompt_hash, now)
            return None, (f"bootstrap_room {room}: the prefill request failed", SERVER_ERROR)
        if placed is None and parked.saw_route:  # its prefill ended: a hand-off, or none
            if parked.saw_handoff:
                return None, (f"bootstrap_room {room}: the KV from prefill rank {p} expired "
                              "before this decode rank could take it", SERVER_ERROR)
            # The route goes when the prefill request ends. An API that aborted it (its
            # client left) removes the route before its rank publishes the failure, so
            # wait a moment for that before calling the hand-off gone.
            if not parked.route_gone_ns:
                parked.route_gone_ns = now
            if now - parked.route_gone_ns < ROUTE_GONE_GRACE_NS:
                return None, None
            return None, (f"bootstrap_room {room}: its prefill ended without handing the KV "
                          "to this request (aborted, or another request with the same room "
                          "took it)", SERVER_ERROR)
        waited = now - parked.arrival_ns
        if p is None:
            if waited > self.bootstrap_ns:
                return None, (f"bootstrap_room {room}: no prefill placed it within "
                              f"{self.bootstrap_ns / 1e9:g} s (prefill never came, or the "
                              "gateway retried with a new room)", SERVER_ERROR)
            if (down := self.peers.none_running(now)) is not None:  # nobody will place it
                return None, (f"bootstrap_room {room}: no prefill rank can place it ({down})",
                              SERVER_ERROR)
        elif waited > self.waiting_ns:
            return None, (f"bootstrap_room {room}: the KV from prefill rank {p} was not "
                          f"ready within {self.waiting_ns / 1e9:g} s", SERVER_ERROR)
        elif (down := self.peers.down_reason(p, now)) is not None:
            return None, (f"bootstrap_room {room}: prefill rank {p} {down}", SERVER_ERROR)
        return None, None

    def _route_of(self, room: int, prompt_hash: int, now: int):
        """The room's route entry, as this request reads it: a FAILED entry past its
        deadline (not expired yet only because no dispatch came since), or one whose
        prompt is another's (a refused request, ``PDRouter.refused``, that an earlier
        client sent with this room), is none."""
        route = self.peers.route
        placed = route.lookup(room) if route is not None else None
        if placed is None or placed.state != FAILED or self._fails(placed, prompt_hash, now):
            return placed
        # Another API process may hold a mark that is this request's (lookup prefers
        # none of several FAILED entries).
        for region in range(route.num_regions):
            other = route.lookup_in(region, room) if region != placed.region else None
            if other is not None and (other.state != FAILED
                                      or self._fails(other, prompt_hash, now)):
                return other
        return None

    @staticmethod
    def _fails(placed, prompt_hash: int, now: int) -> bool:
        """Whether a FAILED route entry fails a request with ``prompt_hash``: not past
        its deadline, and for any prompt (0) or this one."""
        return placed.deadline_ns > now and placed.prompt_hash in (0, prompt_hash)

    def _known(self, parked: Parked, prefill_rank: int, now: int) -> int:
        parked.prefill_rank = prefill_rank
        parked.known_ns = time.monotonic_ns()
        self.resolve_ns.append(parked.known_ns - parked.arrival_ns)
        return prefill_rank

    def _receive(self, parked: Parked, entry, ready: list[Ready]):
        """Claim, copy and release one KV_READY entry (of this request: ``_resolve``
        checked its prompt hash) into ``req.slots``; returns None or (message, status).
        On error the caller frees ``req.slots`` (the scheduler's release does)."""
        req = parked.req
        room, p, claimer = req.bootstrap_room, entry.region, self.peers.claimer
        if entry.kv_len != req.prompt_len:  # the hash matched: only a broken writer
            return (f"bootstrap_room {room}: prefill rank {p} computed {entry.kv_len} prompt "
                    f"tokens, this request has {req.prompt_len}", SERVER_ERROR)
        peer = self.peers.kv_segment(p)
        if peer is None:
            return f"bootstrap_room {room}: cannot map prefill rank {p}'s KV pool", SERVER_ERROR
        if not claimer.claim(entry):
            if claimer.was_claimed(entry):
                return (f"bootstrap_room {room}: its KV was already claimed by another decode "
                        "request; every request needs its own room", CLIENT_ERROR)
            return (f"bootstrap_room {room}: the KV expired before decode could claim it",
                    SERVER_ERROR)
        try:
            logprob, top, src_slots = peer.read_record(entry.kv_location, entry.kv_len)
            self.executor.import_kv(peer, src_slots, req.slots[:entry.kv_len])
        finally:
            intact = claimer.release(entry)
        if not intact:  # prefill freed it under the copy (the claim outlived its grace)
            return f"bootstrap_room {room}: the KV was freed during the copy", SERVER_ERROR
        self.num_received += 1
        req.cached_tokens = entry.cached_tokens
        ready.append(Ready(req, entry.first_token, logprob, top))
        return None

    def _refresh(self, now: int) -> list["Failure"]:
        """If the prefill server restarted (new tables), fail the parked requests whose
        prefill rank was known: it died with the old server. (Unknown ones keep
        waiting: their room may yet come through the new server.)"""
        if not self.peers.refresh(now):
            return []
        self.late.clear()
        failed = []
        for rid, parked in list(self.parked.items()):
            if parked.prefill_rank is not None:
                del self.parked[rid]
                failed.append(Failure(parked.req, f"bootstrap_room {parked.req.bootstrap_room}: "
                                      f"prefill rank {parked.prefill_rank} went away (its "
                                      "server restarted)", SERVER_ERROR))
        return failed

    def close(self) -> None:
        self.parked.clear()
        self.peers.close()

