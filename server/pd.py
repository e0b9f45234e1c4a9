"""PD disaggregation in the server: the launch's shared segments and rank groups, and
the single front door over a prefill and a decode group.

Modes (``--disaggregation-mode``; ``scheduler.pd`` has the shared-memory design):
- ``pd``: this server runs ``--prefill-dp-size`` prefill and ``--decode-dp-size`` decode
  ranks; every request goes to a prefill rank (prefill method) and a decode rank
  (decode method) with one ``bootstrap_room`` (generated when the client sent none);
  the client reads the decode half. ``disagg_prefill_dp_rank`` picks the prefill rank
  (and tells decode where the KV is); ``routed_dp_rank`` picks the decode rank.
- ``prefill`` / ``decode``: one half each, two servers on one node, so an external PD
  gateway can send the same body to both. The prefill server *creates* the shared
  route and hand-off tables under the launch id ``pd<--disaggregation-bootstrap-port>``
  (and refuses to start if a live server already holds that id); the decode server
  *attaches* them, waiting up to ``--startup-timeout-s`` for the prefill server.
  Each server keeps its own load board for its own ranks: neither dispatches to the
  other's ranks, so there is nothing to share there.

Ownership: ``PDProcesses`` creates (and at ``close`` unlinks) what its mode owns; the
decode server only attaches. Each rank group is an ``EngineProcesses``; rank
processes create and unlink their own KV segments (the group reclaims those of
killed ranks). A decode server follows a restarted prefill server: its ranks and its
API re-find the new tables (``scheduler.pd_peers``, ``server.pd_orphans``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import msgspec

from engine.finish import FinishAbort
from scheduler.messages import FlushCacheResult
from scheduler.pd import (HANDOFF_KIND, ROUTE_KIND, PDConfig, attach_tables, create_tables,
                          shared_launch_id)
from scheduler.pd_router import new_room
from scheduler.roles import DisaggregationMode, Role
from server.args import ServerArgs
from server.engine_client import EngineClient, wait_flushes
from server.errors import ApiError
from server.inflight import RequestHandle
from server.placement import LaunchPlan, plan_launch
from server.prepared import PreparedRequest
from server.rank_segments import reclaim_stale
from server.ranks import EngineProcesses, RankMain
from shm.bootstrap import BootstrapTable
from shm.segment import ShmNotReadyError, ShmOwnerError, find_segment, new_launch_id

logger = logging.getLogger(__name__)

# Claim columns a prefill server reserves for the decode server's ranks. Each costs a
# prefill rank one cell read per held hand-off per step when it looks for releases
# (measured: 200 held entries, 2/8/32/64 columns: 59/82/186/381 us), so not 1024.
# One more, the last, is the decode server's API processes' (``server.pd_orphans``).
DEFAULT_DECODE_DP = 32
ATTACH_POLL_S = 0.2


class PDLaunchError(RuntimeError):
    """The PD segments cannot be created or found (the message says what to do)."""


class PDProcesses:
    """The shared PD tables and the rank group(s) of one PD-mode launch."""

    def __init__(self, args: ServerArgs, rank_main: RankMain | None = None,
                 plan: LaunchPlan | None = None):
        self.args = args
        self.rank_main = rank_main
        self.plan = plan or plan_launch(args)  # both groups' devices and KV sizes
        mode = args.disaggregation_mode
        self.launch_id = (new_launch_id() if mode == DisaggregationMode.PD
                          else shared_launch_id(args.disaggregation_bootstrap_port))
        self.route: BootstrapTable | None = None
        self.handoff: BootstrapTable | None = None
        self.route_writer = None
        self.groups: dict[Role, EngineProcesses] = {}

    @property
    def board(self):
        return (self.groups.get(Role.DECODE) or self.groups[Role.PREFILL]).board

    def start(self) -> "PDProcesses":
        args, mode = self.args, self.args.disaggregation_mode
        reclaim_stale()
        try:
            self._open_tables()
        except ShmOwnerError as exc:  # a squatted name: refuse, clearly, having made nothing
            raise PDLaunchError(str(exc)) from None
        pd = PDConfig(self.launch_id, self.route.name, self.handoff.name,
                      args.wall_s(args.disaggregation_bootstrap_timeout),
                      args.wall_s(args.disaggregation_waiting_timeout),
                      stale_after_s=args.stale_ns / 1e9)
        sizes = ({Role.PREFILL: args.prefill_dp_size, Role.DECODE: args.decode_dp_size}
                 if mode == DisaggregationMode.PD else {args.role: args.dp_size})
        for role, n in sizes.items():
            group = EngineProcesses(args, self.rank_main, role=role, dp_size=n,
                                    launch_id=self.launch_id, pd=pd, plan=self.plan)
            self.groups[role] = group  # before start: close() must stop a half-started group
            group.start()
        return self

    def _open_tables(self) -> None:
        """Create (pd, prefill) or attach (decode) the route and hand-off tables."""
        args, mode = self.args, self.args.disaggregation_mode
        if mode == DisaggregationMode.DECODE:
            self.route, self.handoff = self._attach_tables()
            if self.handoff.num_decode_ranks - 1 < args.dp_size:  # the last: the API's
                raise PDLaunchError(
                    f"the prefill server takes KV claims from "
                    f"{self.handoff.num_decode_ranks - 1} decode ranks, this server has "
                    f"{args.dp_size}: start the prefill server with --disaggregation-decode-dp "
                    f"{args.dp_size}")
        else:
            if mode == DisaggregationMode.PREFILL and (
                    find_segment(ROUTE_KIND, self.launch_id)
                    or find_segment(HANDOFF_KIND, self.launch_id)):
                raise PDLaunchError(
                    f"another prefill server on this node uses --disaggregation-bootstrap-port "
                    f"{args.disaggregation_bootstrap_port}; give each pair its own port")
            is_pd = mode == DisaggregationMode.PD
            num_prefill = args.prefill_dp_size if is_pd else args.dp_size
            num_decode = (args.decode_dp_size if is_pd  # + the decode API's column:
                          else (args.disaggregation_decode_dp or DEFAULT_DECODE_DP) + 1)
            # One route region per API process; with several (server.api_servers) each
            # takes its own region, the launcher none.
            self.route, self.handoff = create_tables(
                self.launch_id, num_prefill, num_decode,
                num_prefill_dispatchers=args.api_server_count)
            if args.api_server_count == 1:
                self.route_writer = self.route.region_writer(0)

    def _attach_tables(self) -> tuple[BootstrapTable, BootstrapTable]:
        port = self.args.disaggregation_bootstrap_port
        deadline = time.monotonic() + self.args.startup_timeout_s
        logged = False
        while True:
            route_name = find_segment(ROUTE_KIND, self.launch_id)
            handoff_name = find_segment(HANDOFF_KIND, self.launch_id)
            if route_name and handoff_name:
                try:
                    return attach_tables(route_name, handoff_name)
                except ShmNotReadyError:
                    pass  # the prefill server is making them right now
            if time.monotonic() > deadline:
                raise PDLaunchError(
                    f"no prefill server with --disaggregation-bootstrap-port {port} on this node "
                    f"after {self.args.startup_timeout_s:.0f} s; start it (same port) first")
            if not logged:
                logger.info("waiting for the prefill server (bootstrap port %d)", port)
                logged = True
            time.sleep(ATTACH_POLL_S)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for group in self.groups.values():
            group.wait_ready(max(0.0, deadline - time.monotonic()))

    def engine_client(self) -> "EngineClient | PDEngineClient":
        return pd_engine_client(self.args, self.groups, self.route_writer,
                                self.handoff.num_regions, self.orphan_tables())

    def orphan_tables(self) -> tuple[str, str] | None:
        """The route and hand-off tables' names, where a decode server's API releases
        the rooms its requests left without the KV (``server.pd_orphans``); None but
        on a decode server (in one ``pd`` server the front door aborts the prefill half
        instead, which frees the KV itself)."""
        if self.args.disaggregation_mode != DisaggregationMode.DECODE:
            return None
        return self.route.name, self.handoff.name

    def close(self) -> None:
        """Stop the ranks (decode first: they read prefill's KV), then the tables."""
        try:
            for role in (Role.DECODE, Role.PREFILL):
                if role in self.groups:
                    self.groups[role].close()
        finally:
            for table in (self.handoff, self.route):
                if table is not None:
                    table.close()
            self.handoff = self.route = self.route_writer = None


def pd_engine_client(args: ServerArgs, groups: dict, route_writer, num_prefill_ranks: int,
                     orphan_tables: tuple[str, str] | None = None
                     ) -> "EngineClient | PDEngineClient":
    """The front door over the rank groups of a PD mode: one ``EngineClient`` per group
    (the prefill one publishes routes through ``route_writer``, this API process's
    region of the route table; a decode server's releases the rooms its requests left
    without the KV, in ``orphan_tables``: route and hand-off table names), joined by
    ``PDEngineClient`` when there are both."""
    clients = {}
    for role, group in groups.items():
        clients[role] = EngineClient.from_processes(
            args, group, route_writer=route_writer if role == Role.PREFILL else None,
            num_prefill_ranks=num_prefill_ranks,
            orphan_tables=orphan_tables if role == Role.DECODE else None)
    if len(clients) == 1:
        return next(iter(clients.values()))
    return PDEngineClient(args, clients[Role.PREFILL], clients[Role.DECODE])


class PDEngineClient:
    """The ``--disaggregation-mode pd`` front door: two ``EngineClient``s (prefill ranks,
    decode ranks) behind the one interface the routes use. A request's handle is its
    decode half's; its prefill half runs alongside and its outputs are dropped (a
    failure there reaches the client through decode, which sees it in the tables),
    except what only the prefill rank computed, which goes into decode's first output
    when logprobs are asked: the prompt's logprobs and the first token's (as SGLang's
    gateway prepends prefill's ``input_token_logprobs`` to decode's). ``cached_tokens``
    (the prefix cache lives on prefill ranks) comes in decode's outputs already: the
    hand-off entry carries it (``scheduler.pd_decode``)."""

    def __init__(self, args: ServerArgs, prefill: EngineClient, decode: EngineClient):
        self.args = args
        self.prefill = prefill
        self.decode = decode
        self.role = Role.PD
        self.tokenizer = decode.tokenizer
        self.model_config = decode.model_config
        self.context_len = min(prefill.context_len, decode.context_len)
        self.max_total_num_tokens = decode.max_total_num_tokens
        self.board = decode.board
        self.ranks = decode.ranks
        self.num_prefill_ranks = len(prefill.ranks)  # disagg_prefill_dp_rank's range
        self.started_at = decode.started_at
        self._prefill_of: dict[RequestHandle, RequestHandle] = {}
        # Each request's prefill half's first output, once it arrives (None if it never
        # does: then decode fails too).
        self._prefill_first: dict[RequestHandle, asyncio.Future] = {}
        self._drains: set[asyncio.Task] = set()

    observer = property(lambda self: self.decode.observer,
                        lambda self, obs: setattr(self.decode, "observer", obs))

    @property
    def num_cache_ranks(self) -> int:
        """The prefill ranks: the prefix cache lives there."""
        return len(self.prefill.ranks)

    @property
    def is_serving(self) -> bool:
        return self.prefill.is_serving and self.decode.is_serving

    def dispatch_stats(self) -> dict:
        """The front door's own time per request (``EngineClient.dispatch_stats``), as
        its prefill half (the first one each request passes) measures it."""
        return self.prefill.dispatch_stats()

    async def start(self) -> None:
        await self.prefill.start()
        await self.decode.start()

    def fail_inflight(self, message: str) -> None:
        self.decode.fail_inflight(message)
        self.prefill.fail_inflight(message)

    async def stop(self) -> None:
        for task in list(self._drains):
            task.cancel()
        await self.decode.stop()
        await self.prefill.stop()

    def submit(self, prepared: PreparedRequest) -> RequestHandle:
        """Both halves under one room: prefill on the rank the client named for it (if
        any), scoring the prompt; decode on ``routed_dp_rank``, told where the KV is."""
        room = new_room() if prepared.bootstrap_room is None else prepared.bootstrap_room
        # routed_dp_rank names the decode rank; the prefill group places the half on
        # disagg_prefill_dp_rank when given (EngineClient._on_named_prefill_rank).
        p_handle = self.prefill.submit(dataclasses.replace(
            prepared, routed_dp_rank=None, bootstrap_room=room))
        try:
            handle = self.decode.submit(dataclasses.replace(
                prepared, bootstrap_room=room, logprob_start_len=-1))
        except BaseException:
            self.prefill.abort(p_handle, "its decode half was refused")
            raise
        self._prefill_of[handle] = p_handle
        handle.cache_rank = p_handle.dp_rank  # the prefix cache lives on prefill ranks
        loop = asyncio.get_running_loop()
        first = self._prefill_first[handle] = loop.create_future()
        task = loop.create_task(self._drain_prefill(p_handle, first))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return handle

    async def _drain_prefill(self, handle: RequestHandle, first: asyncio.Future) -> None:
        try:
            async for out in self.prefill.outputs(handle):
                if not first.done():
                    first.set_result(out)
        except ApiError:
            pass  # the route entry is FAILED now: decode fails the request
        finally:
            if not first.done():
                first.set_result(None)

    async def outputs(self, handle: RequestHandle):
        first = self._prefill_first.get(handle)
        finished = False
        try:
            async for out in self.decode.outputs(handle):
                if first is not None:
                    prefill_out = await first
                    if prefill_out is not None:
                        out = _with_prefill_half(out, prefill_out)
                    first = None
                # A rank's abort (a timeout, a refusal) did not take the KV either.
                finished = out.finish_reason is not None and not isinstance(out.finish_reason,
                                                                            FinishAbort)
                yield out
        finally:
            self._prefill_first.pop(handle, None)
            self._end_prefill(handle, "its decode half ended", finished)

    def abort(self, handle: RequestHandle, message: str) -> None:
        self.decode.abort(handle, message)
        self._end_prefill(handle, message)

    def _end_prefill(self, handle: RequestHandle, message: str, decode_finished: bool = False
                     ) -> None:
        """Abort the prefill half if it still runs; if it handed its KV off and the decode
        half ended without finishing (aborted, or its decode rank died before taking the
        KV), the abort tells the prefill rank to free that KV now, not at the room's
        deadline."""
        p_handle = self._prefill_of.pop(handle, None)
        if p_handle is not None and (not p_handle.is_finished or not decode_finished):
            self.prefill.abort(p_handle, message)

    def refused_room(self, room: int | None, input_ids: list[int]) -> None:
        """Nothing to give up: a request this front door refuses was sent to neither
        half (``EngineClient.refused_room`` is for a server that holds one half)."""

    def abort_requests(self, rid: str | None, message: str) -> int:
        """Both halves (they share the rid): decode's abort finish is the client's answer."""
        return (self.decode.abort_requests(rid, message)
                + self.prefill.abort_requests(rid, message))

    async def flush_cache(self, timeout_s: float) -> list[FlushCacheResult]:
        """Both groups' ranks, asked at once and awaited under one timeout."""
        waiters = self.prefill.ask_flush()
        num_prefill = len(waiters)
        try:
            waiters += self.decode.ask_flush()
        except BaseException:
            for waiter in waiters:
                waiter.cancel()
            raise
        results = await wait_flushes(waiters, timeout_s)
        self.prefill.forget_flushed(results[:num_prefill])
        self.decode.forget_flushed(results[num_prefill:])
        return results

    def live_ranks(self) -> list[int]:
        return self.decode.live_ranks() if self.prefill.live_ranks() else []

    def down_ranks(self) -> dict[str, list[int]]:
        return {Role.PREFILL: self.prefill.down_ranks(), Role.DECODE: self.decode.down_ranks()}

    @property
    def status(self) -> str:
        states = {self.prefill.status, self.decode.status}
        for status in ("not_serving", "unavailable", "degraded"):
            if status in states:
                return status
        return "ok"

    def rank_summaries(self) -> list[dict]:
        return self.prefill.rank_summaries() + self.decode.rank_summaries()

    def internal_state_groups(self) -> dict[str, list[dict]]:
        return {**self.prefill.internal_state_groups(), **self.decode.internal_state_groups()}

    def rank_groups(self) -> list[EngineClient]:
        return [self.prefill, self.decode]


def _with_prefill_half(out, prefill_out):
    """Decode's first output with what its prefill half computed: with logprobs, the
    prompt's logprobs and the first token's logprob at full precision (the hand-off
    carries it, and its top list, as float32)."""
    changes = {"input_token_logprobs": prefill_out.input_token_logprobs,
               "input_top_logprobs": prefill_out.input_top_logprobs}
    if out.output_logprobs and prefill_out.output_logprobs:
        changes["output_logprobs"] = prefill_out.output_logprobs[:1] + out.output_logprobs[1:]
        tops = out.output_top_logprobs or [None] * len(out.output_logprobs)
        changes["output_top_logprobs"] = ((prefill_out.output_top_logprobs or [None])[:1]
                                          + tops[1:])
    return msgspec.structs.replace(out, **changes)


__all__ = ["PDProcesses", "PDEngineClient", "PDLaunchError"]
