"""Behind SGLang's real gateways: sglang-router 0.3.2 and smg 1.13 in front of our engines.

Every test starts the gateway and the engines on free 127.0.0.1 ports (the gateway's
Prometheus listener too), bounds every wait and stops everything in ``finally``; each
compares what comes through the gateway with a direct greedy request to an engine. A
``RecordingProxy`` between gateway and engine shows what the gateway really sent (which
routing keys, which load endpoints) and what each hop answered.

Facts these tests pin (found by running the gateways against these engines):
- sglang-router ``--dp-aware`` and smg ``--dp-aware`` (regular mode) register
  ``url@0``, ``url@1`` from ``/server_info``'s ``dp_size`` and inject
  ``data_parallel_rank``; in PD mode smg injects ``routed_dp_rank`` (both sides) and
  ``disagg_prefill_dp_rank`` (decode side).
- sglang-router's ``power_of_two`` reads ``GET /get_load`` (a list; it sums
  ``num_tokens``), polled every 30 s and on demand by the gateway's ``/get_loads``.
- smg 1.13 polls ``GET /loads?model=<id>`` (then ``/v1/loads?include=core,disagg,
  queues,memory``, then ``/metrics`` as fallbacks) every ``--load-monitor-interval``
  and keys its DP load cache on each row's ``dp_rank`` -> ``num_used_tokens``. Its
  ``--dp-minimum-tokens-scheduler`` picks a rank only for workers registered without a
  rank, i.e. in PD mode without ``--dp-aware``: in regular mode it never injects a rank,
  and with ``--dp-aware`` its poller requests ``http://host:port@0/loads``, which
  reqwest reads as user ``host``, password ``port``, host ``0``: it never reaches us.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.args import InvalidServerArgs, build_parser, parse_args, validate_args
from shm.segment import NAME_PREFIX, reclaim_stale_segments
from tests.gateway_helpers import Gateway, RecordingProxy, free_ports, missing_gateway
from tests.server_helpers import ServerProcess, group_pids

pytestmark = [pytest.mark.gateway, pytest.mark.slow]

MODEL = "tiny"
GENERATE = {"text": "The capital of France is",
            "sampling_params": {"max_new_tokens": 8, "temperature": 0.0}}
COMPLETION = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 8, "temperature": 0.0}
TIMEOUT = httpx.Timeout(60.0, connect=5.0)


def needs(kind: str):
    """Skip (before any fixture starts an engine) when ``kind`` is not installed."""
    reason = missing_gateway(kind)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


# ---- engines and the direct answers ----------------------------------------------------------
def start_servers(*servers: ServerProcess) -> None:
    """Start together (they load in parallel), wait for each; on failure stop all."""
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_healthy(90)
    except BaseException:
        stop_servers(*servers)
        raise


def stop_servers(*servers: ServerProcess) -> None:
    """SIGTERM to all, then each one's bounded stop (they shut down in parallel)."""
    for s in servers:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    for s in servers:
        if s.proc is not None:
            try:
                s.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass  # stop() kills the group
        s.stop()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Two ``engine.serve --dp-size 2`` instances with the real tiny model."""
    logs = tmp_path_factory.mktemp("gateway_engines")
    servers = [ServerProcess("--dp-size", "2", "--device", "cpu", log_path=logs / f"engine{i}.log")
               for i in range(2)]
    start_servers(*servers)
    try:
        yield servers
    finally:
        stop_servers(*servers)


@pytest.fixture(scope="module")
def reference(engines):
    """Greedy outputs asked directly of an engine; both engines agree."""
    ref = [{"generate": post(e.url, "/generate", GENERATE),
            "completion": post(e.url, "/v1/completions", COMPLETION)["choices"][0]["text"],
            "chat": post(e.url, "/v1/chat/completions", CHAT)["choices"][0]["message"]["content"]}
           for e in engines]
    assert ref[0] == {**ref[1], "generate": ref[0]["generate"]}
    assert ref[0]["generate"]["output_ids"] == ref[1]["generate"]["output_ids"]
    assert len(ref[0]["generate"]["output_ids"]) == 8
    return ref[0]


@pytest.fixture(scope="module")
def proxies(engines, tmp_path_factory):
    """A recording proxy in front of each engine."""
    logs = tmp_path_factory.mktemp("gateway_proxies")
    out = [RecordingProxy(e.url, logs / f"proxy{i}.log", logs / f"proxy{i}.jsonl")
           for i, e in enumerate(engines)]
    try:
        for p in out:
            p.start()
        yield out
    finally:
        for p in out:
            p.stop()


# ---- requests ------------------------------------------------------------------------------
def post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json=body, timeout=TIMEOUT)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


def stream(url: str, path: str, body: dict) -> list:
    """The ``data:`` events of a streamed request, ``[DONE]`` included."""
    events = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=TIMEOUT) as r:
        assert r.status_code == 200, (path, r.status_code, r.read())
        for line in r.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events and events[-1] == "[DONE]", events
    return events[:-1]


def check_routes(url: str, ref: dict) -> None:
    """/generate (plain and streamed), /v1/completions and /v1/chat/completions (plain and
    streamed) through ``url`` give the direct greedy outputs."""
    direct = ref["generate"]
    out = post(url, "/generate", GENERATE)
    assert (out["text"], out["output_ids"]) == (direct["text"], direct["output_ids"])
    chunks = stream(url, "/generate", GENERATE)
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == sorted(
        c["meta_info"]["completion_tokens"] for c in chunks)  # cumulative
    assert (chunks[-1]["text"], chunks[-1]["output_ids"]) == (direct["text"], direct["output_ids"])
    assert post(url, "/v1/completions", COMPLETION)["choices"][0]["text"] == ref["completion"]
    deltas = stream(url, "/v1/completions", COMPLETION)
    assert "".join(c["choices"][0]["text"] for c in deltas if c["choices"]) == ref["completion"]
    assert post(url, "/v1/chat/completions", CHAT)["choices"][0]["message"]["content"] == ref["chat"]
    deltas = stream(url, "/v1/chat/completions", CHAT)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in deltas
                   if c["choices"]) == ref["chat"]


def finished_requests(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sglang:num_requests_total"))


class LongRequest:
    """A streamed request kept running on one rank of an engine until the block exits
    (leaving closes the stream, which aborts it)."""

    def __init__(self, url: str, dp_rank: int, max_new_tokens: int = 1500):
        self.body = {"text": "Once upon a time", "routed_dp_rank": dp_rank, "stream": True,
                     "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                         "ignore_eos": True}}
        self.url = url

    def __enter__(self) -> "LongRequest":
        self._ctx = httpx.stream("POST", self.url + "/generate", json=self.body, timeout=TIMEOUT)
        r = self._ctx.__enter__()
        assert r.status_code == 200
        self._lines = r.iter_lines()
        next(line for line in self._lines if line.startswith("data: "))  # it is running
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


# ---- 1. sglang-router, regular mode ----------------------------------------------------------
@needs("sglang-router")
@pytest.mark.parametrize("policy", ["round_robin", "cache_aware", "power_of_two"])
def test_router_regular_mode(engines, reference, tmp_path, policy):
    before = [finished_requests(e.url) for e in engines]
    with Gateway("sglang-router", "--worker-urls", *(e.url for e in engines),
                 "--policy", policy, log_path=tmp_path / "router.log").start(2) as gw:
        for _ in range(2):
            check_routes(gw.url, reference)
        served = [finished_requests(e.url) - b for e, b in zip(engines, before)]
        assert sum(served) == 2 * 6
        if policy == "round_robin":
            assert all(n > 0 for n in served), served
            # sglang-router passes the client's model through; like SGLang's engine we echo
            # it rather than 404 (a 4xx would also count toward the gateway's breaker).
            other = post(gw.url, "/v1/chat/completions", {**CHAT, "model": "other"})
            assert other["model"] == "other"
            assert other["choices"][0]["message"]["content"] == reference["chat"]
        if policy == "power_of_two":
            # The policy's load is the gateway's read of our /get_load (sum of num_tokens
            # over the list); /get_loads makes the gateway read it now instead of in 30 s.
            def gateway_loads() -> dict:
                return {w["worker"]: w["load"]
                        for w in httpx.get(gw.url + "/get_loads", timeout=5).json()["workers"]}
            at_rest = {engines[0].url: 0, engines[1].url: 0}  # -1 would mean "unreadable"
            wait_for(gateway_loads, lambda loads: loads == at_rest, "idle loads", timeout_s=5)
            with LongRequest(engines[0].url, dp_rank=1):
                loads = gateway_loads()
                direct = httpx.get(engines[0].url + "/get_load").json()
            assert loads[engines[0].url] > 0 and loads[engines[1].url] == 0, loads
            assert direct[1]["num_tokens"] >= loads[engines[0].url] > 0, (direct, loads)


# ---- 2. --dp-aware, regular mode -------------------------------------------------------------
@pytest.mark.parametrize("kind", [pytest.param(k, marks=needs(k)) for k in ("sglang-router", "smg")])
def test_dp_aware_rank_is_the_gateways_choice(proxies, reference, tmp_path, kind):
    with Gateway(kind, "--worker-urls", *(p.url for p in proxies), "--policy", "round_robin",
                 "--dp-aware", log_path=tmp_path / "gateway.log").start(4) as gw:
        assert sorted(w["url"] for w in gw.workers()) == sorted(
            f"{p.url}@{r}" for p in proxies for r in (0, 1))
        outs = {}
        for i in range(8):
            rid = f"{kind}-dp-aware-{i}"
            body = {**GENERATE, "rid": rid}
            outs[rid] = stream(gw.url, "/generate", body)[-1] if i % 2 else post(gw.url, "/generate", body)
        chosen = set()
        for rid, out in outs.items():
            assert out["output_ids"] == reference["generate"]["output_ids"]
            [(index, record)] = [(i, r) for i, p in enumerate(proxies)
                                 for r in p.records("/generate") if (r["body"] or {}).get("rid") == rid]
            rank = record["body"]["data_parallel_rank"]  # the key both gateways send
            assert out["meta_info"]["dp_rank"] == rank == record["response"]["meta_info"]["dp_rank"]
            chosen.add((index, rank))
        assert chosen == {(0, 0), (0, 1), (1, 0), (1, 1)}  # round robin over the four workers


# ---- 4b. smg's minimum-tokens scheduler over our per-rank loads ----------------------------
@needs("smg")
def test_smg_minimum_tokens_scheduler_follows_our_loads(engines, proxies, reference, tmp_path):
    """smg consults ``--dp-minimum-tokens-scheduler`` only in PD mode (module docstring), so
    smg runs ``--pd-disaggregation``; our two regular engines stand in for the prefill and
    decode servers (each serves the whole request; smg returns decode's). This is about the
    load feed and the injected ranks; the KV hand-off is the PD tests' business."""
    prefill, decode = proxies
    (bootstrap_port,) = free_ports(1)
    started = time.time()
    with Gateway("smg", "--pd-disaggregation", "--prefill", prefill.url, str(bootstrap_port),
                 "--decode", decode.url, "--policy", "round_robin",
                 "--dp-minimum-tokens-scheduler", "--load-monitor-interval", "1",
                 log_path=tmp_path / "smg.log").start(2) as gw:
        polls = wait_for(lambda: [p.records("/loads", since=started) for p in proxies],
                         lambda found: all(found), "smg polling /loads")
        assert all(r["query"] == f"model={MODEL}" and r["status"] == 200 for rs in polls for r in rs)
        for p in proxies:  # /loads answered, so no fallback to /v1/loads or /metrics
            assert not p.records("/metrics", since=started) and not p.records("/v1/loads", since=started)

        # Idle ranks: picks alternate (each pick adds its estimated tokens to the rank).
        assert spread_of(concurrent_generate(gw, prefill, decode, reference, 4)) == {0, 1}
        # Rank 0 busy on both servers: once smg has polled that, everything goes to rank 1.
        with LongRequest(engines[0].url, dp_rank=0), LongRequest(engines[1].url, dp_rank=0):
            busy = time.time() + 1.0  # let rank 0 pile up tokens before the poll counts
            time.sleep(1.0)
            wait_for(lambda: [p.records("/loads", since=busy) for p in proxies],
                     lambda found: all(found), "a poll of the busy ranks")
            assert spread_of(concurrent_generate(gw, prefill, decode, reference, 4)) == {1}


def concurrent_generate(gw: Gateway, prefill: RecordingProxy, decode: RecordingProxy,
                        reference: dict, n: int) -> list[tuple[int, int]]:
    """n concurrent /generate through smg PD; checks each one's keys on both hops and
    returns the (prefill rank, decode rank) smg chose for each."""
    since = time.time()
    with ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(lambda _: post(gw.url, "/generate", GENERATE), range(n)))
    decoded = {r["response"]["meta_info"]["id"]: r for r in decode.records("/generate", since)}
    prefilled = {r["body"]["bootstrap_room"]: r for r in prefill.records("/generate", since)}
    ranks = []
    for out in outs:
        assert out["output_ids"] == reference["generate"]["output_ids"]
        d = decoded[out["meta_info"]["id"]]
        p = prefilled[d["body"]["bootstrap_room"]]
        assert d["body"]["bootstrap_port"] == p["body"]["bootstrap_port"]
        assert d["body"]["disagg_prefill_dp_rank"] == p["body"]["routed_dp_rank"]
        assert p["response"]["meta_info"]["dp_rank"] == p["body"]["routed_dp_rank"]
        assert out["meta_info"]["dp_rank"] == d["body"]["routed_dp_rank"]
        ranks.append((p["body"]["routed_dp_rank"], d["body"]["routed_dp_rank"]))
    return ranks


def spread_of(ranks: list[tuple[int, int]]) -> set[int]:
    """The ranks used; smg picks the same rank on both sides when their loads agree."""
    return {r for pair in ranks for r in pair}


def wait_for(get, ok, what: str, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = get()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not seen after {timeout_s} s ({value!r})")
        time.sleep(0.1)


# ---- 3, 4a. PD: --disaggregation-mode prefill / decode servers ------------------------------
def pd_refused() -> str | None:
    """Why this build cannot run a prefill/decode server pair, or None."""
    argv = ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", "8998"]
    namespace, unknown = build_parser().parse_known_args(argv)
    if unknown:
        return f"the server has no {unknown[0]} flag yet (PD disaggregation)"
    try:
        validate_args(parse_args(argv))  # parse_args also reads the env timeouts
    except InvalidServerArgs as exc:
        return f"the server refuses --disaggregation-mode prefill: {exc}"
    return None


def pd_flags(mode: str, bootstrap_port: int, timeout_s: int = 5) -> list[str]:
    """A PD server's flags; short room timeouts (where the flags exist) so orphaned rooms
    expire within the test."""
    flags = ["--dp-size", "2", "--device", "cpu", "--disaggregation-mode", mode,
             "--disaggregation-bootstrap-port", str(bootstrap_port)]
    for flag in ("--disaggregation-bootstrap-timeout", "--disaggregation-waiting-timeout"):
        if not build_parser().parse_known_args([flag, str(timeout_s)])[1]:
            flags += [flag, str(timeout_s)]
    return flags


@pytest.fixture(scope="module")
def pd_servers(tmp_path_factory):
    reason = pd_refused()
    if reason:
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("gateway_pd")
    (bootstrap_port,) = free_ports(1)  # names the pair's shared tables; no socket
    servers = {mode: ServerProcess(*pd_flags(mode, bootstrap_port), log_path=logs / f"{mode}.log")
               for mode in ("prefill", "decode")}
    start_servers(*servers.values())
    servers.update(bootstrap_port=bootstrap_port, logs=logs)
    try:
        yield servers
    finally:
        stop_servers(servers["prefill"], servers["decode"])


@needs("smg")
def test_smg_pd_dp_aware_ranks(pd_servers, reference, tmp_path):
    logs = tmp_path
    proxies = [RecordingProxy(pd_servers[m].url, logs / f"{m}-proxy.log", logs / f"{m}.jsonl")
               for m in ("prefill", "decode")]
    try:
        for p in proxies:
            p.start()
        prefill, decode = proxies
        with Gateway("smg", "--pd-disaggregation", "--dp-aware", "--prefill", prefill.url,
                     str(pd_servers["bootstrap_port"]), "--decode", decode.url,
                     "--policy", "round_robin", log_path=logs / "smg.log").start(4) as gw:
            check_routes(gw.url, reference)
            pairs = concurrent_generate(gw, prefill, decode, reference, 8)
            assert {p for p, _ in pairs} == {0, 1} and {d for _, d in pairs} == {0, 1}, pairs
    finally:
        for p in proxies:
            p.stop()


@needs("sglang-router")
def test_router_pd_outputs_and_prefill_failure(pd_servers, engines, reference, tmp_path):
    prefill, decode, bport = pd_servers["prefill"], pd_servers["decode"], pd_servers["bootstrap_port"]
    long_body = {**GENERATE, "sampling_params": {"max_new_tokens": 200, "temperature": 0.0}}
    long_ids = post(engines[0].url, "/generate", long_body)["output_ids"]
    # No circuit breaker (10 failures would shut the prefill out for 60 s after it is
    # back) and few retries, so a dead prefill is an error soon.
    with Gateway("sglang-router", "--pd-disaggregation", "--prefill", prefill.url, str(bport),
                 "--decode", decode.url, "--policy", "round_robin", "--disable-circuit-breaker",
                 "--retry-max-retries", "2", log_path=tmp_path / "router.log").start(2) as gw:
        check_routes(gw.url, reference)  # PD greedy outputs are the non-PD ones

        killed = group_pids(prefill.pid)  # the server and its ranks: their segments
        try:
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(outcome, gw.url, long_body) for _ in range(4)]
                time.sleep(0.3)
                prefill.kill_group()
                results = [f.result(timeout=120) for f in futures]
            assert all(kind == "error" or (kind == "ok" and out["output_ids"] == long_ids)
                       for kind, out in results), results  # an error or the right answer
            started = time.monotonic()
            assert outcome(gw.url, GENERATE)[0] == "error"  # prefill gone: an error,
            assert time.monotonic() - started < 30          # soon, not a hang

            restarted = ServerProcess(*pd_flags("prefill", bport), port=prefill.port,
                                      log_path=pd_servers["logs"] / "prefill-restarted.log")
            pd_servers["prefill"] = restarted  # the fixture stops it
            restarted.start().wait_healthy(90)
            wait_for(lambda: outcome(gw.url, GENERATE), lambda o: o[0] == "ok",
                     "a request through the restarted prefill", timeout_s=30)
            check_routes(gw.url, reference)
            wait_for(lambda: httpx.get(decode.url + "/v1/loads", timeout=5).json()["loads"],
                     lambda rows: all(idle(row) for row in rows),
                     "decode ranks idle (no leaked KV or room)", timeout_s=30)
        finally:
            for pid in killed:  # SIGKILLed: nobody unlinked what they created
                reclaim_stale_segments(f"{NAME_PREFIX}{pid}.")


def outcome(url: str, body: dict) -> tuple[str, object]:
    """("ok", output) or ("error", what: a status, an error body, an aborted request or a
    broken connection); a hang shows as the client's timeout."""
    try:
        r = httpx.post(url + "/generate", json=body, timeout=httpx.Timeout(60.0, connect=5.0))
    except httpx.TimeoutException as exc:
        return "timeout", repr(exc)
    except httpx.HTTPError as exc:
        return "error", repr(exc)
    body = r.json()
    finish = (body.get("meta_info") or {}).get("finish_reason") or {}
    if r.status_code != 200 or "error" in body or finish.get("type") == "abort":
        return "error", (r.status_code, r.text[:300])
    return "ok", body


def idle(row: dict) -> bool:
    """A rank holding no request, KV token or room (SGLang's disagg queue counts, where
    reported, included)."""
    return all(row.get(key, 0) == 0 for key in (
        "num_reqs", "num_total_reqs", "num_used_tokens", "num_tokens", "num_prefill_tokens",
        "prefill_queue_reqs", "decode_queue_reqs"))
