"""``bench.client.serving``: the random dataset, the figures, the summary block, a real run.

The stream parsing runs against a small aiohttp stand-in server (exact chunk timing);
the end-to-end test drives a real ``python -m engine.serve --executor sim`` with the
zero-cost profile, bounded and always stopped.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections import Counter

import pytest
from aiohttp import web

from bench.client.backends import RequestResult, send_openai, send_sglang
from bench.client.dataset import (BenchRequest, arrival_offsets, length_range, random_requests,
                                  shared_prefix_requests)
from bench.client.metrics import STATS, format_summary, summarize
from bench.client.serving import BenchConfig, parse_config, run_benchmark, time_scale, to_model_time
from tests.server_helpers import REPO, ServerProcess

# The block of SGLang's bench_serving as SGLang PR #14726 prints it, without the
# "(retokenized)" line, which needs the model's tokenizer on the client.
SGLANG_BLOCK = """\
============ Serving Benchmark Result ============
Backend:
Traffic request rate:
Max request concurrency:
Successful requests:
Benchmark duration (s):
Total input tokens:
Total input text tokens:
Total input vision tokens:
Total generated tokens:
Request throughput (req/s):
Input token throughput (tok/s):
Output token throughput (tok/s):
Peak output token throughput (tok/s):
Peak concurrent requests:
Total token throughput (tok/s):
Concurrency:
----------------End-to-End Latency----------------
Mean E2E Latency (ms):
Median E2E Latency (ms):
---------------Time to First Token----------------
Mean TTFT (ms):
Median TTFT (ms):
P99 TTFT (ms):
-----Time per Output Token (excl. 1st token)------
Mean TPOT (ms):
Median TPOT (ms):
P99 TPOT (ms):
---------------Inter-Token Latency----------------
Mean ITL (ms):
Median ITL (ms):
P95 ITL (ms):
P99 ITL (ms):
Max ITL (ms):
=================================================="""


# ---- dataset ---------------------------------------------------------------------------------
@pytest.mark.parametrize("max_len,ratio", [(100, 0.5), (1500, 1.0), (7, 0.0), (3500, 0.25)])
def test_random_lengths_stay_in_range(max_len, ratio):
    low, high = length_range(max_len, ratio)
    assert (low, high) == (max(1, int(max_len * ratio)), max_len)
    reqs = random_requests(300, max_len, max_len, ratio, seed=3)
    for r in reqs:
        assert low <= r.prompt_len == len(r.prompt) <= high
        assert low <= r.output_len <= high
        assert all(0 <= t < 256 for t in r.prompt)
    if low < high:
        assert len({r.prompt_len for r in reqs}) > 1


def test_random_dataset_is_deterministic_by_seed():
    a = random_requests(50, 200, 50, 0.3, seed=7)
    assert a == random_requests(50, 200, 50, 0.3, seed=7)
    assert a != random_requests(50, 200, 50, 0.3, seed=8)
    text = random_requests(50, 200, 50, 0.3, seed=7, as_text=True)
    assert [len(r.prompt) for r in text] == [r.prompt_len for r in a]  # one char per token
    assert all(isinstance(r.prompt, str) and r.prompt.isascii() for r in text)


def test_seeded_rooms_leave_the_prompts_alone_and_repeat_by_seed():
    plain = random_requests(50, 200, 50, 0.3, seed=7)
    with_rooms = random_requests(50, 200, 50, 0.3, seed=7, rooms=True)
    assert all(r.bootstrap_room is None for r in plain)
    assert [(r.prompt, r.output_len) for r in with_rooms] == [(r.prompt, r.output_len) for r in plain]
    rooms = [r.bootstrap_room for r in with_rooms]
    assert rooms == [r.bootstrap_room for r in random_requests(50, 200, 50, 0.3, 7, rooms=True)]
    assert rooms != [r.bootstrap_room for r in random_requests(50, 200, 50, 0.3, 8, rooms=True)]
    assert len(set(rooms)) == 50 and all(0 <= r < 2**63 for r in rooms)
    assert len({r % 4 for r in rooms}) == 4  # spread over ranks like random rooms
    with pytest.raises(SystemExit):  # argparse: a clear error, not a traceback
        parse_config(["--backend", "openai", "--seeded-bootstrap-rooms"])


def test_arrivals_are_poisson_and_deterministic():
    offsets = arrival_offsets(4000, 8.0, seed=1)
    assert offsets == arrival_offsets(4000, 8.0, seed=1)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets[-1] / 3999 == pytest.approx(1 / 8.0, rel=0.08)
    assert arrival_offsets(5, math.inf, seed=1) == [0.0] * 5
    with pytest.raises(ValueError):
        arrival_offsets(5, 0.0, seed=1)


# ---- generated-shared-prefix ---------------------------------------------------------------
def test_shared_prefix_flags_have_sglangs_names_and_defaults():
    cfg = parse_config(["--dataset-name", "generated-shared-prefix"])
    assert (cfg.gsp_num_groups, cfg.gsp_prompts_per_group, cfg.gsp_system_prompt_len,
            cfg.gsp_question_len, cfg.gsp_output_len, cfg.gsp_range_ratio,
            cfg.gsp_num_turns) == (64, 16, 2048, 128, 256, 1.0, 1)
    cfg = parse_config(["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "3",
                        "--gsp-prompts-per-group", "2", "--gsp-system-prompt-len", "40",
                        "--gsp-question-len", "5", "--gsp-output-len", "6",
                        "--gsp-range-ratio", "0.5", "--gsp-num-turns", "4", "--gsp-ordered",
                        "--flush-cache"])
    assert (cfg.gsp_num_groups, cfg.gsp_prompts_per_group, cfg.gsp_system_prompt_len,
            cfg.gsp_question_len, cfg.gsp_output_len, cfg.gsp_range_ratio, cfg.gsp_num_turns,
            cfg.gsp_ordered, cfg.flush_cache) == (3, 2, 40, 5, 6, 0.5, 4, True, True)


@pytest.mark.parametrize("flags, message", [
    (["--gsp-num-turns", "0"], "--gsp-num-turns must be >= 1"),
    (["--gsp-system-prompt-len", "0"], "--gsp-system-prompt-len must be >= 1"),
    (["--gsp-range-ratio", "1.5"], "--gsp-range-ratio must be in"),
    (["--seeded-bootstrap-rooms"], "works with --dataset-name random"),
    (["--gsp-group-distribution", "zipf"], "needs --gsp-zipf-alpha"),
    (["--gsp-group-distribution", "zipf", "--gsp-zipf-alpha", "0"], "needs --gsp-zipf-alpha"),
    (["--gsp-group-distribution", "zipf", "--gsp-zipf-alpha", "nan"], "needs --gsp-zipf-alpha"),
    (["--gsp-zipf-alpha", "1.2"], "only with --gsp-group-distribution zipf"),
    (["--gsp-group-distribution", "pareto"], "invalid choice"),
    (["--gsp-group-distribution", "zipf", "--gsp-zipf-alpha", "1", "--gsp-hot-share", "0.5"],
     "give one")])
def test_shared_prefix_flags_out_of_range_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--dataset-name", "generated-shared-prefix", *flags])
    assert message in capsys.readouterr().err


def test_shared_prefix_groups_share_their_system_prompt_exactly():
    reqs = shared_prefix_requests(4, 3, 50, 8, 6, 1.0, seed=7, ordered=True)
    assert len(reqs) == 12 and all(r.prompt_len == len(r.prompt) == 58 for r in reqs)
    assert all(r.output_len == 6 and r.later_questions == () for r in reqs)
    for g in range(4):
        group = reqs[3 * g:3 * g + 3]
        assert all(r.prompt[:50] == group[0].prompt[:50] for r in group)  # one system prompt
        assert len({tuple(r.prompt[50:]) for r in group}) == 3  # its own question each
    assert len({tuple(reqs[3 * g].prompt[:50]) for g in range(4)}) == 4
    shuffled = shared_prefix_requests(4, 3, 50, 8, 6, 1.0, seed=7)
    assert shuffled == shared_prefix_requests(4, 3, 50, 8, 6, 1.0, seed=7)  # by seed
    assert shuffled != reqs and sorted(map(str, shuffled)) == sorted(map(str, reqs))
    ranged = shared_prefix_requests(4, 3, 50, 8, 6, 0.5, seed=7, num_turns=3)
    assert all(len(r.later_questions) == 2 and 25 + 4 <= r.prompt_len <= 58 for r in ranged)
    assert all(3 <= r.output_len <= 6 for r in ranged)
    text = shared_prefix_requests(2, 2, 30, 5, 4, 1.0, seed=7, as_text=True, ordered=True)
    assert isinstance(text[0].prompt, str) and text[0].prompt[:30] == text[1].prompt[:30]


def test_zipf_groups_keep_the_uniform_questions_and_favour_low_ranks():
    """SGLang's --gsp-group-distribution zipf: the same questions and lengths as the
    uniform run of the seed, each request's system prompt drawn by 1/rank**alpha."""
    uniform = shared_prefix_requests(40, 50, 64, 8, 6, 1.0, seed=5, ordered=True)
    zipf = shared_prefix_requests(40, 50, 64, 8, 6, 1.0, seed=5, ordered=True,
                                  group_distribution="zipf", zipf_alpha=1.5)
    assert zipf == shared_prefix_requests(40, 50, 64, 8, 6, 1.0, seed=5, ordered=True,
                                          group_distribution="zipf", zipf_alpha=1.5)
    assert len(zipf) == len(uniform) == 2000
    assert [r.prompt[64:] for r in zipf] == [r.prompt[64:] for r in uniform]
    systems = [tuple(uniform[50 * g].prompt[:64]) for g in range(40)]
    counts = Counter(systems.index(tuple(r.prompt[:64])) for r in zipf)
    weights = [1 / (g + 1) ** 1.5 for g in range(40)]
    share = [w / sum(weights) for w in weights]  # group 0: 0.41 of the requests
    for g in (0, 1, 2):  # within 5 standard deviations of the binomial
        sd = (2000 * share[g] * (1 - share[g])) ** 0.5
        assert abs(counts[g] - 2000 * share[g]) < 5 * sd, (g, counts[g], 2000 * share[g])
    assert counts[0] > counts[1] > counts[2] > max(counts[g] for g in range(10, 40))


def test_a_later_turn_resends_the_conversation_and_its_answer():
    (first,) = shared_prefix_requests(1, 1, 10, 4, 3, 1.0, seed=1, num_turns=3)
    second = first.next_turn([201, 202, 203])
    assert second.prompt == first.prompt + [201, 202, 203] + first.later_questions[0]
    assert second.prompt_len == 10 + 4 + 3 + 4 and second.output_len == 3
    third = second.next_turn([204])
    assert third.prompt[:len(second.prompt)] == second.prompt and third.later_questions == ()


# ---- figures and the block -------------------------------------------------------------------
def _result(start, ttft, latency, output_len, itl, dp_rank=None, prompt_len=10) -> RequestResult:
    chunks = [(ttft, 1)] + [(ttft + sum(itl[:i + 1]), 1) for i in range(len(itl))]
    return RequestResult(prompt_len=prompt_len, output_len=output_len, success=True,
                         start_time=start, ttft=ttft, latency=latency, itl=list(itl),
                         chunks=chunks, dp_rank=dp_rank)


def test_figures_follow_sglangs_definitions():
    results = [_result(100.0, 0.1, 0.5, 5, [0.1] * 4, dp_rank=0),
               _result(100.2, 0.3, 1.1, 9, [0.1] * 8, dp_rank=1),
               _result(100.4, 0.2, 0.2, 1, [], dp_rank=1),
               RequestResult(prompt_len=10, error="HTTP 503", start_time=100.5)]
    f = summarize(results, duration_s=2.0, bench_start=100.0)
    assert (f["completed"], f["failed"]) == (3, 1)
    assert f["total_input_tokens"] == 30 and f["total_output_tokens"] == 15
    assert f["request_throughput"] == pytest.approx(1.5)
    assert f["output_throughput"] == pytest.approx(7.5)
    assert f["concurrency"] == pytest.approx((0.5 + 1.1 + 0.2) / 2.0)
    assert f["mean_ttft_ms"] == pytest.approx(200.0)
    # TPOT = (E2E - TTFT) / (output_len - 1), only for requests with > 1 token.
    assert f["mean_tpot_ms"] == pytest.approx(100.0)
    assert f["mean_itl_ms"] == pytest.approx(100.0) and f["max_itl_ms"] == pytest.approx(100.0)
    assert f["peak_concurrent_requests"] == 3
    assert f["requests_per_dp_rank"] == {"0": 1, "1": 2}
    assert f["output_tokens_per_dp_rank"] == {"0": 5, "1": 10}


def test_a_run_whose_requests_all_failed_has_no_figures_not_zeros():
    """0.0 ms would read as the best TTFT of all (a ratio of 0 against another method):
    an empty distribution is None, printed "-", null in the JSON line."""
    failed = [RequestResult(prompt_len=10, error="HTTP 503", start_time=100.0 + i / 10,
                            latency=0.05) for i in range(3)]
    f = summarize(failed, duration_s=0.25, bench_start=100.0)
    assert (f["completed"], f["failed"]) == (0, 3)
    for name in ("e2e_latency", "ttft", "tpot", "itl"):
        assert all(f[f"{stat}_{name}_ms"] is None for stat in STATS), name
    f.update(backend="sglang", request_rate=1.0, max_concurrency=None)
    rows = {l[:40].rstrip(): l[41:].rstrip() for l in format_summary(f).splitlines() if ":" in l}
    assert rows["Mean TTFT (ms):"] == rows["P99 TPOT (ms):"] == "-"
    assert rows["Successful requests:"] == "0"
    # One-token outputs only: no TPOT and no ITL, whatever the TTFT.
    one = summarize([_result(0.0, 0.1, 0.1, 1, [])], 1.0, 0.0)
    assert one["mean_ttft_ms"] == pytest.approx(100.0)
    assert one["mean_tpot_ms"] is None and one["max_itl_ms"] is None


def _streamed(start, times, tokens_each=1) -> RequestResult:
    """A request sent at ``start`` whose tokens arrived at ``times`` (s after sending)."""
    return RequestResult(prompt_len=10, output_len=tokens_each * len(times), success=True,
                         start_time=start, ttft=times[0], latency=times[-1],
                         chunks=[(t, tokens_each) for t in times])


def test_peak_output_throughput_counts_full_seconds_and_is_never_below_the_mean():
    # A 0.63 s run: no full second; its tokens per second over the run, not per bucket.
    short = [_streamed(0.0, [0.01 * i for i in range(1, 64)], tokens_each=5)]
    f = summarize(short, duration_s=0.63, bench_start=0.0)
    assert f["peak_output_throughput"] == pytest.approx(f["output_throughput"]) == \
        pytest.approx(315 / 0.63)
    # 1.5 s: a quiet first second (10 tokens), a busy last half second (90): the partial
    # bucket is left out and the whole run's 100 / 1.5 sets the figure.
    tail = [_streamed(0.0, [0.1 * i for i in range(1, 11)]),
            _streamed(0.0, [1.0 + 0.005 * i for i in range(1, 91)])]
    f = summarize(tail, duration_s=1.5, bench_start=0.0)
    assert f["peak_output_throughput"] == pytest.approx(100 / 1.5)
    # A busy full second beats the mean: 80 tokens in [1, 2), 20 spread over [0, 1) and [2, 3).
    burst = [_streamed(10.0, [0.05 + 0.1 * i for i in range(10)]),
             _streamed(10.0, [1.0 + 0.01 * i for i in range(80)]),
             _streamed(10.0, [2.0 + 0.1 * i for i in range(10)])]
    f = summarize(burst, duration_s=3.0, bench_start=10.0)
    assert f["peak_output_throughput"] == 80.0 > f["output_throughput"]


def test_summary_block_has_sglangs_layout():
    f = summarize([_result(0.0, 0.1, 0.5, 5, [0.1] * 4)], 1.0, 0.0)
    f.update(backend="sglang", request_rate=3.2, max_concurrency=200)
    block = format_summary(f)
    lines = block.splitlines()
    assert [line.split(":")[0] + (":" if ":" in line else "") for line in lines] == \
        SGLANG_BLOCK.splitlines()
    rows = {line[:40].rstrip(): line[41:].rstrip() for line in lines if ":" in line}
    assert all(line[40] == " " for line in lines if ":" in line)  # {:<40} {:<10}
    assert rows["Backend:"] == "sglang"
    assert rows["Traffic request rate:"] == "3.2"
    assert rows["Max request concurrency:"] == "200"
    assert rows["Successful requests:"] == "1"
    assert rows["Mean TTFT (ms):"] == "100.00"
    f.update(request_rate=math.inf, max_concurrency=None)
    rows = {l[:40].rstrip(): l[41:].rstrip() for l in format_summary(f).splitlines() if ":" in l}
    assert rows["Traffic request rate:"] == "inf"
    assert rows["Max request concurrency:"] == "not set"


def test_cache_hit_rate_is_cached_over_input_tokens_of_the_requests_that_report_it():
    results = [_result(0.0, 0.1, 0.5, 5, [0.1] * 4, prompt_len=100),
               _result(0.0, 0.1, 0.5, 5, [0.1] * 4, prompt_len=100),
               _result(0.0, 0.1, 0.5, 5, [0.1] * 4, prompt_len=40)]
    f = summarize(results, 1.0, 0.0)
    assert f["total_cached_tokens"] is None and f["cache_hit_rate"] is None  # nothing said
    results[0].cached_tokens, results[1].cached_tokens = 0, 90
    f = summarize(results, 1.0, 0.0)
    assert f["total_cached_tokens"] == 90 and f["cache_hit_rate"] == pytest.approx(90 / 200)
    # Hit: at least half the prompt reused (90 of 100); a miss: 0 of 100 (the third said nothing).
    assert f["hit_requests"] == 1
    assert f["mean_ttft_hit_ms"] == pytest.approx(100.0) and f["mean_ttft_miss_ms"] == pytest.approx(100.0)
    results[0].ttft = 0.3
    f2 = summarize(results, 1.0, 0.0)
    assert f2["mean_ttft_miss_ms"] == pytest.approx(300.0) and f2["mean_ttft_hit_ms"] == pytest.approx(100.0)
    f.update(backend="sglang", request_rate=1.0, max_concurrency=None)
    lines = format_summary(f).splitlines()
    at = lines.index(next(line for line in lines if line.startswith("Concurrency:")))
    assert [line[:40].rstrip() for line in lines[at + 1:at + 3]] == [
        "Total cached input tokens:", "Cache hit rate (%):"]
    assert lines[at + 2][41:].rstrip() == "45.00"


def test_cli_defaults_come_from_the_config():
    assert parse_config([]) == BenchConfig()
    cfg = parse_config(["--request-rate", "inf", "--max-concurrency", "8", "--disable-tqdm",
                        "--base-url", "http://h:1/", "--backend", "openai"])
    assert math.isinf(cfg.request_rate) and cfg.max_concurrency == 8 and cfg.disable_tqdm
    assert cfg.url == "http://h:1"


# ---- stream timing against a stand-in server -------------------------------------------------
async def _stand_in(handler):
    app = web.Application()
    app.router.add_post("/generate", handler)
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def _sse(request, events: list[tuple[float, object]]):
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for delay, body in events:
        await asyncio.sleep(delay)
        data = body if isinstance(body, str) else json.dumps(body)
        await response.write(f"data: {data}\n\n".encode())
    return response


def test_sglang_stream_timing_counts_cumulative_tokens():
    big = "x" * 100_000  # one event larger than aiohttp's 64 KiB line limit

    def chunk(n, text="t"):
        return {"text": text, "output_ids": list(range(n)),
                "meta_info": {"completion_tokens": n, "prompt_tokens": 12, "dp_rank": 3}}

    bodies = []

    async def handler(request):
        body = await request.json()
        bodies.append(body)
        assert body["sampling_params"] == {"temperature": 0.0, "max_new_tokens": 4,
                                           "ignore_eos": True}
        assert body["stream"] is True and body["input_ids"] == [1, 2, 3]
        return await _sse(request, [(0.05, chunk(1)), (0.04, chunk(3, big)),
                                    (0.02, chunk(4)), (0.0, "[DONE]")])

    async def run():
        runner, url = await _stand_in(handler)
        try:
            import aiohttp
            async with aiohttp.ClientSession() as session:
                await send_sglang(session, url, BenchRequest([1, 2, 3], 3, 4, bootstrap_room=9))
                return await send_sglang(session, url, BenchRequest([1, 2, 3], 3, 4))
        finally:
            await runner.cleanup()

    r = asyncio.run(run())
    assert bodies[0]["bootstrap_room"] == 9 and "bootstrap_room" not in bodies[1]
    assert r.success, r.error
    assert (r.output_len, r.prompt_len, r.dp_rank) == (4, 12, 3)
    assert r.ttft == pytest.approx(0.05, abs=0.03)
    # The chunk bringing 2 tokens after 40 ms counts as two 20 ms gaps.
    assert len(r.itl) == 3 and r.itl[0] == r.itl[1]
    assert r.itl[0] == pytest.approx(0.02, abs=0.015)
    assert r.latency >= r.ttft + 0.05


def test_openai_stream_and_errors_in_stream():
    async def ok(request):
        body = await request.json()
        assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"]
        return await _sse(request, [(0.01, {"choices": [{"text": "a", "finish_reason": None}]}),
                                    (0.01, {"choices": [{"text": "bc", "finish_reason": "length"}]}),
                                    (0.0, {"choices": [], "usage": {"prompt_tokens": 7,
                                                                    "completion_tokens": 3}}),
                                    (0.0, "[DONE]")])

    async def special_only(request):  # e.g. one EOS token under ignore_eos: no text
        return await _sse(request, [(0.03, {"choices": [{"text": "", "finish_reason": "length"}]}),
                                    (0.0, {"choices": [], "usage": {"prompt_tokens": 7,
                                                                    "completion_tokens": 1}}),
                                    (0.0, "[DONE]")])

    async def broken(request):
        return await _sse(request, [(0.0, {"error": {"message": "boom"}}), (0.0, "[DONE]")])

    async def run(handler, send):
        runner, url = await _stand_in(handler)
        try:
            import aiohttp
            async with aiohttp.ClientSession() as session:
                return await send(session, url, BenchRequest("hello", 5, 3))
        finally:
            await runner.cleanup()

    r = asyncio.run(run(ok, send_openai))
    assert r.success and (r.output_len, r.prompt_len, len(r.itl)) == (3, 7, 1)
    r = asyncio.run(run(special_only, send_openai))
    assert r.success, r.error
    assert (r.output_len, r.itl) == (1, []) and r.ttft == pytest.approx(0.03, abs=0.02)
    r = asyncio.run(run(broken, send_sglang))
    assert not r.success and "boom" in r.error
    assert 0 < r.latency < 5  # until the error was seen


def test_conversations_send_each_turn_after_the_last_with_its_answer():
    """run_benchmark over a stand-in server: every turn's body, the cache figures, and
    /flush_cache after the warm-up."""
    seen, flushed = [], []

    async def generate(request):
        body = await request.json()
        seen.append((len(flushed), body["input_ids"]))
        n = body["sampling_params"]["max_new_tokens"]
        out = [len(body["input_ids"]) % 200 + k for k in range(n)]
        meta = {"completion_tokens": n, "prompt_tokens": len(body["input_ids"]),
                "cached_tokens": len(body["input_ids"]) // 2, "finish_reason": None}
        return await _sse(request, [(0.0, {"text": "x", "output_ids": out, "meta_info": meta}),
                                    (0.0, "[DONE]")])

    async def flush(request):
        flushed.append(True)
        return web.Response(text="Cache flushed.\n")

    async def run():
        app = web.Application()
        app.router.add_post("/generate", generate)
        app.router.add_post("/flush_cache", flush)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            cfg = BenchConfig(base_url=url, dataset_name="generated-shared-prefix",
                              gsp_num_groups=2, gsp_prompts_per_group=2,
                              gsp_system_prompt_len=20, gsp_question_len=4, gsp_output_len=3,
                              gsp_num_turns=3, flush_cache=True, max_concurrency=2,
                              disable_tqdm=True, warmup_requests=1)
            return await asyncio.wait_for(run_benchmark(cfg), 30)
        finally:
            await runner.cleanup()

    f = asyncio.run(run())
    assert f["completed"] == 12 and f["failed"] == 0  # 4 conversations x 3 turns
    assert [flushes for flushes, _ in seen] == [0] + [1] * 12  # flushed after the warm-up
    prompts = [ids for _, ids in seen[1:]]
    firsts = [p for p in prompts if len(p) == 24]
    assert len(firsts) == 4
    for first in firsts:  # each conversation: turn t+1 = turn t + its answer + a question
        answer = [24 % 200 + k for k in range(3)]
        (second,) = [p for p in prompts if len(p) == 31 and p[:27] == first + answer]
        answer = [31 % 200 + k for k in range(3)]
        assert [p for p in prompts if len(p) == 38 and p[:34] == second + answer]
    assert f["total_input_tokens"] == 4 * (24 + 31 + 38)
    assert f["total_cached_tokens"] == 4 * (12 + 15 + 19)
    assert f["cache_hit_rate"] == pytest.approx(f["total_cached_tokens"] / f["total_input_tokens"])
    assert f["dataset_name"] == "generated-shared-prefix" and f["gsp_num_turns"] == 3


def test_a_failed_request_is_timed_until_its_failure_and_the_run_lasts_until_it():
    """Duration is from the first request sent to the last one finished, failed or not
    (SGLang's): a request that fails last ends the run, and its time in flight counts
    toward peak concurrency."""
    calls = []

    async def generate(request):
        calls.append(True)
        if len(calls) == 4:  # the run's last request (after the warm-up): a late 503
            await asyncio.sleep(0.4)
            return web.Response(status=503, text="overloaded")
        meta = {"completion_tokens": 2, "prompt_tokens": 8, "finish_reason": None}
        return await _sse(request, [(0.0, {"text": "x", "output_ids": [1, 2],
                                           "meta_info": meta}), (0.0, "[DONE]")])

    async def run():
        runner, url = await _stand_in(generate)
        try:
            cfg = BenchConfig(base_url=url, num_prompts=3, random_input_len=8,
                              random_output_len=2, random_range_ratio=1.0, disable_tqdm=True,
                              max_concurrency=1, return_requests=True)
            return await asyncio.wait_for(run_benchmark(cfg), 30)
        finally:
            await runner.cleanup()

    f = asyncio.run(run())
    assert (f["completed"], f["failed"]) == (2, 1) and "HTTP 503" in f["first_errors"][0]
    (failed,) = [r for r in f["requests"] if not r["success"]]
    assert failed["latency_s"] >= 0.4
    last_end = max(r["start_s"] + r["latency_s"] for r in f["requests"])
    assert f["duration_s"] == pytest.approx(last_end) and f["duration_s"] >= 0.4


def test_peak_concurrency_counts_a_failed_request_until_its_failure():
    failed = RequestResult(prompt_len=10, error="TimeoutError", start_time=10.0, latency=1.0)
    ok = [_result(10.2, 0.05, 0.1, 2, [0.05]), _result(10.5, 0.05, 0.1, 2, [0.05])]
    assert summarize([failed, *ok], 1.0, 10.0)["peak_concurrent_requests"] == 2
    failed.latency = 0.1  # failed before either was sent
    assert summarize([failed, *ok], 1.0, 10.0)["peak_concurrent_requests"] == 1


def test_openai_usage_reports_cached_tokens():
    async def handler(request):
        return await _sse(request, [(0.0, {"choices": [{"text": "ab", "finish_reason": "length"}]}),
                                    (0.0, {"choices": [], "usage": {
                                        "prompt_tokens": 9, "completion_tokens": 2,
                                        "prompt_tokens_details": {"cached_tokens": 6}}}),
                                    (0.0, "[DONE]")])

    async def run():
        runner, url = await _stand_in(handler)
        try:
            import aiohttp
            async with aiohttp.ClientSession() as session:
                return await send_openai(session, url, BenchRequest("hello", 5, 2))
        finally:
            await runner.cleanup()

    r = asyncio.run(run())
    assert r.success and (r.cached_tokens, r.answer, r.prompt_len) == (6, "ab", 9)


def test_a_stretched_servers_times_are_read_back_in_simulated_time():
    r = RequestResult(prompt_len=4, output_len=3, success=True, start_time=110.0, ttft=0.8,
                      latency=2.0, itl=[0.4, 0.8], chunks=[(0.8, 1), (1.2, 1), (2.0, 1)])
    m = to_model_time(r, start=100.0, scale=4.0)
    assert (m.start_time, m.ttft, m.latency, m.itl) == (102.5, 0.2, 0.5, [0.1, 0.2])
    assert m.chunks == [(0.2, 1), (0.3, 1), (0.5, 1)] and r.ttft == 0.8  # r unchanged
    assert time_scale({"executor": "sim", "sim_time_scale": 4}) == 4.0
    assert time_scale({"executor": "real", "sim_time_scale": 4}) == 1.0  # only sim stretches
    assert time_scale({}) == 1.0  # an SGLang server
    with pytest.raises(RuntimeError, match="sim_time_scale"):
        time_scale({"executor": "sim", "sim_time_scale": 0})


# ---- end to end ------------------------------------------------------------------------------
@pytest.mark.slow
def test_benchmark_against_a_real_simulated_server(tmp_path):
    with ServerProcess("--dp-size", "2", "--executor", "sim", "--sim-profile", "instant",
                       log_path=tmp_path / "server.log") as server:
        cfg = BenchConfig(base_url=server.url, num_prompts=24, random_input_len=64,
                          random_output_len=8, random_range_ratio=0.5, request_rate=200.0,
                          seed=5, disable_tqdm=True, return_requests=True)
        f = asyncio.run(asyncio.wait_for(run_benchmark(cfg), 30))
        assert f["completed"] == 24 and f["failed"] == 0
        expected = random_requests(24, 64, 8, 0.5, seed=5)
        assert f["total_input_tokens"] == sum(r.prompt_len for r in expected)
        assert f["total_output_tokens"] == sum(r.output_len for r in expected)
        assert f["simulated"] is True and f["sim_profile"] == "instant"
        assert sorted(f["requests_per_dp_rank"]) == ["0", "1"]
        assert sum(f["requests_per_dp_rank"].values()) == 24
        assert len(f["requests"]) == 24

        out = tmp_path / "runs.jsonl"
        cli = subprocess.run(
            [sys.executable, "-m", "bench.client.serving", "--base-url", server.url, "--backend",
             "openai", "--num-prompts", "8", "--random-input-len", "32",
             "--random-output-len", "4", "--disable-tqdm", "--output-file", str(out)],
            cwd=REPO, capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0, cli.stderr
        assert "simulated accelerator" in cli.stdout
        assert "============ Serving Benchmark Result ============" in cli.stdout
        row = json.loads(out.read_text().splitlines()[-1])
        assert row["completed"] == 8, row.get("first_errors")
        assert row["request_rate"] == "inf" and row["simulated"]


@pytest.mark.slow
def test_shared_prefix_run_reports_the_servers_cache_hits(tmp_path):
    """Waits on the rank-side prefix cache and /flush_cache answers (issue 22)."""
    with ServerProcess("--executor", "sim", "--sim-profile", "instant",
                       log_path=tmp_path / "server.log") as server:
        gsp = dict(dataset_name="generated-shared-prefix", gsp_num_groups=2,
                   gsp_prompts_per_group=3, gsp_system_prompt_len=64, gsp_question_len=8,
                   gsp_output_len=4, gsp_num_turns=2)
        cfg = BenchConfig(base_url=server.url, max_concurrency=1, flush_cache=True,
                          disable_tqdm=True, **gsp)
        f = asyncio.run(asyncio.wait_for(run_benchmark(cfg), 60))
        assert f["completed"] == 12 and f["total_input_tokens"] == 6 * 72 + 6 * 84
        # One at a time: a group's first prompt misses, its others hit the system prompt,
        # every second turn hits its first turn and answer (at least 4*63 + 6*75 tokens).
        assert f["total_cached_tokens"] >= 4 * 63 + 6 * 75 and f["cache_hit_rate"] > 0.7
        cli = subprocess.run(
            [sys.executable, "-m", "bench.client.serving", "--base-url", server.url, "--backend",
             "openai", "--disable-tqdm", "--flush-cache",
             *[f"--{k.replace('_', '-')}={v}" for k, v in gsp.items()]],
            cwd=REPO, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert "Cache hit rate (%):" in cli.stdout
        assert "{:<40} {}".format("Successful requests:", 12) in cli.stdout


@pytest.mark.slow
def test_a_stretched_simulated_server_is_reported_in_simulated_time(tmp_path):
    # Every step costs 10 ms modelled and 40 ms of wall-clock time (--sim-time-scale 4).
    profile = tmp_path / "steps.json"
    profile.write_text(json.dumps({
        "name": "steps", "base_s": 0.01, "prefill_token_s": 0.0, "prefill_attn_s": 0.0,
        "decode_seq_s": 0.0, "decode_kv_s": 0.0, "max_total_num_tokens": 8192,
        "context_len": 2048, "vocab_size": 259, "source": "test"}))
    with ServerProcess("--executor", "sim", "--sim-profile", str(profile),
                       "--sim-time-scale", "4", log_path=tmp_path / "server.log") as server:
        cfg = BenchConfig(base_url=server.url, num_prompts=4, random_input_len=16,
                          random_output_len=8, random_range_ratio=1.0, request_rate=10.0,
                          seed=3, disable_tqdm=True, return_requests=True)
        wall_start = time.perf_counter()
        f = asyncio.run(asyncio.wait_for(run_benchmark(cfg), 60))
        wall = time.perf_counter() - wall_start
    assert f["completed"] == 4 and f["sim_time_scale"] == 4.0
    # One prefill step and 7 decode steps per request: at least 80 ms modelled (320 ms
    # of wall clock) each. Read back unconverted they would be 320 ms or more.
    assert 80 <= f["mean_e2e_latency_ms"] < 320
    assert 10 <= f["mean_tpot_ms"] < 40
    assert f["duration_s"] * 4 <= wall
    # Arrivals at 10 per simulated second, so 2.5 per wall-clock second: each is sent at
    # its Poisson time (0, 0.21, 0.30, 0.32 s), read back in simulated seconds. Sent at
    # those times of wall clock, they would read back as a quarter of them.
    sent = [r["start_s"] for r in f["requests"]]
    assert sent == pytest.approx(arrival_offsets(4, 10.0, 3), abs=0.01)


def test_keepalive_probe_counts_every_request_and_none_fail_below_the_servers_keepalive():
    # bench.micro.keepalive: pooled connections idle about the server's keep-alive. A client
    # keep-alive below the server's drops them before the server can, so none fail;
    # with aiohttp's default some may (a race, so only the count is checked there).
    from bench.micro.keepalive import parse_args, run
    args = parse_args(["--connections", "12", "--cycles", "3", "--idle-s", "0.4", "--jitter-s",
                       "0.02", "--server-keepalive-s", "0.4", "--client-keepalive-s", "15", "0.15",
                       "--quiet"])
    results = run(args)
    assert set(results) == {15.0, 0.15}
    assert all(sum(counts.values()) == 36 for counts in results.values()), results
    assert results[0.15] == {"ok": 36}


@pytest.mark.parametrize("flags, message", [
    (["--connections", "0"], "--connections must be at least 1"),
    (["--idle-s", "-1"], "--idle-s must be a number >= 0"),
    (["--jitter-s", "nan"], "--jitter-s must be a number >= 0"),
    (["--client-keepalive-s", "0"], "keep-alive times must be numbers > 0"),
    (["--server-keepalive-s", "nan"], "keep-alive times must be numbers > 0"),
])
def test_keepalive_probe_rejects_bad_flags(flags, message, capsys):
    from bench.micro.keepalive import parse_args
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err


# ---- the prefix-sharing datasets -----------------------------------------------------------
def test_generated_shared_prefix_is_groups_of_one_system_prompt_and_distinct_questions():
    from collections import Counter
    from bench.client.dataset import skewed_prefix_requests as shared_prefix_requests
    reqs = shared_prefix_requests(5, 4, 100, 10, 7, seed=3)
    assert reqs == shared_prefix_requests(5, 4, 100, 10, 7, seed=3)
    assert len(reqs) == 20 and all(r.prompt_len == 110 and r.output_len == 7 for r in reqs)
    groups = Counter(tuple(r.prompt[:100]) for r in reqs)
    assert sorted(groups.values()) == [4] * 5
    assert len({tuple(r.prompt) for r in reqs}) == 20
    assert len({tuple(r.prompt[:100]) for r in reqs[:4]}) > 1  # shuffled: groups interleave
    hot = shared_prefix_requests(5, 4, 100, 10, 7, seed=3, hot_share=0.5)
    assert len(hot) == 20 and max(Counter(tuple(r.prompt[:100]) for r in hot).values()) == 10
    text = shared_prefix_requests(2, 2, 30, 5, 1, seed=3, as_text=True)
    assert all(isinstance(r.prompt, str) and len(r.prompt) == 35 for r in text)


def test_multi_turn_resends_the_conversation_so_far():
    from bench.client.dataset import multi_turn_requests
    reqs = multi_turn_requests(3, 4, 20, 5, seed=2)
    assert len(reqs) == 12
    by_conv: dict = {}
    for r in reqs:  # each turn extends exactly one earlier prompt of the same conversation
        parent = [p for p in by_conv if tuple(r.prompt[:len(p)]) == p]
        if parent:
            assert len(r.prompt) == len(parent[0]) + 5 + 20
            del by_conv[parent[0]]
        else:
            assert len(r.prompt) == 20
        by_conv[tuple(r.prompt)] = True
    assert len(by_conv) == 3


def test_cached_tokens_make_the_hit_rate():
    ok = [RequestResult(prompt_len=100, output_len=2, success=True, ttft=0.1, latency=0.2,
                        cached_tokens=c, chunks=[(0.1, 1), (0.2, 1)]) for c in (0, 60)]
    assert summarize(ok, 1.0, 0.0)["cache_hit_rate"] == pytest.approx(0.3)
    assert summarize([RequestResult(prompt_len=5, success=True, chunks=[(0.1, 1)])],
                     1.0, 0.0)["cache_hit_rate"] is None
    cfg = parse_config(["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "3",
                        "--gsp-prompts-per-group", "2", "--text-prompts"])
    from bench.client.serving import make_requests
    reqs = make_requests(cfg)
    assert len(reqs) == 6 and isinstance(reqs[0].prompt, str)
    assert reqs[0].prompt_len == 2048 + 128 and reqs[0].output_len == 256  # SGLang's defaults
