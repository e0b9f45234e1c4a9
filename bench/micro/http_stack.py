"""``python -m bench.micro.http_stack``: the API process's CPU time per one-token request, with
uvloop + httptools (``--http-stack fast``) and with asyncio + h11 (``asyncio``).

For each stack a server runs on the simulated executor with the ``instant`` profile
(``--executor sim --sim-profile instant``: a forward pass costs nothing, so what is
measured is the API process: HTTP parsing, routing, tokenizing, dispatch, the rank's
reply, the JSON response). ``--concurrency`` clients send ``--requests`` one-token
``/generate`` requests over kept-alive connections; the API process's user + system CPU
time is read from ``/proc/<pid>/stat`` before and after. The stacks take turns for
``--rounds`` rounds (so drift on a shared host hits both alike); the table shows the
median per stack and each round's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import aiohttp

from bench.cli import log_folder, positive_int
from bench.client.server import ServerProcess, exit_on_sigterm

STACKS = ("fast", "asyncio")
LABELS = {"fast": "uvloop + httptools", "asyncio": "asyncio + h11"}
BODY = {"text": "hello", "sampling_params": {"max_new_tokens": 1, "temperature": 0}}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # stat fields 14 and 15
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


async def send(url: str, num_requests: int, concurrency: int) -> float:
    """Send the requests; returns the wall seconds they took."""
    left = iter(range(num_requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client():
            for _ in left:
                async with session.post(url + "/generate", json=BODY) as r:
                    if r.status != 200:
                        raise RuntimeError(f"/generate answered {r.status}: {await r.text()}")
                    await r.read()
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - start


def measure(server: ServerProcess, num_requests: int, concurrency: int) -> tuple[float, float]:
    """(API CPU microseconds per request, requests per second)."""
    before = cpu_seconds(server.proc.pid)
    wall_s = asyncio.run(send(server.url, num_requests, concurrency))
    cpu_s = cpu_seconds(server.proc.pid) - before
    return cpu_s / num_requests * 1e6, num_requests / wall_s


def add_load_flags(p: argparse.ArgumentParser, requests: int, what: str) -> None:
    """The load flags of a benchmark built on ``measure``: rounds of ``requests`` one-token
    requests per ``what`` (a stack, a method), after a warm-up."""
    p.add_argument("--requests", type=positive_int, default=requests,
                   help=f"requests per round and {what}")
    p.add_argument("--concurrency", type=positive_int, default=4, help="clients sending at once")
    p.add_argument("--rounds", type=positive_int, default=3, help=f"turns each {what} takes")
    p.add_argument("--warmup", type=int, default=300, help="requests before measuring")
    p.add_argument("--log-dir", type=log_folder, default=None,
                   help="server logs (default: a temporary folder)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.micro.http_stack",
                                description=__doc__.split("\n\n")[0])
    add_load_flags(p, requests=3000, what="stack")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="http_stack.")
    flags = ["--executor", "sim", "--sim-profile", "instant", "--dp-size", "1",
             "--log-level", "warning"]
    results: dict[str, list[tuple[float, float]]] = {stack: [] for stack in STACKS}
    servers = {stack: ServerProcess([*flags, "--http-stack", stack],
                                    os.path.join(log_dir, f"{stack}.log")) for stack in STACKS}
    try:
        for server in servers.values():
            server.start()
            measure(server, args.warmup, args.concurrency)
        for _ in range(args.rounds):
            for stack, server in servers.items():
                results[stack].append(measure(server, args.requests, args.concurrency))
    finally:
        for server in servers.values():
            server.close()
    print(f"API process CPU per one-token /generate ({args.requests} requests x "
          f"{args.rounds} rounds, {args.concurrency} concurrent, simulated instant ranks)")
    print(f"{'stack':<22}{'CPU us/request':>16}{'requests/s':>12}   rounds (us/request)")
    for stack in STACKS:
        cpu = statistics.median(c for c, _ in results[stack])
        rate = statistics.median(r for _, r in results[stack])
        rounds = ", ".join(f"{c:.0f}" for c, _ in results[stack])
        print(f"{LABELS[stack]:<22}{cpu:>16.0f}{rate:>12.0f}   {rounds}")
    fast = statistics.median(c for c, _ in results["fast"])
    slow = statistics.median(c for c, _ in results["asyncio"])
    print(f"uvloop + httptools: {100 * (1 - fast / slow):.0f}% less API CPU per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
