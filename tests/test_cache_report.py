"""How the API reports the ranks' prefix caches, without rank processes: ``/flush_cache``'s
answers (``RankMonitor`` and ``wait_flushes``), ``cached_tokens`` through the request flow
and the PD front door, OpenAI's ``usage.prompt_tokens_details`` and the Prometheus
figures. tests/test_server_app.py checks the same through real ranks."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.finish import finish_from_json
from engine.sampling import SamplingParams
from engine.tiny import tiny_model_path
from engine.tokenizer import Tokenizer
from scheduler.messages import FlushCacheResult, ReqOutput
from server.engine_client import wait_flushes
from server.errors import ServiceUnavailable
from server.inflight import InFlight, MetricsObserver, RequestHandle
from server.metrics import ServerMetrics
from server.openai import _usage
from server.pd import _with_prefill_half
from server.prepared import PreparedRequest
from server.rank_monitor import RankMonitor
from server.request_flow import RunningRequest, run_to_end, start


class _Process:
    sentinel = -1

    def is_alive(self) -> bool:
        return False


def _monitor(num_ranks: int = 2, role: str = "mixed") -> tuple[RankMonitor, list]:
    ranks = [SimpleNamespace(dp_rank=r, process=_Process(), lost_reason=None, lost_at=0.0)
             for r in range(num_ranks)]
    never_beat = SimpleNamespace(heartbeat_ns=[0] * num_ranks)
    processes = SimpleNamespace(ranks=ranks, role=role, mark_dead=lambda rank: None,
                                board=SimpleNamespace(snapshot=lambda: never_beat))
    return RankMonitor(processes, InFlight(), stale_ns=10**9, abort=lambda h, m: None), ranks


def test_flush_answers_meet_their_callers_in_order_even_after_one_gave_up():
    async def run():
        monitor, ranks = _monitor()
        first, second = monitor.expect_flush(0), monitor.expect_flush(0)
        other = monitor.expect_flush(1)
        first.cancel()  # its caller timed out; its answer is still on the way
        monitor._on_message(ranks[0], FlushCacheResult(dp_rank=0, success=True))
        assert not second.done()  # the late answer was the cancelled caller's
        monitor._on_message(ranks[0], FlushCacheResult(dp_rank=0, success=False,
                                                       message="2 requests running"))
        monitor._on_message(ranks[1], FlushCacheResult(dp_rank=1, success=True))
        assert (second.result().success, second.result().message) == (False, "2 requests running")
        assert other.result().success
        monitor._on_message(ranks[1], FlushCacheResult(dp_rank=1, success=True))  # unasked: ignored
    asyncio.run(run())


def test_a_lost_rank_fails_its_flush_waiters_and_only_its_own():
    async def run():
        monitor, ranks = _monitor()
        lost, kept = monitor.expect_flush(1), monitor.expect_flush(0)
        monitor.rank_lost(ranks[1], "its process exited with code -9")
        with pytest.raises(ServiceUnavailable, match="rank 1 failed: its process exited"):
            lost.result()
        assert not kept.done()
    asyncio.run(run())


def test_a_pd_rank_that_fails_or_stalls_is_named_with_its_role():
    """The message a request's client gets (a stream's error event) says which rank
    failed: on a PD server, a prefill or a decode rank."""
    monitor, ranks = _monitor(role="decode")
    lost, stalled = RequestHandle("a", dp_rank=1, prompt_len=4), RequestHandle("b", 0, 4)
    for handle in (lost, stalled):
        monitor.inflight.add(handle)
    monitor.rank_lost(ranks[1], "its process exited with code -9")
    assert str(lost.queue.get_nowait()) == "decode rank 1 failed: its process exited with code -9"
    monitor._fail_stalled()  # rank 0 never beat
    assert str(stalled.queue.get_nowait()).startswith("decode rank 0 stopped responding")


def test_wait_flushes_gives_every_answer_or_a_503():
    async def run():
        loop = asyncio.get_running_loop()
        with pytest.raises(ServiceUnavailable, match="no rank"):
            await wait_flushes([], 1.0)
        answered, silent = loop.create_future(), loop.create_future()
        answered.set_result(FlushCacheResult(dp_rank=0, success=True))
        with pytest.raises(ServiceUnavailable, match="1 of 2 ranks did not answer .* 0.05 s"):
            await wait_flushes([answered, silent], 0.05)
        assert silent.cancelled()  # the rank monitor's FIFO pops it when the answer comes
        refused = loop.create_future()
        refused.set_result(FlushCacheResult(dp_rank=1, success=False, message="busy"))
        results = await wait_flushes([answered, refused], 1.0)
        assert [(r.dp_rank, r.success) for r in results] == [(0, True), (1, False)]
        lost = loop.create_future()
        lost.set_exception(ServiceUnavailable("rank 1 failed"))
        with pytest.raises(ServiceUnavailable, match="rank 1 failed"):
            await wait_flushes([answered, lost], 1.0)
    asyncio.run(run())


class _Recorder(MetricsObserver):
    def __init__(self):
        self.seen = []

    def on_prompt_cache(self, prompt_tokens: int, cached_tokens: int, dp_rank: int) -> None:
        self.seen.append((prompt_tokens, cached_tokens, dp_rank))


def _engine():
    """What ``RunningRequest`` uses of an engine client; a request's outputs are what its
    handle's queue holds (``InFlight.deliver`` puts them there)."""
    async def gen(handle):
        while True:
            out = handle.queue.get_nowait()
            yield out
            if out.finish_reason is not None:
                return
    return SimpleNamespace(tokenizer=Tokenizer.from_folder(tiny_model_path()),
                           args=SimpleNamespace(log_requests=False), outputs=gen,
                           observer=_Recorder())


@pytest.mark.parametrize("cache_rank", [-1, 3])
def test_cached_tokens_stay_once_reported_and_reach_the_observer_once(cache_rank):
    # A PD decode rank's later outputs say 0: the request keeps what its first said.
    # The observer hears the rank whose cache it was: the handle's cache_rank (a PD
    # front door's prefill rank) where set, else its dp_rank.
    outputs = [ReqOutput(rid="r", new_token_ids=[70], prompt_tokens=9, completion_tokens=1,
                         cached_tokens=6),
               ReqOutput(rid="r", new_token_ids=[71], prompt_tokens=9, completion_tokens=2,
                         finish_reason={"type": "length", "length": 2})]
    engine = _engine()
    prepared = PreparedRequest(rid="r", input_ids=list(range(60, 69)),
                               params=SamplingParams(max_new_tokens=2))
    handle = RequestHandle("r", dp_rank=1, prompt_len=9, cache_rank=cache_rank)
    running = RunningRequest(engine, prepared, handle)

    async def run():
        steps = []
        async for p in running.progress():
            steps.append(p)
        return steps
    for out in outputs:  # as InFlight.deliver types and queues them
        out.finish_reason = finish_from_json(out.finish_reason)
        handle.queue.put_nowait(out)
    steps = asyncio.run(run())
    assert [p.cached_tokens for p in steps] == [6, 6]
    assert engine.observer.seen == [(9, 6, 1 if cache_rank < 0 else cache_rank)]


def test_a_request_never_dispatched_is_not_a_cache_lookup():
    engine = _engine()
    prepared = PreparedRequest(rid="z", input_ids=[1, 2, 3],
                               params=SamplingParams(max_new_tokens=0))
    last = asyncio.run(run_to_end(start(engine, prepared)))
    assert last.cached_tokens == 0 and engine.observer.seen == []


def test_pd_first_output_keeps_the_cached_tokens_decode_read_from_the_hand_off():
    """Decode's outputs carry the prefill rank's cached tokens (the hand-off entry has
    them, ``scheduler.pd_decode``); merging the prefill half changes only logprobs."""
    decode_first = ReqOutput(rid="r", new_token_ids=[5], prompt_tokens=40, completion_tokens=1,
                             cached_tokens=32)
    prefill_first = ReqOutput(rid="r", new_token_ids=[5], prompt_tokens=40, completion_tokens=1,
                              cached_tokens=32, finish_reason={"type": "length", "length": 1})
    out = _with_prefill_half(decode_first, prefill_first)
    assert (out.cached_tokens, out.new_token_ids, out.finish_reason) == (32, [5], None)
    assert out.input_token_logprobs is None and out.output_logprobs is None


def _progress(prompt_tokens: int, completion_tokens: int, cached_tokens: int):
    return SimpleNamespace(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           cached_tokens=cached_tokens)


def test_usage_counts_each_prompts_cached_tokens_once():
    # Two prompts with n=2: the first choice of each prompt speaks for its prompt.
    results = [_progress(10, 3, 8), _progress(10, 3, 9), _progress(20, 4, 0), _progress(20, 4, 19)]
    assert _usage(results, 2) == {"prompt_tokens": 30, "completion_tokens": 14,
                                  "total_tokens": 44, "prompt_tokens_details": {"cached_tokens": 8}}
    assert _usage([_progress(5, 1, 0)], 1)["prompt_tokens_details"] == {"cached_tokens": 0}


def test_cache_hit_rate_and_cached_tokens_total_metrics_per_rank():
    """One series per rank from the start (0 before any request), each the rank's own
    cached over prompt tokens; ranks ordered by number, not as strings."""
    board = SimpleNamespace(num_ranks=0, snapshot=lambda: SimpleNamespace(in_flight_reqs=[]))
    engine = SimpleNamespace(args=SimpleNamespace(served_model_name="m"), board=board,
                             ranks=[], num_cache_ranks=11, role="mixed")
    engine.rank_groups = lambda: [engine]
    metrics = ServerMetrics(engine)

    def scrape(name: str) -> dict:
        text = generate_latest(metrics.registry).decode()
        return {s.labels["dp_rank"]: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == name}
    assert scrape("sglang:cache_hit_rate") == {str(r): 0.0 for r in range(11)}
    metrics.on_prompt_cache(100, 0, 10)
    metrics.on_prompt_cache(100, 60, 10)
    metrics.on_prompt_cache(50, 49, 2)
    assert scrape("sglang:cached_tokens_total") == {**{str(r): 0 for r in range(11)},
                                                    "10": 60, "2": 49}
    rates = scrape("sglang:cache_hit_rate")
    assert rates["10"] == pytest.approx(60 / 200) and rates["2"] == pytest.approx(49 / 50)
    assert rates["0"] == 0.0 and list(rates) == [str(r) for r in range(11)]
