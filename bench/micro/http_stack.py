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

``/proc`` counts CPU time in clock ticks (10 ms at Linux's usual 100 a second): a figure
resting on fewer than ``MIN_CPU_TICKS`` ticks is not printed (``too_few_ticks`` says how
many requests per round would make enough).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import tempfile
import time

import aiohttp

from bench.cli import (DefaultsHelpFormatter, interrupted, log_folder, non_negative_int,
                       positive_int)
from bench.client.server import ServerProcess, exit_on_sigterm

STACKS = ("fast", "asyncio")
LABELS = {"fast": "uvloop + httptools", "asyncio": "asyncio + h11"}
BODY = {"text": "hello", "sampling_params": {"max_new_tokens": 1, "temperature": 0}}


# A CPU time from two /proc readings is off by up to a tick at each end: from this many
# ticks on, by at most 2 / MIN_CPU_TICKS (4%). The default runs rest on 60-100 ticks.
MIN_CPU_TICKS = 50


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of process ``pid`` so far (not its children), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # stat fields 14 and 15: utime, stime


def too_few_ticks(ticks: int, num_requests: int, what: str,
                  min_ticks: int = MIN_CPU_TICKS) -> str | None:
    """None when a CPU figure measured as ``ticks`` clock ticks over ``num_requests``
    requests rests on enough ticks to print; else the line that says why it is not
    printed and how many requests per round would do (``--num-prompts``)."""
    if ticks >= min_ticks:
        return None
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    if ticks > 0:
        need = f"about {math.ceil(num_requests * min_ticks / ticks * 1.2)}"
    else:
        need = f"more than {num_requests * min_ticks}"
    return (f"{what}: not printed, {ticks} CPU tick(s) of {tick_ms:g} ms measured over "
            f"{num_requests} requests (needs >= {min_ticks}); run {need} requests per round "
            "(--num-prompts)")


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


def measure(server: ServerProcess, num_requests: int,
            concurrency: int) -> tuple[float, float, int]:
    """(API CPU microseconds per request, requests per second, the CPU clock ticks the
    first figure rests on); ``num_requests`` >= 1."""
    before = cpu_ticks(server.proc.pid)
    wall_s = asyncio.run(send(server.url, num_requests, concurrency))
    ticks = cpu_ticks(server.proc.pid) - before
    cpu_s = ticks / os.sysconf("SC_CLK_TCK")
    return cpu_s / num_requests * 1e6, num_requests / wall_s, ticks


def add_load_flags(p: argparse.ArgumentParser, requests: int, what: str) -> None:
    """The load flags of a benchmark built on ``measure``: rounds of ``requests`` one-token
    requests per ``what`` (a stack, a method), after a warm-up."""
    p.add_argument("--requests", "--num-prompts", dest="requests", type=positive_int,
                   default=requests, help=f"one-token requests per round and {what}")
    p.add_argument("--concurrency", "--max-concurrency", dest="concurrency", type=positive_int,
                   default=4, help="clients sending at once")
    p.add_argument("--rounds", type=positive_int, default=3, help=f"turns each {what} takes")
    p.add_argument("--warmup", "--warmup-requests", dest="warmup", type=non_negative_int,
                   default=300, help=f"requests per {what} before measuring (0: none)")
    p.add_argument("--log-dir", type=log_folder, default=None,
                   help="server logs (default: a new temporary folder, printed)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.micro.http_stack",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    add_load_flags(p, requests=3000, what="stack")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="http_stack.")
    print(f"server logs: {log_dir}", file=sys.stderr)
    flags = ["--executor", "sim", "--sim-profile", "instant", "--dp-size", "1",
             "--log-level", "warning"]
    results: dict[str, list[tuple[float, float, int]]] = {stack: [] for stack in STACKS}
    servers = {stack: ServerProcess([*flags, "--http-stack", stack],
                                    os.path.join(log_dir, f"{stack}.log")) for stack in STACKS}
    try:
        for server in servers.values():
            server.start()
            if args.warmup:
                measure(server, args.warmup, args.concurrency)
        for _ in range(args.rounds):
            for stack, server in servers.items():
                results[stack].append(measure(server, args.requests, args.concurrency))
    except KeyboardInterrupt:
        return interrupted(f"no figures; server logs in {log_dir}")
    finally:
        for server in servers.values():
            server.close()
    print(f"API process CPU per one-token /generate ({args.requests} requests x "
          f"{args.rounds} rounds, {args.concurrency} concurrent, simulated instant ranks)")
    print(f"{'stack':<22}{'CPU us/request':>16}{'requests/s':>12}   rounds (us/request)")
    cpu, notes = {}, []
    for stack in STACKS:
        few = too_few_ticks(min(t for _, _, t in results[stack]), args.requests,
                            f"{LABELS[stack]} CPU per request")
        cpu[stack] = None if few else statistics.median(c for c, _, _ in results[stack])
        notes += [few] if few else []
        rate = statistics.median(r for _, r, _ in results[stack])
        rounds = "-" if few else ", ".join(f"{c:.0f}" for c, _, _ in results[stack])
        shown = "-" if cpu[stack] is None else f"{cpu[stack]:.0f}"
        print(f"{LABELS[stack]:<22}{shown:>16}{rate:>12.0f}   {rounds}")
    for note in notes:
        print(note)
    if notes:
        return 1
    print(f"uvloop + httptools: {100 * (1 - cpu['fast'] / cpu['asyncio']):.0f}% less API CPU "
          "per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
