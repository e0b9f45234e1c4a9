"""One API process of several (``--api-server-count``; ``server.api_servers`` starts
them): ``api_server_main`` serves the shared socket with the same ``EngineClient`` and
app a single API process runs, over ``SiblingRanks``: ranks it did not start, watched
through a pidfd (Linux 5.3+), on a board it attaches but does not own.

What it is given (``ApiSpec``, pickled once by spawn, as the ranks' configs are): its
dispatcher id, and per rank group the board's name and, per rank, the API ends of
that rank's pipes to this dispatcher and its ``RankReady``; in PD mode the route table
it publishes in (its own region, ``dispatcher_id``). It reports to the launcher on a
pipe, one word per step: ``built`` (app made), ``serving`` (accepting), or ``failed
<why>``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
from dataclasses import dataclass
from multiprocessing.connection import Connection

import uvicorn

from scheduler.log_format import configure_logging
from scheduler.messages import RankReady
from scheduler.roles import DisaggregationMode, Role
from server.args import ServerArgs
from server.connections import event_loop_factory
from server.engine_client import EngineClient
from server.pd import pd_engine_client
from server.rank_segments import retire_dead_rank
from server.ranks import RankHandle
from server.serving import StopSignal, ignore_stop_signals, make_server, stop_on_signals
from shm.board import LoadBoard
from shm.bootstrap import BootstrapTable
from shm.prefix_summary import PrefixSummary

logger = logging.getLogger("dpserve")

EXIT_STARTUP_FAILED = 1
# How long an API process waits for the others to build their apps.
API_START_TIMEOUT_S = 120.0


@dataclass
class RankEnds:
    """What API process d needs of one rank: its pipes to d and its ready message."""

    dp_rank: int
    ready: RankReady
    req_conn: Connection
    out_conn: Connection


@dataclass
class GroupEnds:
    """One rank group (plain mode: the only one; PD: prefill or decode) as API process
    d sees it: the group's board and its ranks' ends."""

    role: Role
    board_name: str
    ranks: list[RankEnds]
    summary_name: str | None = None  # the ranks' prefix summaries (cache_aware reads them)


@dataclass
class ApiSpec:
    """Everything API process ``dispatcher_id`` is given (pickled by spawn)."""

    dispatcher_id: int
    groups: list[GroupEnds]
    route_name: str | None = None  # PD prefill: the route table; it writes region d
    num_prefill_ranks: int = 0  # PD decode: the range of disagg_prefill_dp_rank
    # A decode server: the route and hand-off tables, where rooms left without KV are
    # released (server.pd_orphans).
    orphan_tables: tuple[str, str] | None = None
    launcher_pid: int = 0  # the process that spawned it (0: do not watch it)


class SiblingProcess:
    """A rank process as an API process that did not start it sees it: enough of
    ``multiprocessing.Process`` for ``RankMonitor`` (sentinel, liveness, signals),
    through a pidfd, which no pid reuse can redirect."""

    def __init__(self, pid: int):
        self.pid = pid
        self.exitcode = None  # only the parent (the launcher) can learn it
        try:
            self.sentinel = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone: a sentinel that reads as exited
            read_end, write_end = os.pipe()
            os.close(write_end)
            self.sentinel = read_end

    def is_alive(self) -> bool:
        return not select.select([self.sentinel], [], [], 0)[0]

    def join(self, timeout: float | None = None) -> None:
        select.select([self.sentinel], [], [], timeout)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        try:
            signal.pidfd_send_signal(self.sentinel, signum)
        except (ProcessLookupError, OSError):
            pass  # exited already

    def close(self) -> None:
        os.close(self.sentinel)


class SiblingRanks:
    """The ranks as one API process of several sees them (what ``EngineClient`` and
    ``RankMonitor`` use of ``EngineProcesses``): the board attached, not owned."""

    def __init__(self, args: ServerArgs, dispatcher_id: int, group: GroupEnds):
        self.args = args
        self.role = group.role
        self.dispatcher_id = dispatcher_id
        self.dp_size = len(group.ranks)
        self.board: LoadBoard | None = LoadBoard.attach(group.board_name)
        self.summary: PrefixSummary | None = (PrefixSummary.attach(group.summary_name)
                                              if group.summary_name else None)
        self.ranks = [RankHandle(r.dp_rank, SiblingProcess(r.ready.pid), r.req_conn,
                                 r.out_conn, ready=r.ready) for r in group.ranks]

    def mark_dead(self, rank: RankHandle) -> None:
        """As ``EngineProcesses.mark_dead``: ``retire_dead_rank`` once the process has
        exited (every API process that notices writes the same)."""
        if rank.is_marked_dead or rank.process.is_alive() or self.board is None:
            return
        retire_dead_rank(self.board, self.summary, rank)

    def close(self) -> None:
        for rank in self.ranks:
            rank.process.close()
            rank.req_conn.close()
            rank.out_conn.close()
        if self.summary is not None:
            self.summary.close()
            self.summary = None
        if self.board is not None:
            self.board.close()
            self.board = None


def api_server_main(args: ServerArgs, spec: ApiSpec, sock: socket.socket,
                    status_conn: Connection, go) -> None:
    """The body of API process ``spec.dispatcher_id``: build the engine client and the
    app, wait for ``go`` (every API process built its app), serve until a stop signal
    (``server.serving.STOP_SIGNALS``)."""
    d = spec.dispatcher_id
    configure_logging(args.log_level, f"api {d}")
    stop_on_signals()
    _exit_with_parent(spec.launcher_pid)
    groups: dict[Role, SiblingRanks] = {}
    route = None
    try:
        for group in spec.groups:
            groups[group.role] = SiblingRanks(args, d, group)
        if args.disaggregation_mode == DisaggregationMode.NULL:
            engine = EngineClient.from_processes(args, groups[Role.MIXED])
        else:
            route = BootstrapTable.attach(spec.route_name) if spec.route_name else None
            writer = route.region_writer(d) if route is not None else None
            engine = pd_engine_client(args, groups, writer, spec.num_prefill_ranks,
                                      spec.orphan_tables)
        server = make_server(args, engine)
        status_conn.send_bytes(b"built")
        if not go.wait(API_START_TIMEOUT_S):
            return
        with asyncio.Runner(loop_factory=event_loop_factory(args)) as runner:
            runner.run(_serve(server, sock, status_conn))
    except StopSignal:
        pass
    except Exception as exc:
        logger.exception("API process %d failed", d)
        _try_send(status_conn, f"failed {type(exc).__name__}: {exc}".encode())
        raise SystemExit(EXIT_STARTUP_FAILED) from None
    finally:
        ignore_stop_signals()
        if route is not None:
            route.close()  # gives up its region
        for group in groups.values():
            group.close()


def _exit_with_parent(launcher_pid: int) -> None:
    """SIGTERM this process when the launcher dies (even by SIGKILL), as the ranks
    stop when their pipes close: no API process outlives its launcher."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if launcher_pid and os.getppid() != launcher_pid:  # it died before the prctl
        raise SystemExit(EXIT_STARTUP_FAILED)


async def _serve(server: uvicorn.Server, sock: socket.socket, status_conn: Connection) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        _try_send(status_conn, b"serving")
    await task


def _try_send(conn: Connection, status: bytes) -> None:
    try:
        conn.send_bytes(status)
    except (OSError, ValueError):
        pass
