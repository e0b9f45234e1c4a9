"""Test helpers: SGLang's gateways and a recording proxy as bounded, always-stopped processes.

``Gateway`` runs sglang-router 0.3.2 (``python -m sglang_router.launch_router``) or smg
1.13 (``python -m smg launch``; the ``smg`` script on PATH may be sglang-router's, which
installs one under the same name) on free 127.0.0.1 ports, its Prometheus listener
included (otherwise 0.0.0.0:29000). Both are one Rust process behind the Python launcher
(it renames itself ``sglang::router`` / ``smg::router``), so stopping means that pid:
SIGTERM, a short wait, SIGKILL. ``RecordingProxy`` (``tests/recording_proxy.py``) sits
between a gateway and an engine and logs what passes.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.server_helpers import REPO

LAUNCH = {
    "sglang-router": [sys.executable, "-m", "sglang_router.launch_router"],
    "smg": [sys.executable, "-m", "smg", "launch", "--shutdown-grace-period-secs", "0"],
}
MODULE = {"sglang-router": "sglang_router", "smg": "smg"}


def missing_gateway(kind: str) -> str | None:
    """Why ``kind`` cannot run here, or None."""
    if importlib.util.find_spec(MODULE[kind]) is None:
        return f"{kind} is not installed (pip install -e '.[gateway]')"
    return None


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class _Process:
    """One subprocess with a log file; ``stop`` is always safe and bounded."""

    def __init__(self, args: list[str], log_path: Path):
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.args[:4]} exited with {self.proc.returncode}:\n"
                               f"{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Gateway(_Process):
    def __init__(self, kind: str, *flags: str, log_path: Path):
        self.kind = kind
        self.port, self.prometheus_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([*LAUNCH[kind], "--host", "127.0.0.1", "--port", str(self.port),
                          "--prometheus-host", "127.0.0.1",
                          "--prometheus-port", str(self.prometheus_port), *flags], log_path)

    def workers(self) -> list[dict]:
        return httpx.get(self.url + "/workers", timeout=2).json()["workers"]

    def start(self, num_workers: int, timeout_s: float = 30.0) -> "Gateway":
        """Start and wait until ``num_workers`` workers (``url@rank`` each with
        ``--dp-aware``) are registered, healthy and ready."""
        self._start()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    workers = self.workers()
                    if len(workers) == num_workers and all(
                            w.get("is_healthy") and w.get("status", "ready") == "ready"
                            for w in workers):
                        return self
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                time.sleep(0.1)
            raise TimeoutError(f"{self.kind}: {num_workers} workers not ready after "
                               f"{timeout_s} s:\n{self.log()[-4000:]}")
        except BaseException:
            self.stop()
            raise


class RecordingProxy(_Process):
    def __init__(self, target: str, log_path: Path, record_path: Path):
        (self.port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.record_path = record_path
        super().__init__([sys.executable, "-m", "tests.recording_proxy", str(self.port),
                          target, str(record_path)], log_path)

    def start(self, timeout_s: float = 20.0) -> "RecordingProxy":
        self._start()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        return self
                except OSError:
                    time.sleep(0.05)
            raise TimeoutError(f"proxy not listening after {timeout_s} s:\n{self.log()}")
        except BaseException:
            self.stop()
            raise

    def records(self, path: str | None = None, since: float = 0.0) -> list[dict]:
        if not self.record_path.exists():
            return []
        out = [json.loads(line) for line in self.record_path.read_text().splitlines() if line]
        return [r for r in out if (path is None or r["path"] == path) and r["t"] >= since]
