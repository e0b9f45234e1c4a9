"""What every API process runs the same way: uvicorn's configuration and the signals
that stop it (``server.launch`` with one API process, ``server.api_servers`` with
several)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from multiprocessing import resource_tracker

import uvicorn

from server.app import create_app
from scheduler.roles import DisaggregationMode, Role
from server.args import ServerArgs
from server.connections import accept_backlog, protocol_for
from server.engine_client import EngineClient

logger = logging.getLogger("dpserve")

GRACEFUL_SHUTDOWN_S = 5
# Requests still running this long after a stop began are failed (a 503 with
# Retry-After, or a stream's error event and [DONE]) before uvicorn's bound cancels them.
DRAIN_S = GRACEFUL_SHUTDOWN_S - 1
# What stops a server gracefully: Ctrl-C, a service manager's stop, and SIGHUP, which a
# server started from a terminal gets when the terminal closes or the ssh session drops
# (unless it was started with SIGHUP ignored, as nohup does: see ``hangup_stops``).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def hangup_stops() -> bool:
    """Whether SIGHUP stops this process: not when it started with SIGHUP ignored
    (``nohup``, meant to outlive its terminal). Asked before any handler is installed;
    a spawned child inherits the ignored disposition (exec keeps it), not a handler."""
    return signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker now, with SIGHUP ignored: started later
    by the first spawn, it would get SIGHUP's default action and die when the terminal
    closes (a relaunch warning and tracebacks in the log). The launcher calls this
    before installing its stop handlers."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGHUP, previous)


class Server(uvicorn.Server):
    """uvicorn's server with a stop that ends every request with an answer a client or
    gateway can retry. uvicorn stops accepting, lets running requests finish for
    ``GRACEFUL_SHUTDOWN_S``, then cancels what still runs, which a client sees as a 500
    or a stream cut off without ``[DONE]``. Here, ``DRAIN_S`` into the stop, the engine
    fails those requests first, so their routes answer as for a lost rank.

    Signals: SIGHUP stops as SIGINT and SIGTERM do (unless ignored from the start,
    ``hangup_stops``). A second SIGINT (Ctrl-C pressed again) ends the drain at once: the running requests are failed the same way, where
    uvicorn would cancel them."""

    def __init__(self, config: uvicorn.Config, engine: EngineClient):
        super().__init__(config)
        self.engine = engine
        self.is_hurried = False  # set by a second SIGINT; read by the drain

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            if threading.current_thread() is not threading.main_thread() or \
                    not hangup_stops():
                yield  # signals reach the main thread only, as in uvicorn
                return
            previous = signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                yield
            finally:
                # Restored before uvicorn re-raises what it captured, SIGHUP included.
                signal.signal(signal.SIGHUP, previous)

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            # Not uvicorn's force_exit: that cancels the running requests unanswered.
            # A signal handler only sets a flag; the drain polls it. The stop stays
            # bounded without it: uvicorn's graceful timeout, then the engine's own stop,
            # whose waits are bounded too (EngineClient.stop).
            self.is_hurried = True
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        drain = asyncio.create_task(self._fail_after_drain())
        try:
            await super().shutdown(sockets)
        finally:
            drain.cancel()

    async def _fail_after_drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_S
        while not self.is_hurried and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.is_hurried:
            logger.info("second SIGINT: failing the running requests now")
        self.engine.fail_inflight("the server is shutting down")


def make_server(args: ServerArgs, engine: EngineClient) -> Server:
    return Server(uvicorn_config(args, engine), engine)


def uvicorn_config(args: ServerArgs, engine: EngineClient) -> uvicorn.Config:
    # log_config None: uvicorn's loggers propagate to ours (scheduler.log_format).
    return uvicorn.Config(create_app(engine), log_level=args.log_level, access_log=False,
                          log_config=None, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                          lifespan="on", timeout_keep_alive=args.timeout_keep_alive,
                          http=protocol_for(args), backlog=accept_backlog())


def num_ranks(args: ServerArgs) -> int:
    """The ranks one launch runs: both roles' in ``--disaggregation-mode pd``."""
    if args.disaggregation_mode == DisaggregationMode.PD:
        return args.prefill_dp_size + args.decode_dp_size
    return args.dp_size


def pd_summary(args: ServerArgs) -> str:
    """The ready line's tail: each role's ranks and load balance method."""
    mode = args.disaggregation_mode
    if mode == DisaggregationMode.PD:
        return (f": {args.prefill_dp_size} prefill ranks ({args.method_for(Role.PREFILL)}), "
                f"{args.decode_dp_size} decode ranks ({args.method_for(Role.DECODE)})")
    method = args.method_for(args.role)
    if mode != DisaggregationMode.NULL:
        return (f", PD {mode} server ({method}), bootstrap port "
                f"{args.disaggregation_bootstrap_port}")
    return f", load balance method {method}"


class StopSignal(BaseException):
    """A stop signal arrived outside uvicorn's own handling (start-up, or re-raised by
    uvicorn after its graceful exit). A BaseException so that only ``main`` catches it
    and every ``finally`` on the way cleans up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> None:
    def handler(signum, frame):
        raise StopSignal(signum)
    for signum in STOP_SIGNALS:
        if signum != signal.SIGHUP or hangup_stops():
            signal.signal(signum, handler)


def ignore_stop_signals() -> None:
    """For the cleanup after a stop: it is bounded (a bounded wait, then terminate, then
    kill), and a second signal must not cut it short and leave processes or segments
    behind. The signals are blocked while their handlers change, so none arrives
    between two of the changes and raises ``StopSignal`` out of a ``finally``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
