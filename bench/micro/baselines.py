"""SGLang-style baselines measured beside the board, in the same process tree.

- ``zmq_pickle_report_us``: one-way latency of a pickled load report over a ZMQ ipc
  PUSH/PULL socket between two processes (how SGLang's schedulers report load). The
  sender stamps ``time.monotonic_ns()`` (one clock for the node) into the report; the
  receiver subtracts on arrival. Reports are paced so the queue never builds up.
- ``http_bootstrap_get_us``: a GET to an aiohttp bootstrap server on loopback through a
  keep-alive client (how SGLang's decode side asks where a request's prefill is).

Both need the ``bench`` extra (pyzmq, aiohttp).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import statistics
import tempfile
import time


def _zmq_receiver(addr: str, count: int, result, ready) -> None:
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(addr)
    ready.set()
    lat = []
    for _ in range(count):
        data = sock.recv()
        now = time.monotonic_ns()
        report = pickle.loads(data)
        lat.append((now - report["sent_ns"]) / 1000)
    result.put(statistics.median(lat[count // 10:]))  # drop warm-up
    sock.close()
    ctx.term()


def zmq_pickle_report_us(count: int = 3000) -> float:
    """Median one-way latency (us) of a pickled per-rank load report over ZMQ ipc."""
    import zmq
    ctx_mp = mp.get_context("spawn")
    path = os.path.join(tempfile.mkdtemp(prefix="dps-zmq-"), "report.ipc")
    addr = f"ipc://{path}"
    result, ready = ctx_mp.Queue(), ctx_mp.Event()
    proc = ctx_mp.Process(target=_zmq_receiver, args=(addr, count, result, ready), daemon=True)
    proc.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    try:
        if not ready.wait(30):
            raise RuntimeError("zmq receiver did not start")
        sock.connect(addr)
        for i in range(count):
            report = {"dp_rank": i % 8, "num_reqs": i, "num_waiting_reqs": 0,
                      "num_tokens": 10 * i, "sent_ns": time.monotonic_ns()}
            sock.send(pickle.dumps(report))
            time.sleep(0.0002)  # paced: measure latency, not queueing
        return result.get(timeout=60)
    finally:
        sock.close(linger=0)
        ctx.term()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        os.unlink(path) if os.path.exists(path) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bootstrap_server(port: int, ready) -> None:
    import asyncio
    from aiohttp import web

    table = {str(room): {"prefill_dp_rank": room % 8} for room in range(1000)}

    async def route(request):
        return web.json_response(table.get(request.query.get("bootstrap_room", ""), {}))

    async def main():
        app = web.Application()
        app.router.add_get("/route", route)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def http_bootstrap_get_us(count: int = 2000) -> float:
    """Median latency (us) of a keep-alive GET to an aiohttp bootstrap server on loopback."""
    import asyncio
    import aiohttp
    ctx_mp = mp.get_context("spawn")
    port = _free_port()
    ready = ctx_mp.Event()
    proc = ctx_mp.Process(target=_bootstrap_server, args=(port, ready), daemon=True)
    proc.start()

    async def client() -> float:
        lat = []
        async with aiohttp.ClientSession() as session:  # one keep-alive connection
            for i in range(count):
                t0 = time.perf_counter_ns()
                async with session.get(f"http://127.0.0.1:{port}/route",
                                       params={"bootstrap_room": str(i % 1000)}) as resp:
                    body = await resp.json()
                lat.append((time.perf_counter_ns() - t0) / 1000)
                if body.get("prefill_dp_rank") != (i % 1000) % 8:
                    raise RuntimeError(f"bootstrap server answered {body}")
        return statistics.median(lat[count // 10:])

    try:
        if not ready.wait(30):
            raise RuntimeError("bootstrap server did not start")
        return asyncio.run(client())
    finally:
        proc.kill()
        proc.join(10)
