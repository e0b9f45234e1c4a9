"""Limits that keep one client from starving the others, on the real command.

``python -m engine.serve`` (simulated executor, 2 ranks), over each HTTP stack
(uvloop + httptools, asyncio + h11), with short bounds:
``--max-request-body-bytes`` (413 by Content-Length and by counted chunked bytes),
``--api-key`` (401 without or with a wrong key, /health open, streaming with it),
``--limit-concurrency`` (503 with Retry-After when every connection is mid-request;
waiting connections make room), and ``--timeout-request-read`` with idle, slow-header
and slow-body clients, on a server whose open-file limit is 256 (hard), a limit some hosts
have. Every socket is closed in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import subprocess
import sys
import time

import httpx
import pytest

from server.connections import FDS_PER_RANK, FDS_RESERVED
from tests.server_helpers import ServerProcess, write_sim_profile

pytestmark = pytest.mark.slow

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 4096
MAX_CONNECTIONS = 8
GENERATE = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}


# Every bound must hold over both HTTP stacks (server.connections).
@pytest.fixture(scope="module", params=["fast", "asyncio"])
def sim_flags(request, tmp_path_factory):
    profile = write_sim_profile(tmp_path_factory.mktemp("limits") / "sim.json", step_s=0.0)
    return ["--dp-size", "2", "--executor", "sim", "--sim-profile", profile,
            "--http-stack", request.param]


@pytest.fixture(scope="module")
def server(sim_flags, tmp_path_factory):
    with ServerProcess(*sim_flags, "--api-key", KEY, "--max-request-body-bytes", str(BODY_LIMIT),
                       "--limit-concurrency", str(MAX_CONNECTIONS),
                       log_path=tmp_path_factory.mktemp("limits") / "server.log") as s:
        yield s


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_response(sock: socket.socket, timeout_s: float = 10.0) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one response with a Content-Length."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def close_all(socks) -> None:
    for sock in socks:
        sock.close()


# ---- request-body limit ---------------------------------------------------------------------
def test_body_over_the_limit_by_content_length_gets_413(server):
    padded = json.dumps(GENERATE).encode()
    at_limit = padded + b" " * (BODY_LIMIT - len(padded))  # JSON allows trailing spaces
    assert httpx.post(server.url + "/generate", content=at_limit, headers=AUTH,
                      timeout=30).status_code == 200
    r = httpx.post(server.url + "/generate", content=at_limit + b" ", headers=AUTH, timeout=30)
    assert r.status_code == 413
    message = r.json()["error"]["message"]
    assert f"{BODY_LIMIT} bytes" in message and "--max-request-body-bytes" in message


def test_chunked_body_gets_413_as_soon_as_it_passes_the_limit(server):
    """The 413 arrives while the client is still sending: the body is counted as it
    comes, never read whole."""
    sock = connect(server.port)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b'{"prompt": "' + b"x" * 988  # 1000 bytes
        for _ in range(BODY_LIMIT // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            chunk = b"x" * 1000
        # No terminating chunk: the body is not over, and the answer is already due.
        status, _, body = read_response(sock)
        assert status == 413, body
        assert "--max-request-body-bytes" in json.loads(body)["error"]["message"]
    finally:
        sock.close()


# ---- --api-key ------------------------------------------------------------------------------
def test_api_key_is_required_on_every_route_but_health(server):
    url = server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}):
        r = httpx.post(url + "/generate", json=GENERATE, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "API key" in r.json()["error"]["message"]
    for path in ("/health_generate", "/server_info", "/get_load", "/metrics", "/v1/models"):
        assert httpx.get(url + path, timeout=30).status_code == 401, path
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert httpx.post(url + "/generate", json=GENERATE, headers=AUTH, timeout=30).status_code == 200
    info = httpx.get(url + "/server_info", headers=AUTH, timeout=30)
    assert info.json()["api_key"] == "<set>" and KEY not in info.text


def test_api_key_on_a_streaming_route(server):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 401
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH,
                      timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 2


# ---- --limit-concurrency --------------------------------------------------------------------
def slow_body_client(port: int) -> socket.socket:
    """Headers complete, body begun and never finished: a request in progress."""
    sock = connect(port)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n{")
    return sock


def test_connection_bound_answers_503_with_retry_after(server):
    busy = []
    try:
        busy = [slow_body_client(server.port) for _ in range(MAX_CONNECTIONS)]
        time.sleep(0.3)  # the server has their headers
        r = httpx.post(server.url + "/generate", json=GENERATE, headers=AUTH, timeout=10)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
        assert "--limit-concurrency" in r.json()["error"]["message"]
    finally:
        close_all(busy)
    deadline = time.monotonic() + 10
    while (status := httpx.post(server.url + "/generate", json=GENERATE, headers=AUTH,
                                timeout=10).status_code) == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 200


def test_waiting_connections_make_room_for_a_new_request(server):
    """Idle and slow-header connections past the bound are closed oldest first, so a
    new client is served instead of getting 503."""
    idle = []
    try:
        idle = [connect(server.port) for _ in range(3 * MAX_CONNECTIONS)]
        idle[-1].sendall(b"GET /health HTTP/1.1\r\n")  # a slow-header client
        time.sleep(0.3)
        r = httpx.post(server.url + "/generate", json=GENERATE, headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        closed = 0
        for sock in idle:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except TimeoutError:
                pass
        assert closed >= 2 * MAX_CONNECTIONS
    finally:
        close_all(idle)


# ---- --timeout-request-read at an open-file limit of 256 ------------------------------------
NOFILE = 256
READ_TIMEOUT_S = 5.0
LAUNCH_WITH_NOFILE = ("import resource, sys; "
                      f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); "
                      "from server.launch import main; sys.exit(main(sys.argv[1:]))")


def test_idle_and_slow_clients_do_not_starve_a_new_request_and_are_closed(sim_flags, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:  # this test process holds 340 sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    server = ServerProcess(*sim_flags, "--timeout-request-read", str(READ_TIMEOUT_S),
                           log_path=tmp_path / "server.log")
    server.args = [sys.executable, "-c", LAUNCH_WITH_NOFILE, *server.args[3:]]  # after -m engine.serve
    idle, slow_headers, slow_bodies = [], [], []
    selector = selectors.DefaultSelector()
    with server:
        try:
            info = httpx.get(server.url + "/server_info", timeout=10).json()
            # 256 less the reserve, 2 ranks and two accept rounds of 256 // 8.
            assert info["limit_concurrency"] == NOFILE - FDS_RESERVED - FDS_PER_RANK * 2 - 2 * 32
            opened = time.monotonic()
            idle = [connect(server.port) for _ in range(300)]
            for _ in range(20):
                sock = connect(server.port)
                sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
                slow_headers.append(sock)
            bodies_opened = time.monotonic()
            for _ in range(20):
                sock = connect(server.port)
                sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n{")
                slow_bodies.append(sock)
            start = time.monotonic()
            r = httpx.post(server.url + "/generate", json=GENERATE, timeout=READ_TIMEOUT_S)
            served_s = time.monotonic() - start
            assert r.status_code == 200 and served_s < READ_TIMEOUT_S / 2, (r.status_code, served_s)

            # Slow clients keep sending a byte every 0.25 s; all 340 must be closed.
            everyone = idle + slow_headers + slow_bodies
            for sock in everyone:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            closed_at: dict[socket.socket, float] = {}
            received: dict[socket.socket, bytes] = {}
            deadline = opened + READ_TIMEOUT_S + 15
            next_byte = 0.0
            while len(closed_at) < len(everyone) and time.monotonic() < deadline:
                if time.monotonic() >= next_byte:
                    next_byte = time.monotonic() + 0.25
                    for sock in slow_headers + slow_bodies:
                        if sock not in closed_at:
                            try:
                                sock.send(b"a" if sock in slow_headers else b" ")
                            except OSError:
                                pass  # closed: the read below sees it
                for key, _ in selector.select(timeout=0.05):
                    try:
                        data = key.fileobj.recv(4096)
                    except ConnectionResetError:
                        data = b""
                    received[key.fileobj] = received.get(key.fileobj, b"") + data
                    gone = data == b""
                    if gone:
                        closed_at[key.fileobj] = time.monotonic()
                        selector.unregister(key.fileobj)
            assert len(closed_at) == len(everyone), (
                f"{len(everyone) - len(closed_at)} connections still open after "
                f"{READ_TIMEOUT_S} s + 15 s")
            # Mid-request clients are not cut before their bound (waiting ones may be:
            # they made room for newer connections).
            earliest = min(closed_at[s] for s in slow_bodies) - bodies_opened
            assert earliest > READ_TIMEOUT_S * 0.9, earliest
            # Told why: a 408 before the close (nothing had been answered on them).
            assert all(received.get(s, b"").startswith(b"HTTP/1.1 408 ") for s in slow_bodies)
            assert httpx.post(server.url + "/generate", json=GENERATE, timeout=10).status_code == 200
        finally:
            selector.close()
            close_all(idle + slow_headers + slow_bodies)
    log = server.log()
    assert "Traceback" not in log and "out of system resource" not in log, log[-3000:]


# ---- the open-file limit --------------------------------------------------------------------
def test_open_file_soft_limit_is_raised_to_the_hard_limit():
    code = ("import resource; from server.connections import raise_open_file_limit; "
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(64, hard), hard)); "
            "assert raise_open_file_limit() == hard; "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=ServerProcess.__init__.__globals__["REPO"])
    assert out.stdout.strip() == "True", out.stderr
