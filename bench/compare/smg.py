"""smg 1.13 in front of one engine, as ``bench.compare.cache`` runs it for its ``smg`` method.

``python -m smg launch --policy cache_aware --dp-aware`` with the engine as its one
worker: smg's own cache-aware routing picks the rank (``routed_dp_rank``), as users run
it today. Started on free loopback ports, ready once its ``/workers`` lists every rank
healthy, and always stopped (SIGTERM, then SIGKILL) when its ``with`` block ends.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

from bench.client.server import free_port


class SmgGateway:
    """smg in front of one engine (``--dp-aware``: one worker per rank); always stopped."""

    def __init__(self, engine_url: str, ranks: int, log_path: str):
        self.port, self.prometheus_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ranks = ranks
        self.cmd = [sys.executable, "-m", "smg", "launch", "--shutdown-grace-period-secs", "0",
                    "--host", "127.0.0.1", "--port", str(self.port), "--prometheus-host",
                    "127.0.0.1", "--prometheus-port", str(self.prometheus_port),
                    "--worker-urls", engine_url, "--policy", "cache_aware", "--dp-aware"]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "SmgGateway":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"smg exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    with urllib.request.urlopen(self.url + "/workers", timeout=2) as r:
                        workers = json.load(r)["workers"]
                    if len(workers) == self.ranks and all(w.get("is_healthy") for w in workers):
                        return self
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.2)
            raise RuntimeError(f"smg: {self.ranks} workers not ready after 60 s; see {self.log_path}")
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
