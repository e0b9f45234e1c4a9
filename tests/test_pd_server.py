"""PD through the real command: ``--disaggregation-mode pd`` (one front door) and a
``prefill`` + ``decode`` server pair driven the way a PD gateway drives them.

Each server is a subprocess in its own process group, always stopped (SIGTERM, then
SIGKILL of the group) by ``ServerProcess``; every wait is bounded; afterwards no
segment of any server is left (and conftest checks the whole session). Greedy
outputs must equal the in-process non-PD reference token for token.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from shm.segment import NAME_PREFIX, list_segments
from tests.pd_helpers import make_workload, non_pd_outputs
from tests.server_helpers import ServerProcess, write_sim_profile

pytestmark = pytest.mark.slow

COMMON = ["--device", "cpu", "--max-total-tokens", "8192", "--chunked-prefill-size", "128",
          "--log-level", "warning"]


@pytest.fixture(scope="module")
def workload():
    return make_workload()


@pytest.fixture(scope="module")
def reference(workload):
    return non_pd_outputs(workload)


def body(ids, n, **extra) -> dict:
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0,
                                                  "ignore_eos": True}, **extra}


async def stream_ids(client: httpx.AsyncClient, url: str, payload: dict) -> tuple[list[int], dict]:
    """Streamed /generate: the last cumulative output_ids and finish reason."""
    last = None
    async with client.stream("POST", url + "/generate", json={**payload, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                last = httpx.Response(200, content=line[6:]).json()
    return last["output_ids"], last["meta_info"]["finish_reason"]


def _both(prefill_url: str, decode_url: str, payload: dict) -> tuple[dict, dict]:
    """One request as a PD gateway sends it: the same body to both servers at once."""
    with ThreadPoolExecutor(1) as pool:
        dec = pool.submit(httpx.post, decode_url + "/generate", json=payload, timeout=60)
        pre = httpx.post(prefill_url + "/generate", json=payload, timeout=60)
        assert pre.status_code == 200, pre.text
        assert dec.result().status_code == 200, dec.result().text
        return pre.json(), dec.result().json()


def assert_idle(url: str) -> None:
    for row in httpx.get(url + "/get_load", timeout=5).json():
        assert (row["num_reqs"], row["num_tokens"]) == (0, 0), row


def test_front_door_outputs_equal_non_pd(tmp_path, workload, reference):
    flags = ["--disaggregation-mode", "pd", "--prefill-dp-size", "2", "--decode-dp-size", "2",
             "--prefill-load-balance-method", "total_tokens", *COMMON]
    with ServerProcess(*flags, log_path=tmp_path / "pd.log") as server:
        info = httpx.get(server.url + "/server_info", timeout=5).json()
        assert info["disaggregation_mode"] == "pd" and info["dp_size"] == 2
        assert info["disaggregation_roles"] == {"prefill": "total_tokens",
                                                "decode": "total_requests"}
        assert sorted(r["role"] for r in info["ranks"]) == ["decode"] * 2 + ["prefill"] * 2
        rows = httpx.get(server.url + "/get_load", timeout=5).json()
        assert [(r["role"], r["dp_rank"]) for r in rows] == [
            ("prefill", 0), ("prefill", 1), ("decode", 0), ("decode", 1)], rows
        loads = httpx.get(server.url + "/v1/loads?dp_rank=1", timeout=5).json()["loads"]
        assert sorted((r["role"], r["dp_rank"]) for r in loads) == [("decode", 1), ("prefill", 1)]

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                async def one(i, rid, ids, n):
                    extra = {"disagg_prefill_dp_rank": i % 2} if i % 3 == 0 else {}
                    if i % 2:
                        return await stream_ids(client, server.url, body(ids, n, **extra))
                    r = await client.post(server.url + "/generate", json=body(ids, n, **extra))
                    assert r.status_code == 200, r.text
                    return r.json()["output_ids"], r.json()["meta_info"]["finish_reason"]
                return await asyncio.gather(*(one(i, *w) for i, w in enumerate(workload)))

        results = asyncio.run(run())
        for (rid, ids, n), (output_ids, finish) in zip(workload, results):
            assert output_ids == reference[rid], rid
            assert finish == {"type": "length", "length": n}
        assert_idle(server.url)
        _check_prefill_cache_hits_reach_the_client(server.url, workload, reference)
        pids = server.rank_pids()
        segments_before_stop = server.segments()
        assert any(s.endswith(".handoff") for s in segments_before_stop)
    assert not server.segments() and pids


def _check_prefill_cache_hits_reach_the_client(url: str, workload, reference) -> None:
    """The prefix cache lives on the prefill ranks: a prompt sent again to the prefill
    rank that ran it reports the hit (streamed and not), same tokens; /flush_cache asks
    both groups' ranks, and the next run hits nothing. Waits on issue 22's rank side."""
    rid, ids, n = workload[3]  # 184 tokens; it ran on prefill rank 3 % 2 (above)
    assert len(ids) > 100
    again = body(ids, n, disagg_prefill_dp_rank=1)
    for stream in (False, True):
        r = httpx.post(url + "/generate", json={**again, "stream": stream}, timeout=60)
        last = r.json() if not stream else httpx.Response(200, content=[
            line for line in r.text.split("\n\n") if line.startswith("data: {")][-1][6:]).json()
        assert last["output_ids"] == reference[rid]
        assert len(ids) - 1 <= last["meta_info"]["cached_tokens"] < len(ids)
    deadline = time.monotonic() + 10  # refused (400) while a rank still holds a request
    while (code := httpx.post(url + "/flush_cache", timeout=30).status_code) == 400:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert code == 200
    meta = httpx.post(url + "/generate", json=again, timeout=60).json()["meta_info"]
    assert meta["cached_tokens"] == 0


def test_prefill_and_decode_servers_pair_like_a_gateway(tmp_path, workload, reference):
    """Both halves get the identical body at once (the decode server sometimes first);
    the prefill response ends at its hand-off; orphans on either side expire."""
    port = random.randint(20_000, 60_000)  # names the shared tables; no socket
    pair = ["--disaggregation-bootstrap-port", str(port), "--disaggregation-bootstrap-timeout",
            "1.5", "--dp-size", "2", *COMMON]
    with _pair(tmp_path, pair) as (prefill, decode):
        info = httpx.get(prefill.url + "/server_info", timeout=5).json()
        assert info["disaggregation_roles"] == {"prefill": "round_robin"}
        assert httpx.get(decode.url + "/server_info").json()["disaggregation_roles"] == \
            {"decode": "total_requests"}
        for server in (prefill, decode):  # half a pair cannot generate: liveness, 200
            health = httpx.get(server.url + "/health_generate", timeout=10)
            assert health.status_code == 200 and health.json()["ranks"] == [0, 1], health.text
        # The first token's top list travels in the hand-off: decode's answer (the one a
        # gateway returns) has it, as prefill computed it.
        asked = body([5, 6, 7, 8], 3, return_logprob=True, top_logprobs_num=3,
                     bootstrap_room=random.getrandbits(63))
        pre, dec = _both(prefill.url, decode.url, asked)
        first = pre["meta_info"]["output_top_logprobs"][0]
        assert len(first) == 3 and dec["meta_info"]["output_top_logprobs"][0] == first, dec
        assert dec["meta_info"]["output_token_logprobs"][0] == \
            pre["meta_info"]["output_token_logprobs"][0]
        # Prompt logprobs (lm-eval's loglikelihood): the prefill server has them, the
        # decode server says it has none rather than answer with nulls.
        echo = {"prompt": "hello world", "max_tokens": 0, "echo": True, "logprobs": 1,
                "bootstrap_room": random.getrandbits(63)}
        r = httpx.post(decode.url + "/v1/completions", json=echo, timeout=30)
        assert r.status_code == 400 and "prefill server" in r.text, r.text
        lps = httpx.post(prefill.url + "/v1/completions", json=echo,
                         timeout=30).json()["choices"][0]["logprobs"]["token_logprobs"]
        assert lps[0] is None and all(isinstance(x, float) for x in lps[1:]), lps
        # A chat with n through a gateway: one room per choice (smg, sglang-router).
        rooms = [random.getrandbits(63), random.getrandbits(63)]
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2,
                "temperature": 0, "bootstrap_room": rooms, "bootstrap_host": ["127.0.0.1"] * 2,
                "bootstrap_port": [port] * 2}
        with ThreadPoolExecutor(1) as pool:
            dec = pool.submit(httpx.post, decode.url + "/v1/chat/completions", json=chat,
                              timeout=60)
            pre = httpx.post(prefill.url + "/v1/chat/completions", json=chat, timeout=60)
            assert pre.status_code == 200, pre.text
            assert dec.result().status_code == 200, dec.result().text
        choices = dec.result().json()["choices"]
        assert [c["index"] for c in choices] == [0, 1] and choices[0] == {**choices[1], "index": 0}
        # The same body names the prefill rank for both: the prefill server places it
        # there (routed_dp_rank, in a body both servers get, may name the decode rank).
        for named in (0, 1):
            pinned = body([5, 6, 7], 3, bootstrap_room=random.getrandbits(63),
                          disagg_prefill_dp_rank=named, routed_dp_rank=1 - named)
            pre, dec = _both(prefill.url, decode.url, pinned)
            assert pre["meta_info"]["dp_rank"] == named, pre
            assert len(dec["output_ids"]) == 3, dec

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                async def one(i, rid, ids, n):
                    b = body(ids, n, bootstrap_host="127.0.0.1", bootstrap_port=port,
                             bootstrap_room=random.getrandbits(63))
                    dec = asyncio.ensure_future(client.post(decode.url + "/generate", json=b))
                    if i % 4 == 0:
                        await asyncio.sleep(0.05)  # decode arrives first, waits for the room
                    pre = await client.post(prefill.url + "/generate", json=b)
                    return pre.json(), (await dec).json()
                return await asyncio.gather(*(one(i, *w) for i, w in enumerate(workload)))

        for (rid, ids, n), (pre, dec) in zip(workload, asyncio.run(run())):
            assert dec["output_ids"] == reference[rid], rid
            assert pre["meta_info"]["finish_reason"] == {"type": "length", "length": 1}
            assert pre["output_ids"] == reference[rid][:1]

        # A prompt again on the prefill rank that ran it: the answer a gateway returns
        # (decode's) reports what that rank's prefix cache held, as prefill's does.
        rid, ids, n = workload[3]
        again = body(ids, n, bootstrap_room=random.getrandbits(63), routed_dp_rank=1)
        for _ in range(2):
            pre, dec = _both(prefill.url, decode.url, again)
            again["bootstrap_room"] += 1
        assert dec["output_ids"] == reference[rid]
        assert len(ids) - 1 <= dec["meta_info"]["cached_tokens"] < len(ids)
        assert dec["meta_info"]["cached_tokens"] == pre["meta_info"]["cached_tokens"]

        # Orphans: a decode whose prefill never comes fails after the timeout; a prefill
        # whose decode never comes returns at once (its KV is freed at the timeout).
        orphan = body([5, 6, 7], 4, bootstrap_room=424242)
        pre = httpx.post(prefill.url + "/generate", json={**orphan, "bootstrap_room": 1}, timeout=10)
        assert pre.json()["meta_info"]["finish_reason"]["type"] == "length"
        dec = httpx.post(decode.url + "/generate", json=orphan, timeout=10)
        assert dec.status_code == 503 and dec.headers["retry-after"] == "1", dec.text
        assert "no prefill placed it" in dec.json()["error"]["message"]

        # A room hijack: an intruder's decode request with the owner's room (another
        # prompt) arrives first; it gets 400, the owner its own output.
        (rid, ids, n), room = workload[0], random.getrandbits(63)

        async def hijack():
            async with httpx.AsyncClient(timeout=60) as client:
                intruder = asyncio.ensure_future(client.post(
                    decode.url + "/generate", json=body([7, 7, 7, 7], n, bootstrap_room=room)))
                await asyncio.sleep(0.3)  # parked before the owner
                owner = body(ids, n, bootstrap_room=room)
                dec = asyncio.ensure_future(client.post(decode.url + "/generate", json=owner))
                await client.post(prefill.url + "/generate", json=owner)
                return await intruder, await dec

        intruder, owner = asyncio.run(hijack())
        # 400 when it saw the owner's hand-off; 503 when the owner took and released it
        # between two of its polls (then all it sees is the route gone, as after an abort).
        assert intruder.status_code in (400, 503), intruder.text
        assert "another request" in intruder.json()["error"]["message"]  # whichever it saw first
        assert owner.status_code == 200 and owner.json()["output_ids"] == reference[rid]
        bad = httpx.post(decode.url + "/generate", json=body([5], 2), timeout=10)
        assert bad.status_code == 400 and "bootstrap_room" in bad.text
        assert_idle(prefill.url)
        assert_idle(decode.url)
    assert not prefill.segments() and not decode.segments()


def test_decode_fails_at_once_when_its_prefill_is_refused_or_no_prefill_rank_runs(tmp_path):
    """Two servers, one prefill rank. A decode request whose prefill half the prefill
    server refused fails with a 503 at once (the room can be used again right away); when
    the rank is killed, a decode request whose room nobody placed fails with a 503 within
    the liveness check; neither waits for the bootstrap timeout (300 s)."""
    port = random.randint(20_000, 60_000)
    pair = ["--disaggregation-bootstrap-port", str(port), "--dp-size", "1", *COMMON]
    with _pair(tmp_path, pair) as (prefill, decode):
        asked = body([5, 6, 7], 3, bootstrap_room=78)
        # Refused by the prefill server only: a rank it does not have (when dispatched),
        # or a field it refuses (before anything is prepared), as in a body that differs.
        refused = [(78, {"routed_dp_rank": 3}, "routed_dp_rank"),
                   (79, {"sampling_params": {"temperature": -1}}, "temperature")]
        for room, change, field in refused:
            bad = {**asked, "bootstrap_room": room, **change}
            with ThreadPoolExecutor(1) as pool:
                start = time.monotonic()
                waiting = pool.submit(httpx.post, decode.url + "/generate", timeout=60,
                                      json={**asked, "bootstrap_room": room})
                r = httpx.post(prefill.url + "/generate", json=bad, timeout=30)
                assert r.status_code == 400 and field in r.text, r.text
                r = waiting.result()
                assert r.status_code == 503 and "the prefill request failed" in r.text, r.text
                assert time.monotonic() - start < 10
        pre = httpx.post(prefill.url + "/generate", json=asked, timeout=30)  # the room again
        dec = httpx.post(decode.url + "/generate", json=asked, timeout=30)
        assert pre.status_code == 200 and dec.status_code == 200, (pre.text, dec.text)
        assert_idle(decode.url)
        ranks = httpx.get(prefill.url + "/server_info", timeout=5).json()["ranks"]
        os.kill(ranks[0]["pid"], signal.SIGKILL)
        start = time.monotonic()
        r = httpx.post(decode.url + "/generate", json=body([5, 6, 7], 3, bootstrap_room=77),
                       timeout=60)
        assert r.status_code == 503 and "no prefill rank can place it" in r.text, r.text
        assert "prefill rank 0 is not running" in r.text
        assert time.monotonic() - start < 10  # the bootstrap timeout is 300 s


def test_kv_held_for_a_dead_decode_rank_is_freed_at_once(tmp_path):
    """Requests wait on decode rank 0 (stopped) while prefill holds their KV; rank 0 is
    then killed: its requests fail (503) and prefill frees their KV at once, so the
    caches flush, instead of holding it until the 300 s bootstrap timeout."""
    flags = ["--disaggregation-mode", "pd", "--prefill-dp-size", "1", "--decode-dp-size", "2",
             "--executor", "sim", "--sim-profile", write_sim_profile(tmp_path / "p.json"),
             "--log-level", "info"]
    with ServerProcess(*flags, log_path=tmp_path / "held.log") as server:
        ranks = httpx.get(server.url + "/server_info", timeout=5).json()["ranks"]
        victim = next(r["pid"] for r in ranks if r["role"] == "decode" and r["dp_rank"] == 0)
        os.kill(victim, signal.SIGSTOP)
        with ThreadPoolExecutor(3) as pool:
            replies = [pool.submit(httpx.post, server.url + "/generate", timeout=60,
                                   json=body([5, 6, 7 + i], 4, routed_dp_rank=0))
                       for i in range(3)]
            time.sleep(1.0)  # their prefill (instant here) is done: prefill holds the KV
            # 3 prompts of 3 tokens, their first two ([5, 6]) held once by the prefix cache
            _assert_prefill_shows_held_kv(server.url, at_least=5)
            os.kill(victim, signal.SIGKILL)
            assert all(r.result().status_code == 503 for r in replies)
        _wait_flushed(server, server)
        assert server.log().count("before a decode took the KV; freed") == 3, server.log()


def _assert_prefill_shows_held_kv(url: str, at_least: int) -> None:
    """KV a prefill rank keeps for decode is memory in use (``num_used_tokens``,
    ``token_usage``, and the ``engine_type="prefill"`` gauge), not load (``num_tokens``)."""
    row = next(r for r in httpx.get(url + "/v1/loads", timeout=5).json()["loads"]
               if r["role"] == "prefill")
    assert row["num_used_tokens"] >= at_least and row["token_usage"] > 0, row
    assert row["num_tokens"] == 0, row
    gauges = [line for line in httpx.get(url + "/metrics", timeout=5).text.splitlines()
              if line.startswith("sglang:num_used_tokens{")]
    assert len(gauges) == 3, gauges  # one prefill and two decode ranks
    prefill = next(line for line in gauges if 'engine_type="prefill"' in line)
    assert float(prefill.rsplit(" ", 1)[1]) == row["num_used_tokens"], gauges
    assert sum('engine_type="decode"' in line for line in gauges) == 2, gauges


def test_kv_held_for_a_lost_decode_rank_of_a_decode_server_is_released(tmp_path):
    """Two servers: requests wait on decode rank 0 (stopped) while the prefill server
    holds their KV; rank 0 is then killed: the decode server fails them (503) and
    releases their hand-offs for the dead rank, so the prefill server frees the KV (its
    caches flush) at once instead of at the 300 s bootstrap timeout."""
    port = random.randint(20_000, 60_000)
    pair = ["--disaggregation-bootstrap-port", str(port), "--dp-size", "2", "--executor", "sim",
            "--sim-profile", write_sim_profile(tmp_path / "p.json"), "--log-level", "info"]
    with _pair(tmp_path, pair) as (prefill, decode):
        ranks = httpx.get(decode.url + "/server_info", timeout=5).json()["ranks"]
        victim = next(r["pid"] for r in ranks if r["dp_rank"] == 0)
        os.kill(victim, signal.SIGSTOP)
        rooms = [random.getrandbits(63) for _ in range(3)]
        with ThreadPoolExecutor(3) as pool:
            replies = [pool.submit(httpx.post, decode.url + "/generate", timeout=60,
                                   json=body([5, 6, 7 + i], 4, routed_dp_rank=0,
                                             bootstrap_room=room))
                       for i, room in enumerate(rooms)]
            for i, room in enumerate(rooms):  # prefill (instant here) hands each one off
                pre = httpx.post(prefill.url + "/generate", timeout=30,
                                 json=body([5, 6, 7 + i], 4, bootstrap_room=room))
                assert pre.status_code == 200, pre.text
            assert httpx.post(prefill.url + "/flush_cache", timeout=10).status_code == 400
            os.kill(victim, signal.SIGKILL)
            assert all(r.result().status_code == 503 for r in replies)
        _wait_flushed(prefill, decode)
        assert decode.log().count("ended without the KV; released") == 3, decode.log()
        # The live rank still serves a whole request.
        room = random.getrandbits(63)
        pre, dec = _both(prefill.url, decode.url, body([5, 6, 9], 4, bootstrap_room=room,
                                                       routed_dp_rank=1))
        assert len(dec["output_ids"]) == 4, dec


def test_kv_for_a_decode_half_refused_or_aborted_before_the_hand_off_is_released(tmp_path):
    """Two servers, the same body to both: when the decode half ends before the prefill
    half has handed off (the decode server refused it, or it was aborted while parked),
    the decode server (its API, or the rank that dropped the request) releases the
    hand-off once it is written: the prefill server's caches flush at once instead of
    holding the KV until the bootstrap timeout."""
    port = random.randint(20_000, 60_000)
    pair = ["--disaggregation-bootstrap-port", str(port), "--dp-size", "1", "--executor", "sim",
            "--sim-profile", write_sim_profile(tmp_path / "p.json"), "--log-level", "info"]
    with _pair(tmp_path, pair) as (prefill, decode):
        # Prompt logprobs: prefill computes them; the decode server has none (a 400).
        echo = {"prompt": [5, 6, 7], "max_tokens": 0, "echo": True, "logprobs": 1,
                "bootstrap_room": random.getrandbits(63)}
        r = httpx.post(decode.url + "/v1/completions", json=echo, timeout=30)
        assert r.status_code == 400 and "prefill server" in r.text, r.text
        assert httpx.post(prefill.url + "/v1/completions", json=echo, timeout=30).status_code == 200
        _wait_flushed(prefill, decode)
        # One room twice in one body: both servers refuse it, and no KV is held.
        twice = {"text": ["a", "b"], "bootstrap_room": [11, 11]}
        for server in (decode, prefill):
            r = httpx.post(server.url + "/generate", json=twice, timeout=30)
            assert r.status_code == 400 and "bootstrap_room" in r.text, r.text
        # Parked on decode, aborted, and only then prefilled.
        room = random.getrandbits(63)
        parked = body([5, 6, 8], 4, rid="parked", bootstrap_room=room)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, decode.url + "/generate", json=parked, timeout=60)
            deadline = time.monotonic() + 10
            while httpx.get(decode.url + "/get_load", timeout=5).json()[0]["num_reqs"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert httpx.post(decode.url + "/abort_request", json={"rid": "parked"},
                              timeout=10).status_code == 200
            assert waiting.result().json()["meta_info"]["finish_reason"]["type"] == "abort"
        assert httpx.post(prefill.url + "/generate", json=parked, timeout=30).status_code == 200
        _wait_flushed(prefill, decode)
        # The refused echo's hand-off is released by the decode server's API (no rank saw
        # that request); the aborted one's by whichever comes first, its rank or the API.
        assert decode.log().count("ended without the KV; released") >= 1, decode.log()


def _wait_flushed(server: ServerProcess, logged: ServerProcess, timeout_s: float = 10) -> None:
    """Until ``server``'s caches flush (nothing held for decode any more); on timeout,
    fail with ``logged``'s log."""
    deadline = time.monotonic() + timeout_s
    while httpx.post(server.url + "/flush_cache", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, logged.log()
        time.sleep(0.1)


class _pair:
    """Start the decode server first (it waits for the prefill server's tables), then
    the prefill server; stop both whatever happens."""

    def __init__(self, tmp_path, pair_flags):
        self.decode = ServerProcess("--disaggregation-mode", "decode", *pair_flags,
                                    log_path=tmp_path / "decode.log")
        self.prefill = ServerProcess("--disaggregation-mode", "prefill",
                                     "--load-balance-method", "round_robin", *pair_flags,
                                     log_path=tmp_path / "prefill.log")

    def __enter__(self):
        try:
            self.decode.start()
            self.prefill.start()
            self.prefill.wait_healthy(90)
            self.decode.wait_healthy(90)
        except BaseException:
            self.__exit__()
            raise
        return self.prefill, self.decode

    def __exit__(self, *exc):
        try:
            self.decode.stop()
        finally:
            self.prefill.stop()


def test_killed_prefill_rank_fails_its_requests_fast_and_its_segment_is_reclaimed(tmp_path):
    """Simulated ranks whose prefill takes 20 ms a token: a request is mid-prefill on
    rank 0 when rank 0 is killed. Its decode half fails within seconds (not the 300 s
    room timeout); new requests go to prefill rank 1; the dead rank's KV segment is
    unlinked once the rank is marked dead, not left until the server stops."""
    profile = write_sim_profile(tmp_path / "slow_prefill.json", prefill_token_s=0.02)
    flags = ["--disaggregation-mode", "pd", "--prefill-dp-size", "2", "--decode-dp-size", "1",
             "--executor", "sim", "--sim-profile", profile, "--log-level", "warning"]
    with ServerProcess(*flags, log_path=tmp_path / "pd_kill.log") as server:
        ranks = httpx.get(server.url + "/server_info", timeout=5).json()["ranks"]
        victim = next(r["pid"] for r in ranks if r["role"] == "prefill" and r["dp_rank"] == 0)
        assert any(s.endswith(".kv-p0") for s in list_segments(f"{NAME_PREFIX}{victim}."))
        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.post, server.url + "/generate",
                                  json=body(list(range(3, 203)), 4, disagg_prefill_dp_rank=0))
            time.sleep(1.0)  # 200 tokens: 4 s of prefill on rank 0
            start = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            reply = pending.result(timeout=30)
            assert time.monotonic() - start < 5
            # Never a 200: 503 with Retry-After, which a gateway retries elsewhere.
            assert reply.status_code == 503 and reply.headers["retry-after"] == "1", reply.text
            assert "prefill" in reply.json()["error"]["message"], reply.text
            ok = client.post(server.url + "/generate", json=body([5, 6, 7], 3)).json()
            assert ok["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
            # Naming the dead prefill rank: the answer names the field the client gave.
            named = client.post(server.url + "/generate",
                                json=body([5, 6, 7], 3, disagg_prefill_dp_rank=0))
            assert named.status_code == 503, named.text
            assert "disagg_prefill_dp_rank 0" in named.json()["error"]["message"], named.text
            health = client.get(server.url + "/health")
            assert health.status_code == 200, health.text
            assert health.json() == {"status": "degraded",
                                     "dead_ranks": {"prefill": [0], "decode": []}}
            rows = client.get(server.url + "/get_load").json()
            assert [r["status"] for r in rows] == ["dead", "ready", "ready"], rows
            assert (rows[0]["num_reqs"], rows[0]["num_tokens"]) == (0, 0), rows
            assert not list_segments(f"{NAME_PREFIX}{victim}.")


def test_frozen_prefill_rank_fails_decode_within_the_stale_bound(tmp_path):
    """A request is mid-prefill on rank 0 when rank 0 is frozen (SIGSTOP): the client
    gets an error within --stale-after-s (plus margin), not after the 300 s waiting
    timeout; a stream that started ends with an error event and [DONE]. Meanwhile
    /get_load marks the rank stale and /health lists it."""
    stale_s = 2.0
    profile = write_sim_profile(tmp_path / "slow_prefill.json", prefill_token_s=0.05)
    flags = ["--disaggregation-mode", "pd", "--prefill-dp-size", "2", "--decode-dp-size", "1",
             "--executor", "sim", "--sim-profile", profile, "--stale-after-s", str(stale_s),
             "--log-level", "warning"]
    with ServerProcess(*flags, log_path=tmp_path / "pd_stop.log") as server:
        ranks = httpx.get(server.url + "/server_info", timeout=5).json()["ranks"]
        victim = next(r["pid"] for r in ranks if r["role"] == "prefill" and r["dp_rank"] == 0)
        payload = {**body(list(range(3, 203)), 4, disagg_prefill_dp_rank=0), "stream": True}
        try:
            with httpx.Client(timeout=60) as client:
                with client.stream("POST", server.url + "/generate", json=payload) as r:
                    assert r.status_code == 200  # the stream starts at once
                    time.sleep(1.0)  # 200 tokens: 10 s of prefill on rank 0
                    os.kill(victim, signal.SIGSTOP)
                    start = time.monotonic()
                    lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                    elapsed = time.monotonic() - start
                assert lines[-1] == "data: [DONE]", lines
                error = httpx.Response(200, content=lines[-2][6:]).json()["error"]
                assert error["code"] == 503 and "prefill" in error["message"], error
                assert elapsed < stale_s + 5, elapsed  # margin: a loaded machine
                rows = client.get(server.url + "/get_load").json()
                assert rows[0]["status"] == "stale", rows
                assert client.get(server.url + "/health").json()["dead_ranks"] == \
                    {"prefill": [0], "decode": []}
        finally:
            os.kill(victim, signal.SIGCONT)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_squatted_pd_segment_is_refused_with_a_clear_error(tmp_path, mode):
    """Another user created the pair's hand-off table name first (here: mode 0644): the
    server refuses to start, says why, and leaves nothing behind."""
    port = random.randint(20_000, 60_000)
    path = f"/dev/shm/{NAME_PREFIX}{os.getpid()}.pd{port}.handoff"  # a live pid: looks in use
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    os.fchmod(fd, 0o644)
    os.close(fd)
    server = ServerProcess("--disaggregation-mode", mode, "--disaggregation-bootstrap-port",
                           str(port), "--startup-timeout-s", "30", *COMMON,
                           log_path=tmp_path / f"{mode}.log")
    try:
        server.start()
        assert server.proc.wait(60) != 0
        assert "not created by a dpserve server of this user" in server.log(), server.log()
        assert not server.segments()
    finally:
        server.stop()
        os.unlink(path)
