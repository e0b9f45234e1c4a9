"""What operators and SGLang's clients read from a running server, on the real command:
``internal_states`` in ``/server_info`` (one entry per rank; SGLang's ``bench_serving``
indexing), the one log format, SGLang's "Decode batch." line, ``--log-requests``, and
Prometheus ``sglang:gen_throughput`` / ``sglang:num_aborted_requests_total``.
"""

from __future__ import annotations

import re

import httpx
import pytest

from scheduler.messages import RankStats
from scheduler.stats import DecodeStats, decode_batch_line, prefill_batch_line
from tests.server_helpers import ServerProcess, metric, write_sim_profile

LOG_PREFIX = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (api|rank \d+|prefill rank \d+|"
                        r"decode rank \d+)\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
DECODE_LINE = re.compile(r"\] INFO Decode batch\. #running-req: \d+, #token: \d+, token usage: "
                         r"\d\.\d\d, gen throughput \(token/s\): \d+\.\d\d, #queue-req: \d+, $")
STATE_KEYS = {"dp_rank", "world_size", "effective_max_running_requests_per_dp",
              "last_gen_throughput", "memory_usage", "avg_spec_accept_length", "step_time_dict",
              "startup_time"}


def bench_serving_accept_length(info: dict):
    """What SGLang's bench_serving (0.5.3 and older) does with /get_server_info."""
    if "decode" in info:
        info = info["decode"][0]
    return info["internal_states"][0]["avg_spec_accept_length"]


def generate(url: str, rid: str, n: int = 6) -> dict:
    r = httpx.post(url + "/generate", json={"rid": rid, "text": "hello there", "sampling_params": {
        "max_new_tokens": n, "temperature": 0, "ignore_eos": True}}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_decode_stats_counts_decoding_batches_and_formats_sglang_line():
    now = [0.0]
    stats = DecodeStats(interval=2, clock=lambda: now[0])
    assert stats.on_step(0, 0, 0.0) is None  # idle
    assert stats.on_step(1, 0, 100.0) is None  # prefill only, after 100 s idle
    now[0] = 100.5
    assert stats.on_step(3, 3, 100.2) is None
    now[0] = 101.0
    assert stats.on_step(5, 5, 100.6) == pytest.approx(0.5)  # 1 s busy, 2 decoding batches
    assert stats.last_gen_throughput == pytest.approx(8.0)  # 8 tokens in 1 s, idle left out
    assert stats.num_decode_batches == 2
    line = decode_batch_line(RankStats(
        dp_rank=0, num_running_reqs=3, num_used_tokens=412, token_usage=0.0126,
        num_queue_reqs=1, last_gen_throughput=151.2249, decode_step_time_s=0.01,
        num_decode_batches=40))
    assert line == ("Decode batch. #running-req: 3, #token: 412, token usage: 0.01, "
                    "gen throughput (token/s): 151.22, #queue-req: 1, ")
    assert prefill_batch_line(1, 128, 2048, 0.0234, 2, 0) == (
        "Prefill batch. #new-seq: 1, #new-token: 128, #cached-token: 2048, "
        "token usage: 0.02, #running-req: 2, #queue-req: 0, ")


@pytest.mark.slow
def test_plain_server_states_logs_and_metrics(tmp_path):
    profile = write_sim_profile(tmp_path / "slow.json", step_s=0.01)
    flags = ["--dp-size", "2", "--executor", "sim", "--sim-profile", profile,
             "--decode-log-interval", "1", "--log-requests", "--enable-metrics"]
    with ServerProcess(*flags, log_path=tmp_path / "server.log") as server:
        for i in range(4):
            generate(server.url, f"ops-{i}")
        # A client that leaves mid-stream: its request is aborted.
        with httpx.stream("POST", server.url + "/generate", timeout=30, json={
                "rid": "ops-left", "text": "hi", "stream": True,
                "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}}) as r:
            next(r.iter_lines())
        info = httpx.get(server.url + "/get_server_info", timeout=5).json()
        assert httpx.get(server.url + "/server_info", timeout=5).json()["internal_states"]
        states = info["internal_states"]
        assert [s["dp_rank"] for s in states] == [0, 1]
        for state in states:
            assert STATE_KEYS <= state.keys() and state["avg_spec_accept_length"] is None
            assert state["effective_max_running_requests_per_dp"] == info["max_running_requests"]
            assert state["memory_usage"]["token_capacity"] == info["max_total_num_tokens"]
        assert bench_serving_accept_length(info) is None
        assert any(s["last_gen_throughput"] > 0 and s["step_time_dict"] for s in states)
        text = httpx.get(server.url + "/metrics", timeout=5).text
        assert max(metric(text, "sglang:gen_throughput", dp_rank=r) for r in (0, 1)) > 0
        deadline_text = text
        for _ in range(50):  # the abort reaches the counter when the API notices the close
            if metric(deadline_text, "sglang:num_aborted_requests_total") >= 1:
                break
            deadline_text = httpx.get(server.url + "/metrics", timeout=5).text
        assert metric(deadline_text, "sglang:num_aborted_requests_total") == 1
        assert metric(deadline_text, "sglang:num_requests_total") >= 4
    log = server.log()
    lines = [line for line in log.splitlines() if line.strip()]
    assert all(LOG_PREFIX.match(line) for line in lines), [
        line for line in lines if not LOG_PREFIX.match(line)][:5]
    assert any(re.search(r"^\[.* rank 0\]", line) and DECODE_LINE.search(line) for line in lines)
    assert any(re.search(r"^\[.* rank \d\] INFO Prefill batch\. #new-seq: \d+, #new-token: \d+, "
                         r"#cached-token: \d+, ", line) for line in lines)
    assert any(re.search(r"^\[.* api\] INFO ready: ", line) for line in lines)
    for i in range(4):
        assert re.search(rf"\] INFO request ops-{i} on rank \d finished: .*\"length\".* "
                         rf"completion_tokens=6 ", log), log[-2000:]
    assert re.search(r"\] INFO request ops-left on rank \d ended: closed before its finish", log)


@pytest.mark.slow
def test_pd_front_door_lists_every_rank_and_serves_bench_serving(tmp_path):
    flags = ["--disaggregation-mode", "pd", "--prefill-dp-size", "2", "--decode-dp-size", "1",
             "--executor", "sim", "--sim-profile", "instant", "--decode-log-interval", "1"]
    with ServerProcess(*flags, log_path=tmp_path / "pd.log") as server:
        generate(server.url, "pd-0")
        info = httpx.get(server.url + "/get_server_info", timeout=5).json()
        # The prefix cache lives on prefill ranks: its series are theirs (two, not
        # decode's one), and a request counts at the prefill rank that ran it.
        for _ in range(2):
            r = httpx.post(server.url + "/generate", json={
                "text": "the same prompt " * 8, "disagg_prefill_dp_rank": 1,
                "sampling_params": {"max_new_tokens": 2}}, timeout=30)
            assert r.status_code == 200, r.text
        text = httpx.get(server.url + "/metrics", timeout=5).text
        assert metric(text, "sglang:cached_tokens_total", dp_rank=1) == \
            r.json()["meta_info"]["cached_tokens"] > 0
        assert 0 < metric(text, "sglang:cache_hit_rate", dp_rank=1) < 1
        assert len([line for line in text.splitlines()
                    if line.startswith("sglang:cache_hit_rate{")]) == 2
    states = info["internal_states"]
    assert [(s["disaggregation_mode"], s["dp_rank"]) for s in states] == [
        ("prefill", 0), ("prefill", 1), ("decode", 0)]
    assert [len(info[role][0]["internal_states"]) for role in ("prefill", "decode")] == [2, 1]
    assert bench_serving_accept_length(info) is None
    assert info["decode"][0]["internal_states"][0]["disaggregation_mode"] == "decode"
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert all(LOG_PREFIX.match(line) for line in lines), lines[:5]
    assert any(line.startswith("[") and " decode rank 0] INFO Decode batch." in line
               for line in lines)


@pytest.mark.slow
def test_http_stack_benchmark_prints_both_stacks_side_by_side():
    import subprocess
    import sys

    from tests.server_helpers import REPO
    done = subprocess.run([sys.executable, "-m", "bench.micro.http_stack", "--requests", "40",
                           "--rounds", "1", "--warmup", "5"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    rows = {line.split("  ")[0]: line for line in done.stdout.splitlines()}
    assert "uvloop + httptools" in rows and "asyncio + h11" in rows, done.stdout
    # 40 requests rest on a few 10 ms CPU ticks: the CPU figures are then withheld (exit
    # 1, saying how many requests would do) rather than printed as noise.
    if done.returncode == 0:
        assert "less API CPU per request" in done.stdout
    else:
        assert done.returncode == 1 and "not printed" in done.stdout, done.stderr[-2000:]
        assert "requests per round" in done.stdout
