"""The simulated executor's cost model, profiles and ``--sim-lockstep``.

Lockstep runs real processes (spawn) over a real segment: each rank drives its own
``SimExecutor`` the way the rank loop does (a forward per batch; an empty forward when
``wants_idle_steps``). Every process is joined or killed and the segment unlinked in
``finally``; every wait is bounded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from engine.sampling import SamplingParams
from scheduler.batching import ForwardItem
from sim.lockstep import CHECK_DEAD_AFTER_S, LockstepMember, LockstepSegment
from scheduler.request import Req
from sim.executor import PROFILE_DIR, SimExecutor, SimProfile, load_profile
from shm.segment import new_launch_id

# 5 ms a step plus 1 ms per prefill token.
PROFILE = SimProfile(name="test", base_s=0.005, prefill_token_s=0.001, prefill_attn_s=0.0,
                     decode_seq_s=0.0, decode_kv_s=0.0, max_total_num_tokens=4096,
                     context_len=2048, vocab_size=259)


def prefill_batch(n: int, rid: str = "r") -> list[ForwardItem]:
    req = Req(rid=rid, input_ids=[1] * n, params=SamplingParams(), dispatcher_id=0,
              counted_tokens=n)
    return [ForwardItem(req, req.input_ids, 0, True)]


# ---- profiles --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(PROFILE_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_profiles_load_and_say_where_they_come_from(path):
    profile = load_profile(path.stem)
    assert profile.name == path.stem
    assert profile.source
    assert profile.vocab_size == 259  # the sim server still detokenizes with tiny's tokenizer
    assert profile.max_total_num_tokens >= profile.context_len


def test_tiny_cpu_matches_the_real_tiny_rank_defaults():
    from engine.config import load_model_config
    from engine.executor import default_max_total_tokens

    config = load_model_config("tiny")
    profile = load_profile("tiny-cpu")
    assert profile.context_len == config.context_len
    assert profile.vocab_size == config.vocab_size
    assert profile.max_total_num_tokens == default_max_total_tokens(config, config.context_len)


def test_seed_profile_reproduces_the_published_step_times():
    p = load_profile("seed-qwen3-235b-dp4")
    prefill = p.step_time(prefill_batch(3500))  # 001: 4 ranks / 3.2 req/s
    assert prefill == pytest.approx(1.25, rel=0.01)
    decode = [ForwardItem(Req(rid=f"d{i}", input_ids=[1] * 1249, params=SamplingParams(),
                              dispatcher_id=0, counted_tokens=1249), [1], 1249, True)
              for i in range(23)]
    for item in decode:
        item.req.num_computed = 1249
    assert p.step_time(decode) == pytest.approx(0.04877, rel=0.03)  # 002: mean TPOT


def test_step_time_of_an_empty_batch_is_the_base_cost():
    assert PROFILE.step_time([]) == PROFILE.base_s
    assert PROFILE.step_time(prefill_batch(10)) == pytest.approx(0.015)


def test_without_lockstep_a_rank_never_wants_idle_steps():
    ex = SimExecutor(PROFILE)
    assert ex.wants_idle_steps is False
    assert ex.steps_in_lockstep is False  # the scheduler publishes after each batch only
    start = time.perf_counter()
    ex.forward(prefill_batch(5))
    assert 0.009 <= time.perf_counter() - start < 0.5  # 10 ms modelled; margin: a busy machine


def test_a_stretched_step_sleeps_its_cost_times_the_scale_and_counts_modelled_time():
    ex = SimExecutor(PROFILE, time_scale=3.0)
    start = time.perf_counter()
    ex.forward(prefill_batch(5))  # 10 ms modelled
    assert time.perf_counter() - start >= 0.030
    assert ex.busy_s == pytest.approx(0.010)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="time_scale"):
            SimExecutor(PROFILE, time_scale=bad)


# ---- lockstep across processes ---------------------------------------------------------------
def _rank(name: str, dp_rank: int, plan: list[int] | None, go, stop, out) -> None:
    """Run ``plan`` (prefill tokens per step; empty: an idle rank) like the rank loop.
    ``None``: join, then sleep until killed. Each rank reports on its own pipe and the
    killed one never touches ``go``: a process killed while holding a shared lock (a
    Queue's, an Event's) would leave the others waiting on it."""
    ex = SimExecutor(PROFILE, lockstep=LockstepMember.attach(name, dp_rank))
    out.send("joined")
    if plan is None:
        time.sleep(60)
        return
    go.wait(10)
    steps = []
    for n in plan:
        t0 = time.monotonic()
        ex.forward(prefill_batch(n, rid=f"{dp_rank}"))
        steps.append((t0, time.monotonic()))
    idle_steps = 0
    deadline = time.monotonic() + 10
    while not plan and not stop.is_set() and time.monotonic() < deadline:
        if ex.wants_idle_steps:
            ex.forward([])
            idle_steps += 1
        else:
            time.sleep(0.001)
    out.send({"steps": steps, "idle_steps": idle_steps})


def _recv(conn, timeout_s: float):
    if not conn.poll(timeout_s):
        raise TimeoutError(f"no message from a rank in {timeout_s} s")
    return conn.recv()


def _run_ranks(name: str, plans: list[list[int] | None], timeout_s: float = 20.0) -> dict:
    """Start one process per plan, wait until all joined, kill the ``None`` ones, run;
    returns each surviving rank's report."""
    ctx = mp.get_context("spawn")
    go, stop = ctx.Event(), ctx.Event()
    pipes = [ctx.Pipe(duplex=False) for _ in plans]
    procs = [ctx.Process(target=_rank, args=(name, r, plan, go, stop, pipes[r][1]), daemon=True)
             for r, plan in enumerate(plans)]
    results = {}
    try:
        for p in procs:
            p.start()
        for recv, _ in pipes:
            assert _recv(recv, timeout_s) == "joined"
        for rank in [r for r, plan in enumerate(plans) if plan is None]:
            procs[rank].kill()  # dies as a member: joined stays 1, its pid goes away
            procs[rank].join(5)
        go.set()
        for r, plan in enumerate(plans):  # busy ranks finish by themselves
            if plan:
                results[r] = _recv(pipes[r][0], timeout_s)
        stop.set()  # then the idle ones may stop
        for r, plan in enumerate(plans):
            if plan == []:
                results[r] = _recv(pipes[r][0], timeout_s)
    finally:
        stop.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for recv, send in pipes:
            recv.close()
            send.close()
    return results


@pytest.fixture
def segment():
    seg = LockstepSegment.create(3, new_launch_id())
    try:
        yield seg
    finally:
        seg.close()


def test_lockstep_steps_take_the_slowest_ranks_time_and_idle_ranks_keep_stepping(segment):
    num_steps = 6
    # Rank 0: 30 ms steps; rank 1: 6 ms steps; rank 2: no work at all.
    results = _run_ranks(segment.name, [[25] * num_steps, [1] * num_steps, []])
    slow, fast = results[0]["steps"], results[1]["steps"]
    fast_durations = [end - start for start, end in fast]
    # Without lockstep rank 1 would take 6 ms a step; here it waits for rank 0.
    assert sum(fast_durations) / num_steps >= 0.025, fast_durations
    # Every step ends together (both compute the same end; what differs is how late
    # the OS wakes each process, a few ms on a loaded two-core machine).
    gaps = [abs(end0 - end1) for (_, end0), (_, end1) in zip(slow, fast)]
    assert sorted(gaps)[len(gaps) // 2] < 0.004 and max(gaps) < 0.015, gaps
    total = slow[-1][1] - slow[0][0]
    assert total < num_steps * 0.030 * 1.6  # the idle rank never stalls the busy ones
    assert results[2]["idle_steps"] >= num_steps - 1


def test_a_member_that_died_does_not_hang_the_others(segment):
    start = time.monotonic()
    results = _run_ranks(segment.name, [[1] * 3, [1] * 3, None])
    assert len(results[0]["steps"]) == len(results[1]["steps"]) == 3
    assert time.monotonic() - start < CHECK_DEAD_AFTER_S + 10


def test_member_rejects_a_rank_outside_the_segment(segment):
    from shm.segment import SharedSegment

    with pytest.raises(ValueError, match="out of range"):
        LockstepMember(SharedSegment.attach(segment.name), 3)


def test_a_lone_member_steps_at_its_own_pace(segment):
    member = LockstepMember.attach(segment.name, 0)
    try:
        ex = SimExecutor(PROFILE, lockstep=member)
        assert not ex.wants_idle_steps
        assert ex.steps_in_lockstep  # the scheduler also publishes before each forward
        start = time.perf_counter()
        ex.forward(prefill_batch(5))
        assert 0.009 <= time.perf_counter() - start < 0.5  # 10 ms modelled; margin: a busy machine
        # It was busy: peers (none here) would be asked for one more step.
        assert ex.wants_idle_steps
        ex.forward([])
        assert not ex.wants_idle_steps
        assert member.row[0] == 1 and member.row[1] == os.getpid()
    finally:
        member.close()


# ---- lockstep through the real rank loop -----------------------------------------------------
def _serve_two_ranks(tmp_path, lockstep: bool) -> dict[str, float]:
    """Two ``run_scheduler`` processes; rank 0 gets a long prompt (4 chunks of 52 ms),
    rank 1 a short request (about 3 ms a step). Returns each request's seconds to finish."""
    import json

    from scheduler.config import SchedulerConfig
    from scheduler.messages import (BatchOutput, GenerateReq, RankReady, ShutdownReq,
                                    decode_to_server, encode)
    from scheduler.process import run_scheduler
    from shm.board import LoadBoard

    profile = tmp_path / "slow-prefill.json"
    profile.write_text(json.dumps({"name": "slow-prefill", "base_s": 0.002,
                                   "prefill_token_s": 0.001, "prefill_attn_s": 0.0,
                                   "decode_seq_s": 0.0, "decode_kv_s": 0.0,
                                   "max_total_num_tokens": 4096, "context_len": 2048,
                                   "vocab_size": 259, "source": "tests"}))
    launch_id = new_launch_id()
    board = LoadBoard.create(2, 1, launch_id=launch_id)
    seg = LockstepSegment.create(2, launch_id) if lockstep else None
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    try:
        for r in range(2):
            cfg = SchedulerConfig(dp_rank=r, board_name=board.name, executor="sim",
                                  sim_profile=str(profile), chunked_prefill_size=50,
                                  sim_lockstep_name=seg.name if seg else None,
                                  log_level="warning")
            req_recv, req_send = ctx.Pipe(duplex=False)
            out_recv, out_send = ctx.Pipe(duplex=False)
            procs.append(ctx.Process(target=run_scheduler, args=(cfg, req_recv, out_send),
                                     daemon=True))
            procs[-1].start()
            req_recv.close()
            out_send.close()
            conns.append((req_send, out_recv))
        for _, out in conns:
            assert out.poll(60), "a rank did not start in 60 s"
            assert isinstance(decode_to_server(out.recv_bytes()), RankReady)
        jobs = {0: ("long", 200, 4), 1: ("short", 2, 8)}
        start = time.monotonic()
        for r, (rid, prompt_len, max_new) in jobs.items():
            conns[r][0].send_bytes(encode(GenerateReq(
                rid=rid, input_ids=[5] * prompt_len, dispatcher_id=0, counted_tokens=prompt_len,
                sampling_params=SamplingParams(max_new_tokens=max_new, temperature=0.0,
                                               ignore_eos=True))))
        finished: dict[str, float] = {}
        deadline = time.monotonic() + 20
        while len(finished) < 2 and time.monotonic() < deadline:
            for _, out in conns:
                while out.poll(0):
                    msg = decode_to_server(out.recv_bytes())
                    assert isinstance(msg, BatchOutput)
                    for o in msg.outputs:
                        if o.finish_reason is not None:
                            finished[o.rid] = time.monotonic() - start
            time.sleep(0.001)
        for req_send, _ in conns:
            req_send.send_bytes(encode(ShutdownReq()))
        return finished
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for req_send, out in conns:
            req_send.close()
            out.close()
        if seg is not None:
            seg.close()
        board.close()


def test_rank_loop_without_lockstep_runs_each_rank_at_its_own_pace(tmp_path):
    finished = _serve_two_ranks(tmp_path, lockstep=False)
    assert finished["short"] < 0.15  # 8 steps of about 3 ms (and scheduling)
    assert 0.2 <= finished["long"] < 0.5  # 4 prefill chunks of 52 ms, 3 decode steps


def test_rank_loop_with_lockstep_waits_for_the_slowest_rank_and_never_stalls(tmp_path):
    finished = _serve_two_ranks(tmp_path, lockstep=True)
    # The short request's first steps last as long as rank 0's 52 ms prefill chunks.
    assert finished["short"] >= 0.15
    # The idle rank 1 keeps stepping once its request is done: rank 0 is not slowed
    # (alone it takes about 0.22 s; a rank 1 blocked on its 50 ms heartbeat would add
    # up to that per decode step).
    assert 0.2 <= finished["long"] < 0.35


def test_simulated_ranks_run_the_prefix_cache_and_pay_only_uncached_prefill():
    """The scheduler's cache works over the simulated pool: a repeated system prompt is a
    hit, and the modelled prefill time drops to the question plus attention over the
    cached prefix."""
    from scheduler.config import SchedulerConfig
    from scheduler.messages import GenerateReq
    from scheduler.scheduler import Scheduler
    from shm.board import LoadBoard
    from shm.segment import new_launch_id

    busy = {}
    for cache_off in (True, False):
        board = LoadBoard.create(1, 1, new_launch_id())
        try:
            profile = SimProfile(name="t", base_s=0.0, prefill_token_s=1e-6,
                                 prefill_attn_s=1e-9, decode_seq_s=0.0, decode_kv_s=0.0,
                                 max_total_num_tokens=8192, context_len=4096, vocab_size=259)
            executor = SimExecutor(profile, time_scale=1e-6)
            sent = []
            cfg = SchedulerConfig(dp_rank=0, board_name=board.name, executor="sim",
                                  disable_radix_cache=cache_off)
            sched = Scheduler(cfg, executor, board.rank_writer(0), sent.append)
            system = list(range(3, 2051))
            for i in range(2):
                ids = system + [100 + i] * 128
                board.dispatcher_writer(0).bump(0, len(ids))
                sched.step([GenerateReq(rid=f"q{i}", input_ids=ids, dispatcher_id=0,
                                        counted_tokens=len(ids),
                                        sampling_params=SamplingParams(max_new_tokens=1))])
                while sched.has_work:
                    sched.step([])
            cached = {o.rid: o.cached_tokens for b in sent for o in b.outputs}
            busy[cache_off] = executor.busy_s
            assert cached == ({"q0": 0, "q1": 0} if cache_off else {"q0": 0, "q1": 2048})
        finally:
            board.close()
    one_off = profile.prefill_token_s * 2176 + profile.prefill_attn_s * 2176 * 2176 / 2
    hit = profile.prefill_token_s * 128 + profile.prefill_attn_s * 128 * (2048 + 64)
    assert busy[True] == pytest.approx(2 * one_off, rel=0.05)
    assert busy[False] == pytest.approx(one_off + hit, rel=0.05)
