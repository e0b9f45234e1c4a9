"""``--api-server-count N``: N API processes on one port and one board, balancing as one.

The server tests run the real command over simulated ranks (``--executor sim`` with a
fixed step time, so requests last as long as the test needs); ``ServerProcess``
always stops the server and its group. The rank-side tests run the real
``Scheduler`` in-process over a real board.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from engine.sampling import SamplingParams
from scheduler.config import SchedulerConfig
from scheduler.messages import BatchOutput, GenerateReq
from scheduler.rank_io import retire_dispatcher
from scheduler.scheduler import Scheduler
from shm.board import LoadBoard, RankStatus
from shm.segment import new_launch_id
from sim.executor import SimExecutor, load_profile
from tests.server_helpers import (ServerProcess, child_pids, metric, pid_gone,
                                  wait_group_gone, write_sim_profile)


# ---- the rank side: outputs go back to their dispatcher; a dispatcher that dies ---------
def _gen(rid: str, dispatcher: int, prompt_len: int = 4, max_new: int = 1000) -> GenerateReq:
    return GenerateReq(rid=rid, input_ids=list(range(1, prompt_len + 1)),
                       sampling_params=SamplingParams(max_new_tokens=max_new, temperature=0.0,
                                                      ignore_eos=True),
                       dispatcher_id=dispatcher, counted_tokens=prompt_len)


@pytest.fixture
def rank_on_board():
    """A real scheduler for rank 0 of a 1-rank, 2-dispatcher board; what it sends, by
    dispatcher."""
    board = LoadBoard.create(1, 2, launch_id=new_launch_id())
    try:
        cfg = SchedulerConfig(dp_rank=0, board_name=board.name, num_dispatchers=2,
                              executor="sim", sim_profile="instant")
        row = board.rank_writer(0)
        row.set_status(RankStatus.READY)
        sent: dict[int, list[BatchOutput]] = {0: [], 1: []}
        sched = Scheduler(cfg, SimExecutor(load_profile("instant"), 8192), row,
                          lambda msg: None, send_to=lambda d, batch: sent[d].append(batch))
        yield board, sched, sent
    finally:
        board.close()


def _dispatch(board, sched, msgs: list[GenerateReq]) -> None:
    """As the API processes do: each counts its requests on the board, then sends."""
    writers = [board.dispatcher_writer(d) for d in range(2)]
    for m in msgs:
        writers[m.dispatcher_id].bump(0, m.counted_tokens)
    sched.step(msgs)


def test_outputs_go_to_the_dispatcher_that_sent_the_request(rank_on_board):
    board, sched, sent = rank_on_board
    _dispatch(board, sched, [_gen("a", 0), _gen("b", 1), _gen("c", 1)])
    sched.step([])
    got = {d: {out.rid for batch in batches for out in batch.outputs}
           for d, batches in sent.items()}
    assert got == {0: {"a"}, 1: {"b", "c"}}
    assert all(len(batch.outputs) > 0 for batches in sent.values() for batch in batches)


def test_a_dead_dispatchers_requests_end_and_its_counts_retire(rank_on_board):
    """Dispatcher 1 sent two requests and counted two more it never delivered (it died
    between the bump and the send): retiring it frees its requests and its in-flight
    count; dispatcher 0's request keeps running and counting."""
    board, sched, sent = rank_on_board
    writers = [board.dispatcher_writer(d) for d in range(2)]
    msgs = [_gen("keep", 0), _gen("x", 1), _gen("y", 1)]
    for m in msgs:
        writers[m.dispatcher_id].bump(0, m.counted_tokens)
    writers[1].bump(0, 7)
    writers[1].bump(0, 9)  # counted, never sent
    sched.step(msgs)
    snap = board.snapshot()
    assert int(snap.effective_reqs[0]) == 5 and int(snap.in_flight_reqs[0]) == 2

    assert retire_dispatcher(sched, board, 1, "its API process exited") == 2
    snap = board.snapshot()
    assert int(snap.effective_reqs[0]) == 1 and int(snap.in_flight_reqs[0]) == 0
    assert int(snap.effective_tokens[0]) == int(snap.num_tokens[0])
    assert set(sched.reqs) == {"keep"}
    sched.step([])
    assert sched.reqs.keys() == {"keep"} and int(board.snapshot().effective_reqs[0]) == 1


def test_abort_request_ends_any_dispatchers_request_and_answers_its_owner(rank_on_board):
    """/abort_request reaches a rank through one API process but acts on a request of
    another (a client abort acts on its own process's only); the abort finish goes to
    the request's own process, with the status that tells it from a failure."""
    from engine.finish import ABORT_REQUESTED
    from scheduler.messages import AbortReq
    from scheduler.rank_io import owned_by

    board, sched, sent = rank_on_board
    _dispatch(board, sched, [_gen("a", 0), _gen("b", 0), _gen("c", 1)])
    assert not owned_by(sched, 1, AbortReq(rid="a"))
    asked = AbortReq(rid="a", message="stop it", requested=True)
    assert owned_by(sched, 1, asked)
    sched.step([asked])
    ended = [o for batch in sent[0] for o in batch.outputs if o.finish_reason]
    assert [(o.rid, o.finish_reason) for o in ended] == [
        ("a", {"type": "abort", "message": "stop it", "status_code": ABORT_REQUESTED})]
    copies = [_gen("n_0", 1), _gen("n_1", 0)]
    for copy in copies:
        copy.group_rid = "n"  # a body's copies (n > 1) go with it; a lone n_2 does not
    _dispatch(board, sched, [*copies, _gen("n_2", 0)])
    sched.step([AbortReq(rid="n", requested=True)])
    assert {"n_0", "n_1"}.isdisjoint(sched.reqs) and "n_2" in sched.reqs
    sched.step([AbortReq(requested=True, abort_all=True, message="all")])
    assert not sched.reqs
    assert {o.rid for d in (0, 1) for batch in sent[d] for o in batch.outputs
            if o.finish_reason and o.finish_reason["message"] == "all"} == {"b", "c", "n_2"}
    assert int(board.snapshot().effective_reqs[0]) == 0


def test_rank_pipes_route_replies_and_report_a_closed_dispatcher():
    """A flush result goes to the API process that asked, stats to all; a request pipe
    that closes is reported once, as that dispatcher gone, and the others stay open."""
    import multiprocessing

    from scheduler.messages import (FlushCacheReq, FlushCacheResult, RankStats,
                                    decode_to_server, encode)
    from scheduler.rank_io import RankPipes

    req = [multiprocessing.Pipe(duplex=False) for _ in range(2)]  # (rank end, API end)
    out = [multiprocessing.Pipe(duplex=False) for _ in range(2)]  # (API end, rank end)
    pipes = RankPipes([r for r, _ in req], [w for _, w in out])
    req[1][1].send_bytes(encode(FlushCacheReq()))
    received, gone = pipes.receive(1.0)
    assert [(d, type(m)) for d, m in received] == [(1, FlushCacheReq)] and gone == []
    pipes.send(FlushCacheResult(dp_rank=0, success=True))
    stats = RankStats(dp_rank=0, num_running_reqs=0, num_used_tokens=0, token_usage=0.0,
                      num_queue_reqs=0, last_gen_throughput=0.0, decode_step_time_s=0.0,
                      num_decode_batches=0)
    pipes.send(stats)
    got = {d: [] for d in range(2)}
    for d in range(2):
        while out[d][0].poll(0.2):
            got[d].append(type(decode_to_server(out[d][0].recv_bytes())))
    assert got == {0: [RankStats], 1: [FlushCacheResult, RankStats]}
    req[0][1].close()
    received, gone = pipes.receive(1.0)
    assert (received, gone, pipes.is_open, pipes.any_open) == ([], [0], [False, True], True)
    pipes.send_to(0, stats)  # its outputs have nowhere to go: dropped, no error
    req[1][1].close()
    assert pipes.receive(1.0) == ([], [1]) and not pipes.any_open


def test_an_api_process_that_stops_reading_never_blocks_the_rank():
    """With several API processes, one that stops reading (stopped, its loop stuck) does
    not block the rank's sends (they blocked once its 64 KiB pipe was full, and with them
    the rank's loop and heartbeat): its outputs wait, in order, and reach it whole when it
    reads again; the others get theirs meanwhile. Once it is gone, what waited for it is
    let go."""
    import multiprocessing
    import threading

    from scheduler.messages import FlushCacheResult, decode_to_server
    from scheduler.rank_io import RankPipes
    from server.rank_pipe import FrameReader

    req = [multiprocessing.Pipe(duplex=False) for _ in range(2)]  # (rank end, API end)
    out = [multiprocessing.Pipe(duplex=False) for _ in range(2)]  # (API end, rank end)
    pipes = RankPipes([r for r, _ in req], [w for _, w in out])
    big = [FlushCacheResult(dp_rank=0, success=True, message=f"{i}:" + "x" * 1000)
           for i in range(300)]  # 300 KB: far more than the pipe holds
    sender = threading.Thread(target=lambda: [pipes.send_to(1, m) for m in big], daemon=True)
    sender.start()
    sender.join(5)
    assert not sender.is_alive()  # was: blocked on the full pipe for as long as nobody read
    pipes.send_to(0, big[0])
    assert out[0][0].poll(1) and decode_to_server(out[0][0].recv_bytes()) == big[0]
    reader, got = FrameReader(out[1][0]), []
    deadline = time.monotonic() + 10
    while len(got) < len(big):
        assert time.monotonic() < deadline, len(got)
        pipes.receive(0.01)  # the rank's loop writes what waits, as the reader drains
        got += [decode_to_server(f) for f in reader.read()[0]]
    assert got == big
    # It stops reading again, then goes away: what waited for it is dropped, no error.
    for message in big:
        pipes.send_to(1, message)
    assert pipes._outboxes[1].waiting
    req[1][1].close()
    out[1][0].close()
    assert pipes.receive(1.0) == ([], [1])
    assert not pipes._outboxes[1].waiting
    pipes.send_to(1, big[0])  # dropped, no error
    pipes.send_to(0, big[1])
    assert out[0][0].poll(1) and decode_to_server(out[0][0].recv_bytes()) == big[1]


def test_outputs_that_waited_reach_a_reader_whole_and_in_order_however_it_reads():
    """Frames sent while earlier ones wait go behind them, never into the pipe ahead of
    them, however the reader's partial reads make room; and while outputs wait the rank's
    loop polls often enough to hand them over soon after the reader drains."""
    import multiprocessing

    from scheduler.messages import FlushCacheResult, decode_to_server
    from scheduler.rank_io import RankPipes
    from server.rank_pipe import FrameReader

    req = [multiprocessing.Pipe(duplex=False) for _ in range(2)]
    out = [multiprocessing.Pipe(duplex=False) for _ in range(2)]
    pipes = RankPipes([r for r, _ in req], [w for _, w in out])
    sent = [FlushCacheResult(dp_rank=0, success=True, message=f"{i}:" + "y" * 10_000)
            for i in range(60)]
    reader, got = FrameReader(out[1][0]), []
    fd = out[1][0].fileno()
    for i, message in enumerate(sent):
        pipes.send_to(1, message)
        if i % 3 == 2:  # the reader takes a little: room for part of a frame
            reader._buf += os.read(fd, 3000)
    assert pipes._outboxes[1].waiting
    deadline = time.monotonic() + 10
    while len(got) < len(sent):
        assert time.monotonic() < deadline, len(got)
        started = time.monotonic()
        pipes.receive(1.0)  # nothing to receive: returns at the short poll while bytes wait
        assert time.monotonic() - started < 0.5 or not pipes._outboxes[1].waiting
        got += [decode_to_server(f) for f in reader.read()[0]]
    assert got == sent


# ---- the server ----------------------------------------------------------------------------
def _serve_flags(tmp_path: Path, step_s: float, dp_size: int, api_servers: int,
                 *extra: str) -> list[str]:
    profile = write_sim_profile(tmp_path / "profile.json", step_s=step_s)
    return ["--executor", "sim", "--sim-profile", profile, "--dp-size", str(dp_size),
            "--api-server-count", str(api_servers), *extra]


def _wait_all_serving(server: ServerProcess, n: int, timeout_s: float = 30.0) -> None:
    """Until the launcher logs that all ``n`` API processes serve."""
    deadline = time.monotonic() + timeout_s
    while f"behind {n} API processes" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


def _board(server: ServerProcess) -> LoadBoard:
    (name,) = [s for s in server.segments() if s.endswith(".board")]
    return LoadBoard.attach("/" + name.lstrip("/"))


def _wait_board(board: LoadBoard, done, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not done(snap := board.snapshot()):
        assert time.monotonic() < deadline, (what, snap)
        time.sleep(0.02)
    return snap


def _api_pids(server: ServerProcess) -> dict[int, int]:
    """dispatcher id -> pid of each API process (each answers /server_info for itself;
    fresh connections land on either)."""
    pids: dict[int, int] = {}
    deadline = time.monotonic() + 20
    while len(pids) < 2 and time.monotonic() < deadline:
        with httpx.Client() as client:  # a new connection each time
            d = client.get(server.url + "/server_info", timeout=5).json()["dispatch"]
        pids[d["dispatcher_id"]] = d["pid"]
    return pids


@pytest.mark.slow
def test_a_burst_over_two_api_processes_reads_25_per_rank(tmp_path):
    """100 long requests over 2 API processes, 4 ranks, total_requests: /get_load reads
    exactly 25 per rank once all are dispatched and before any completes (each lasts
    2000 steps of 50 ms); closing them drains the board to zero."""
    flags = _serve_flags(tmp_path, 0.05, 4, 2, "--load-balance-method", "total_requests")
    with ServerProcess(*flags, log_path=tmp_path / "server.log") as server:
        _wait_all_serving(server, 2)
        board = _board(server)
        try:
            asyncio.run(_burst_and_check(server, board))
        finally:
            board.close()


async def _burst_and_check(server: ServerProcess, board: LoadBoard) -> None:
    release = asyncio.Event()
    body = {"text": "a long one", "stream": True,
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)

    async def hold(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", server.url + "/generate", json=body) as r:
            assert r.status_code == 200
            await release.wait()

    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        tasks = [asyncio.create_task(hold(client)) for _ in range(100)]
        try:
            deadline = time.monotonic() + 30
            while sum(row["num_reqs"] for row in
                      (await client.get(server.url + "/get_load")).json()) < 100:
                assert time.monotonic() < deadline, "the burst was not dispatched in 30 s"
                assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]
                await asyncio.sleep(0.05)
            rows = (await client.get(server.url + "/get_load")).json()
            assert [row["num_reqs"] for row in rows] == [25, 25, 25, 25], rows
            snap = board.snapshot()
            per_api = snap.dispatched_reqs.sum(axis=1).tolist()
            assert sum(per_api) == 100 and min(per_api) > 0, per_api  # both served some
            assert not any(t.done() for t in tasks)  # none completed
        finally:
            release.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    _wait_board(board, lambda s: s.effective_reqs.sum() == 0 and s.effective_tokens.sum() == 0,
                10, "the board did not drain after the clients left")
    # Either API process's /metrics counts all 100 aborts (each counted its own).
    seen = {}
    deadline = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < deadline:
        with httpx.Client(base_url=server.url, timeout=5) as client:  # one connection
            pid = client.get("/server_info").json()["dispatch"]["pid"]
            seen[pid] = _metric(client.get("/metrics").text, "sglang:num_aborted_requests_total")
    assert len(seen) == 2 and set(seen.values()) == {100.0}, seen


def _metric(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name)


@pytest.mark.slow
def test_sigkill_of_one_api_process_under_load(tmp_path):
    """SIGKILL API process 1 while 40 requests run: its clients see errors, API process
    0's complete, the board drains to zero, and the server keeps serving and then
    stops clean."""
    flags = _serve_flags(tmp_path, 0.02, 2, 2)
    server = ServerProcess(*flags, log_path=tmp_path / "server.log")
    with server:
        _wait_all_serving(server, 2)
        pids = _api_pids(server)
        assert set(pids) == {0, 1} and set(pids.values()) <= set(child_pids(server.pid))
        board = _board(server)
        try:
            ok, failed, per_api = asyncio.run(_kill_under_load(server, board, pids[1]))
            assert per_api[1] > 0 and per_api[0] > 0, per_api
            assert (ok, failed) == (per_api[0], per_api[1])
            _wait_board(board, lambda s: (s.effective_reqs.sum() == 0
                                          and s.effective_tokens.sum() == 0
                                          and s.in_flight_reqs.sum() == 0),
                        10, "the board did not drain after the API process died")
        finally:
            board.close()
        r = httpx.post(server.url + "/generate", timeout=30, json={
            "text": "still here", "sampling_params": {"max_new_tokens": 3}})
        assert r.status_code == 200, r.text
        exits = [line for line in server.log().splitlines()
                 if "ERROR API process 1" in line and "exited" in line]
        assert len(exits) == 1, exits  # once, though its pipe and its sentinel both tell
        assert server.terminate(20) == 0
        assert wait_group_gone(server.pid) == []  # SIGTERM left no process
    assert server.segments() == []


async def _kill_under_load(server: ServerProcess, board: LoadBoard, victim: int):
    body = {"text": "under load", "sampling_params": {"max_new_tokens": 150, "ignore_eos": True}}
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        tasks = [asyncio.create_task(client.post(server.url + "/generate", json=body))
                 for _ in range(40)]
        snap = await asyncio.to_thread(_wait_board, board, lambda s: s.effective_reqs.sum() == 40,
                                       20, "40 requests were not dispatched")
        per_api = snap.dispatched_reqs.sum(axis=1).tolist()
        os.kill(victim, signal.SIGKILL)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert pid_gone(victim)
    ok = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 200]
    assert all(len(r.json()["output_ids"]) == 150 for r in ok)
    failed = [r for r in results if isinstance(r, httpx.HTTPError)]
    assert len(ok) + len(failed) == 40, results
    return len(ok), len(failed), per_api


# ---- N dispatchers in N processes: counts stay within 1 + N, and return to zero ---------
NUM_RANKS, NUM_APIS, PICKS_EACH = 4, 3, 150
STALE_NS = 10**12  # the test's ranks heartbeat once, at start


def _dispatcher_proc(board_name: str, d: int, seed: int, queues, start) -> None:
    """One API process's dispatcher: ``PICKS_EACH`` total_requests picks, each handed to
    its rank's queue, with random pauses between the board read and the bump (a
    preempted API process) and between picks."""
    import random

    from scheduler.dispatcher import Dispatcher

    rng = random.Random(seed)
    board = LoadBoard.attach(board_name)
    read = board.read_requests

    def slow_read():
        counts = read()
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0, 0.002))  # the window another dispatcher can race into
        return counts

    board.read_requests = slow_read
    dispatcher = Dispatcher(board, d, "total_requests", stale_ns=STALE_NS)
    start.wait(30)
    for _ in range(PICKS_EACH):
        tokens = rng.randint(1, 100)
        queues[dispatcher.pick(tokens)].put((d, tokens))
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0, 0.001))
    del dispatcher, board.read_requests
    board.close()


def _rank_proc(board_name: str, r: int, seed: int, inbox, finish) -> None:
    """A rank that acks what arrives at random moments and holds it (none completes),
    then, on ``finish``, completes everything."""
    import queue
    import random

    rng = random.Random(seed)
    board = LoadBoard.attach(board_name)
    row = board.rank_writer(r)
    acked_reqs, acked_tokens = [0] * NUM_APIS, [0] * NUM_APIS
    held = held_tokens = 0
    while not (finish.is_set() and inbox.empty()):
        try:
            d, tokens = inbox.get(timeout=0.01)
        except queue.Empty:
            continue
        time.sleep(rng.uniform(0, 0.001))
        acked_reqs[d] += 1
        acked_tokens[d] += tokens
        held, held_tokens = held + 1, held_tokens + tokens
        row.publish(held, held, held_tokens, acked_reqs, acked_tokens,
                    num_prefill_tokens=held_tokens, num_kv_tokens=0)
    row.publish(0, 0, 0, acked_reqs, acked_tokens, num_prefill_tokens=0, num_kv_tokens=0)
    del row
    board.close()


def test_n_dispatchers_in_processes_stay_within_1_plus_n_and_return_to_zero():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    board = LoadBoard.create(NUM_RANKS, NUM_APIS, launch_id=new_launch_id())
    procs = []
    try:
        now = time.monotonic_ns()
        for r in range(NUM_RANKS):
            w = board.rank_writer(r)
            w.heartbeat(now)
            w.set_status(RankStatus.READY)
        queues = [ctx.Queue() for _ in range(NUM_RANKS)]
        start, finish = ctx.Event(), ctx.Event()
        ranks = [ctx.Process(target=_rank_proc, args=(board.name, r, 100 + r, queues[r], finish))
                 for r in range(NUM_RANKS)]
        apis = [ctx.Process(target=_dispatcher_proc, args=(board.name, d, d, queues, start))
                for d in range(NUM_APIS)]
        procs = ranks + apis
        for p in procs:
            p.start()
        start.set()
        worst, samples = 0, 0
        while any(p.is_alive() for p in apis) or samples == 0:
            counts = board.read_requests()
            worst = max(worst, max(counts) - min(counts))
            samples += 1
        for p in apis:
            p.join(30)
            assert p.exitcode == 0
        counts = board.read_requests()
        assert sum(counts) == NUM_APIS * PICKS_EACH
        assert worst <= 1 + NUM_APIS, (worst, samples)
        assert max(counts) - min(counts) <= 1 + NUM_APIS, counts
        finish.set()
        for p in ranks:
            p.join(30)
            assert p.exitcode == 0
        snap = board.snapshot()
        assert board.read_requests() == [0] * NUM_RANKS
        assert snap.effective_tokens.tolist() == [0] * NUM_RANKS
        assert snap.in_flight_reqs.tolist() == [0] * NUM_RANKS
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        board.close()


@pytest.mark.slow
def test_pd_mode_over_two_api_processes(tmp_path):
    """``--disaggregation-mode pd`` with 2 API processes: every request completes, both
    API processes dispatch to both groups, each publishes routes in its own region of
    the route table, and the boards and the route table drain."""
    from shm.bootstrap import BootstrapTable

    flags = ["--executor", "sim", "--sim-profile",
             write_sim_profile(tmp_path / "profile.json", step_s=0.005),
             "--disaggregation-mode", "pd", "--prefill-dp-size", "2", "--decode-dp-size", "2",
             "--api-server-count", "2"]
    with ServerProcess(*flags, log_path=tmp_path / "server.log") as server:
        _wait_all_serving(server, 2)
        pids = _api_pids(server)
        segments = server.segments()
        boards = {kind: LoadBoard.attach(next(s for s in segments if s.endswith("." + kind)))
                  for kind in ("board-prefill", "board-decode")}
        route = BootstrapTable.attach(next(s for s in segments if s.endswith(".route")))
        try:
            assert sorted(route.region_writer_pid(d) for d in range(2)) == sorted(pids.values())
            results = asyncio.run(_send_many(server.url, 40, {
                "text": "disaggregated", "sampling_params": {"max_new_tokens": 20,
                                                             "ignore_eos": True}}))
            assert all(r.status_code == 200 for r in results), [r.text for r in results]
            assert all(len(r.json()["output_ids"]) == 20 for r in results)
            # The cache counters (per prefill rank) are summed over both API processes,
            # and each rank's hit rate is computed from its sums, whichever process is
            # scraped.
            metas = [r.json()["meta_info"] for r in results]
            text = httpx.get(server.url + "/metrics", timeout=5).text
            cached = [metric(text, "sglang:cached_tokens_total", dp_rank=r) for r in range(2)]
            prompt = [metric(text, "dpserve:cache_prompt_tokens_total", dp_rank=r)
                      for r in range(2)]
            assert sum(cached) == sum(m["cached_tokens"] for m in metas)
            assert sum(prompt) == sum(m["prompt_tokens"] for m in metas)
            for r in range(2):
                assert metric(text, "sglang:cache_hit_rate", dp_rank=r) == pytest.approx(
                    cached[r] / prompt[r] if prompt[r] else 0.0)
            for kind, board in boards.items():
                snap = _wait_board(board, lambda s: (s.effective_reqs.sum() == 0
                                                     and s.in_flight_reqs.sum() == 0),
                                   10, f"{kind} did not drain")
                per_api = snap.dispatched_reqs.sum(axis=1).tolist()
                assert sum(per_api) == 40 and min(per_api) > 0, (kind, per_api)
            assert route.num_live() == 0
        finally:
            route.close()
            for board in boards.values():
                board.close()
        assert server.terminate(20) == 0
    assert server.segments() == []


async def _send_many(url: str, n: int, body: dict) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        return await asyncio.gather(*(client.post(url + "/generate", json=body)
                                      for _ in range(n)))


# ---- behind SGLang's gateways ------------------------------------------------------------------
def _needs(kind: str):
    from tests.gateway_helpers import missing_gateway
    reason = missing_gateway(kind)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@pytest.mark.slow
@_needs("sglang-router")
@_needs("smg")
def test_behind_the_gateways(tmp_path):
    """sglang-router --dp-aware (it reads /server_info's dp_size and picks the rank) over
    a plain server, and smg PD --dp-aware over a prefill and a decode server, every
    server with 2 API processes:
    every request through each gateway completes, and both API processes of every
    server dispatched some."""
    from tests.gateway_helpers import Gateway, free_ports

    profile = write_sim_profile(tmp_path / "profile.json", step_s=0.005)
    sim = ["--executor", "sim", "--sim-profile", profile, "--api-server-count", "2"]
    (bootstrap_port,) = free_ports(1)
    pd = ["--disaggregation-bootstrap-port", str(bootstrap_port)]
    servers = {
        "plain": ServerProcess(*sim, "--dp-size", "2", log_path=tmp_path / "plain.log"),
        "prefill": ServerProcess(*sim, "--dp-size", "2", "--disaggregation-mode", "prefill", *pd,
                                 log_path=tmp_path / "prefill.log"),
        "decode": ServerProcess(*sim, "--dp-size", "2", "--disaggregation-mode", "decode", *pd,
                                log_path=tmp_path / "decode.log"),
    }
    body = {"text": "through a gateway", "sampling_params": {"max_new_tokens": 8,
                                                             "ignore_eos": True}}
    try:
        for s in servers.values():
            s.start()
            s.wait_healthy(60)
            _wait_all_serving(s, 2)
        boards = {name: _board_of(s) for name, s in servers.items()}
        with Gateway("sglang-router", "--worker-urls", servers["plain"].url, "--dp-aware",
                     "--policy", "round_robin", log_path=tmp_path / "router.log").start(2) as gw:
            _check_through(gw.url, body, 24)
        with Gateway("smg", "--pd-disaggregation", "--dp-aware", "--prefill",
                     servers["prefill"].url, str(bootstrap_port), "--decode",
                     servers["decode"].url, "--policy", "round_robin",
                     log_path=tmp_path / "smg.log").start(4) as gw:
            _check_through(gw.url, body, 24)
        for name, board in boards.items():
            snap = _wait_board(board, lambda s: s.effective_reqs.sum() == 0, 10, name)
            per_api = snap.dispatched_reqs.sum(axis=1).tolist()
            assert sum(per_api) >= 24 and min(per_api) > 0, (name, per_api)
            board.close()
    finally:
        for s in servers.values():
            s.stop()


def _board_of(server: ServerProcess) -> LoadBoard:
    (name,) = [s for s in server.segments() if ".board" in s]
    return LoadBoard.attach(name)


def _check_through(url: str, body: dict, n: int) -> None:
    results = asyncio.run(_send_many(url, n, body))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert all(len(r.json()["output_ids"]) == 8 for r in results)
