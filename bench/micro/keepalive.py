"""``python -m bench.micro.keepalive``: how often a pooled HTTP connection fails when it is
reused just as the server's keep-alive timer closes it.

uvicorn (ours and SGLang's server) closes a keep-alive connection idle for
``timeout_keep_alive`` (5 s by default); aiohttp's connector keeps an idle connection
for 15 s by default. A request sent on a connection idle about 5 s can cross the
server's close and fail with ``ServerDisconnectedError`` or a reset
(aio-libs/aiohttp#9138). Stretched simulated runs (``--sim-time-scale``) leave
connections idle for seconds, which is why ``bench.client.serving`` keeps idle connections at
most ``KEEPALIVE_S``.

The probe serves a trivial POST endpoint with uvicorn (``--server-keepalive-s``) in a
child process and runs ``--connections`` clients; each sends a request, sleeps
``--idle-s`` (+- ``--jitter-s``) and sends again, ``--cycles`` times. It does this once
per client keep-alive in ``--client-keepalive-s`` and prints, for each, how many
requests succeeded and how many failed, by exception type. Nothing here is our engine:
it isolates the connection reuse the benchmark client does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import subprocess
import sys

from bench.cli import DefaultsHelpFormatter
from bench.client.serving import KEEPALIVE_S

AIOHTTP_DEFAULT_KEEPALIVE_S = 15.0
UVICORN_DEFAULT_KEEPALIVE_S = 5


def _app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def generate(request):
        await request.body()
        return JSONResponse({"text": ""})

    async def health(request):
        return Response()

    return Starlette(routes=[Route("/generate", generate, methods=["POST"]),
                             Route("/health", health)])


async def _client(session, url: str, cycles: int, idle_s: float, jitter_s: float,
                  rng: random.Random, counts: collections.Counter, bar) -> None:
    import aiohttp
    for i in range(cycles):
        try:
            async with session.post(url, json={"text": "x"}) as r:
                r.raise_for_status()
                await r.read()
            counts["ok"] += 1
        except (aiohttp.ClientError, OSError) as exc:
            counts[type(exc).__name__] += 1
        bar.update(1)
        if i + 1 < cycles:
            await asyncio.sleep(max(0.0, idle_s + rng.uniform(-jitter_s, jitter_s)))


async def _probe(url: str, client_keepalive_s: float, args, bar) -> collections.Counter:
    import aiohttp
    counts: collections.Counter = collections.Counter()
    rng = random.Random(args.seed)
    connector = aiohttp.TCPConnector(limit=args.connections, keepalive_timeout=client_keepalive_s)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        await asyncio.gather(*(_client(session, url, args.cycles, args.idle_s, args.jitter_s,
                                       rng, counts, bar)
                               for _ in range(args.connections)))
    return counts


def _serve(port: int, keepalive_s: float) -> None:
    import uvicorn
    uvicorn.run(_app(), host="127.0.0.1", port=port, log_level="warning",
                timeout_keep_alive=keepalive_s)


def run(args) -> dict[float, dict[str, int]]:
    """Per client keep-alive, the request outcomes ({"ok": n, "<Error>": n, ...})."""
    from tqdm import tqdm

    from bench.client.server import free_port, wait_healthy
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from bench.micro.keepalive import _serve; "
                             f"_serve({port}, {args.server_keepalive_s})"])
    results = {}
    try:
        base = f"http://127.0.0.1:{port}"
        if not wait_healthy(proc, base, 30):
            raise RuntimeError(f"the probe server did not start (exit code {proc.poll()})")
        url = base + "/generate"
        for keepalive in args.client_keepalive_s:
            with tqdm(total=args.connections * args.cycles, desc=f"client keep-alive {keepalive} s",
                      file=sys.stderr, disable=args.quiet) as bar:
                results[keepalive] = dict(asyncio.run(_probe(url, keepalive, args, bar)))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.micro.keepalive",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--connections", type=int, default=100, help="kept-alive connections probed")
    p.add_argument("--cycles", type=int, default=8, help="requests per connection")
    p.add_argument("--idle-s", type=float, default=float(UVICORN_DEFAULT_KEEPALIVE_S),
                   help="idle time between a connection's requests (default: the server's keep-alive)")
    p.add_argument("--jitter-s", type=float, default=0.01,
                   help="each idle time is --idle-s +- up to this, seconds")
    p.add_argument("--server-keepalive-s", type=float, default=float(UVICORN_DEFAULT_KEEPALIVE_S),
                   help="uvicorn's timeout_keep_alive (default: uvicorn's, which engine.serve uses)")
    p.add_argument("--client-keepalive-s", type=float, nargs="+",
                   default=[AIOHTTP_DEFAULT_KEEPALIVE_S, KEEPALIVE_S],
                   help="aiohttp keepalive_timeout values to probe (default: aiohttp's and "
                        "bench.client.serving's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the jitter")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("connections", "cycles"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("idle_s", "jitter_s"):
        if not 0 <= getattr(args, name) < float("inf"):
            p.error(f"--{name.replace('_', '-')} must be a number >= 0")
    if not all(0 < s < float("inf") for s in (args.server_keepalive_s, *args.client_keepalive_s)):
        p.error("keep-alive times must be numbers > 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    print(f"server keep-alive {args.server_keepalive_s} s; {args.connections} connections x "
          f"{args.cycles} requests, {args.idle_s} s +- {args.jitter_s} s idle between them")
    print("| client keep-alive, s | ok | failed | failures by type |")
    print("|---|---|---|---|")
    for keepalive, counts in results.items():
        failed = {k: v for k, v in counts.items() if k != "ok"}
        by_type = ", ".join(f"{k} {v}" for k, v in sorted(failed.items())) or "-"
        print(f"| {keepalive:g} | {counts.get('ok', 0)} | {sum(failed.values())} | {by_type} |")


if __name__ == "__main__":
    main()
