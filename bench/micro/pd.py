"""``python -m bench.micro.pd [--json PATH]``: the cost of the shared-memory bootstrap path.

Two figures, each with its target:

- ``bootstrap_resolve_us`` (target <= 50): median time from a request's arrival at a
  decode rank (its ``GenerateReq`` handled) to that rank knowing the prefill rank,
  through the route table. Measured inside real decode ``Scheduler``s
  (``tests.pd_local``: real tables and KV segments in shared memory, zero-cost
  simulated forward) on requests whose room the prefill dispatcher placed first, as
  the front door always does and a gateway usually does. The raw table look-up
  (``bootstrap_lookup_us``) is reported beside it.
- ``bootstrap_ttft_penalty_ms`` (target <= 1): mean TTFT of requests that go the
  bootstrap-table way minus mean TTFT of the same prompts sent with
  ``disagg_prefill_dp_rank`` (decode skips the route table), measured side by side
  in one run against a real ``python -m engine.serve --disaggregation-mode pd``
  (real tiny model on CPU by default, prefix caches off: a pair's second request
  would reuse the first's prompt): the two kinds alternate, one request at a time,
  over the same prompts; TTFT is the first streamed chunk with tokens.

SGLang's equivalent of the first figure is an HTTP round trip to the bootstrap server
(0.2-1 ms; about 200 ms of extra TTFT in the proof of concept of SGLang issue #13052).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.cli import DefaultsHelpFormatter, positive_int, writable_file
from bench.client.server import exit_on_sigterm, free_port, wait_healthy
from bench.stats import mean_ci95

REPO = Path(__file__).resolve().parent.parent
TARGET_RESOLVE_US = 50.0
TARGET_PENALTY_MS = 1.0


def measure_resolve(num_requests: int, seed: int = 0) -> dict:
    """Two orders: the decode half arrives while its prefill runs (the room is in the
    route table: the usual case, and the headline figure), or after its prefill ended
    (route entry gone: decode finds the room in the hand-off table instead)."""
    figures = {}
    for name, prefill_later in (("bootstrap_resolve", True), ("resolve_after_prefill", False)):
        resolve_ns, lookup_ns = _resolve_run(num_requests, prefill_later, seed)
        figures[f"{name}_us"] = statistics.median(resolve_ns) / 1e3
        figures[f"{name}_p99_us"] = resolve_ns[int(0.99 * (len(resolve_ns) - 1))] / 1e3
        figures[f"{name}_samples"] = len(resolve_ns)
    figures["bootstrap_lookup_us"] = lookup_ns / 1e3
    return figures


def _resolve_run(num_requests: int, prefill_later: bool, seed: int) -> tuple[list[int], float]:
    from engine.sampling import SamplingParams
    from tests.pd_local import LocalPD, sim_executor_factory

    rng = random.Random(seed)
    with LocalPD(4, 4, sim_executor_factory("instant", 1 << 16)) as pd:
        for i in range(num_requests):
            ids = [rng.randrange(3, 259) for _ in range(rng.randint(1, 64))]
            pd.submit(f"r{i}", ids, SamplingParams(max_new_tokens=2, temperature=0.0),
                      room=rng.getrandbits(63), decode_first=prefill_later)
            if i % 8 == 7:
                pd.run()
        pd.run()
        resolve_ns = sorted(ns for s in pd.schedulers["decode"] for ns in s.pd.resolve_ns)
        return resolve_ns, _lookup_cost(pd, rng)


def _lookup_cost(pd, rng) -> float:
    """Median ns of one route-table hit (the table filled with 1,000 live rooms)."""
    writer = pd.router.route
    rooms = [rng.getrandbits(63) for _ in range(1000)]
    for room in rooms:
        writer.insert(room, 0, 1 << 62)
    lookup = pd.route_table.lookup
    runs = []
    for _ in range(7):
        t0 = time.perf_counter_ns()
        for room in rooms:
            lookup(room)
        runs.append((time.perf_counter_ns() - t0) / len(rooms))
    for room in rooms:
        writer.remove(writer.slot_of(room))
    return statistics.median(runs)


# ---- TTFT through a real PD server ----------------------------------------------------------
def measure_penalty(num_pairs: int, executor: str, seed: int = 0) -> dict:
    port = free_port()
    flags = ["--port", str(port), "--disaggregation-mode", "pd", "--prefill-dp-size", "2",
             "--decode-dp-size", "2", "--device", "cpu", "--max-total-tokens", "16384",
             "--log-level", "warning", "--executor", executor, "--model-path", "tiny",
             # Each pair sends one prompt twice: with prefix caches the second of a pair
             # would hit (cache_aware steers the table's request to the rank holding it,
             # a named rank holds it half the time), and the figure would measure that.
             "--disable-radix-cache"]
    if executor == "sim":
        flags += ["--sim-profile", "tiny-cpu"]
    log = tempfile.NamedTemporaryFile(prefix="bench_pd_server_", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", *flags], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        print(f"PD server log: {log.name}", file=sys.stderr)
        _wait_healthy(proc, url)
        rng = random.Random(seed)
        ttft = {"bootstrap": [], "explicit": []}
        # TCP_NODELAY on our side too: httpx writes headers and body separately, and
        # Nagle + a delayed ACK could add ~40 ms to a request, drowning the figure.
        nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        with httpx.Client(timeout=60, transport=nodelay) as client:
            for i in range(num_pairs + 10):  # the first 10 pairs warm up
                ids = [rng.randrange(3, 259) for _ in range(rng.randint(16, 128))]
                order = ("bootstrap", "explicit") if i % 2 else ("explicit", "bootstrap")
                for kind in order:
                    extra = {"disagg_prefill_dp_rank": rng.randrange(2)} if kind == "explicit" else {}
                    t = _ttft(client, url, ids, extra)
                    if i >= 10:
                        ttft[kind].append(t)
    finally:
        _stop(proc)
        log.close()
    diffs = [a - b for a, b in zip(ttft["bootstrap"], ttft["explicit"])]
    return {**penalty_figures(diffs),
            "ttft_bootstrap_mean_ms": statistics.mean(ttft["bootstrap"]) * 1e3,
            "ttft_explicit_mean_ms": statistics.mean(ttft["explicit"]) * 1e3,
            "server_executor": executor}


def penalty_figures(diffs: list[float]) -> dict:
    """The TTFT penalty's figures from the paired differences (seconds, at least two):
    the mean with its 95% interval (Student's t: with a few pairs the normal's 1.96 is
    far too narrow), the median and a trimmed mean."""
    low, high = mean_ci95(diffs)
    mean = statistics.mean(diffs)
    cut = len(diffs) // 20  # 5% off each end: scheduler hiccups on a shared machine
    trimmed = sorted(diffs)[cut:len(diffs) - cut]
    return {"bootstrap_ttft_penalty_ms": mean * 1e3,
            "penalty_ci95_ms": (high - mean) * 1e3,
            "penalty_ci95_low_ms": low * 1e3, "penalty_ci95_high_ms": high * 1e3,
            "penalty_median_ms": statistics.median(diffs) * 1e3,
            "penalty_trimmed_mean_ms": statistics.mean(trimmed) * 1e3,
            "ttft_pairs": len(diffs)}


def penalty_verdict(figures: dict, target_ms: float = TARGET_PENALTY_MS) -> str:
    """"met" when the whole 95% interval of the penalty is within ``target_ms``, "missed"
    when all of it is above, else "undecided" (the interval covers the target: more
    ``--pairs`` narrow it)."""
    if figures["penalty_ci95_high_ms"] <= target_ms:
        return "met"
    if figures["penalty_ci95_low_ms"] > target_ms:
        return "missed"
    return "undecided"


def _ttft(client: httpx.Client, url: str, ids: list[int], extra: dict) -> float:
    payload = {"input_ids": ids, "stream": True, **extra,
               "sampling_params": {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}}
    start = time.perf_counter()
    first = None
    with client.stream("POST", url + "/generate", json=payload) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"output_ids":[]' not in line:
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("the stream carried no token")
    return first


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 120.0) -> None:
    if wait_healthy(proc, url, timeout_s):
        return
    if proc.poll() is not None:
        raise RuntimeError(f"the PD server exited with {proc.returncode}; see its log")
    raise TimeoutError("the PD server did not become healthy")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of its group still alive
    except ProcessLookupError:
        pass
    proc.wait(10)


def pair_count(text: str) -> int:
    """An integer >= 2: the TTFT pairs an interval of their mean needs at least."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (an interval needs two pairs), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.micro.pd",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--json", metavar="PATH", type=writable_file,
                        help="also write the figures here")
    parser.add_argument("--requests", type=positive_int, default=2000,
                        help="requests for the resolve figure")
    parser.add_argument("--pairs", type=pair_count, default=300,
                        help="TTFT pairs (bootstrap, explicit) after 10 warm-up pairs; "
                             "at least 2")
    parser.add_argument("--executor", choices=("real", "sim"), default="real",
                        help="the PD server's executor for the TTFT figure")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    figures = {**measure_resolve(args.requests), **measure_penalty(args.pairs, args.executor)}
    figures["targets"] = {"bootstrap_resolve_us": TARGET_RESOLVE_US,
                          "bootstrap_ttft_penalty_ms": TARGET_PENALTY_MS}
    # The penalty's target is met only when its whole 95% interval is within it.
    figures["penalty_target"] = penalty_verdict(figures)
    figures["meets_targets"] = (figures["bootstrap_resolve_us"] <= TARGET_RESOLVE_US
                                and figures["penalty_target"] == "met")
    for key, value in figures.items():
        print(f"{key:>28}: {value:.3f}" if isinstance(value, float) else f"{key:>28}: {value}")
    if figures["penalty_target"] == "undecided":
        print(f"the penalty's 95% interval covers the {TARGET_PENALTY_MS:g} ms target: "
              "run more --pairs to decide", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
