"""Test helpers for the HTTP server: a real ``python -m engine.serve`` subprocess.

``ServerProcess`` starts the server in its own session (so the server and its ranks
form one process group the test can find and kill), waits for ``/health`` with a
bound, and always stops it: SIGTERM, a bounded wait, then SIGKILL of the group.
``write_sim_profile`` writes a simulated-accelerator profile whose forward pass takes
a chosen time, for tests that need requests to last (disconnects, kills, balance).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from shm.segment import NAME_PREFIX, list_segments

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_sim_profile(path: Path, step_s: float = 0.0, **overrides) -> str:
    """A sim profile where each forward pass takes ``step_s``; tiny's vocabulary."""
    profile = {"name": path.stem, "base_s": step_s, "prefill_token_s": 0.0,
               "prefill_attn_s": 0.0, "decode_seq_s": 0.0, "decode_kv_s": 0.0,
               "max_total_num_tokens": 65536, "context_len": 2048, "vocab_size": 259,
               "source": "tests"}
    profile.update(overrides)
    path.write_text(json.dumps(profile))
    return str(path)


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name (state, ppid, pgrp, ...); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) is not None:
            if fields[0] != "Z" and int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def pid_gone(pid: int) -> bool:
    """The process has exited (a zombie too: an orphan waits for init to reap it)."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] == "Z"


def wait_group_gone(pgid: int, timeout_s: float = 5.0) -> list[int]:
    """Wait (bounded) until the group is empty; returns what is left. multiprocessing's
    resource tracker leaves a moment after the server, when its pipe reads EOF."""
    deadline = time.monotonic() + timeout_s
    while (left := group_pids(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def child_pids(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _default_hangup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class ServerProcess:
    def __init__(self, *flags: str, log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The built-in random model unless flags name another: tests never need the network.
        self.args = [sys.executable, "-m", "engine.serve", "--port", str(self.port),
                     "--model-path", "tiny", *flags]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        # SIGHUP as a terminal leaves it (the server keeps it ignored when it starts
        # with it ignored): a test run under nohup still tests a terminal's server.
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_default_hangup)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout_s: float = 60.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy after {timeout_s} s:\n{self.log()}")

    def rank_pids(self) -> list[int]:
        info = httpx.get(self.url + "/server_info", timeout=5).json()
        return [r["pid"] for r in info["ranks"]]

    def segments(self) -> list[str]:
        return list_segments(f"{NAME_PREFIX}{self.pid}.")

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code (raises if it does not exit)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        """Always safe: SIGTERM, bounded wait, then SIGKILL of the whole group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.terminate(20.0)
            except subprocess.TimeoutExpired:
                pass
        if group_pids(self.pid):
            self.kill_group()
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            return self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def metric(text: str, name: str, **labels) -> float:
    """The value of Prometheus sample ``name`` with ``labels`` in a /metrics page."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")
