"""server.bounds through the HTTP API (``TestClient`` over two simulated ranks): every
number out of range is a 400 naming its field and leaves nothing on the board; the
caps on ``n`` and on a body's requests answer at once; deep JSON is a 400; and the
small cases: ``max_new_tokens`` 0, batch rids, integer query parameters."""

from __future__ import annotations

import time

import pytest

from server.bounds import MAX_BATCH_REQUESTS
# The in-process app over simulated ranks (one per module: the fixture is module-scoped).
from tests.test_server_app import client, served  # noqa: F401

HI = {"text": "hi", "sampling_params": {"max_new_tokens": 1}}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
COMPLETION = {"prompt": "hi", "max_tokens": 1}
INT64_MIN = -(2**63)

# (route, body, the field the 400 must name)
OUT_OF_RANGE = [
    ("/generate", {**HI, "bootstrap_room": 2**64}, "bootstrap_room"),
    ("/generate", {**HI, "bootstrap_room": -1}, "bootstrap_room"),
    # a scalar room in a batch means room + i: the second request's room is 2**64
    ("/generate", {**HI, "text": ["a", "b"], "bootstrap_room": 2**64 - 1}, "bootstrap_room"),
    ("/generate", {**HI, "sampling_params": {"n": 2}, "bootstrap_room": 2**64 - 1},
     "bootstrap_room"),
    ("/generate", {**HI, "bootstrap_room": [2**64]}, "bootstrap_room"),
    ("/generate", {**HI, "disagg_prefill_dp_rank": 2**64}, "disagg_prefill_dp_rank"),
    ("/generate", {**HI, "disagg_prefill_dp_rank": 2}, "disagg_prefill_dp_rank"),
    ("/generate", {**HI, "routed_dp_rank": 2**64}, "routed_dp_rank"),
    ("/generate", {**HI, "data_parallel_rank": 2**70}, "routed_dp_rank"),
    ("/generate", {**HI, "sampling_params": {"sampling_seed": INT64_MIN - 1}}, "sampling_seed"),
    ("/generate", {**HI, "sampling_params": {"sampling_seed": 2**63}}, "sampling_seed"),
    ("/generate", {**HI, "top_logprobs_num": 2**64}, "top_logprobs_num"),
    ("/generate", {**HI, "top_logprobs_num": -1}, "top_logprobs_num"),
    ("/generate", {**HI, "top_logprobs_num": [2**64]}, "top_logprobs_num"),
    ("/generate", {**HI, "logprob_start_len": 2**70}, "logprob_start_len"),
    ("/generate", {**HI, "logprob_start_len": -2}, "logprob_start_len"),
    ("/generate", {**HI, "bootstrap_port": 2**64}, "bootstrap_port"),
    ("/generate", {**HI, "bootstrap_port": [70000]}, "bootstrap_port"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": 2**64}}, "top_k"),
    ("/generate", {"text": "hi", "sampling_params": {"stop_token_ids": [2**64]}},
     "stop_token_ids"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2**64}}, "max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"min_new_tokens": 2**64}}, "min_new_tokens"),
    ("/v1/completions", {**COMPLETION, "seed": 2**64}, "seed"),
    ("/v1/completions", {**COMPLETION, "seed": INT64_MIN - 1}, "seed"),
    ("/v1/completions", {**COMPLETION, "bootstrap_room": 2**64}, "bootstrap_room"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"], "bootstrap_room": 2**64 - 1},
     "bootstrap_room"),
    ("/v1/completions", {**COMPLETION, "disagg_prefill_dp_rank": 2**64}, "disagg_prefill_dp_rank"),
    ("/v1/completions", {**COMPLETION, "logprobs": 2**64}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 2**64}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "top_k": 2**64}, "top_k"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**64}, "seed"),
    ("/v1/chat/completions", {**CHAT, "bootstrap_room": 2**64}, "bootstrap_room"),
    ("/v1/chat/completions", {**CHAT, "routed_dp_rank": 2**64}, "routed_dp_rank"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2**64}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "min_tokens": 2**64}, "min_tokens"),
    ("/v1/chat/completions", {**CHAT, "stop_token_ids": [-1]}, "stop_token_ids"),
    # more logprob entries than one body may carry (server.bounds.MAX_LOGPROB_ENTRIES)
    ("/generate", {"text": ["hi"] * 9, "return_logprob": True, "top_logprobs_num": 259,
                   "sampling_params": {"max_new_tokens": 2000}}, "logprob entries"),
    ("/v1/completions", {**COMPLETION, "prompt": ["hi"] * 9, "logprobs": 259,
                         "max_tokens": 2000}, "logprob entries"),
]


def assert_idle(client) -> None:
    """Every rank's effective load is zero (bounded wait: ranks ack what they finish)."""
    deadline = time.monotonic() + 5
    while (rows := client.get("/get_load").json()) and time.monotonic() < deadline:
        if all(r["num_reqs"] == 0 and r["num_tokens"] == 0 for r in rows):
            return
        time.sleep(0.02)
    assert all(r["num_reqs"] == 0 and r["num_tokens"] == 0 for r in rows), rows


@pytest.mark.parametrize("route,body,field", OUT_OF_RANGE,
                         ids=[f"{r}:{f}:{i}" for i, (r, _, f) in enumerate(OUT_OF_RANGE)])
def test_out_of_range_is_400_naming_the_field_and_leaves_no_load(client, route, body, field):
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"], r.text
    assert_idle(client)


def test_edges_in_range_are_served(client):
    for body in ({**HI, "bootstrap_room": 2**64 - 1}, {**HI, "bootstrap_room": 0},
                 {**HI, "text": ["a", "b"], "bootstrap_room": 2**64 - 2},
                 {**HI, "sampling_params": {"max_new_tokens": 1, "sampling_seed": INT64_MIN}},
                 {**HI, "sampling_params": {"max_new_tokens": 1, "sampling_seed": 2**63 - 1}},
                 {**HI, "sampling_params": {"max_new_tokens": 1, "top_k": 2**63 - 1}},
                 {**HI, "top_logprobs_num": 259, "bootstrap_port": 65535, "logprob_start_len": 0}):
        r = client.post("/generate", json=body)
        assert r.status_code == 200, (body, r.text)
    assert_idle(client)


HUGE_FAN_OUT = [
    ("/v1/completions", {**COMPLETION, "n": 2**64}),
    ("/v1/completions", {**COMPLETION, "n": 2**40}),
    ("/v1/completions", {**COMPLETION, "n": 129}),
    ("/v1/completions", {**COMPLETION, "prompt": ["a"] * 17, "n": 128}),
    ("/v1/completions", {**COMPLETION, "prompt": [[1]] * (MAX_BATCH_REQUESTS + 1)}),
    ("/v1/chat/completions", {**CHAT, "n": 2**64}),
    ("/generate", {"text": "hi", "sampling_params": {"n": 2**40}}),
    ("/generate", {"text": "hi", "sampling_params": {"n": 2**64}}),
    ("/generate", {"text": ["a"] * 17, "sampling_params": {"n": 128}}),
    ("/generate", {"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 2**40}]}),
    ("/generate", {"input_ids": [[1]] * (MAX_BATCH_REQUESTS + 1)}),
]


@pytest.mark.parametrize("route,body", HUGE_FAN_OUT, ids=range(len(HUGE_FAN_OUT)))
def test_huge_n_or_batch_is_400_within_a_second(client, route, body):
    t0 = time.monotonic()
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text[:300]
    assert time.monotonic() - t0 < 1.0
    message = r.json()["error"]["message"]
    assert "n must be" in message or "requests" in message or "prompts" in message, message
    assert client.get("/health").status_code == 200


def test_n_at_the_cap_is_served(client):
    r = client.post("/v1/completions", json={**COMPLETION, "n": 128})
    assert r.status_code == 200 and len(r.json()["choices"]) == 128
    assert_idle(client)


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_deep_json_is_400(client, route):
    depth = 5000
    for body in (b"[" * depth + b"]" * depth,
                 b'{"text": ' + b"[" * depth + b"]" * depth + b"}",
                 b'{"sampling_params": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"):
        r = client.post(route, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text[:300]
        assert "nested too deeply" in r.json()["error"]["message"]


def test_max_new_tokens_zero_yields_no_token(client):
    r = client.post("/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 0}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["output_ids"] == [] and body["text"] == ""
    meta = body["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["completion_tokens"] == 0 and meta["prompt_tokens"] == 5
    r = client.post("/generate", json={"text": "hello", "stream": True,
                                       "sampling_params": {"max_new_tokens": 0}})
    assert '"finish_reason":{"type":"length","length":0}' in r.text.replace(" ", "")
    assert r.text.endswith("data: [DONE]\n\n")
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 0})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0
    assert_idle(client)


def test_batch_rids(client):
    ok = client.post("/generate", json={"text": ["a", "b"], "rid": ["r1", "r2"],
                                        "sampling_params": {"max_new_tokens": 1}})
    assert [o["meta_info"]["id"] for o in ok.json()] == ["r1", "r2"]
    single = client.post("/generate", json={"text": ["a", "b"], "rid": "one",
                                            "sampling_params": {"max_new_tokens": 1}})
    assert single.status_code == 400 and "rid must be a list" in single.json()["error"]["message"]
    for body in ({"text": ["a", "b"], "rid": ["same", "same"]},
                 # n=2 makes x_0, x_1: the second prompt's own rid x_0 collides
                 {"text": ["a", "b"], "rid": ["x", "x_0"], "sampling_params": [{"n": 2}, {}]}):
        r = client.post("/generate", json=body)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "rid" in message and "twice" in message, message
    assert_idle(client)


@pytest.mark.parametrize("query", ["%C2%B2", "-1", "2", "1.0", "x", "9" * 40, "%EF%BC%91"])
def test_bad_query_parameter_is_400(client, query):
    r = client.get(f"/v1/loads?dp_rank={query}")
    assert r.status_code == 400, r.text
    assert "dp_rank" in r.json()["error"]["message"]
    assert client.get("/v1/loads?dp_rank=1").json()["loads"][0]["dp_rank"] == 1


def test_prompt_certainly_longer_than_the_context_is_400_without_tokenizing(client):
    """10 MB of text against a 2,048-token context: refused from its length alone
    (tokenizing it takes ~7 s here), on every route that takes text."""
    big = "a" * 10_000_000
    for route, body in (("/generate", {"text": big}), ("/generate", {"text": ["a", big]}),
                        ("/v1/completions", {"prompt": big}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]})):
        t0 = time.monotonic()
        r = client.post(route, json=body)
        assert r.status_code == 400, r.text[:300]
        assert "too long" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 1.0, route


def test_one_room_per_prompt_or_per_request():
    """A room list may give each prompt's (its copies under n add their index) or each
    request's, as gateways send for a chat with n (a room per choice); else a 400."""
    from server.errors import BadRequest
    from server.prepared import request_rooms
    assert request_rooms(None, [2]) == [None, None]
    assert request_rooms(10, [2, 1]) == [10, 11, 12]
    assert request_rooms([10, 20], [2, 1]) == [10, 11, 20]
    assert request_rooms([7, 3], [2]) == [7, 3]  # smg: one room per choice of one prompt
    assert request_rooms([7, 3, 5], [2, 1]) == [7, 3, 5]
    with pytest.raises(BadRequest, match="one per prompt \\(2\\) or one per request \\(4"):
        request_rooms([1, 2, 3], [2, 2])


def test_a_chat_with_n_and_a_room_per_choice_is_served(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2,
            "bootstrap_room": [5, 9], "bootstrap_host": ["h", "h"], "bootstrap_port": [1, 1]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    r = client.post("/generate", json={**HI, "sampling_params": {"max_new_tokens": 1, "n": 2},
                                       "bootstrap_room": [5, 9]})
    assert r.status_code == 200 and len(r.json()) == 2, r.text
    assert_idle(client)

