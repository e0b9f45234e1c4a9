"""The server under test: one ``engine.serve`` subprocess, its front door's timing, the load sampler.

``ServerProcess`` starts ``python -m engine.serve`` on a free loopback port in its own
process group, waits until ``/health`` answers 200, and in ``close`` (also on any
error, through ``with``) sends SIGINT to that group's leader (the server stops its
own ranks and unlinks its segments), then SIGTERM/SIGKILL if it does not exit.

``LoadSampler`` polls ``/v1/loads`` (``/get_load``'s rows plus each rank's role) every
``interval_s`` during a run and keeps, per sample, the time and every balanced rank's
``num_reqs`` and ``num_tokens`` (PD: the ranks of ``role``, by default the prefill ones),
at times in simulated seconds when the server's steps are stretched (``time_scale``).

``dispatch_stats`` reads the server's own timing of its front door (``/server_info``'s
``dispatch``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import aiohttp

STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> bool:
    """Poll ``url``/health until it answers 200 (True), or ``proc`` exits or
    ``timeout_s`` passes (False; ``proc.poll()`` tells which)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def dispatch_stats(url: str) -> dict | None:
    """``/server_info``'s ``dispatch``: the server's timing of ``EngineClient.submit``."""
    with urllib.request.urlopen(url + "/server_info", timeout=10) as r:
        return json.load(r).get("dispatch")


def exit_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, a CI runner) end this process as Ctrl-C would, so the
    ``with`` blocks that own servers stop them. Servers run in their own session and
    outlive a benchmark killed outright: 9 processes of a PD server ran on for 53
    minutes after ``timeout`` ended the script that started them. Entry points only."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


class ServerProcess:
    def __init__(self, flags: list[str], log_path: str):
        self.flags = flags
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "engine.serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--model-path", "tiny", *self.flags]
        log = open(self.log_path, "ab")
        log.write((" ".join(cmd) + "\n").encode())
        log.flush()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        if wait_healthy(self.proc, self.url, STARTUP_TIMEOUT_S):
            return
        if self.proc.poll() is not None:
            raise ServerStartError(f"engine.serve exited with {self.proc.returncode}; "
                                   f"see {self.log_path}")
        raise ServerStartError(f"engine.serve not healthy after {STARTUP_TIMEOUT_S:.0f} s; "
                               f"see {self.log_path}")

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGINT, STOP_TIMEOUT_S), (signal.SIGTERM, 5.0),
                            (signal.SIGKILL, 5.0)):
            try:
                # The server's own process group (start_new_session): its ranks too on KILL.
                target = proc.pid if sig != signal.SIGKILL else -os.getpgid(proc.pid)
                os.kill(target, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


class LoadSampler:
    """Polls ``/v1/loads`` in the background of a run (``async with``)."""

    def __init__(self, url: str, interval_s: float = 0.075, role: str | None = None,
                 time_scale: float = 1.0):
        self.url = url + "/v1/loads"
        self.role = role or "prefill"
        self.interval_s = interval_s
        self.time_scale = time_scale
        self.samples: list[dict] = []  # {"t": s, "reqs": [...], "tokens": [...]}
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "LoadSampler":
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        start = time.perf_counter()
        async with aiohttp.ClientSession(trust_env=False) as session:
            while True:
                try:
                    async with session.get(self.url) as r:
                        rows = (await r.json())["loads"]
                    # PD: the balanced ranks (self.role); otherwise every (mixed) rank.
                    rows = [x for x in rows if x["role"] == self.role] or rows
                    t = (time.perf_counter() - start) / self.time_scale
                    self.samples.append({"t": round(t, 3),
                                         "reqs": [x["num_reqs"] for x in rows],
                                         "tokens": [x["num_tokens"] for x in rows]})
                except (aiohttp.ClientError, ValueError, KeyError):
                    pass
                await asyncio.sleep(self.interval_s)
