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
other work on the host included), which says what bounds the rate. A figure read from
``/proc`` resting on too few clock ticks is printed as "-"
(``bench.micro.http_stack.too_few_ticks``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import httpx

from bench.cli import (DefaultsHelpFormatter, interrupted, log_folder, non_negative_int,
                       positive_int, rank_count)
from bench.client.server import ServerProcess, exit_on_sigterm
from bench.micro.http_stack import cpu_ticks, send, too_few_ticks

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


def machine_busy_ticks() -> int:
    """Clock ticks every core of the machine spent not idle so far (``/proc/stat``):
    this benchmark's processes and anything else running on the host."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle


def _load_generator(url: str, num_requests: int, concurrency: int,
                    groups: dict[str, list[int]], conn) -> None:
    """The client, in its own process. Reads every CPU counter itself right around the
    send (its own start-up is not measured); sends back the figures of ``measure``."""
    import asyncio

    before = {part: sum(cpu_ticks(p) for p in pids) for part, pids in groups.items()}
    busy_before, own_before = machine_busy_ticks(), time.process_time()
    wall_s = asyncio.run(send(url, num_requests, concurrency))
    own_s, busy = time.process_time() - own_before, machine_busy_ticks() - busy_before
    ticks = {part: sum(cpu_ticks(p) for p in pids) - before[part] for part, pids in groups.items()}
    hz = os.sysconf("SC_CLK_TCK")
    conn.send({"rate": num_requests / wall_s, "api_cpu_us": ticks["api"] / hz / num_requests * 1e6,
               "api_cores": ticks["api"] / hz / wall_s, "rank_cores": ticks["ranks"] / hz / wall_s,
               "client_cores": own_s / wall_s, "machine_cores": busy / hz / wall_s,
               "api_ticks": ticks["api"], "rank_ticks": ticks["ranks"], "machine_ticks": busy})
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
                                description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--requests", "--num-prompts", dest="requests", type=positive_int,
                   default=3000, help="one-token requests per round and server")
    p.add_argument("--concurrency", "--max-concurrency", dest="concurrency", type=positive_int,
                   default=32, help="kept-alive connections sending at once")
    p.add_argument("--rounds", type=positive_int, default=3, help="turns each server takes")
    p.add_argument("--warmup", "--warmup-requests", dest="warmup", type=non_negative_int,
                   default=500, help="requests per server before measuring (0: none)")
    p.add_argument("--dp-size", type=rank_count, default=4, help="simulated ranks per server")
    p.add_argument("--log-dir", type=log_folder, default=None,
                   help="server logs (default: a new temporary folder, printed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="api_servers.")
    print(f"server logs: {log_dir}", file=sys.stderr)
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
            if args.warmup:
                measure(server, groups[n], args.warmup, args.concurrency)
        for _ in range(args.rounds):
            for n, server in servers.items():
                results[n].append(measure(server, groups[n], args.requests, args.concurrency))
    except KeyboardInterrupt:
        return interrupted(f"no figures; server logs in {log_dir}")
    finally:
        for server in servers.values():
            server.close()
    report(results, args)
    return 0


# The figures each count of /proc ticks underlies (the client's is process_time: exact).
TICKED = {"api_ticks": ("api_cpu_us", "api_cores"), "rank_ticks": ("rank_cores",),
          "machine_ticks": ("machine_cores",)}


def medians(rounds: list[dict], num_requests: int) -> tuple[dict, list[str]]:
    """Medians over ``rounds``, each figure resting on too few ``/proc`` ticks in any
    round as None; and the lines saying which and why."""
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    notes = []
    for ticks, keys in TICKED.items():
        few = too_few_ticks(min(r[ticks] for r in rounds), num_requests, ", ".join(keys))
        if few:
            notes.append(few)
            med.update(dict.fromkeys(keys))
    return med, notes


def _fig(value: float | None, spec: str, width: int) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def report(results: dict[int, list[dict]], args) -> None:
    print(f"Front door, one-token /generate ({args.requests} requests x {args.rounds} rounds, "
          f"{args.concurrency} connections, {args.dp_size} simulated instant ranks, load "
          f"generator in its own process, {os.cpu_count()} CPUs)")
    print(f"{'API processes':<15}{'requests/s':>11}{'API CPU us/req':>16}"
          f"{'cores: API':>12}{'ranks':>7}{'client':>8}{'ours':>6}{'machine':>9}"
          f"   rounds (req/s)")
    med, notes = {}, []
    for n in COUNTS:
        med[n], few = medians(results[n], args.requests)
        notes += [f"N={n}: {line}" for line in few]
        m = med[n]
        parts = (m["api_cores"], m["rank_cores"])
        total = None if None in parts else sum(parts) + m["client_cores"]
        rounds = ", ".join(f"{r['rate']:.0f}" for r in results[n])
        print(f"{n:<15}{m['rate']:>11.0f}{_fig(m['api_cpu_us'], '.0f', 16)}"
              f"{_fig(m['api_cores'], '.2f', 12)}{_fig(m['rank_cores'], '.2f', 7)}"
              f"{m['client_cores']:>8.2f}{_fig(total, '.2f', 6)}"
              f"{_fig(m['machine_cores'], '.2f', 9)}   {rounds}")
    for note in notes:
        print(note)
    api = [med[n]["api_cpu_us"] for n in COUNTS]
    print(f"N=2 / N=1: {med[2]['rate'] / med[1]['rate']:.2f}x requests/s, " + (
        f"{api[1] / api[0]:.2f}x API CPU per request" if None not in api else "API CPU: -"))
    # The two ceilings: one API process can serve at most one core's worth of requests;
    # the machine at most its cores over the CPU every part spends per request.
    cores = os.cpu_count() or 1
    for n in COUNTS:
        m = med[n]
        if None in (m["api_cores"], m["rank_cores"], m["api_cpu_us"]):
            continue
        whole_us = (m["api_cores"] + m["rank_cores"] + m["client_cores"]) / m["rate"] * 1e6
        print(f"N={n}: CPU per request, all parts {whole_us:.0f} us -> this machine's "
              f"{cores} cores serve at most {cores / whole_us * 1e6:.0f} requests/s; "
              f"{n} API process(es) at most {n / m['api_cpu_us'] * 1e6:.0f}")


if __name__ == "__main__":
    raise SystemExit(main())
