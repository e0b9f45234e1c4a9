"""The prefix cache under the real rank scheduler: greedy outputs equal with the cache
on and off (tiny model, the default model when cached, plain and PD), cache hits
reported, evictions and aborts at every stage leave no slot behind, /flush_cache's rank
side. The cache itself against a model: tests/test_radix_cache.py."""

from __future__ import annotations

import random

import pytest

from engine.model_source import DEFAULT_FOLDER, cache_dir
from scheduler.config import SchedulerConfig
from scheduler.messages import AbortReq, FlushCacheReq, FlushCacheResult, GenerateReq
from scheduler.scheduler import Scheduler
from shm.board import LoadBoard
from shm.segment import new_launch_id
from tests.board_helpers import read_effective
from tests.pd_helpers import greedy, real_executor
from tests.pd_local import LocalPD

FOREVER = 1 << 62
CHUNK = 64


def executor_for(model_path="tiny", pool=8192):
    from scheduler.process import make_executor
    cfg = SchedulerConfig(dp_rank=0, board_name="unused", executor="real", device="cpu",
                          model_path=model_path, max_total_tokens=pool)
    return make_executor(cfg)


@pytest.fixture(scope="module")
def tiny():
    return executor_for()


class Rank:
    """One in-process rank over a real board; ``run`` steps until idle."""

    def __init__(self, executor, **cfg_kw):
        self.board = LoadBoard.create(1, 1, new_launch_id())
        cfg = SchedulerConfig(dp_rank=0, board_name=self.board.name,
                              chunked_prefill_size=CHUNK, **cfg_kw)
        self.sent = []
        self.sched = Scheduler(cfg, executor, self.board.rank_writer(0), self.sent.append,
                               executor.tokenizer)
        self.dispatcher = self.board.dispatcher_writer(0)

    def deliver(self, msgs):
        for m in msgs:
            if isinstance(m, GenerateReq):
                self.dispatcher.bump(0, m.counted_tokens)
        self.sched.step(msgs)

    def run(self):
        for _ in range(20_000):
            if not self.sched.has_work:
                return
            self.sched.step([])
        raise AssertionError("the rank did not go idle")

    def outputs(self):
        ids, cached, finish = {}, {}, {}
        for batch in self.sent:
            for o in getattr(batch, "outputs", ()):
                ids.setdefault(o.rid, []).extend(o.new_token_ids)
                cached[o.rid] = o.cached_tokens
                if o.finish_reason is not None:
                    finish[o.rid] = o.finish_reason
        return ids, cached, finish

    def close(self):
        """Check nothing is held, empty the cache (the executor is shared), close."""
        try:
            assert self.sched.num_kv_in_use == 0
            assert read_effective(self.board, FOREVER)[:2] == ([0], [0])
            if self.sched.cache is not None:
                assert self.sched.cache.flush()
            assert self.sched.executor.kv.num_used == 0
        finally:
            self.board.close()


def req(rid, ids, max_new=6):
    return GenerateReq(rid=rid, input_ids=ids, sampling_params=greedy(max_new), dispatcher_id=0,
                       counted_tokens=len(ids))


def shared_prefix_waves(vocab_lo=3, vocab_hi=259, seed=5):
    """Waves of prompts over one 300-token base: prefixes of many lengths, a prompt that
    is wholly a prefix of another, the same prompt twice, prompts diverging inside a
    64-token chunk, unrelated ones. Each wave runs after the previous went idle, and the
    last wave arrives all at once."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(vocab_lo, vocab_hi) for _ in range(n)]  # noqa: E731
    base = tok(300)
    first = [("a", base[:250] + tok(5)), ("b", base[:100]), ("c", tok(40)), ("d", base[:64])]
    second = [("e", base[:250] + tok(7)), ("f", base[:100]), ("g", base[:100] + tok(30)),
              ("h", base[:37] + tok(3)), ("i", base[:255]), ("j", base[:1] + tok(20)),
              ("k", base[:64] + tok(1))]
    third = [(f"m{n}", base[:n] + tok(4)) for n in (0, 1, 63, 64, 65, 128, 129, 200, 299)]
    third += [("same1", base[:150]), ("same2", base[:150])]
    return [first, second, third]


def run_waves(executor, waves, **cfg_kw):
    rank = Rank(executor, **cfg_kw)
    try:
        for wave in waves:
            rank.deliver([req(rid, ids) for rid, ids in wave])
            rank.run()
        return rank.outputs()
    finally:
        rank.close()


def test_greedy_outputs_equal_with_the_cache_on_and_off_tiny(tiny):
    waves = shared_prefix_waves()
    off, off_cached, _ = run_waves(tiny, waves, disable_radix_cache=True)
    on, on_cached, _ = run_waves(tiny, waves)
    assert on == off
    assert set(off_cached.values()) == {0}
    # Hits where the waves make them certain (a hit never covers the last prompt token).
    # "b" arrives with "a" but is admitted after a's prompt is prefilled (64 tokens a
    # batch, first come first served), whose chunks are cached as they are computed.
    assert on_cached["b"] == 99 and on_cached["f"] == 99 and on_cached["i"] == 250
    assert on_cached["e"] == 250 and on_cached["g"] == 100 and on_cached["h"] == 37
    assert on_cached["k"] == 64 and on_cached["m129"] >= 129


def test_a_prompt_is_shared_while_its_request_still_decodes(tiny):
    """A request's prompt is cached once prefilled: one that shares it and arrives while
    the first still decodes reuses it (same outputs as without the cache), and two prompts
    prefilled side by side share what one cached first and keep one copy of the rest."""
    rng = random.Random(11)
    base = [rng.randrange(3, 259) for _ in range(200)]
    outs = {}
    for off in (True, False):
        rng = random.Random(12)
        rank = Rank(tiny, disable_radix_cache=off)
        try:
            rank.deliver([req("long", base + [7], max_new=40)])
            for _ in range(6):  # prefilled (4 chunks), then decoding
                rank.sched.step([])
            assert rank.sched.running and not rank.sched.running[0].is_prefilling
            if not off:  # the prompt's KV is the cache's while "long" decodes
                assert rank.sched.cache.protected_size == 201
            rank.deliver([req("late", base + [9, 10], max_new=5)])
            rank.run()
            fresh = [rng.randrange(3, 259) for _ in range(100)]
            rank.deliver([req("x", fresh + [4] * 20), req("y", fresh + [5] * 20)])
            rank.run()
            outs[off] = rank.outputs()
        finally:
            rank.close()
    (off_ids, _, _), (on_ids, on_cached, _) = outs[True], outs[False]
    assert on_ids == off_ids
    assert on_cached["long"] == 0 and on_cached["late"] == 200
    # y, admitted after x's first chunk, reuses it; the rest of the common prefix both
    # computed side by side is kept once (close(): no slot left after the flush).
    assert on_cached["x"] == 0 and on_cached["y"] == 64


def test_multi_turn_reuses_the_previous_answer(tiny):
    """Turn 2 resends turn 1's prompt and answer: all of it but the newest answer token
    (never computed) comes from the cache."""
    rng = random.Random(9)
    turn1 = [rng.randrange(3, 259) for _ in range(90)]
    outs = {}
    for cache_off in (True, False):
        rank = Rank(tiny, disable_radix_cache=cache_off)
        try:
            rank.deliver([req("t1", turn1, 8)])
            rank.run()
            answer = rank.outputs()[0]["t1"]
            rank.deliver([req("t2", turn1 + answer + [5, 6, 7], 8)])
            rank.run()
            outs[cache_off] = rank.outputs()
        finally:
            rank.close()
    assert outs[True][0] == outs[False][0]
    assert outs[False][1]["t2"] == 90 + 8 - 1


def test_pd_prefill_rank_reuses_its_cache_and_outputs_equal(tiny):
    """The cache lives on the prefill rank: a hit shortens its prefill; decode gets the
    whole prompt's KV as before, and outputs equal the cache-off run's."""
    waves = shared_prefix_waves()
    reference, _, _ = run_waves(tiny, waves, disable_radix_cache=True)
    with LocalPD(1, 1, real_executor, chunked_prefill_size=CHUNK) as pd:
        room = 0
        for wave in waves:
            for rid, ids in wave:
                room += 1
                pd.submit(rid, ids, greedy(6), room=room)
            pd.run()
            for _ in range(50):  # let the prefill rank see decode's releases
                pd.step(("prefill",))
        got = {rid: pd.output_ids(rid) for wave in waves for rid, _ in wave}
        cached = {rid: outs[-1].cached_tokens for rid, outs in pd.prefill_outputs.items()}
        assert pd.leftovers() == {k: 0 for k in pd.leftovers()}
    assert got == reference
    assert cached["f"] == 99 and cached["i"] == 250 and cached["e"] == 250


def test_small_pool_evicts_and_aborts_at_every_stage_leave_nothing(tiny):
    """A 700-token pool under a shared-prefix load several times its size: the cache
    evicts; requests aborted while queued, mid-prefill, decoding and after finishing.
    The others' outputs equal the cache-off run's; no slot is left held."""
    small = executor_for(pool=700)
    rng = random.Random(3)
    base = [rng.randrange(3, 259) for _ in range(200)]
    reqs = [(f"q{i}", base[:rng.choice((20, 64, 100, 150, 199))]
             + [rng.randrange(3, 259) for _ in range(rng.randint(1, 60))]) for i in range(40)]
    aborted = {f"q{i}": i % 5 for i in range(40) if i % 3 == 0}  # abort after 0-4 steps

    def run(cache_off):
        rank = Rank(small, disable_radix_cache=cache_off)
        evictions = []
        if rank.sched.cache is not None:
            real_evict = rank.sched.cache.evict
            rank.sched.cache.evict = lambda n: evictions.append(real_evict(n)) or evictions[-1]
        try:
            pending_aborts: dict[int, list[str]] = {}
            for step, i in enumerate(range(0, 40, 4)):
                batch = [req(rid, ids, 12) for rid, ids in reqs[i:i + 4]]
                for m in batch:
                    if m.rid in aborted:
                        pending_aborts.setdefault(step + aborted[m.rid], []).append(m.rid)
                rank.deliver(batch + [AbortReq(rid=r) for r in pending_aborts.pop(step, [])])
            step += 1
            while pending_aborts or rank.sched.has_work:
                rank.deliver([AbortReq(rid=r) for r in pending_aborts.pop(step, [])])
                step += 1
                assert step < 5000
            ids, cached, finish = rank.outputs()
        finally:
            rank.close()
        return ids, cached, finish, evictions

    off, _, off_finish, _ = run(True)
    on, cached, on_finish, evictions = run(False)
    assert sum(evictions) > 0 and sum(cached.values()) > 0
    kept = [rid for rid, _ in reqs if on_finish[rid]["type"] != "abort"
            and off_finish[rid]["type"] != "abort"]
    assert len(kept) >= 26
    assert {rid: on[rid] for rid in kept} == {rid: off[rid] for rid in kept}
    assert {r for r, f in on_finish.items() if f["type"] == "abort"} <= set(aborted)


def test_flush_is_refused_while_requests_are_held_then_empties_the_cache(tiny):
    rank = Rank(tiny)
    try:
        rank.deliver([req("x", list(range(3, 103)), 50)])
        rank.deliver([FlushCacheReq()])
        refused = [m for m in rank.sent if isinstance(m, FlushCacheResult)]
        assert len(refused) == 1 and not refused[0].success and "holds 1" in refused[0].message
        rank.run()
        assert rank.sched.cache.total_size > 0
        rank.deliver([FlushCacheReq()])
        done = [m for m in rank.sent if isinstance(m, FlushCacheResult)]
        assert done[-1].success and rank.sched.cache.total_size == 0
        assert rank.sched.executor.kv.num_used == 0
    finally:
        rank.close()


@pytest.mark.skipif(not (cache_dir() / "models" / DEFAULT_FOLDER / "config.json").is_file(),
                    reason="the default model is not cached (python -m engine.serve fetches it)")
def test_greedy_outputs_equal_with_the_cache_on_and_off_default_model():
    folder = str(cache_dir() / "models" / DEFAULT_FOLDER)
    executor = executor_for(folder, pool=4096)
    tok = executor.tokenizer
    system = tok.encode("You are a helpful assistant who answers in one short sentence. " * 6)
    questions = ["What is the capital of France?", "Name a prime number.", "What colour is the sky?"]
    waves = [[("s0", system[:40])], [("q0", system + tok.encode(questions[0]))],
             [(f"q{i}", system + tok.encode(q)) for i, q in enumerate(questions) if i],
             [("half", system[:len(system) // 2] + tok.encode("Say hi."))]]
    off, _, _ = run_waves(executor, waves, disable_radix_cache=True)
    on, cached, _ = run_waves(executor, waves)
    assert on == off
    assert cached["q0"] >= 40 and cached["q1"] >= len(system) and cached["q2"] >= len(system)
