"""The HTTP API through ``TestClient(create_app(...))`` over real rank processes.

The ranks run the real ``scheduler.process.run_scheduler`` with the simulated
executor (a fixed-cost forward, tiny's vocabulary), so these test the API, the
dispatcher, the pipes and the board, not the model (tests/test_server_e2e.py runs the
real command). Start-up costs about a second, so ranks are shared per module where a
test does not break them.
"""

from __future__ import annotations

import dataclasses

import json
import os
import random
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from server.app import create_app
from server.args import ServerArgs, resolve_args
from server.engine_client import EngineClient
from server.pd import PDProcesses
from server.ranks import EngineProcesses, RankStartupError
from shm.board import LoadBoard, RankStatus
from shm.segment import list_segments
from tests.server_helpers import write_sim_profile

GREEDY = {"temperature": 0.0}


def make_args(tmp_path, step_s=0.0, **kw) -> ServerArgs:
    profile = write_sim_profile(tmp_path / "sim.json", step_s=step_s)
    return resolve_args(ServerArgs(model_path="tiny", executor="sim", sim_profile=profile, port=0,
                                   **{"dp_size": 2, **kw}))


def serve(args: ServerArgs):
    """(processes, TestClient) context; everything is stopped and unlinked after."""
    class _Ctx:
        def __enter__(self):
            self.procs = EngineProcesses(args).start()
            try:
                self.procs.wait_ready(60)
                self.client = TestClient(create_app(EngineClient.from_processes(args, self.procs)))
                self.client.__enter__()
            except BaseException:
                self.procs.close()
                raise
            return self.procs, self.client

        def __exit__(self, *exc):
            try:
                self.client.__exit__(*exc)
            finally:
                self.procs.close()
    return _Ctx()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve(make_args(tmp_path_factory.mktemp("app"), step_s=0.001)) as (procs, client):
        yield procs, client


@pytest.fixture
def client(served):
    return served[1]


def sse_events(text: str) -> list:
    """Parse an SSE body strictly: every event is ``data: ...\\n\\n``, the last [DONE]."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    parts = text.split("\n\n")
    assert parts[-1] == ""
    events = []
    for part in parts[:-1]:
        assert part.startswith("data: "), part
        payload = part[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


# ---- /generate --------------------------------------------------------------------------
def test_generate_text(client):
    r = client.post("/generate", json={"text": "Hello", "sampling_params": {
        "max_new_tokens": 7, **GREEDY}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"text", "output_ids", "meta_info"}
    meta = body["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 7}
    assert meta["prompt_tokens"] == 5 and meta["completion_tokens"] == 7
    assert len(body["output_ids"]) == 7 and meta["cached_tokens"] == 0
    assert meta["dp_rank"] in (0, 1) and meta["e2e_latency"] > 0 and meta["id"]
    assert isinstance(body["text"], str)


def test_generate_input_ids_batch_and_n(client):
    r = client.post("/generate", json={"input_ids": [[1, 2, 3], [4, 5]], "rid": ["a", "b"],
                                       "sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o["meta_info"]["id"] for o in out] == ["a", "b"]
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [3, 2]
    r = client.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2, "n": 3}})
    assert r.status_code == 200 and len(r.json()) == 3
    single = client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {
        "max_new_tokens": 2}}).json()
    assert isinstance(single, dict) and single["meta_info"]["prompt_tokens"] == 3


def test_generate_stream_is_cumulative(client):
    r = client.post("/generate", json={"text": "Hi there", "stream": True,
                                       "sampling_params": {"max_new_tokens": 12, **GREEDY}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r.text)
    assert chunks
    prev_ids, prev_n = [], 0
    for c in chunks:
        ids = c["output_ids"]
        assert ids[:len(prev_ids)] == prev_ids  # cumulative, never a delta
        assert c["meta_info"]["completion_tokens"] == len(ids) >= prev_n
        prev_ids, prev_n = ids, len(ids)
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert len(prev_ids) == 12


def test_generate_stream_batch_has_index(client):
    r = client.post("/generate", json={"text": ["a", "b"], "stream": True,
                                       "sampling_params": {"max_new_tokens": 3}})
    chunks = sse_events(r.text)
    assert {c["index"] for c in chunks} == {0, 1}
    finals = [c for c in chunks if c["meta_info"]["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1]


def test_routed_dp_rank_and_alias(client):
    for key in ("routed_dp_rank", "data_parallel_rank"):
        for rank in (0, 1):
            r = client.post("/generate", json={"text": "x", key: rank,
                                               "sampling_params": {"max_new_tokens": 1}})
            assert r.status_code == 200, r.text
            assert r.json()["meta_info"]["dp_rank"] == rank


def test_gateway_keys_are_accepted(client):
    r = client.post("/generate", json={
        "text": "x", "sampling_params": {"max_new_tokens": 2, "stop": None},
        "model": None, "return_text_in_logprobs": True, "log_metrics": True,
        "return_hidden_states": False, "background": False, "no_logs": True,
        "return_bytes": False, "return_entropy": False, "lora_path": None,
        "bootstrap_host": "127.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 12345,
        "some_future_key": {"a": 1}})
    assert r.status_code == 200, r.text


def test_openai_routes_take_the_routing_keys(client):
    """Gateways add the routing keys to the OpenAI bodies too (a list per prompt for a
    list ``prompt``); they are obeyed (an out-of-range rank is a 400) and checked."""
    ok = {"model": "x", "prompt": ["a", "b"], "max_tokens": 1, "data_parallel_rank": [1, 0],
          "disagg_prefill_dp_rank": 0, "bootstrap_host": ["h", "h"], "bootstrap_port": [1, 1],
          "bootstrap_room": [5, 9]}
    assert client.post("/v1/completions", json=ok).status_code == 200
    chat = {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 1}
    assert client.post("/v1/chat/completions", json={**chat, "routed_dp_rank": 1,
                                                     "bootstrap_room": 3}).status_code == 200
    for bad in ({"routed_dp_rank": [0]}, {"bootstrap_room": [1, 2, 3]}, {"routed_dp_rank": 7}):
        r = client.post("/v1/completions", json={**ok, **bad})
        assert r.status_code == 400, (bad, r.text)
    assert client.post("/v1/chat/completions", json={**chat, "routed_dp_rank": 7}).status_code == 400
    both = {"routed_dp_rank": 1, "data_parallel_rank": 0}
    assert client.post("/v1/chat/completions", json={**chat, **both}).status_code == 400
    agree = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1,
                                                "routed_dp_rank": 1, "data_parallel_rank": 1})
    assert agree.status_code == 200


def test_return_logprob(client):
    r = client.post("/generate", json={"text": "x", "return_logprob": True,
                                       "sampling_params": {"max_new_tokens": 3}})
    lps = r.json()["meta_info"]["output_token_logprobs"]
    assert len(lps) == 3 and all(len(e) == 3 for e in lps)


BAD_BODIES = {
    "wrong type": {"text": "x", "sampling_params": {"max_new_tokens": "ten"}},
    "bool as int": {"text": "x", "sampling_params": {"max_new_tokens": True}},
    "negative max_new_tokens": {"text": "x", "sampling_params": {"max_new_tokens": -1}},
    "absurd max_new_tokens": {"text": "x", "sampling_params": {"max_new_tokens": 10**12}},
    "prompt longer than context": {"input_ids": [1] * 5000},
    "empty text": {"text": ""},
    "empty input_ids": {"input_ids": []},
    "unknown sampling key": {"text": "x", "sampling_params": {"max_new_tokenz": 3}},
    "bad dp rank": {"text": "x", "routed_dp_rank": 7},
    "negative dp rank": {"text": "x", "data_parallel_rank": -1},
    "no prompt": {"sampling_params": {}},
    "text and input_ids": {"text": "x", "input_ids": [1]},
    "token id outside vocab": {"input_ids": [1, 100000]},
    "bad temperature": {"text": "x", "sampling_params": {"temperature": -1}},
    "text of wrong type": {"text": 5},
    "batch size mismatch": {"text": ["a", "b"], "rid": ["only-one"]},
    "two rank names that disagree": {"text": "x", "routed_dp_rank": 0, "data_parallel_rank": 1},
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_generate_bodies_are_400_then_still_serving(client, case):
    r = client.post("/generate", json=BAD_BODIES[case])
    assert r.status_code == 400, (case, r.status_code, r.text)
    assert isinstance(r.json()["error"]["message"], str) and r.json()["error"]["message"]
    ok = client.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
    assert ok.status_code == 200


def test_not_json_and_not_object_are_400(client):
    assert client.post("/generate", content=b"{nope").status_code == 400
    assert client.post("/generate", json=[1, 2]).status_code == 400
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": -2}).status_code == 400


def test_unknown_route_is_json_404(client):
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()


# ---- OpenAI -----------------------------------------------------------------------------
def test_completions(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once", "max_tokens": 5,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    usage = body["usage"]
    assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
        "prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < 4
    r = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2, "n": 2})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert r.json()["usage"]["prompt_tokens"] == 2


def test_completions_stream_with_usage(client):
    r = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 6, "stream": True,
                                             "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    finals = [e for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"


def test_chat_max_tokens_and_max_completion_tokens(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    for key in ("max_tokens", "max_completion_tokens"):
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, key: 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] == 4


def test_chat_stream(client):
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True})
    events = sse_events(r.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert isinstance(text, str)


BAD_CHATS = {
    "unknown role": ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    "tool role": ([{"role": "tool", "content": "42"}], "messages[0].role"),
    "image part": ([{"role": "user", "content": [
        {"type": "text", "text": "Describe this image."},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}],
        "messages[0].content[1].type"),
    "text part without text": ([{"role": "user", "content": [{"type": "text"}]}],
                               "messages[0].content[0].text"),
    "text part of another type": ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
                                  "messages[0].content[0].text"),
    "null content": ([{"role": "system", "content": "be brief"},
                      {"role": "user", "content": None}], "messages[1].content"),
    "no content": ([{"role": "user"}], "messages[0].content"),
    "tool calls": ([{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}],
                   "messages[1].tool_calls"),
    "no message": ([], "messages"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHATS))
def test_chat_messages_a_template_cannot_render_faithfully_are_400(client, case):
    messages, field = BAD_CHATS[case]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert r.status_code == 400 and field in r.json()["error"]["message"], (case, r.text)
    ok = [{"role": "developer", "content": "be brief"},
          {"role": "user", "content": [{"type": "text", "text": "hi"}]},
          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    assert client.post("/v1/chat/completions",
                       json={"messages": ok, "max_tokens": 1}).status_code == 200


def test_models(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny").json() == body["data"][0]
    r = client.get("/v1/models/org/other-model")
    assert r.status_code == 404 and "tiny" in r.json()["error"]["message"]


# ---- info, load, metrics ------------------------------------------------------------------
def test_health_and_info(client):
    assert client.get("/health").status_code == 200
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/health_generate").status_code == 200
    for path in ("/server_info", "/get_server_info"):
        info = client.get(path).json()
        for key in ("model_path", "served_model_name", "tp_size", "dp_size",
                    "load_balance_method", "disaggregation_mode", "max_total_num_tokens",
                    "version"):
            assert key in info, key
        # auto on mixed ranks that keep a prefix cache
        assert info["dp_size"] == 2 and info["load_balance_method"] == "cache_aware"
        assert info["status"] == "ok" and os.path.isdir(info["model_path"])
    for path in ("/model_info", "/get_model_info"):
        info = client.get(path).json()
        assert os.path.isdir(info["model_path"]) and os.path.isdir(info["tokenizer_path"])
        assert info["is_generation"] is True and info["architectures"] == ["LlamaForCausalLM"]
        assert info["served_model_name"] == "tiny" and info["disaggregation_mode"] == "null"


def test_loads(client):
    rows = client.get("/get_load").json()
    assert [r["dp_rank"] for r in rows] == [0, 1]
    assert all(set(r) == {"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens", "status"}
               for r in rows)
    assert [r["status"] for r in rows] == ["ready", "ready"]
    for path in ("/v1/loads?include=core,disagg,queues,memory", "/loads?model=tiny"):
        body = client.get(path).json()
        assert body["timestamp"] and len(body["loads"]) == 2
        assert {"num_running_reqs", "num_waiting_reqs", "token_usage",
                "num_prefill_tokens"} <= set(body["loads"][0])
        assert [r["role"] for r in body["loads"]] == ["mixed", "mixed"]
    assert client.get("/v1/loads?dp_rank=1").json()["loads"][0]["dp_rank"] == 1


def test_pd_pair_load_rows_say_their_role(tmp_path):
    """A prefill and a decode server (one rank each, in-process): their /get_load and
    /v1/loads rows say their role, as a pd server's do (a gateway polling both sees which
    is which); a plain server's /get_load keeps SGLang's keys (test_loads)."""
    port = random.randint(20_000, 60_000)  # names the pair's shared tables; no socket
    servers = []
    try:
        for mode in ("prefill", "decode"):
            args = make_args(tmp_path, disaggregation_mode=mode, dp_size=1,
                             disaggregation_bootstrap_port=port)
            servers.append(procs := PDProcesses(args))
            procs.start()
            procs.wait_ready(60)
            with TestClient(create_app(procs.engine_client())) as client:
                assert [r["role"] for r in client.get("/get_load").json()] == [mode]
                assert [r["role"] for r in client.get("/v1/loads").json()["loads"]] == [mode]
    finally:
        for procs in reversed(servers):
            procs.close()


FLUSHED = ("Cache flushed.\nPlease check backend logs for more details. (When there are "
           "running or waiting requests, the operation will not be performed.)\n")


def test_flush_cache(client):
    """Waits on the ranks answering FlushCacheReq (scheduler side of issue 22)."""
    for r in (client.get("/flush_cache"), client.post("/flush_cache")):
        assert (r.status_code, r.text) == (200, FLUSHED)


def test_a_flush_makes_the_dispatcher_forget_the_caches(client):
    """After a flush no rank caches anything: ``cache_aware``'s memory of prompts sent
    to be cached, and of which prefixes were hot, goes with the caches."""
    dispatcher = client.app_state["engine"].dispatcher
    prompt = list(range(3, 3 + 3 * 64))
    assert client.post("/generate", json={"input_ids": prompt, "sampling_params": {
        "max_new_tokens": 1}}).status_code == 200
    assert len(dispatcher.traffic) > 0
    dispatcher.pending.note(prompt, 0, time.monotonic_ns())
    assert len(dispatcher.pending) == 1
    assert client.post("/flush_cache").status_code == 200
    assert len(dispatcher.pending) == len(dispatcher.traffic) == 0


def test_flush_cache_is_refused_while_a_request_runs(client):
    """SGLang's 400, same text, while any rank holds a request; 200 once idle. Waits on
    the ranks answering FlushCacheReq (scheduler side of issue 22)."""
    import threading
    long = threading.Thread(target=client.post, args=("/generate",), kwargs={"json": {
        "text": "x", "routed_dp_rank": 1,
        "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}})
    long.start()
    try:
        deadline = time.monotonic() + 5
        while client.get("/get_load").json()[1]["num_reqs"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        pending = client.app_state["engine"].dispatcher.pending
        pending.clear()
        for rank in (0, 1):  # prompts just sent to each rank, to be cached there
            pending.note([rank + 3] * 64, rank, time.monotonic_ns())
        r = client.post("/flush_cache")
        assert (r.status_code, r.text) == (400, FLUSHED)
        # Rank 0 flushed, rank 1 refused: only what was sent to rank 0 is forgotten.
        assert [entry[0] for entry in pending._by_first.values()] == [1]
    finally:
        long.join(30)
    assert client.post("/flush_cache").status_code == 200


def test_abort_request_ends_a_request_with_what_it_has(client):
    """SGLang's /abort_request: by rid, the client gets its tokens so far and an abort
    finish (a 200); abort_all ends every request, streams included (a last event with
    the abort finish, then [DONE]); the load is back to zero; no rid is a 400."""
    import threading

    def long(rid: str, rank: int, out: list, **extra) -> threading.Thread:
        body = {"text": "x", "rid": rid, "routed_dp_rank": rank,
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}, **extra}
        thread = threading.Thread(target=lambda: out.append(client.post("/generate", json=body)))
        thread.start()
        return thread

    def wait_running(n: int) -> None:
        deadline = time.monotonic() + 10
        while sum(r["num_reqs"] for r in client.get("/get_load").json()) < n:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    one: list = []
    thread = long("to-abort", 1, one)
    try:
        wait_running(1)
        time.sleep(0.05)  # a few tokens
        assert client.post("/abort_request", json={"rid": "to-abort"}).status_code == 200
    finally:
        thread.join(30)
    r = one[0]
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["finish_reason"] == {"type": "abort", "message": "aborted by /abort_request"}
    assert 0 < meta["completion_tokens"] < 2000
    both: list = []
    threads = [long("a1", 0, both), long("a2", 1, both, stream=True)]
    try:
        wait_running(2)
        assert client.post("/abort_request", json={"abort_all": True,
                                                   "abort_message": "maintenance"}).status_code == 200
    finally:
        for thread in threads:
            thread.join(30)
    plain, stream = sorted(both, key=lambda r: r.text.startswith("data:"))
    assert plain.json()["meta_info"]["finish_reason"]["message"] == "maintenance"
    last = sse_events(stream.text)[-1]
    assert last["meta_info"]["finish_reason"] == {"type": "abort", "message": "maintenance"}
    rows = client.get("/get_load").json()
    assert all(row["num_reqs"] == 0 and row["num_tokens"] == 0 for row in rows), rows
    copies: list = []
    thread = long("nn", 0, copies, sampling_params={"max_new_tokens": 2000, "ignore_eos": True,
                                                     "n": 2})
    try:
        wait_running(2)
        assert client.post("/abort_request", json={"rid": "nn"}).status_code == 200
    finally:
        thread.join(30)
    assert [c["meta_info"]["finish_reason"]["type"] for c in copies[0].json()] == ["abort"] * 2
    r = client.post("/abort_request", json={})
    assert r.status_code == 400 and "rid" in r.text
    assert client.post("/abort_request", json={"rid": "nobody"}).status_code == 200


# ---- prefix cache: cached_tokens in every response shape ----------------------------------
PREFIX = [5 + i % 250 for i in range(300)]  # tiny has 259 ids; later prompts begin with it


def _on_rank0(ids, max_new_tokens: int = 3, **extra) -> dict:
    return {"input_ids": ids, "routed_dp_rank": 0, **extra,
            "sampling_params": {"max_new_tokens": max_new_tokens, **GREEDY}}


def test_cached_tokens_in_every_response_shape(client):
    """Waits on the rank-side prefix cache (issue 22): with it off every figure is 0."""
    assert client.post("/flush_cache").status_code == 200
    hit = len(PREFIX) - 1  # at least this many: PREFIX is cached, the suffix is new
    assert client.post("/generate", json=_on_rank0(PREFIX + [7, 8])).json()[
        "meta_info"]["cached_tokens"] == 0
    meta = client.post("/generate", json=_on_rank0(PREFIX + [9, 10])).json()["meta_info"]
    assert hit <= meta["cached_tokens"] < meta["prompt_tokens"]
    events = sse_events(client.post("/generate", json=_on_rank0(PREFIX + [11], stream=True)).text)
    assert events and all(e["meta_info"]["cached_tokens"] >= hit for e in events)
    batch = client.post("/generate", json={"input_ids": [PREFIX + [12], PREFIX + [13]],
                                           "routed_dp_rank": 0, "sampling_params": {
                                               "max_new_tokens": 2, "n": 2, **GREEDY}}).json()
    assert len(batch) == 4 and all(b["meta_info"]["cached_tokens"] >= hit for b in batch)

    def details(usage: dict) -> int:
        return usage["prompt_tokens_details"]["cached_tokens"]
    body = client.post("/v1/completions", json={"prompt": PREFIX + [14], "max_tokens": 2,
                                                 "routed_dp_rank": 0}).json()
    assert details(body["usage"]) >= hit
    body = client.post("/v1/completions", json={"prompt": [PREFIX + [15], PREFIX + [16]], "n": 2,
                                                 "max_tokens": 2, "routed_dp_rank": 0}).json()
    assert 2 * hit <= details(body["usage"]) < body["usage"]["prompt_tokens"]  # once per prompt
    events = sse_events(client.post("/v1/completions", json={
        "prompt": PREFIX + [17], "max_tokens": 2, "routed_dp_rank": 0, "stream": True,
        "stream_options": {"include_usage": True}}).text)
    assert details(events[-1]["usage"]) >= hit
    chat = {"messages": [{"role": "system", "content": "You are terse. " * 20},
                         {"role": "user", "content": "hi"}], "max_tokens": 2,
            "routed_dp_rank": 0, "stream": True, "stream_options": {"include_usage": True}}
    sse_events(client.post("/v1/chat/completions", json=chat).text)
    usage = sse_events(client.post("/v1/chat/completions", json=chat).text)[-1]["usage"]
    assert usage["prompt_tokens"] - 1 <= details(usage) < usage["prompt_tokens"]

    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    # These requests ran on rank 0: its series (one per rank) count them.
    rate = {s.labels["dp_rank"]: s.value for s in families["sglang:cache_hit_rate"].samples}
    cached = {s.labels["dp_rank"]: s.value for s in families["sglang:cached_tokens"].samples
              if s.name.endswith("_total")}
    assert sorted(rate) == sorted(cached) == [str(r) for r in range(len(rate))]
    assert len(rate) > 1 and 0 < rate["0"] < 1 and cached["0"] >= 10 * hit


def test_disable_radix_cache(tmp_path):
    """Waits on the ranks answering FlushCacheReq (scheduler side of issue 22)."""
    with serve(make_args(tmp_path, dp_size=1, disable_radix_cache=True)) as (procs, client):
        assert client.get("/server_info").json()["disable_radix_cache"] is True
        for _ in range(2):
            meta = client.post("/generate", json=_on_rank0(PREFIX)).json()["meta_info"]
            assert meta["cached_tokens"] == 0
        assert client.post("/flush_cache").status_code == 200


def test_metrics(client):
    client.post("/generate", json={"text": "abc", "sampling_params": {"max_new_tokens": 4}})
    r = client.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:num_used_tokens",
                 "sglang:token_usage"):
        ranks = {s.labels["dp_rank"] for s in families[name].samples}
        assert ranks == {"0", "1"}, name
    for name in ("sglang:time_to_first_token_seconds", "sglang:inter_token_latency_seconds",
                 "sglang:e2e_request_latency_seconds"):
        assert families[name].type == "histogram"
        count = [s.value for s in families[name].samples if s.name.endswith("_count")]
        assert count and count[0] >= 1, name


def test_metrics_count_requests_served_without_a_rank_and_hide_no_token(client):
    """A request for no token (served by the API alone) counts as a finished request
    with its prompt; a prompt-only one (echo with max_tokens
    0: the rank generates a token the client never gets) adds no generated token and no
    time to first token."""
    def totals() -> tuple[float, ...]:
        text = client.get("/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return (*(sum(s.value for s in families[name].samples if s.name.endswith("_total"))
                  for name in ("sglang:num_requests", "sglang:prompt_tokens",
                               "sglang:generation_tokens")),
                sum(s.value for s in families["sglang:time_to_first_token_seconds"].samples
                    if s.name.endswith("_count")))

    before = totals()
    r = client.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": {
        "max_new_tokens": 0}})
    assert r.status_code == 200 and r.json()["output_ids"] == []
    r = client.post("/v1/completions", json={"prompt": [5, 6, 7, 8], "max_tokens": 0,
                                             "echo": True, "logprobs": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 0, r.text
    after = totals()
    assert [a - b for a, b in zip(after, before)] == [2, 7, 0, 0]


def test_a_refused_body_gives_up_the_rooms_it_names_within_bounds():
    """A body refused before its requests were prepared gives up each distinct room it
    names (with its prompt where it had one request), and none past the batch bound: one
    small body must not buy thousands of table inserts."""
    from types import SimpleNamespace

    from server.bounds import MAX_BATCH_REQUESTS
    from server.request_flow import refuse_body_rooms
    calls = []
    engine = SimpleNamespace(refused_room=lambda room, ids: calls.append((room, ids)))
    refuse_body_rooms(engine, 7, [1, 2, 3])
    refuse_body_rooms(engine, [8, 8, 9, "x", -1], [1, 2])
    refuse_body_rooms(engine, 10, [1, 1 << 70])  # ids no hash takes: unknown
    refuse_body_rooms(engine, list(range(MAX_BATCH_REQUESTS + 1)), None)
    assert sorted(calls) == [(7, [1, 2, 3]), (8, []), (9, []), (10, [])]


def test_metrics_registries_are_per_app(served, tmp_path):
    procs, _ = served
    a = create_app(EngineClient.from_processes(procs.args, procs))
    b = create_app(EngineClient.from_processes(procs.args, procs))
    assert a is not b  # two apps, two registries: no "Duplicated timeseries" error


def test_loads_return_to_zero_when_idle(client):
    for _ in range(3):
        client.post("/generate", json={"text": ["a", "b", "c"], "sampling_params": {"max_new_tokens": 5}})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rows = client.get("/get_load").json()
        if all(r["num_reqs"] == 0 and r["num_tokens"] == 0 for r in rows):
            break
        time.sleep(0.05)
    assert all(r["num_reqs"] == 0 and r["num_tokens"] == 0 for r in rows), rows


# ---- capacity, failures -------------------------------------------------------------------
def test_full_engine_gets_503_with_retry_after(tmp_path):
    args = make_args(tmp_path, step_s=0.01, dp_size=1, max_running_requests=1,
                     max_queued_requests=0)
    with serve(args) as (procs, client):
        import threading
        long = threading.Thread(target=client.post, args=("/generate",), kwargs={"json": {
            "text": "x", "sampling_params": {"max_new_tokens": 150}}})
        long.start()
        try:
            deadline = time.monotonic() + 5
            while client.get("/get_load").json()[0]["num_reqs"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = client.post("/generate", json={"text": "y", "sampling_params": {"max_new_tokens": 1}})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "full" in r.json()["error"]["message"]
        finally:
            long.join(10)
        assert client.post("/generate", json={"text": "y", "sampling_params": {
            "max_new_tokens": 1}}).status_code == 200


def test_queue_limit_holds_on_the_rank_chosen(tmp_path):
    """--max-queued-requests is per rank: the method chooses among ranks with room (the
    rotation pointed at the full rank, which took the request past its limit while the
    other rank was idle)."""
    args = make_args(tmp_path, step_s=0.01, dp_size=2, max_running_requests=1,
                     max_queued_requests=0, load_balance_method="round_robin")
    with serve(args) as (procs, client):
        import threading
        long = threading.Thread(target=client.post, args=("/generate",), kwargs={"json": {
            "text": "x", "sampling_params": {"max_new_tokens": 300}}})
        long.start()
        try:
            deadline = time.monotonic() + 5
            while (not any(r["num_reqs"] for r in client.get("/get_load").json())
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            busy = next((r["dp_rank"] for r in client.get("/get_load").json() if r["num_reqs"]),
                        None)
            assert busy is not None, "the long request never showed on the board"
            for _ in range(3):  # round robin alone would send one of these to the busy rank
                r = client.post("/generate", json={"text": "y", "sampling_params": {
                    "max_new_tokens": 1}})
                assert r.status_code == 200, r.text
                assert r.json()["meta_info"]["dp_rank"] == 1 - busy
        finally:
            long.join(15)


def test_rank_killed_mid_request_fails_fast_and_others_serve(tmp_path):
    args = make_args(tmp_path, step_s=0.01, dp_size=2)
    with serve(args) as (procs, client):
        import threading
        results = {}

        def slow(rank, stream):
            t0 = time.monotonic()
            r = client.post("/generate", json={"text": "x", "routed_dp_rank": rank, "stream": stream,
                                               "sampling_params": {"max_new_tokens": 1000}})
            results[(rank, stream)] = (r, time.monotonic() - t0)

        threads = [threading.Thread(target=slow, args=(1, s)) for s in (False, True)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while client.get("/get_load").json()[1]["num_reqs"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        killed_at = time.monotonic()
        os.kill(procs.ranks[1].ready.pid, signal.SIGKILL)
        for t in threads:
            t.join(5)
        assert time.monotonic() - killed_at < 2.0
        r, _ = results[(1, False)]
        assert r.status_code == 503 and "rank 1" in r.json()["error"]["message"]
        r, _ = results[(1, True)]
        events = sse_events(r.text)
        assert "error" in events[-1] and "rank 1" in events[-1]["error"]["message"]

        health = client.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "degraded", "dead_ranks": [1]}
        assert client.get("/server_info").json()["status"] == "degraded"
        assert RankStatus(int(procs.board.snapshot().status[1])) is RankStatus.DEAD
        dead = client.get("/get_load").json()[1]  # marked, and not its last load
        assert dead == {"dp_rank": 1, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0,
                        "status": "dead"}, dead
        # /metrics likewise: not the two requests the rank ran when it died.
        gauges = [line for line in client.get("/metrics").text.splitlines()
                  if line.startswith(("sglang:num_running_reqs{", "sglang:num_used_tokens{"))
                  and 'dp_rank="1"' in line]
        assert len(gauges) == 2 and all(line.endswith(" 0.0") for line in gauges), gauges
        for _ in range(4):
            r = client.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2}})
            assert r.status_code == 200 and r.json()["meta_info"]["dp_rank"] == 0
        r = client.post("/generate", json={"text": "x", "routed_dp_rank": 1})
        assert r.status_code == 503 and r.headers["retry-after"]
        os.kill(procs.ranks[0].ready.pid, signal.SIGKILL)
        deadline = time.monotonic() + 2
        while client.get("/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/health").status_code == 503
        assert client.post("/generate", json={"text": "x"}).status_code == 503


def test_a_rank_killed_mid_publish_never_freezes_the_api(tmp_path):
    """A rank killed while it writes its board row leaves the row mid-write for good;
    the API's reads of the board (the rank monitor, /get_load, token-based picks) go on,
    the other rank serves, and SIGTERM stops the server (it hung: every route, and
    SIGTERM, until SIGKILL). A real server, so that a hang is a client timeout."""
    import httpx

    from shm.board_layout import SEQ
    from tests.server_helpers import ServerProcess
    flags = ["--dp-size", "2", "--executor", "sim", "--load-balance-method", "total_tokens",
             "--sim-profile", write_sim_profile(tmp_path / "sim.json", step_s=0.001)]
    with ServerProcess(*flags, log_path=tmp_path / "server.log") as server:
        pid = httpx.get(server.url + "/server_info", timeout=5).json()["ranks"][1]["pid"]
        (name,) = [n for n in server.segments() if n.endswith(".board")]
        os.kill(pid, signal.SIGSTOP)  # not mid-write itself: the test leaves it so
        with LoadBoard.attach(name) as board:
            cells, row = board.cells, board.layout.row(1)
            cells[row + SEQ] = -(cells[row + SEQ] + 1)
            del cells
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health", timeout=5).json().get("dead_ranks") != [1]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        loads = httpx.get(server.url + "/get_load", timeout=5).json()
        assert [row["status"] for row in loads] == ["ready", "dead"]
        for _ in range(3):
            r = httpx.post(server.url + "/generate", timeout=10, json={
                "text": "x", "sampling_params": {"max_new_tokens": 2}})
            assert r.status_code == 200 and r.json()["meta_info"]["dp_rank"] == 0, r.text
        assert server.terminate(10) == 0


def test_rank_startup_error_stops_the_launch(tmp_path):
    # resolve_args itself rejects a missing profile; here the ranks must find out.
    args = dataclasses.replace(resolve_args(ServerArgs(model_path="tiny", executor="sim", dp_size=2, port=0)),
                               sim_profile=str(tmp_path / "missing.json"))
    procs = EngineProcesses(args).start()
    name = procs.board.name
    try:
        with pytest.raises(RankStartupError, match="missing.json"):
            procs.wait_ready(60)
    finally:
        procs.close()
    assert name.lstrip("/") not in [s.lstrip("/") for s in list_segments()]
    assert all(not r.process.is_alive() for r in procs.ranks)


def test_stopped_rank_never_blocks_the_api(tmp_path):
    """SIGSTOP a rank and flood its request pipe past 64 KiB: the API keeps answering,
    the requests on it fail once its heartbeat is stale, and after SIGCONT it drains
    what was queued (and the aborts) back to zero load."""
    import threading
    args = make_args(tmp_path, step_s=0.001, dp_size=2, stale_after_s=0.5)
    with serve(args) as (procs, client):
        pid = procs.ranks[1].ready.pid
        codes = []
        body = {"input_ids": [200] * 1500, "routed_dp_rank": 1,  # ~3 KB each on the pipe
                "sampling_params": {"max_new_tokens": 1}}
        threads = [threading.Thread(target=lambda: codes.append(
            client.post("/generate", json=body).status_code)) for _ in range(40)]
        os.kill(pid, signal.SIGSTOP)
        try:
            for t in threads:
                t.start()
            t0 = time.monotonic()
            assert client.get("/get_load").status_code == 200
            assert time.monotonic() - t0 < 1.0
            for t in threads:
                t.join(5)
            assert codes == [503] * 40
            assert client.get("/health").json() == {"status": "degraded", "dead_ranks": [1]}
            ok = client.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
            assert ok.status_code == 200 and ok.json()["meta_info"]["dp_rank"] == 0
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            rows = client.get("/get_load").json()
            if client.get("/health").json()["status"] == "ok" and all(
                    r["num_reqs"] == 0 and r["num_tokens"] == 0 for r in rows):
                break
            time.sleep(0.05)
        assert client.get("/health").json()["status"] == "ok"
        assert all(r["num_reqs"] == 0 and r["num_tokens"] == 0 for r in rows), rows
        r = client.post("/generate", json={"text": "x", "routed_dp_rank": 1,
                                           "sampling_params": {"max_new_tokens": 1}})
        assert r.status_code == 200


def test_a_stream_never_sends_text_a_stop_string_then_cuts(client):
    """The start of a stop string is held back until the next tokens show whether the
    stop follows: streamed and non-streamed text agree (a one-byte-a-token vocabulary,
    so a two-character stop spans two tokens)."""
    body = {"prompt": "Once", "max_tokens": 24, "rid": "stop-holdback"}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    # A two-character stop whose first occurrence starts at i >= 1 (sim tokens depend
    # only on the request id and position, so the same rid gives the same text).
    i = next(i for i in range(1, len(text) - 1)
             if text.find(text[i:i + 2]) == i and text[i:i + 2].isascii()
             and text[i:i + 2].isprintable())
    stop = text[i:i + 2]
    plain = client.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0]
    assert plain["text"] == text[:i] and plain["finish_reason"] == "stop"
    events = sse_events(client.post("/v1/completions",
                                    json={**body, "stop": [stop], "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events) == text[:i]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "rid": "stop-chat"}
    text = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    i = next(i for i in range(1, len(text) - 1)
             if text.find(text[i:i + 2]) == i and text[i:i + 2].isascii()
             and text[i:i + 2].isprintable())
    events = sse_events(client.post("/v1/chat/completions", json={
        **chat, "stop": text[i:i + 2], "stream": True}).text)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == text[:i]


@pytest.mark.parametrize("longer", [None, "~~~~~"])
def test_a_stop_string_seen_before_min_tokens_is_not_where_the_text_ends(client, longer):
    """With min_tokens, stop strings in the first tokens are not checked (and are
    streamed); the text ends at the occurrence that did stop it, streamed or not. The
    rank's first check looks back the longest stop string less one character (so a
    second, longer stop string moves where its search, and the trim, begin)."""
    def text_of(rid, n):  # sim tokens depend only on the rid and the position
        body = {"prompt": "Once", "max_tokens": n, "rid": rid}
        return client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    m, back = 12, len(longer) - 1 if longer else 0
    for rid in (f"stop-min-{k}" for k in range(400)):
        text = text_of(rid, 32)
        unchecked = text_of(rid, m - 1)  # the first m - 1 tokens' text: never checked
        if unchecked.endswith("\ufffd") or not text.startswith(unchecked):
            continue  # (a character split at its end would blur where it ends)
        start = len(unchecked) - back  # where the rank's first check begins
        # Seen before the search began, and found by it: with a longer stop string,
        # within the look-back (in the first m - 1 tokens' text).
        stops = [c for c in unchecked[:start] if c.isprintable() and c != "\ufffd"
                 and 0 <= text.find(c, start) < (len(unchecked) if longer else len(text))]
        if stops:
            break
    stop = stops[0]
    j = text.index(stop, start)
    asked = {"prompt": "Once", "max_tokens": 32, "rid": rid, "min_tokens": m,
             "stop": [stop] + ([longer] if longer else [])}
    whole = client.post("/v1/completions", json=asked).json()["choices"][0]
    assert whole["text"] == text[:j] and whole["finish_reason"] == "stop", (stop, text)
    events = sse_events(client.post("/v1/completions", json={**asked, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events) == text[:j]
