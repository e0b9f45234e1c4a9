"""``python -m bench.micro.pick_share``: ``Dispatcher.pick`` against the front door's CPU per request.

One server on the simulated executor with the ``instant`` profile (``--executor sim
--sim-profile instant --model-path tiny``: a forward pass costs nothing, so what the
API process spends is the request's whole cost to it) and ``--dp-size`` ranks, one per
balancing method asked for. Per method and round, in this one run:

- ``api_cpu_us``: the API process's user + system CPU time per one-token ``/generate``
  request (``bench.micro.http_stack.measure``: ``/proc/<pid>/stat`` before and after);
- ``submit_cpu_us``: the mean CPU time of ``EngineClient.submit`` over the same requests
  (checks, pick, encode, pipe send), from ``/server_info``'s ``dispatch`` figures;
- ``pick_us``: ``Dispatcher.pick`` with the same method on a board of the same shape in
  this process (``bench.micro.board.pick_bump_us``);
- ``pick_share``: ``pick_us / api_cpu_us``, which must stay under 3%.

The API CPU figure rests on ``/proc``'s clock ticks: one resting on too few is not
printed (``bench.micro.http_stack.too_few_ticks``), and the share is then not judged.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from bench.cli import DefaultsHelpFormatter, interrupted, rank_count
from bench.client.server import ServerProcess, dispatch_stats, exit_on_sigterm
from bench.micro.board import pick_bump_us
from bench.micro.http_stack import add_load_flags, measure, too_few_ticks

METHODS = ("total_requests", "total_tokens", "prefill_tokens")
MAX_PICK_SHARE = 0.03


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.micro.pick_share",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--dp-size", type=rank_count, default=2, help="simulated ranks behind the API")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="balancing methods, one server each")
    add_load_flags(p, requests=2000, what="method")
    return p


def run_round(server: ServerProcess, method: str, args) -> dict:
    before = dispatch_stats(server.url)
    api_cpu_us, rate, ticks = measure(server, args.requests, args.concurrency)
    after = dispatch_stats(server.url)
    n = after["num_requests"] - before["num_requests"]
    # Before any request (no --warmup) the server reports no mean: nothing spent yet.
    submit_cpu_us = ((after["mean_cpu_us"] or 0.0) * after["num_requests"]
                     - (before["mean_cpu_us"] or 0.0) * before["num_requests"]) / n
    pick_us = pick_bump_us(args.dp_size, method, calls=2000, batches=15)
    return {"api_cpu_us": api_cpu_us, "submit_cpu_us": submit_cpu_us, "pick_us": pick_us,
            "requests_per_s": rate, "api_cpu_ticks": ticks}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="pick_share.")
    print(f"server logs: {log_dir}", file=sys.stderr)
    flags = ["--executor", "sim", "--sim-profile", "instant", "--model-path", "tiny",
             "--dp-size", str(args.dp_size), "--log-level", "warning"]
    servers = {m: ServerProcess([*flags, "--load-balance-method", m],
                                os.path.join(log_dir, f"{m}.log")) for m in args.methods}
    rounds: dict[str, list[dict]] = {m: [] for m in args.methods}
    try:
        for server in servers.values():
            server.start()
            if args.warmup:
                measure(server, args.warmup, args.concurrency)
        for _ in range(args.rounds):  # methods take turns: drift hits them alike
            for m, server in servers.items():
                rounds[m].append(run_round(server, m, args))
    except KeyboardInterrupt:
        return interrupted(f"no figures; server logs in {log_dir}")
    finally:
        for server in servers.values():
            server.close()
    print(f"pick vs the API process's CPU per one-token /generate (dp-size {args.dp_size}, "
          f"{args.requests} requests x {args.rounds} rounds, {args.concurrency} concurrent, "
          "simulated instant ranks; medians over rounds)")
    print(f"{'method':<16}{'pick us':>9}{'submit us':>11}{'API us/req':>12}{'pick share':>12}")
    ok, notes = True, []
    for m, rows in rounds.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        few = too_few_ticks(min(r["api_cpu_ticks"] for r in rows), args.requests,
                            f"{m} API CPU per request")
        if few:
            notes.append(few)
            api, share = "-", "-"
        else:
            ratio = med["pick_us"] / med["api_cpu_us"]
            ok &= ratio < MAX_PICK_SHARE
            api, share = f"{med['api_cpu_us']:.0f}", f"{100 * ratio:.2f}%"
        print(f"{m:<16}{med['pick_us']:>9.2f}{med['submit_cpu_us']:>11.1f}{api:>12}{share:>12}")
    for note in notes:
        print(note)
    verdict = "not judged (too few CPU ticks)" if notes else ("ok" if ok else "MISSED")
    print(f"pick under {100 * MAX_PICK_SHARE:.0f}% of the API's CPU per request: {verdict}")
    return 0 if ok and not notes else 1


if __name__ == "__main__":
    raise SystemExit(main())
