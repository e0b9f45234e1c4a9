"""``python -m bench.micro.api_servers``: front-door capacity with one API process and
with ``--api-server-count 2``, side by side in one run.

Two servers run on the simulated executor with the ``instant`` profile (a forward pass
costs nothing, so what is measured is the front door: HTTP, tokenizing, dispatch, the
ranks' replies, the JSON response), ``--dp-size`` ranks each, one with one API process
and one with two. A load generator in its own process sends ``--requests`` one-token
``/generate`` requests over ``--concurrency`` kept-alive connections as fast as they
are answered. Each server takes turns for ``--rounds`` rounds (drift on a shared host
hits both alike). Reported per server (medians over rounds): requests per second, API
CPU per request (user + system time of every API process and the launcher, from
``/proc``), and where the machine's CPU went during the round (API processes, ranks,
load generator, in cores, and the whole machine's busy cores from ``/proc/stat``,
other work on the host included), which says what bounds the rate.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time

import httpx

from bench.cli import log_folder, positive_int
from bench.client.server import ServerProcess, exit_on_sigterm
from bench.micro.http_stack import cpu_seconds, send

COUNTS = (1, 2)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_groups(server: ServerProcess) -> dict[str, list[int]]:
    """The server's pids by part: ``api`` (the launcher and its API processes) and
    ``ranks``; multiprocessing's resource tracker is left out (it idles)."""
    info = httpx.get(server.url + "/server_info", timeout=10).json()
    ranks = [r["pid"] for r in info["ranks"]]
    launcher = server.proc.pid
    apis = [p for p in _children(launcher)
            if p not in ranks and "resource_tracker" not in _cmdline(p)]
    return {"api": [launcher, *apis], "ranks": ranks}


def wait_api_processes(server: ServerProcess, n: int, timeout_s: float = 60.0) -> None:
    """Until ``n`` API processes have answered (each labels ``/server_info``'s dispatch
    figures with its pid; a fresh connection may land on any of them)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only API processes {sorted(seen)} answered in {timeout_s} s")
        with httpx.Client() as client:
            seen.add(client.get(server.url + "/server_info", timeout=10).json()["dispatch"]["pid"])


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent not idle so far (``/proc/stat``):
    this benchmark's processes and anything else running on the host."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _load_generator(url: str, num_requests: int, concurrency: int,
                    groups: dict[str, list[int]], conn) -> None:
    """The client, in its own process. Reads every CPU counter itself right around the
    send (its own start-up is not measured); sends back the figures of ``measure``."""
    import asyncio

    before = {part: sum(cpu_seconds(p) for p in pids) for part, pids in groups.items()}
    busy_before, own_before = machine_busy_seconds(), time.process_time()
    wall_s = asyncio.run(send(url, num_requests, concurrency))
    own_s, busy_s = time.process_time() - own_before, machine_busy_seconds() - busy_before
    cpu = {part: sum(cpu_seconds(p) for p in pids) - before[part] for part, pids in groups.items()}
    conn.send({"rate": num_requests / wall_s, "api_cpu_us": cpu["api"] / num_requests * 1e6,
               "api_cores": cpu["api"] / wall_s, "rank_cores": cpu["ranks"] / wall_s,
               "client_cores": own_s / wall_s, "machine_cores": busy_s / wall_s})
    conn.close()


def measure(server: ServerProcess, groups: dict[str, list[int]], num_requests: int,
            concurrency: int) -> dict[str, float]:
    """One round: the load generator's figures (``_load_generator``)."""
    ctx = multiprocessing.get_context("spawn")
    recv, send_end = ctx.Pipe(duplex=False)
    gen = ctx.Process(target=_load_generator,
                      args=(server.url, num_requests, concurrency, groups, send_end))
    gen.start()
    send_end.close()
    try:
        return recv.recv()
    finally:
        gen.join(30)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.micro.api_servers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=positive_int, default=3000,
                   help="requests per round and server")
    p.add_argument("--concurrency", type=positive_int, default=32,
                   help="kept-alive connections sending at once")
    p.add_argument("--rounds", type=positive_int, default=3, help="turns each server takes")
    p.add_argument("--warmup", type=int, default=500, help="requests before measuring")
    p.add_argument("--dp-size", type=positive_int, default=4, help="simulated ranks per server")
    p.add_argument("--log-dir", type=log_folder, default=None,
                   help="server logs (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="api_servers.")
    flags = ["--executor", "sim", "--sim-profile", "instant", "--dp-size", str(args.dp_size),
             "--log-level", "warning"]
    servers = {n: ServerProcess([*flags, "--api-server-count", str(n)],
                                os.path.join(log_dir, f"api{n}.log")) for n in COUNTS}
    results: dict[int, list[dict[str, float]]] = {n: [] for n in COUNTS}
    try:
        groups = {}
        for n, server in servers.items():
            server.start()
            wait_api_processes(server, n)
            groups[n] = process_groups(server)
            if len(groups[n]["api"]) != n + (n > 1):
                raise RuntimeError(f"expected {n} API process(es), found {groups[n]['api']}")
            measure(server, groups[n], args.warmup, args.concurrency)
        for _ in range(args.rounds):
            for n, server in servers.items():
                results[n].append(measure(server, groups[n], args.requests, args.concurrency))
    finally:
        for server in servers.values():
            server.close()
    print(f"Front door, one-token /generate ({args.requests} requests x {args.rounds} rounds, "
          f"{args.concurrency} connections, {args.dp_size} simulated instant ranks, load "
          f"generator in its own process, {os.cpu_count()} CPUs)")
    print(f"{'API processes':<15}{'requests/s':>11}{'API CPU us/req':>16}"
          f"{'cores: API':>12}{'ranks':>7}{'client':>8}{'ours':>6}{'machine':>9}"
          f"   rounds (req/s)")
    med = {}
    for n in COUNTS:
        med[n] = {k: statistics.median(r[k] for r in results[n]) for k in results[n][0]}
        m = med[n]
        total = m["api_cores"] + m["rank_cores"] + m["client_cores"]
        rounds = ", ".join(f"{r['rate']:.0f}" for r in results[n])
        print(f"{n:<15}{m['rate']:>11.0f}{m['api_cpu_us']:>16.0f}{m['api_cores']:>12.2f}"
              f"{m['rank_cores']:>7.2f}{m['client_cores']:>8.2f}{total:>6.2f}"
              f"{m['machine_cores']:>9.2f}   {rounds}")
    print(f"N=2 / N=1: {med[2]['rate'] / med[1]['rate']:.2f}x requests/s, "
          f"{med[2]['api_cpu_us'] / med[1]['api_cpu_us']:.2f}x API CPU per request")
    # The two ceilings: one API process can serve at most one core's worth of requests;
    # the machine at most its cores over the CPU every part spends per request.
    cores = os.cpu_count() or 1
    for n in COUNTS:
        m = med[n]
        whole_us = (m["api_cores"] + m["rank_cores"] + m["client_cores"]) / m["rate"] * 1e6
        print(f"N={n}: CPU per request, all parts {whole_us:.0f} us -> this machine's "
              f"{cores} cores serve at most {cores / whole_us * 1e6:.0f} requests/s; "
              f"{n} API process(es) at most {n / m['api_cpu_us'] * 1e6:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
