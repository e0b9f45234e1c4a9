"""``python -m engine.serve``: start the ranks, wait until all are ready, serve HTTP.

Order, and why:
1. raise the open-file limit, then parse and resolve the arguments (bad flags fail
   before anything starts; the connection bound derives from that limit); plan every
   rank's device and KV pool (``server.placement``): ranks that cannot be placed or do
   not fit in memory end the launch here, with one line and exit code 1;
2. bind the listening socket (a busy port fails before minutes of model loading; the
   socket does not accept until uvicorn serves, so nobody's request hangs meanwhile);
3. ``EngineProcesses``: reclaim stale segments, create the board, spawn the ranks,
   wait for every ``RankReady`` (a rank failing stops the launch with its message and
   exit code 1);
4. serve with uvicorn, over ``server.connections``' protocol (request-read deadline,
   connection bound; uvloop and httptools when installed); log the "ready" line with
   the URL once it accepts.
Exit: SIGINT, SIGTERM or SIGHUP stop uvicorn (``server.serving.Server`` handles them
while serving; before that our handler turns them into ``StopSignal``), then
``finally`` stops the ranks and unlinks every segment, whatever happened before.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvicorn

from engine.model_source import ModelFetchError
from scheduler.log_format import configure_logging
from scheduler.roles import DisaggregationMode
from server.args import InvalidServerArgs, ServerArgs, parse_args, resolve_args
from server.connections import event_loop_factory, raise_open_file_limit
from server.engine_client import EngineClient
from server.pd import PDLaunchError, PDProcesses
from server.placement import LaunchError, LaunchPlan, plan_launch
from server.ranks import EngineProcesses, RankMain, RankStartupError
from server.serving import (StopSignal, ignore_stop_signals, make_server, num_ranks, pd_summary,
                            start_resource_tracker, stop_on_signals)

logger = logging.getLogger("dpserve")

EXIT_STARTUP_FAILED = 1
EXIT_BAD_ARGS = 2


def main(argv: list[str] | None = None, rank_main: RankMain | None = None) -> int:
    """Run the server until a stop signal; returns the exit code (0 after a signal).

    ``rank_main`` replaces ``scheduler.process.run_scheduler`` as the body of every rank
    process (tests use it to run the API over stand-in ranks)."""
    args = parse_args(argv)
    configure_logging(args.log_level, "api")
    start_resource_tracker()
    stop_on_signals()
    raise_open_file_limit()  # before resolve_args: --limit-concurrency derives from it
    try:
        try:
            args = resolve_args(args)
        except InvalidServerArgs as exc:
            logger.error("%s", exc)
            return EXIT_BAD_ARGS
        except ModelFetchError as exc:
            logger.error("%s", exc)
            return EXIT_STARTUP_FAILED
        try:
            plan = plan_launch(args)  # ranks that cannot be placed or fit: refuse now
        except LaunchError as exc:
            logger.error("%s", exc)
            return EXIT_STARTUP_FAILED
        logger.info("placement: %s", plan.summary())
        try:
            sock = bind_socket(args.host, args.port)
        except OSError as exc:
            logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
            return EXIT_STARTUP_FAILED
        with sock:
            return serve(args, sock, rank_main, plan)
    except StopSignal as stop:
        logger.info("received %s: stopped", signal.Signals(stop.signum).name)
        return 0


def serve(args: ServerArgs, sock: socket.socket, rank_main: RankMain | None = None,
          plan: LaunchPlan | None = None) -> int:
    if args.api_server_count > 1:  # this process supervises; N API processes serve
        from server.api_servers import serve_api_servers
        return serve_api_servers(args, sock, rank_main, plan)
    pd_mode = args.disaggregation_mode != DisaggregationMode.NULL
    processes = (PDProcesses(args, rank_main, plan) if pd_mode
                 else EngineProcesses(args, rank_main, plan=plan))
    try:
        processes.start()
        logger.info("started %d rank(s); waiting until they are ready", num_ranks(args))
        processes.wait_ready(args.startup_timeout_s)
        engine = processes.engine_client() if pd_mode else EngineClient.from_processes(args, processes)
        server = make_server(args, engine)
        # uvicorn's own loop setting applies only to uvicorn.run.
        with asyncio.Runner(loop_factory=event_loop_factory(args)) as runner:
            started = runner.run(_serve(server, sock, args))
        return 0 if started else EXIT_STARTUP_FAILED
    except (RankStartupError, PDLaunchError) as exc:
        logger.error("%s", exc)
        return EXIT_STARTUP_FAILED
    finally:
        ignore_stop_signals()
        processes.close()
        logger.info("stopped: every rank exited and every segment is unlinked")


async def _serve(server: uvicorn.Server, sock: socket.socket, args: ServerArgs) -> bool:
    """Serve until uvicorn exits; True if it ever accepted connections."""
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        url = args.url.rsplit(":", 1)[0] + f":{sock.getsockname()[1]}"
        logger.info("ready: %s serving %s with %d rank(s)%s", url, args.served_model_name,
                    num_ranks(args), pd_summary(args))
    await task
    return server.started


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit this. asyncio only sets TCP_NODELAY itself on sockets
    # made with proto=IPPROTO_TCP (this one has proto 0), and without it every response
    # on a kept-alive connection waited ~40 ms for the client's delayed ACK (measured).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)  # ranks must not keep the port open
    return sock
