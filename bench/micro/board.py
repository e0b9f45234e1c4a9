"""`python -m bench.micro.board`: the load board and bootstrap table against SGLang's ways.

Every figure is a median over batches (each batch times many calls and divides), in
microseconds, all measured in this one run:

- ``pick_bump_us_n{4,8,64}``: ``Dispatcher.pick`` with ``total_requests`` on a board of
  N live ranks: a read of every rank's load (single cells, see
  ``LoadBoard.read_requests``), the choice, the in-place bump.
- ``pick_bump_us_n8_{total_tokens,prefill_tokens}``: the same through the seqlocked
  row read (``LoadBoard.read_loads``), uncontended.
- ``seqlock_pick_us_n8_contended``: ``Dispatcher.pick`` with ``total_tokens``, whose
  read goes through every row's seqlock, at N=8 while another process publishes rows
  at about 100k rows/s (so readers do meet rows mid-write and retry).
- ``cache_aware_pick_us_n64_p4096_{miss,pending,half,full}``: ``Dispatcher.pick`` with
  ``cache_aware`` for a 4,096-token prompt at 64 live ranks whose prefix-cache
  summaries each hold 64 blocks of other prompts, hashing included: no rank holds the
  prompt's first block (``miss``; nor was it sent before); 16 ranks hold its first
  2,048 tokens (``half``); one rank holds all of it and 16 the first half (``full``);
  no rank holds it but the same prompt was just sent (``pending``: the dispatcher's
  memory of prompts being prefilled answers, ``scheduler.pending_prefix``; the prompt
  asked is a copy with its own int objects, as another request's is). ``hash_floor_us_p4096`` is
  CPython's ``hash(tuple(prompt))`` over the same 4,096 tokens, the least any
  content hash of the whole prompt costs in pure Python (``scheduler.prefix_hash``).
- ``bootstrap_lookup_us`` / ``bootstrap_insert_us``: a hit in a half-full table; an
  insert (followed, untimed, by its removal so the table stays half full).
- ``zmq_pickle_report_us`` / ``http_bootstrap_get_us``: SGLang's load report and
  bootstrap look-up, see ``bench.micro.baselines``. ``board_speedup_vs_zmq`` is the
  report's one-way delivery (how late a dispatcher learns a rank's load that way, most
  of it waking the receiver) over ``pick_bump_us_n8`` (reading every rank's load from
  the board and counting the request: all the board path does); not the same work, the
  same question answered. ``table_speedup_vs_http``: the GET over ``bootstrap_lookup_us``.

``--json PATH`` writes the figures plus the two ratios the targets are about.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import random
import statistics
import time

from bench.cli import interrupted, writable_file
from scheduler.dispatcher import Dispatcher
from shm.board import LoadBoard, RankStatus
from shm.bootstrap import BootstrapTable
from shm.prefix_summary import PrefixSummary, buckets_for
from shm.segment import new_launch_id

FOREVER_NS = 1 << 62


def median_us(fn, calls: int, batches: int, *arg) -> float:
    """Median over ``batches`` of the mean time of ``calls`` calls ``fn(*arg)`` (at most
    one argument). The loop calls ``fn`` itself, not a wrapper around it: a lambda
    would add a Python call per call, a sizeable part of what is measured."""
    per_call = []
    for _ in range(batches):
        if arg:
            a = arg[0]
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                fn(a)
        else:
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                fn()
        per_call.append((time.perf_counter_ns() - t0) / calls / 1000)
    return statistics.median(per_call)


def median_us_each(fn, items: list, batches: int) -> float:
    """``median_us`` with a different argument per call: ``fn(item)`` for each item."""
    per_call = []
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        for item in items:
            fn(item)
        per_call.append((time.perf_counter_ns() - t0) / len(items) / 1000)
    return statistics.median(per_call)


def live_board(num_ranks: int, num_dispatchers: int = 1) -> LoadBoard:
    board = LoadBoard.create(num_ranks, num_dispatchers, launch_id=new_launch_id())
    for r in range(num_ranks):
        row = board.rank_writer(r)
        row.set_status(RankStatus.READY)
        row.heartbeat()
    return board


def pick_bump_us(num_ranks: int, method: str = "total_requests", calls: int = 2000,
                 batches: int = 25) -> float:
    with live_board(num_ranks) as board:
        dispatcher = Dispatcher(board, 0, method, stale_ns=FOREVER_NS)
        return median_us(dispatcher.pick, calls, batches, 100)


def cache_aware_pick_us(num_ranks: int = 64, prompt_len: int = 4096) -> dict[str, float]:
    rng = random.Random(0)
    prompt = [rng.randrange(150_000) for _ in range(prompt_len)]
    fresh = prompt[:prompt_len // 2] + [rng.randrange(150_000) for _ in range(prompt_len // 2)]
    figures = {}
    with live_board(num_ranks) as board, PrefixSummary.create(
            num_ranks, buckets_for(1 << 20), new_launch_id()) as summary:
        writers = [summary.writer(r) for r in range(num_ranks)]
        for writer in writers:  # other prompts: 64 blocks a rank
            writer.on_cached([rng.randrange(150_000) for _ in range(4096)], 0)
        dispatcher = Dispatcher(board, 0, "cache_aware", stale_ns=FOREVER_NS, summary=summary)
        pick = functools.partial(dispatcher.pick, prompt_len, None, None)

        def pick_new(tokens):  # a prompt no pick has seen: forget the last one first
            dispatcher.pending.clear()
            return pick(tokens)
        figures["cache_aware_pick_us_n64_p4096_miss"] = median_us(pick_new, 500, 25, prompt)
        # Just sent (the memory of prompts being prefilled answers): the whole prompt shared.
        # Asked with a copy whose ints are other objects, as a second request's are (parsed
        # from its own JSON): comparing the same objects would skip every compare.
        again = [int(str(t)) for t in prompt]
        assert all(a is not b for a, b in zip(again, prompt) if a > 256)  # small ints are shared
        figures["cache_aware_pick_us_n64_p4096_pending"] = median_us(pick, 500, 25, again)
        for writer in writers[8:24]:
            writer.on_cached(prompt[:prompt_len // 2], 0)
        figures["cache_aware_pick_us_n64_p4096_half"] = median_us(pick, 500, 25, fresh)
        writers[3].on_cached(prompt, 0)
        assert summary.cached_tokens(prompt)[3] == prompt_len
        figures["cache_aware_pick_us_n64_p4096_full"] = median_us(pick, 500, 25, prompt)
        del writers, pick
    figures["hash_floor_us_p4096"] = median_us(hash_tuple, 500, 25, prompt)
    return figures


def hash_tuple(tokens: list[int]) -> int:
    return hash(tuple(tokens))


def _publisher(name: str, rows_per_s: int, stop, started) -> None:
    board = LoadBoard.attach(name)
    writers = [board.rank_writer(r) for r in range(board.num_ranks)]
    k = 0
    started.set()
    t_next = time.perf_counter()
    while not stop.is_set():
        for _ in range(100):  # 100 rows, then pace to the target rate
            k += 1
            writers[k % len(writers)].publish(k % 50, 0, k % 5000, [0], [0],
                                              num_prefill_tokens=k % 500,
                                              num_kv_tokens=k % 4500)
        t_next += 100 / rows_per_s
        delay = t_next - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    del writers
    board.close()


def seqlock_pick_contended_us(num_ranks: int = 8, rows_per_s: int = 100_000) -> tuple[float, float]:
    """(median pick+bump us, rows/s the publisher actually achieved)."""
    ctx = mp.get_context("spawn")
    stop, started = ctx.Event(), ctx.Event()
    with live_board(num_ranks) as board:
        proc = ctx.Process(target=_publisher, args=(board.name, rows_per_s, stop, started), daemon=True)
        proc.start()
        try:
            if not started.wait(30):
                raise RuntimeError("publisher did not start")
            # total_tokens: the method whose read goes through the row seqlocks.
            dispatcher = Dispatcher(board, 0, "total_tokens", stale_ns=FOREVER_NS)
            seq_before = int(board.snapshot().seq.sum())
            t0 = time.perf_counter()
            us = median_us(dispatcher.pick, 2000, 25, 100)
            elapsed = time.perf_counter() - t0
            rows_written = (int(board.snapshot().seq.sum()) - seq_before) / 2
            return us, rows_written / elapsed
        finally:
            stop.set()
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def bootstrap_us(slots: int = 4096) -> tuple[float, float]:
    """(lookup hit us, insert us) in a half-full single-region table."""
    with BootstrapTable.create(1, slots, launch_id=new_launch_id()) as table:
        writer = table.region_writer(0)
        rng = random.Random(0)
        rooms = [rng.getrandbits(63) for _ in range(slots // 2)]
        for room in rooms:
            writer.insert(room, room % 8, FOREVER_NS)
        probe = random.Random(1).choices(rooms, k=2000)
        lookup = median_us_each(table.lookup, probe, 25)
        fresh = iter(rng.getrandbits(63) for _ in range(10**7))
        times = []
        for _ in range(25):
            batch = [next(fresh) for _ in range(500)]
            t0 = time.perf_counter_ns()
            slots_used = [writer.insert(room, 1, FOREVER_NS) for room in batch]
            times.append((time.perf_counter_ns() - t0) / len(batch) / 1000)
            for slot in slots_used:
                writer.remove(slot)
        writer.close()
        return lookup, statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro.board",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", type=writable_file,
                        help="write every figure to PATH")
    parser.add_argument("--skip-baselines", action="store_true", help="skip the ZMQ and HTTP baselines")
    args = parser.parse_args(argv)
    try:
        figures = measure(args.skip_baselines)
    except KeyboardInterrupt:  # the contending writer process is stopped in its finally
        return interrupted("no figures")
    print_figures(figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def measure(skip_baselines: bool) -> dict[str, float]:
    """Every figure of the table."""
    figures: dict[str, float] = {}
    for n in (4, 8, 64):
        figures[f"pick_bump_us_n{n}"] = pick_bump_us(n)
    for method in ("total_tokens", "prefill_tokens"):
        figures[f"pick_bump_us_n8_{method}"] = pick_bump_us(8, method)
    figures["seqlock_pick_us_n8_contended"], figures["contending_rows_per_s"] = seqlock_pick_contended_us()
    figures.update(cache_aware_pick_us())
    figures["bootstrap_lookup_us"], figures["bootstrap_insert_us"] = bootstrap_us()
    if not skip_baselines:
        from bench.micro.baselines import http_bootstrap_get_us, zmq_pickle_report_us
        figures["zmq_pickle_report_us"] = zmq_pickle_report_us()
        figures["http_bootstrap_get_us"] = http_bootstrap_get_us()
        figures["board_speedup_vs_zmq"] = figures["zmq_pickle_report_us"] / figures["pick_bump_us_n8"]
        figures["table_speedup_vs_http"] = figures["http_bootstrap_get_us"] / figures["bootstrap_lookup_us"]
    return figures


def print_figures(figures: dict[str, float]) -> None:
    """The table: each figure, and its target where it has one."""
    targets = {"pick_bump_us_n8": ("<=", 2.0), "pick_bump_us_n64": ("<=", 4.0),
               "bootstrap_lookup_us": ("<=", 1.0),
               **{f"cache_aware_pick_us_n64_p4096_{case}": ("<=", 30.0)
                  for case in ("miss", "half", "full")}, "board_speedup_vs_zmq": (">=", 20.0),
               "table_speedup_vs_http": (">=", 300.0)}
    width = max(len("figure"), *map(len, figures)) + 2
    print(f"{'figure':<{width}}{'value':>12}  target")
    for key, value in figures.items():
        target = ""
        if key in targets:
            op, bound = targets[key]
            ok = value <= bound if op == "<=" else value >= bound
            target = f"{op} {bound:g}  {'ok' if ok else 'MISSED'}"
        print(f"{key:<{width}}{value:>12.2f}  {target}")


if __name__ == "__main__":
    raise SystemExit(main())
