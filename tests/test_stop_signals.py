"""How a stop signal ends a running server: a second Ctrl-C, SIGHUP, and new connections
made while it drains.

Each test runs the real command over simulated ranks (20 ms a step, so a request for
1,500 tokens runs for 30 s unless the stop ends it) in its own process group, which
``ServerProcess`` always stops; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.server_helpers import ServerProcess, wait_group_gone, write_sim_profile

pytestmark = pytest.mark.slow

LONG = {"text": "long", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}


class RunningRequests:
    """A plain /generate and a streamed /v1/completions, each in a thread, running
    until the server ends them."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.results: dict = {}
        self.threads = [threading.Thread(target=f) for f in (self._plain, self._streamed)]

    def _plain(self):
        self.results["plain"] = httpx.post(self.server.url + "/generate", json=LONG, timeout=60)

    def _streamed(self):
        with httpx.stream("POST", self.server.url + "/v1/completions", timeout=60, json={
                "prompt": "long", "max_tokens": 1500, "ignore_eos": True, "stream": True}) as r:
            self.results["stream"] = [line for line in r.iter_lines() if line]

    def start(self) -> "RunningRequests":
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 20
        while sum(row["num_reqs"] for row in httpx.get(self.server.url + "/get_load").json()) < 2:
            assert time.monotonic() < deadline and not self.results, (self.results,
                                                                      self.server.log())
            time.sleep(0.05)
        return self

    def join(self) -> None:
        for t in self.threads:
            t.join(30)

    def assert_retryable(self) -> None:
        """Both were ended as a stop ends them: a 503 with Retry-After, a stream's error
        event then [DONE]; never a 500 or a connection cut."""
        plain = self.results["plain"]
        assert plain.status_code == 503 and "Retry-After" in plain.headers, plain.text
        assert "shutting down" in plain.text
        lines = self.results["stream"]
        assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2], lines[-3:]


def sim_server(tmp_path, name: str, *flags: str) -> ServerProcess:
    profile = write_sim_profile(tmp_path / "step.json", step_s=0.02)
    return ServerProcess("--dp-size", "2", "--executor", "sim", "--sim-profile", profile,
                         *flags, log_path=tmp_path / f"{name}.log")


def assert_stopped_cleanly(s: ServerProcess) -> None:
    assert wait_group_gone(s.pid) == [], s.log()
    assert s.segments() == []
    log = s.log()
    assert "Traceback" not in log and "Cancel" not in log and "ERROR" not in log, log


def test_second_sigint_fails_running_requests_at_once(tmp_path):
    """Ctrl-C twice, 1 s apart, with one API process: the second ends the drain and the
    running requests get their retryable answers at once (uvicorn's own force exit
    cancelled them: a 500, a stream cut off, tracebacks)."""
    from server.serving import DRAIN_S
    with sim_server(tmp_path, "sigint2") as s:
        requests = RunningRequests(s).start()
        s.proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        requests.join()
        assert time.monotonic() - t0 < DRAIN_S - 1.5, "the second SIGINT did not shorten the drain"
        assert s.proc.wait(30) == 0, s.log()
        requests.assert_retryable()
        assert "second SIGINT" in s.log()
        assert_stopped_cleanly(s)


def test_new_connections_during_the_drain_are_refused(tmp_path):
    """Two API processes draining after SIGTERM: a new connection is refused at once
    (the launcher kept a listening copy of the socket: the kernel accepted it into a
    backlog nobody reads, and the client hung until the launcher exited)."""
    with sim_server(tmp_path, "newconn", "--api-server-count", "2") as s:
        requests = RunningRequests(s).start()
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10  # until both API processes stopped accepting
        while s.log().count("Shutting down") < 2:
            assert time.monotonic() < deadline, s.log()
            time.sleep(0.05)
        time.sleep(0.2)  # each closes its listening socket right after saying so
        try:
            late = httpx.post(s.url + "/generate", json=LONG, timeout=2).status_code
        except httpx.ConnectError:
            late = "refused"
        except httpx.TimeoutException:
            late = "hung"
        assert late in ("refused", 503), late
        assert s.proc.wait(30) == 0, s.log()
        requests.join()
        requests.assert_retryable()
        assert_stopped_cleanly(s)


@pytest.mark.parametrize("api_servers", ["1", "2"])
def test_sighup_stops_as_sigterm_does(tmp_path, api_servers):
    """SIGHUP to the server's whole process group, as a closed terminal or a dropped ssh
    session sends it (launcher, API processes, ranks, multiprocessing's resource
    tracker): the graceful stop, every segment unlinked (it killed the launcher and the
    ranks at once, leaving segments and cut connections; the tracker died and was
    relaunched with tracebacks)."""
    with sim_server(tmp_path, f"hup{api_servers}", "--api-server-count", api_servers) as s:
        requests = RunningRequests(s).start()
        os.killpg(s.pid, signal.SIGHUP)
        assert s.proc.wait(30) == 0, s.log()
        requests.join()
        requests.assert_retryable()
        assert "received SIGHUP" in s.log()
        assert " ERROR " not in s.log() and "Warning" not in s.log(), s.log()
        assert_stopped_cleanly(s)


@pytest.mark.parametrize("api_servers", ["1", "2"])
def test_a_server_started_under_nohup_outlives_its_terminal(tmp_path, api_servers):
    """Started with SIGHUP ignored (nohup): a hangup to the whole group changes nothing,
    the server keeps serving; SIGTERM still stops it."""
    server = sim_server(tmp_path, f"nohup{api_servers}", "--api-server-count", api_servers)
    server.args = ["nohup", *server.args]
    with server as s:
        os.killpg(s.pid, signal.SIGHUP)
        time.sleep(1.0)
        assert s.proc.poll() is None, s.log()
        reply = httpx.post(s.url + "/generate", timeout=30, json={
            "text": "x", "sampling_params": {"max_new_tokens": 2}})
        assert reply.status_code == 200, reply.text
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0, s.log()
        assert "received SIGTERM" in s.log()
        assert_stopped_cleanly(s)


def test_sigusr1_prints_every_threads_stack_and_changes_nothing(tmp_path):
    """``kill -USR1 PID`` (the launcher's or a rank's) prints that process's threads'
    Python stacks to the log, so a hung process can be looked into; it keeps serving."""
    with sim_server(tmp_path, "usr1") as s:
        rank_pid = s.rank_pids()[1]
        for pid in (s.pid, rank_pid):
            os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while s.log().lower().count("thread 0x") < 2 or "scheduler/process.py" not in s.log():
            assert time.monotonic() < deadline, s.log()
            time.sleep(0.05)
        r = httpx.post(s.url + "/generate", timeout=30, json={
            "text": "x", "routed_dp_rank": 1, "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0, s.log()
        assert wait_group_gone(s.pid) == [] and s.segments() == []
