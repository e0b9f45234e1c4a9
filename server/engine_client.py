"""The API process's handle on the ranks: dispatch requests, stream their outputs back.

One ``EngineClient`` per API process, used from its event loop only (like the
``Dispatcher`` inside it, it is not thread-safe). It owns no process: the launch's
``EngineProcesses`` does; the client uses the ranks' pipes and the board.

Request life cycle:
1. ``submit`` checks that some rank can take the request (503 otherwise), asks the
   dispatcher for a rank (which counts it on the board), queues ``GenerateReq`` on
   that rank's request pipe (``server.rank_pipe``: never blocks the loop, even if the
   rank stopped reading) and returns a ``RequestHandle``; if anything fails after the
   count, it is taken back (the front door's invariant, ``_submit``);
2. the ``RankMonitor`` reads every rank's outputs and puts each ``ReqOutput`` into its
   request's queue (``server.inflight``); it also fails the requests of a rank that
   dies or stalls;
3. the route consumes ``outputs(handle)`` until a finish reason; leaving early (the
   client went away) sends ``AbortReq``, so the rank frees the KV and its load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator

from engine.config import ModelConfig, load_model_config
from engine.finish import FinishAbort
from engine.chat_template import load_chat_template_arg
from engine.tokenizer import Tokenizer
from scheduler.dispatcher import Dispatcher
from scheduler.messages import (CLIENT_ERROR, AbortReq, FlushCacheReq, FlushCacheResult,
                                GenerateReq, ReqOutput, encode)
from scheduler.pd import attach_tables
from scheduler.pd_router import PDRouter
from scheduler.policy import (InvalidDpRankError, MissingBootstrapRoomError,
                              RankUnavailableError)
from scheduler.roles import Role
from server.args import ServerArgs
from server.errors import ApiError, BadRequest, RequestFailed, ServiceUnavailable
from server.inflight import InFlight, MetricsObserver, RequestHandle
from server.internal_state import rank_internal_state
from server.pd_orphans import POLL_S as ORPHAN_POLL_S, OrphanedRooms
from server.prepared import PreparedRequest
from server.rank_monitor import RankMonitor
from server.rank_pipe import PipeBackedUp, RequestPipe
from server.ranks import EngineProcesses, RankHandle
from shm.board import RankStatus
from shm.bootstrap_layout import BootstrapTableFullError, DuplicateRoomError

__all__ = ["EngineClient", "MetricsObserver", "RequestHandle", "failure_error", "wait_flushes"]

logger = logging.getLogger(__name__)


def failure_error(finish_reason: FinishAbort) -> ApiError:
    """The HTTP error for a request its rank aborted, never a 200: as SGLang answers a
    ``FINISH_ABORT`` with a status (``tokenizer_manager``: 400 raises ``ValueError``,
    the route's 400; 503/500 raise ``HTTPException`` with that status), 400 when the
    rank says the request is at fault, else 503 with Retry-After so a gateway retries
    it (also for an abort with no status: a rank ends a request itself only when it
    cannot serve it)."""
    message = finish_reason.message or "the request was aborted"
    if finish_reason.status_code == CLIENT_ERROR:
        return BadRequest(message)
    return RequestFailed(message)


async def wait_flushes(waiters: list[asyncio.Future], timeout_s: float) -> list[FlushCacheResult]:
    """Every asked rank's ``FlushCacheResult`` (refusals included: the route answers
    400 for those). ``ServiceUnavailable`` (503, retryable) if no rank was asked, one
    was lost while asked, or one did not answer within ``timeout_s``: a rank answers
    between two batches, so one silent that long is stalled."""
    if not waiters:
        raise ServiceUnavailable("no rank is available to flush its cache")
    done, pending = await asyncio.wait(waiters, timeout=timeout_s)
    for waiter in pending:
        waiter.cancel()
    failures = [w.exception() for w in done if w.exception() is not None]
    if failures:
        raise failures[0]
    if pending:
        raise ServiceUnavailable(f"{len(pending)} of {len(waiters)} ranks did not answer the "
                                 f"cache flush within {timeout_s:g} s")
    return [w.result() for w in waiters]


class EngineClient:
    def __init__(self, args: ServerArgs, processes: EngineProcesses, tokenizer: Tokenizer,
                 model_config: ModelConfig, route_writer=None, num_prefill_ranks: int = 0,
                 orphan_tables: tuple[str, str] | None = None):
        """``route_writer`` (PD prefill ranks): this process's region of the route table;
        ``num_prefill_ranks`` (PD decode ranks): the range of ``disagg_prefill_dp_rank``;
        ``orphan_tables`` (a decode server apart from its prefill server): the route and
        hand-off tables' names, where the rooms its requests leave without the KV are
        released (``server.pd_orphans``)."""
        if any(r.ready is None for r in processes.ranks):
            raise ValueError("every rank must be ready before the API serves")
        self.args = args
        self.role = processes.role
        self.board = processes.board
        self.ranks: list[RankHandle] = processes.ranks
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.context_len = min(args.context_length or 1 << 62,
                               *(r.ready.context_len for r in self.ranks))
        self.max_total_num_tokens = min(r.ready.max_total_num_tokens for r in self.ranks)
        # One dispatcher per API process (--api-server-count): its own board column.
        self.dispatcher_id = processes.dispatcher_id
        self.dispatcher = Dispatcher(self.board, self.dispatcher_id, args.method_for(self.role),
                                     stale_ns=args.stale_ns, summary=processes.summary)
        # PD (scheduler.pd_router): prefill dispatch also publishes the room's route.
        self.router = None
        if route_writer:
            self.router = PDRouter(self.dispatcher, None, route_writer,
                                   args.wall_s(args.disaggregation_bootstrap_timeout))
        self.num_prefill_ranks = num_prefill_ranks
        self.orphans = None
        if orphan_tables:
            self.orphans = OrphanedRooms(*attach_tables(*orphan_tables),
                                         args.wall_s(args.disaggregation_bootstrap_timeout))
        self._orphan_task: asyncio.Task | None = None
        self.inflight = InFlight()
        self.monitor = RankMonitor(processes, self.inflight, args.stale_ns, self.abort)
        self.is_serving = False
        self.started_at = time.time()
        self._pipes: dict[int, RequestPipe] = {}
        self.num_dispatched = 0
        self.dispatch_time_s = 0.0
        self.dispatch_cpu_ns = 0
        self._recent_cpu_ns: deque[int] = deque(maxlen=4096)  # for the median: robust to GC pauses

    @classmethod
    def from_processes(cls, args: ServerArgs, processes: EngineProcesses, **pd) -> "EngineClient":
        """Load what the API needs of the model: tokenizer and config (no torch)."""
        template = args.chat_template and load_chat_template_arg(args.chat_template)
        tokenizer = Tokenizer.from_folder(args.tokenizer_path, chat_template=template)
        return cls(args, processes, tokenizer, load_model_config(args.model_path), **pd)

    @property
    def observer(self) -> MetricsObserver:
        return self.inflight.observer

    @observer.setter
    def observer(self, observer: MetricsObserver) -> None:
        self.inflight.observer = observer

    # ---- lifetime (called by the app's lifespan, inside the serving loop) ---------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for rank in self.ranks:
            self._pipes[rank.dp_rank] = RequestPipe(rank.req_conn, loop)
        self.monitor.start(loop)
        self.is_serving = True

    def fail_inflight(self, message: str) -> None:
        """End every running request with ``message`` (a 503, or a stream's error
        event): a server stop whose drain ran out (``server.serving.Server``)."""
        self.inflight.fail_all(message)

    async def stop(self) -> None:
        self.is_serving = False
        self.monitor.stop()
        self.fail_inflight("the server is shutting down")
        if self._orphan_task is not None:
            self._orphan_task.cancel()
        if self.orphans is not None:
            self.orphans.close()
        for rank in self.ranks:
            pipe = self._pipes.pop(rank.dp_rank, None)
            if pipe is not None and not pipe.detach() and rank.lost_reason is None:
                # A half-written frame: the launcher must not send ShutdownReq after it.
                rank.lost_reason = "its request pipe is stuck"

    # ---- requests ----------------------------------------------------------------------
    def submit(self, prepared: PreparedRequest) -> RequestHandle:
        """Dispatch one checked request. Raises ``BadRequest`` or ``ServiceUnavailable``.

        Times itself (``dispatch_stats``): the front door's share of a request, checks +
        pick + encode + pipe send, without parsing, tokenizing or the model. Both wall
        time and this thread's CPU time: the pipe write wakes the rank, which on a
        machine with few cores may take the CPU from this thread mid-call."""
        began, began_cpu = time.perf_counter(), time.thread_time_ns()
        handle = self._submit(prepared)
        self.dispatch_time_s += time.perf_counter() - began
        cpu_ns = time.thread_time_ns() - began_cpu
        self.dispatch_cpu_ns += cpu_ns
        self._recent_cpu_ns.append(cpu_ns)
        self.num_dispatched += 1
        return handle

    def dispatch_stats(self) -> dict:
        n = self.num_dispatched
        # Labelled: with --api-server-count each API process answers for itself.
        return {"dispatcher_id": self.dispatcher_id, "pid": os.getpid(),
                "num_requests": n, "mean_us": 1e6 * self.dispatch_time_s / n if n else None,
                "mean_cpu_us": self.dispatch_cpu_ns / n / 1000 if n else None,
                "median_cpu_us": statistics.median(self._recent_cpu_ns) / 1000 if n else None}

    def _submit(self, p: PreparedRequest) -> RequestHandle:
        """Check, pick (the board bump), hand over.

        The front door's invariant: once the board is bumped (``dispatcher.pick``, or
        ``router.dispatch_prefill``, which also publishes the room's route), the
        request is either handed to its rank (registered in ``inflight``, then its
        message queued on the rank's pipe, the last step: nothing after it can fail)
        or the bump and the route entry are taken back, whatever is raised
        (``BaseException``, not only ``ServiceUnavailable``). So no exception leaves a
        count on the board that no rank will ack, nor a route no request will end.
        Numbers out of range are refused before the bump, by the routes
        (``server.bounds``); one that slips through still cannot break the invariant.
        """
        if not self.is_serving:
            raise ServiceUnavailable("the server is not serving (starting or stopping)")
        if self.role == Role.PREFILL and p.disagg_prefill_dp_rank is not None:
            p = self._on_named_prefill_rank(p)
        if p.rid in self.inflight:
            raise BadRequest(f"rid {p.rid!r} is already in use by a running request")
        self._check_pd(p.bootstrap_room)
        if self.orphans is not None and p.bootstrap_room is not None:
            self.orphans.forget(p.bootstrap_room)  # whatever comes for the room is p's now
        has_room = self._check_capacity(p.routed_dp_rank)
        num_tokens = len(p.input_ids)
        try:
            if self.router is not None:
                dp_rank = self.router.dispatch_prefill(p.bootstrap_room, num_tokens,
                                                       p.routed_dp_rank, p.input_ids, has_room)
            else:
                dp_rank = self.dispatcher.pick(num_tokens, p.routed_dp_rank, p.bootstrap_room,
                                               p.input_ids, has_room)
        except (InvalidDpRankError, MissingBootstrapRoomError, DuplicateRoomError) as exc:
            raise BadRequest(str(exc)) from None
        except (RankUnavailableError, BootstrapTableFullError) as exc:
            raise ServiceUnavailable(str(exc)) from None
        try:
            return self._hand_over(dp_rank, GenerateReq(
                rid=p.rid, input_ids=p.input_ids, sampling_params=p.params,
                dispatcher_id=self.dispatcher_id, counted_tokens=num_tokens,
                return_logprob=p.return_logprob, top_logprobs_num=p.top_logprobs_num,
                # the prompt is scored only for a request that asks for logprobs
                logprob_start_len=p.logprob_start_len if p.return_logprob else -1,
                arrival_time=time.time(), bootstrap_room=p.bootstrap_room,
                disagg_prefill_dp_rank=p.disagg_prefill_dp_rank, group_rid=p.group_rid))
        except BaseException:
            # Never delivered, so never acked: take the board count and the route back.
            self.dispatcher.cancel(dp_rank, num_tokens)
            if self.router is not None:
                self.router.prefill_finished(p.bootstrap_room)
            raise

    def _hand_over(self, dp_rank: int, msg: GenerateReq) -> RequestHandle:
        """Register the request, then queue it on its rank's pipe; on any failure the
        registration is undone (the caller takes back the bump)."""
        rank = self.ranks[dp_rank]
        if not rank.is_usable:  # lost a moment ago; its board row is not DEAD yet
            raise ServiceUnavailable(f"rank {dp_rank} is unavailable: {rank.lost_reason}")
        payload = encode(msg)
        handle = RequestHandle(msg.rid, dp_rank, msg.counted_tokens)
        if self.router is not None:  # the route lives as long as the prefill request
            handle.on_exit = functools.partial(self.router.prefill_finished, msg.bootstrap_room)
        elif self.orphans is not None:
            handle.on_exit = functools.partial(self._on_decode_exit, handle,
                                               msg.bootstrap_room, msg.input_ids)
        self.inflight.add(handle)
        try:
            self._send_payload(rank, payload)  # the last step: nothing after it can fail
        except BaseException:
            handle.on_exit = None  # the caller takes back the bump and the route
            self.inflight.remove(handle)
            raise
        return handle

    def _on_decode_exit(self, handle: RequestHandle, room: int, input_ids: list[int],
                        ok: bool) -> None:
        """A decode request left the registry: if it ended without its KV (no token came:
        refused, aborted, its rank lost), release what its prefill holds or will hold
        for it (``server.pd_orphans``)."""
        if handle.first_token_time is not None or not self.is_serving:
            return  # its rank took the KV (and released it), or the server is stopping
        rank = self.ranks[handle.dp_rank]
        if rank.lost_reason is None:
            self.release_room(room, input_ids)
        else:
            self.release_room(room, input_ids, handle.dp_rank, rank.ready.pid)

    def refused_room(self, room: int | None, input_ids: list[int]) -> None:
        """The request for ``room`` was refused here, before its rank got it. Its other
        half, which a gateway sent to the other server at the same time, must not wait
        for this one: a decode server releases the room's hand-off once it is there
        (``release_room``); a prefill server publishes the room FAILED, so the decode
        half fails at once (``PDRouter.refused``)."""
        if room is None:
            return
        try:
            if self.router is not None:
                self.router.refused(room, input_ids)
            elif input_ids:  # a hand-off is released only for its own prompt
                self.release_room(room, input_ids)
        except Exception:  # never in place of the refusal the client is owed
            logger.exception("bootstrap_room %d: could not give the refused room up", room)

    def release_room(self, room: int | None, input_ids: list[int], lost_rank: int = -1,
                     lost_pid: int = 0) -> None:
        """A decode server: the request for ``room`` will not take its KV (refused here,
        aborted, or its decode rank ``lost_rank`` died): release the hand-off once it is
        there, so prefill frees the KV at once (``server.pd_orphans``)."""
        if self.orphans is None or room is None:
            return
        self.orphans.adopt(room, input_ids, lost_rank, lost_pid)
        if self._orphan_task is None or self._orphan_task.done():
            self._orphan_task = asyncio.get_running_loop().create_task(self._release_orphans())

    async def _release_orphans(self) -> None:
        while self.orphans:
            self.orphans.poll()
            await asyncio.sleep(ORPHAN_POLL_S)

    async def outputs(self, handle: RequestHandle) -> AsyncIterator[ReqOutput]:
        """The request's outputs up to and including the one with a finish reason.

        Raises ``RequestFailed`` if its rank fails, and in place of a rank's abort finish
        (``failure_error``). Closing the iterator before the end (the client
        disconnected) aborts the request on its rank; use it under
        ``contextlib.aclosing`` so that happens at once.
        """
        try:
            while True:
                item = await handle.queue.get()
                if isinstance(item, RequestFailed):
                    raise item
                if isinstance(item.finish_reason, FinishAbort) and not handle.abort_requested:
                    raise failure_error(item.finish_reason)  # its tokens are of no use now
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not handle.is_finished:
                self.abort(handle, "the client disconnected")

    def abort(self, handle: RequestHandle, message: str) -> None:
        """Stop a request: forget it here and tell its rank to free it."""
        if not handle.is_finished:
            self.inflight.observer.on_abort()
        self.inflight.remove(handle)
        rank = self.ranks[handle.dp_rank]
        if rank.lost_reason is None and self.is_serving:
            try:
                self._send(rank, AbortReq(rid=handle.rid, message=message))
            except ServiceUnavailable:
                pass  # the rank is gone or not reading: nothing to free there now

    def abort_requests(self, rid: str | None, message: str) -> int:
        """``/abort_request``: end request ``rid`` (None: every request) wherever it runs,
        also a request another API process sent: every usable rank is told (the rank
        that holds it ends it and answers that request's API process). Its client gets
        what was generated so far and an abort finish. Returns how many ranks were told."""
        msg = AbortReq(rid=rid or "", message=message, requested=True, abort_all=rid is None)
        told = 0
        for rank in self.ranks:
            if rank.is_usable and self.is_serving:
                try:
                    self._send(rank, msg)
                    told += 1
                except ServiceUnavailable:
                    pass  # lost meanwhile: its requests fail with it
        return told

    async def flush_cache(self, timeout_s: float) -> list[FlushCacheResult]:
        """Ask every usable rank to empty its prefix cache; every rank's answer
        (``wait_flushes``: 503 unless all of them answer within ``timeout_s``). This
        API process's dispatcher then forgets what it remembered of the emptied caches
        (``forget_flushed``)."""
        results = await wait_flushes(self.ask_flush(), timeout_s)
        self.forget_flushed(results)
        return results

    def forget_flushed(self, results: list[FlushCacheResult]) -> None:
        """Every rank flushed: the dispatcher starts over (``Dispatcher.forget_prefixes``);
        some did: it forgets the prompts it sent to those to be cached."""
        flushed = {r.dp_rank for r in results if r.success}
        if len(flushed) == len(results):
            self.dispatcher.forget_prefixes()
        else:
            self.dispatcher.pending.forget_ranks(flushed)

    def ask_flush(self) -> list[asyncio.Future]:
        """Send ``FlushCacheReq`` to every usable rank; one future per rank asked, for
        its ``FlushCacheResult``. Raises ``ServiceUnavailable`` if the server is not
        serving or a usable rank cannot be asked (then nothing is awaited)."""
        if not self.is_serving:
            raise ServiceUnavailable("the server is not serving (starting or stopping)")
        waiters: list[asyncio.Future] = []
        try:
            for rank in self.ranks:
                if rank.is_usable:
                    self._send(rank, FlushCacheReq())
                    waiters.append(self.monitor.expect_flush(rank.dp_rank))
        except BaseException:
            for waiter in waiters:
                waiter.cancel()  # its rank's answer still pops it (``RankMonitor``)
            raise
        return waiters

    def _send(self, rank: RankHandle, msg) -> None:
        """Queue a message on the rank's request pipe (never blocks the loop)."""
        self._send_payload(rank, encode(msg))

    def _send_payload(self, rank: RankHandle, payload: bytes) -> None:
        try:
            self._pipes[rank.dp_rank].send(payload)
        except PipeBackedUp as exc:
            raise ServiceUnavailable(f"rank {rank.dp_rank} is not reading requests: {exc}") from None
        except (OSError, ValueError, KeyError) as exc:
            self.monitor.rank_lost(rank, f"its request pipe failed ({exc!r})")
            raise ServiceUnavailable(f"rank {rank.dp_rank} is unavailable") from None

    def _on_named_prefill_rank(self, p: PreparedRequest) -> PreparedRequest:
        """A prefill server places a request whose body names its prefill rank
        (``disagg_prefill_dp_rank``) there: the decode half, given the same body, looks
        for the KV on that rank. The field wins over ``routed_dp_rank``, which in a body
        sent to both servers may name the decode rank."""
        named = p.disagg_prefill_dp_rank
        if named not in self.live_ranks():
            raise ServiceUnavailable(f"disagg_prefill_dp_rank {named} is not alive")
        return dataclasses.replace(p, routed_dp_rank=named, disagg_prefill_dp_rank=None)

    def _check_pd(self, room: int | None) -> None:
        if self.role not in (Role.PREFILL, Role.DECODE):
            return
        if room is None:
            raise BadRequest(f"a PD {self.role} server needs bootstrap_room in every request "
                             "(the gateway adds it; the same room goes to prefill and decode)")

    def _check_capacity(self, routed_dp_rank: int | None) -> list[bool] | None:
        """Per rank, whether its queue takes another request (``pick``'s ``has_room``);
        503 unless some live rank (or the routed one) does.

        Only with ``--max-queued-requests`` (None without it): without a queue limit
        there is nothing to check here, and a board with no live rank is already a 503
        from ``pick``, so the hot path reads the board once, not twice. The method then
        chooses among the ranks with room: a limit checked on any rank but not on the
        one chosen let ``cache_aware`` queue six requests on one rank behind a limit of
        three while another rank idled.
        """
        max_queued = self.args.max_queued_requests
        if max_queued is None:
            return None
        eff_reqs = self.board.read_requests()
        alive = [a and r.lost_reason is None
                 for a, r in zip(self.board.liveness.check(self.args.stale_ns), self.ranks)]
        if not any(alive):
            raise ServiceUnavailable("no rank is alive")
        has_room = [alive[r] and eff_reqs[r] < rank.ready.max_running_requests + max_queued
                    for r, rank in enumerate(self.ranks)]
        candidates = range(len(self.ranks))
        if isinstance(routed_dp_rank, int) and 0 <= routed_dp_rank < len(self.ranks):
            candidates = [routed_dp_rank]
        if not any(has_room[r] for r in candidates):
            raise ServiceUnavailable("every rank is full (running + queued requests at the "
                                     "limit); retry later")
        return has_room

    # ---- state for /health, /server_info -------------------------------------------------
    @property
    def num_cache_ranks(self) -> int:
        """Ranks whose prefix caches requests meet (``RequestHandle.cache_rank``)."""
        return len(self.ranks)

    def rank_groups(self) -> list["EngineClient"]:
        """Every rank group this API serves, each with its ``role``, ``board`` and
        ``ranks``: itself, or in PD mode its prefill and its decode half."""
        return [self]

    def live_ranks(self) -> list[int]:
        """Ranks a request can go to now: not lost, READY on the board, heartbeat fresh."""
        alive = self.board.liveness.check(self.args.stale_ns)
        return [r.dp_rank for r, a in zip(self.ranks, alive) if a and r.lost_reason is None]

    def down_ranks(self) -> list[int]:
        """Ranks that cannot serve now (lost, dead or stale): ``/health``'s ``dead_ranks``."""
        live = set(self.live_ranks())
        return [r.dp_rank for r in self.ranks if r.dp_rank not in live]

    @property
    def status(self) -> str:
        """``ok``, ``degraded`` (some ranks dead or stalled), ``unavailable`` (none
        live) or ``not_serving`` (starting or stopping)."""
        if not self.is_serving:
            return "not_serving"
        num_live = len(self.live_ranks())
        return "ok" if num_live == len(self.ranks) else "degraded" if num_live else "unavailable"

    def internal_state_groups(self) -> dict[str, list[dict]]:
        """``/server_info``'s ``internal_states`` by role: one entry per rank."""
        return {self.role: [rank_internal_state(r, self.role, self.started_at)
                            for r in self.ranks]}

    def rank_summaries(self) -> list[dict]:
        snap = self.board.snapshot()
        return [{
            "dp_rank": r.dp_rank, "role": self.role, "pid": r.ready.pid, "device": r.ready.device,
            "status": RankStatus(int(snap.status[r.dp_rank])).name.lower(),
            "lost_reason": r.lost_reason,
        } for r in self.ranks]
