"""Hostile input against real servers: nothing a client sends may give a 5xx, hang, or
leave a count, KV slot or table entry behind, or change what the model answers.

A hypothesis fuzzer sends 3,000 bodies over every route: 1,500 to a real plain server
(two mixed ranks) and 1,500 to a real PD server (one prefill and one decode rank, one
front door): random JSON, and bodies of the right shape whose values are extreme
(the int64 edges and beyond, NaN and infinities, huge strings and lists, deep
nesting). Every answer must be below 500, come within its time bound, and carry a
message if it is an error. Afterwards the board reads zero on every rank, the PD route
and hand-off tables are empty, and a greedy request returns what it returned before.

Deterministic: hypothesis runs derandomized, with no example database.
"""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.pd import HANDOFF_KIND, ROUTE_KIND
from server.info import FLUSH_CACHE_TEXT
from shm.bootstrap import BootstrapTable
from tests.server_helpers import ServerProcess

pytestmark = pytest.mark.slow

NUM_BODIES = 1500  # per server
REQUEST_BOUND_S = 15.0  # one answer, streams read to the end; generous for a loaded host
GREEDY = {"text": "The fuzzer checks", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}

INT_EDGES = [0, 1, -1, 2, 3, 127, 128, 129, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63,
             -2**63, -2**63 - 1, 2**64 - 1, 2**64, 10**40, -10**40]
FLOAT_EDGES = [0.0, -0.0, 0.5, 1.0, 2.0, -1.0, 1e308, -1e308, 5e-324, math.nan, math.inf,
               -math.inf]
HUGE_STRINGS = ["x" * 100_000, "é" * 300_000, "hi " * 400_000]
HUGE_LISTS = [[1] * 100_000, [[5, 6]] * 20_000, ["a"] * 50_000]

ints = st.one_of(st.sampled_from(INT_EDGES), st.integers(-5, 300))
floats = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(-3, 3))
texts = st.one_of(st.text(max_size=40), st.sampled_from(HUGE_STRINGS))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=25)
anything = st.one_of(json_values, st.sampled_from(HUGE_LISTS))
token_lists = st.one_of(st.lists(ints, min_size=0, max_size=12),
                        st.lists(st.lists(ints, max_size=6), max_size=3),
                        st.sampled_from(HUGE_LISTS))
# Few new tokens where the body is valid, so thousands of requests stay quick; the
# extremes are there too.
small_counts = st.one_of(st.integers(0, 3), st.sampled_from(INT_EDGES))


def maybe(strategy):
    """A key that is absent, null, of the right type, or of any type at all."""
    return st.one_of(st.just(ABSENT), st.none(), strategy, anything)


ABSENT = object()


def fixed_dict(**fields) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({k: maybe(v) for k, v in fields.items()}).map(
        lambda d: {k: v for k, v in d.items() if v is not ABSENT})


def one_changed(base: dict, fields: dict) -> st.SearchStrategy[dict]:
    """``base`` (a valid body) with one field set to a drawn value (or removed): most such
    bodies are served, so the extremes of each field meet the whole request path."""
    def set_field(key_value):
        key, value = key_value
        body = json.loads(json.dumps(base))
        parent, _, leaf = key.rpartition(".")
        target = body[parent] if parent else body
        if value is ABSENT:
            target.pop(leaf, None)
        else:
            target[leaf] = value
        return body
    return st.sampled_from(sorted(fields)).flatmap(
        lambda key: maybe(fields[key]).map(lambda value: (key, value))).map(set_field)


SAMPLING = dict(
    max_new_tokens=small_counts, temperature=floats, top_p=floats, top_k=ints, min_p=floats,
    stop=st.one_of(texts, st.lists(texts, max_size=3)), stop_token_ids=token_lists,
    ignore_eos=st.booleans(), min_new_tokens=small_counts, n=small_counts,
    frequency_penalty=floats, presence_penalty=floats, repetition_penalty=floats,
    skip_special_tokens=st.booleans(), no_stop_trim=st.booleans(), sampling_seed=ints)
sampling_params = fixed_dict(**SAMPLING)
ROUTING = dict(bootstrap_room=st.one_of(ints, st.lists(ints, max_size=3)),
               routed_dp_rank=ints, data_parallel_rank=ints, disagg_prefill_dp_rank=ints)
GENERATE = dict(
    text=st.one_of(texts, st.lists(texts, max_size=3)), input_ids=token_lists,
    sampling_params=st.one_of(sampling_params, st.lists(sampling_params, max_size=3)),
    stream=st.booleans(), rid=st.one_of(texts, st.lists(texts, max_size=3)),
    return_logprob=st.booleans(), logprob_start_len=ints, top_logprobs_num=ints,
    bootstrap_host=texts, bootstrap_port=ints, **ROUTING)
OPENAI_COMMON = dict(
    model=texts, n=small_counts, stream=st.booleans(),
    stream_options=fixed_dict(include_usage=st.booleans()), temperature=floats, top_p=floats,
    top_k=ints, seed=ints, stop=st.one_of(texts, st.lists(texts, max_size=3)),
    presence_penalty=floats, frequency_penalty=floats, ignore_eos=st.booleans(),
    min_tokens=small_counts, user=texts, rid=texts, **ROUTING)
COMPLETION = dict(prompt=st.one_of(texts, st.lists(texts, max_size=3), token_lists),
                  max_tokens=small_counts, logprobs=ints, echo=st.booleans(), **OPENAI_COMMON)
messages = st.lists(fixed_dict(role=st.sampled_from(["system", "user", "assistant", "tool"]),
                               content=st.one_of(texts, st.lists(json_values, max_size=2)),
                               name=texts), max_size=3)
CHAT = dict(messages=messages, max_tokens=small_counts, max_completion_tokens=small_counts,
            logprobs=st.booleans(), top_logprobs=ints, **OPENAI_COMMON)
# Valid bodies (two new tokens, greedy or not) that one_changed starts from.
BASES = {
    "/generate": ({"text": "fuzz me", "sampling_params": {"max_new_tokens": 2}},
                  {**GENERATE, **{f"sampling_params.{k}": v for k, v in SAMPLING.items()}}),
    "/v1/completions": ({"prompt": "fuzz me", "max_tokens": 2}, COMPLETION),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "fuzz me"}],
                              "max_tokens": 2}, CHAT),
}
TYPED = {path: st.one_of(fixed_dict(**fields), one_changed(base, fields),
                         one_changed(base, fields))
         for path, (base, fields) in BASES.items()}

POST_ROUTES = ["/generate", "/v1/completions", "/v1/chat/completions", "/flush_cache",
               "/abort_request"]
GET_ROUTES = ["/health", "/health_generate", "/server_info", "/get_server_info", "/model_info",
              "/get_model_info", "/get_load", "/v1/loads", "/loads", "/metrics", "/v1/models",
              "/v1/models/tiny", "/flush_cache", "/no_such_route"]
query_values = st.one_of(st.text(max_size=8), st.sampled_from(["0", "1", "2", "-1", "²", "１",
                                                               "99999999999999999999999"]))
queries = st.dictionaries(st.sampled_from(["dp_rank", "include", "model", "x"]), query_values,
                          max_size=3)


def _deep(depth: int, kind: str) -> bytes:
    return (b"[" * depth + b"]" * depth) if kind == "list" else (b'{"a":' * depth + b"1"
                                                                  + b"}" * depth)


raw_bodies = st.one_of(
    st.builds(lambda body: json.dumps(body, allow_nan=True).encode(), anything),
    st.builds(_deep, st.sampled_from([100, 1_000, 10_000, 100_000]), st.sampled_from(["list", "dict"])),
    st.builds(lambda inner: b'{"text":' + inner + b"}",
              st.builds(_deep, st.sampled_from([1_000, 50_000]), st.just("list"))),
    st.binary(max_size=64), st.sampled_from([b"", b"{", b"NaN", b'{"text": NaN}',
                                             b'{"text": "a", "text": 1}', b"\xff\xfe"]))


@st.composite
def calls(draw):
    """(method, path, params, body bytes or None)."""
    kind = draw(st.sampled_from(["typed", "typed", "typed", "raw", "get"]))
    if kind == "get":
        return "GET", draw(st.sampled_from(GET_ROUTES)), draw(queries), None
    path = draw(st.sampled_from(POST_ROUTES))
    method = "PUT" if path == "/generate" and draw(st.booleans()) else "POST"
    if kind == "typed" and path in TYPED:
        return method, path, {}, json.dumps(draw(TYPED[path]), allow_nan=True).encode()
    return method, path, {}, draw(raw_bodies)


class Fuzzer:
    def __init__(self, server: ServerProcess):
        self.server = server
        self.client = httpx.Client(base_url=server.url,
                                   timeout=httpx.Timeout(REQUEST_BOUND_S, connect=5.0))
        self.num_sent = 0
        self.num_generated = 0  # 200s from a route that ran the model
        self.statuses: dict[int, int] = {}

    def send(self, method: str, path: str, params: dict, body: bytes | None) -> None:
        began = time.monotonic()
        headers = {"content-type": "application/json"} if body is not None else {}
        with self.client.stream(method, path, params=params, content=body,
                                headers=headers) as response:
            payload = b"".join(response.iter_bytes())
        elapsed = time.monotonic() - began
        self.num_sent += 1
        self.num_generated += response.status_code == 200 and path in TYPED
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        what = f"{method} {path} {params} {body[:300] if body else body!r}"
        assert response.status_code < 500, f"{what} -> {response.status_code} {payload[:500]}"
        assert elapsed < REQUEST_BOUND_S, f"{what} took {elapsed:.1f} s"
        if response.status_code == 400 and path == "/flush_cache":  # SGLang's plain text,
            assert payload.decode() == FLUSH_CACHE_TEXT  # when a rank still holds a request
        elif response.status_code >= 400:
            message = json.loads(payload)["error"]["message"]
            assert isinstance(message, str) and message, f"{what}: error without a message"
        elif response.headers.get("content-type", "").startswith("text/event-stream"):
            assert payload.rstrip().endswith(b"data: [DONE]"), f"{what}: stream not ended"

    def greedy(self) -> list[int]:
        response = self.client.post("/generate", json=GREEDY)
        assert response.status_code == 200, response.text
        return response.json()["output_ids"]

    def settled_loads(self, timeout_s: float = 30.0) -> list[dict]:
        """/get_load once every count is back to zero, or what it reads at the bound."""
        deadline = time.monotonic() + timeout_s
        while True:
            loads = self.client.get("/get_load").json()
            if all(r["num_reqs"] == r["num_tokens"] == r["num_waiting_reqs"] == 0 for r in loads) \
                    or time.monotonic() > deadline:
                return loads
            time.sleep(0.1)


def _fuzz(server: ServerProcess, num_bodies: int) -> Fuzzer:
    fuzzer = Fuzzer(server)
    before = fuzzer.greedy()

    @settings(max_examples=num_bodies, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(calls())
    def run(call):
        fuzzer.send(*call)

    run()
    assert fuzzer.num_sent >= num_bodies
    loads = fuzzer.settled_loads()
    assert all(r["num_reqs"] == r["num_tokens"] == r["num_waiting_reqs"] == 0 for r in loads), loads
    usage = fuzzer.client.get("/v1/loads").json()["loads"]
    assert all(r["token_usage"] == 0 and r["num_used_tokens"] == 0 for r in usage), usage
    assert fuzzer.greedy() == before
    return fuzzer


@pytest.fixture
def server(tmp_path, request):
    proc = ServerProcess(*request.param, log_path=tmp_path / "server.log").start()
    try:
        yield proc.wait_healthy(120)
    finally:
        proc.stop()


@pytest.mark.parametrize("server", [("--dp-size", "2", "--max-queued-requests", "64")],
                         indirect=True)
def test_fuzz_plain_server(server):
    fuzzer = _fuzz(server, NUM_BODIES)
    assert fuzzer.num_generated > NUM_BODIES // 50, fuzzer.statuses  # valid bodies ran too


@pytest.mark.parametrize("server", [("--disaggregation-mode", "pd", "--prefill-dp-size", "1",
                                     "--decode-dp-size", "1")], indirect=True)
def test_fuzz_pd_server(server):
    fuzzer = _fuzz(server, NUM_BODIES)
    assert fuzzer.num_generated > NUM_BODIES // 50, fuzzer.statuses
    for kind in (ROUTE_KIND, HANDOFF_KIND):
        [name] = [s for s in server.segments() if s.endswith("." + kind)]
        with BootstrapTable.attach(name) as table:
            assert table.num_live() == 0, f"{kind} table holds {table.num_live()} entries"
