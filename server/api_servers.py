"""``--api-server-count N`` (N > 1): N API processes serve one port, each its own
dispatcher on the load board, and this process supervises them.

The launcher process (``serve_api_servers``) does what it does with one API process
(creates the board with N dispatcher columns, spawns the ranks, waits until they are
ready), then spawns N API processes (``api_server_main``) instead of serving itself:
API process d gets the listening socket (all of them accept on it), the board's name
and, for every rank, the API ends of that rank's pipes to dispatcher d and its
``RankReady``. It then drops its own copies of every pipe end, so the only writer of
a rank's request pipe d is API process d: when that process exits, however it
exits, the rank reads EOF there and ends its requests (``scheduler.rank_io``); and of
the listening socket, so that a stop, which closes the API processes' copies, leaves
the port refusing connections rather than queueing them for nobody.

Each API process (``server.api_process``) runs the same ``EngineClient`` and app as a
single API process does, over ranks it did not start. The board is shared, so
``/get_load``, ``/v1/loads``, ``/server_info``'s ranks and the ``/metrics`` gauges read
the same from any of them; ``/metrics``' counters and histograms are summed over all of
them (``server.metrics.shared_registry``);
``/server_info``'s ``dispatch`` figures are the answering process's, labelled with its
``dispatcher_id`` and pid.

Lifecycle:
- start: every API process loads its tokenizer and builds its app, then waits until
  all have (so they start accepting together), serves, and reports it; the launcher
  logs "ready" once all of them serve. One that fails to start fails the launch.
- an API process that dies: its clients' connections break; the ranks end its
  requests and retire its in-flight counts, so the board returns to zero; the others
  keep serving. The launcher logs it and carries on while any is left.
- SIGTERM/SIGINT/SIGHUP to the launcher (or the last API process gone): each API process
  gets SIGTERM (uvicorn's graceful stop), then SIGKILL after a bound; the ranks, whose
  request pipes all read EOF, stop themselves; then ``EngineProcesses.close`` stops
  what is left and unlinks every segment.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from scheduler.roles import DisaggregationMode, Role
from server.api_process import (API_START_TIMEOUT_S, EXIT_STARTUP_FAILED, ApiSpec,
                                GroupEnds, RankEnds, api_server_main)
from server.args import ServerArgs
from server.metrics import MULTIPROC_ENV
from server.pd import PDLaunchError, PDProcesses
from server.placement import LaunchPlan
from server.ranks import EngineProcesses, RankMain, RankStartupError
from server.serving import ignore_stop_signals, num_ranks, pd_summary
from shm.segment import METRICS_DIR_PREFIX

logger = logging.getLogger("dpserve")

# After SIGTERM: uvicorn's graceful shutdown bound plus the engine client's stop.
API_STOP_TIMEOUT_S = 10.0


# ---- the launcher ---------------------------------------------------------------------
@dataclass(eq=False)
class ApiProcess:
    dispatcher_id: int
    process: multiprocessing.process.BaseProcess
    status_conn: Connection
    state: str = "starting"  # built, serving, failed, exited


def serve_api_servers(args: ServerArgs, sock: socket.socket, rank_main: RankMain | None = None,
                      plan: LaunchPlan | None = None) -> int:
    """Start the ranks, then ``--api-server-count`` API processes on ``sock``; supervise
    until a stop signal or until none is left. Always stops everything it started."""
    pd_mode = args.disaggregation_mode != DisaggregationMode.NULL
    processes = (PDProcesses(args, rank_main, plan) if pd_mode
                 else EngineProcesses(args, rank_main, plan=plan))
    apis: list[ApiProcess] = []
    # Every API process's counters in one folder, summed by a scrape of any of them
    # (server.metrics.shared_registry); inherited by the processes spawned below.
    # Named by this launcher's pid: a crashed launcher's is removed by the next start
    # and by ``python -m shm.cleanup`` (``shm.segment.reclaim_stale_metrics_dirs``).
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}.")
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        processes.start()
        groups = processes.groups if pd_mode else {processes.role: processes}
        logger.info("started %d rank(s) on board(s) %s; waiting until they are ready",
                    num_ranks(args),
                    ", ".join(g.board.name for g in groups.values()))
        processes.wait_ready(args.startup_timeout_s)
        port = sock.getsockname()[1]
        apis, go = start_api_processes(args, sock, groups, processes if pd_mode else None)
        release_pipes(groups)  # each pipe's API end now lives in one API process only
        # Every API process has its copy (spawn passed the descriptor at exec). Ours
        # would keep the port listening after they all closed theirs in a stop: the
        # kernel would queue new connections that nobody accepts, not refuse them.
        sock.close()
        if not wait_serving(apis, go):
            return EXIT_STARTUP_FAILED
        url = args.url.rsplit(":", 1)[0] + f":{port}"
        logger.info("ready: %s serving %s with %d rank(s) behind %d API processes%s", url,
                    args.served_model_name, num_ranks(args), len(apis),
                    pd_summary(args))
        supervise(apis)
        return 0
    except (RankStartupError, PDLaunchError) as exc:
        logger.error("%s", exc)
        return EXIT_STARTUP_FAILED
    finally:
        ignore_stop_signals()
        stop_api_processes(apis)
        # With every API process gone each rank reads EOF on all its request pipes and
        # stops by itself (its requests ended, its row DEAD); close stops what is left.
        deadline = time.monotonic() + args.shutdown_timeout_s
        ranks = ([r for g in processes.groups.values() for r in g.ranks] if pd_mode
                 else processes.ranks)
        for rank in ranks:
            rank.process.join(max(0.0, deadline - time.monotonic()))
        processes.close()
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        logger.info("stopped: every API process and rank exited and every segment is unlinked")


def start_api_processes(args: ServerArgs, sock: socket.socket,
                        groups: dict[Role, EngineProcesses], pd: PDProcesses | None):
    """Spawn one API process per dispatcher; returns them and the event that lets them
    serve."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    apis = []
    route_name = pd.route.name if pd is not None and pd.route.segment.is_owner else None
    for d in range(args.api_server_count):
        spec = ApiSpec(d, [GroupEnds(role, g.board.name,
                                     [RankEnds(r.dp_rank, r.ready, *r.dispatcher_pipes[d])
                                      for r in g.ranks],
                                     g.summary.name if g.summary is not None else None)
                           for role, g in groups.items()],
                       route_name=route_name,
                       num_prefill_ranks=pd.handoff.num_regions if pd is not None else 0,
                       orphan_tables=pd.orphan_tables() if pd is not None else None,
                       launcher_pid=os.getpid())
        status_recv, status_send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=api_server_main, name=f"dpserve-api-{d}",
                              args=(args, spec, sock, status_send, go), daemon=False)
        process.start()
        status_send.close()
        apis.append(ApiProcess(d, process, status_recv))
    return apis, go


def release_pipes(groups: dict[Role, EngineProcesses]) -> None:
    """Close the launcher's copies of every rank pipe's API end."""
    for group in groups.values():
        for rank in group.ranks:
            for req_conn, out_conn in rank.dispatcher_pipes:
                req_conn.close()
                out_conn.close()


def _read_status(api: ApiProcess) -> None:
    try:
        state, _, detail = api.status_conn.recv_bytes().decode(errors="replace").partition(" ")
    except (EOFError, OSError):
        api.process.join(1.0)
        if api.state != "exited":
            api.state = "exited"
            logger.error("API process %d exited (code %s)", api.dispatcher_id,
                         api.process.exitcode)
        return
    api.state = state
    if state == "failed":
        logger.error("API process %d failed to start: %s", api.dispatcher_id, detail)


def wait_serving(apis: list[ApiProcess], go) -> bool:
    """Every API process builds its app, then all are let go together; True once all
    serve, False if one fails, exits or takes too long."""
    deadline = time.monotonic() + API_START_TIMEOUT_S
    released = False
    while True:
        states = {a.state for a in apis}
        if states & {"failed", "exited"}:
            return False
        if not released and states <= {"built", "serving"}:
            go.set()
            released = True
        if states == {"serving"}:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            logger.error("API processes not serving after %.0f s: %s", API_START_TIMEOUT_S,
                         {a.dispatcher_id: a.state for a in apis})
            return False
        for conn in wait([a.status_conn for a in apis], timeout=left):
            _read_status(next(a for a in apis if a.status_conn is conn))


def supervise(apis: list[ApiProcess]) -> None:
    """Until every API process has exited: log each exit; the others keep serving."""
    while live := [a for a in apis if a.state != "exited"]:
        by_conn = {a.status_conn: a for a in live}
        by_sentinel = {a.process.sentinel: a for a in live}
        # Exits first: a process that died shows both its sentinel and its pipe's EOF,
        # and is logged once, by the sentinel.
        for obj in sorted(wait([*by_conn, *by_sentinel]), key=lambda o: o not in by_sentinel):
            api = by_conn.get(obj) or by_sentinel[obj]
            if api.state == "exited":
                continue
            if obj in by_sentinel:
                api.process.join(1.0)
                api.state = "exited"
                left = sum(a.state != "exited" for a in apis)
                logger.error("API process %d (pid %d) exited with code %s; its requests are "
                             "ended on the ranks, %d API process(es) keep serving",
                             api.dispatcher_id, api.process.pid, api.process.exitcode, left)
            else:
                _read_status(api)


def stop_api_processes(apis: list[ApiProcess]) -> None:
    """SIGTERM every API process (uvicorn's graceful stop), then SIGKILL after a bound."""
    for api in apis:
        if api.process.is_alive():
            api.process.terminate()
    deadline = time.monotonic() + API_STOP_TIMEOUT_S
    for api in apis:
        api.process.join(max(0.0, deadline - time.monotonic()))
    for api in apis:
        if api.process.is_alive():
            logger.warning("kill API process %d", api.dispatcher_id)
            api.process.kill()
            api.process.join(2.0)
        api.status_conn.close()
