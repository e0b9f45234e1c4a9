"""Log-probabilities through a real server (the tiny model), against the model's own
logits computed here, independently, in one unchunked prefill; logit_bias; and the
OpenAI fields that are not implemented (each a 400 naming it).

The servers chunk prefill at 16 tokens, so a 40-token prompt's logprobs arrive over
three chunks. Two server starts: a plain one and a PD front door.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from engine.runner import ModelRunner
from tests.engine_driver import full_logits
from tests.server_helpers import ServerProcess

torch.set_num_threads(1)

COMMON = ["--model-path", "tiny", "--device", "cpu", "--max-total-tokens", "4096",
          "--chunked-prefill-size", "16", "--log-level", "warning"]
PROMPT = [(7 * i + 11) % 250 + 3 for i in range(40)]
TOL = 1e-4
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """log_softmax of the tiny model's logits at every position of PROMPT."""
    runner = ModelRunner.from_model_path("tiny", "cpu", max_total_num_tokens=256, random_seed=0)
    with torch.no_grad():
        return torch.log_softmax(full_logits(runner.model, runner.kv_pool, PROMPT).float(), -1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("logprobs") / "server.log"
    with ServerProcess(*COMMON, "--dp-size", "2", log_path=log) as s:
        yield s.url


def post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(url + route, json=body, timeout=60)


def generate(url: str, **body) -> dict:
    r = post(url, "/generate", {"input_ids": PROMPT, "return_logprob": True,
                                "sampling_params": {**GREEDY, "max_new_tokens": 4}, **body})
    assert r.status_code == 200, r.text
    return r.json()["meta_info"]


def stream_events(url: str, route: str, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", url + route, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return events


# ---- /generate ------------------------------------------------------------------------
def test_prompt_logprobs_equal_the_models_log_softmax(server, reference):
    meta = generate(server, logprob_start_len=0, top_logprobs_num=3,
                    return_text_in_logprobs=True)
    entries = meta["input_token_logprobs"]
    assert [e[1] for e in entries] == PROMPT
    assert entries[0][0] is None and meta["input_top_logprobs"][0] is None
    for p in range(1, len(PROMPT)):
        assert entries[p][0] == pytest.approx(float(reference[p - 1, PROMPT[p]]), abs=TOL)
        assert isinstance(entries[p][2], str)  # return_text_in_logprobs
        top = meta["input_top_logprobs"][p]
        want = reference[p - 1].topk(3)
        assert [t[0] for t in top] == pytest.approx(want.values.tolist(), abs=TOL)
    # The first output token is the greedy pick after the whole prompt.
    first = meta["output_token_logprobs"][0]
    assert first[1] == int(reference[-1].argmax())
    assert first[0] == pytest.approx(float(reference[-1].max()), abs=TOL)


def test_logprob_start_len_scores_from_there(server, reference):
    meta = generate(server, logprob_start_len=25, top_logprobs_num=0)
    entries = meta["input_token_logprobs"]
    assert [e[1] for e in entries] == PROMPT[25:] and all(e[2] is None for e in entries)
    for e, p in zip(entries, range(25, len(PROMPT))):
        assert e[0] == pytest.approx(float(reference[p - 1, PROMPT[p]]), abs=TOL)
    assert meta["input_top_logprobs"] == [[]] * len(entries)
    assert generate(server)["input_token_logprobs"] == []  # -1: output only
    r = post(server, "/generate", {"input_ids": PROMPT, "return_logprob": True,
                                   "logprob_start_len": len(PROMPT)})
    assert r.status_code == 400 and "logprob_start_len" in r.text


def test_top_lists_are_sorted_and_hold_the_chosen_token(server):
    meta = generate(server, top_logprobs_num=5,
                    sampling_params={"temperature": 0.7, "max_new_tokens": 12, "ignore_eos": True,
                                     "sampling_seed": 3})
    assert len(meta["output_top_logprobs"]) == len(meta["output_token_logprobs"]) == 12
    for (lp, tid, _), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        values = [t[0] for t in top]
        assert len(top) == 5 and values == sorted(values, reverse=True)
        assert lp <= values[0] + 1e-6
        if lp >= values[-1] + 1e-6:  # likely enough to be in the top 5: it is there
            assert [lp, tid] in [t[:2] for t in top]
    greedy = generate(server, top_logprobs_num=2)
    for (lp, tid, _), top in zip(greedy["output_token_logprobs"], greedy["output_top_logprobs"]):
        assert top[0][:2] == [lp, tid]


def test_generate_stream_ends_with_the_same_logprobs(server):
    body = {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 3,
            "top_logprobs_num": 2, "sampling_params": {**GREEDY, "max_new_tokens": 6}}
    whole = post(server, "/generate", body).json()["meta_info"]
    last = stream_events(server, "/generate", body)[-1]["meta_info"]
    for key in ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs",
                "output_top_logprobs"):
        assert last[key] == whole[key], key


# ---- OpenAI completions: what lm-evaluation-harness sends --------------------------------
@pytest.mark.parametrize("max_tokens", [1, 0])
def test_lm_eval_loglikelihood_request(server, reference, max_tokens):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": [PROMPT], "echo": True,
                                         "logprobs": 1, "max_tokens": max_tokens,
                                         "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    n = len(PROMPT) + max_tokens
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for p in range(1, len(PROMPT)):
        assert lp["token_logprobs"][p] == pytest.approx(
            float(reference[p - 1, PROMPT[p]]), abs=TOL)
        # logprobs: 1, and the prompt's own token where it is not the most likely
        # (OpenAI: up to logprobs + 1 entries); lm-eval's greedy check takes the max.
        top = lp["top_logprobs"][p]
        assert max(top.values()) == pytest.approx(float(reference[p - 1].max()), abs=TOL)
        assert top[lp["tokens"][p]] == lp["token_logprobs"][p]
        assert len(top) == 1 + (reference[p - 1].argmax().item() != PROMPT[p])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    _assert_tokens_at_their_offsets(choice["text"], lp)
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(PROMPT), max_tokens)


def test_completion_top_logprobs_list_the_sampled_token(server):
    """OpenAI: "the API will always return the logprob of the sampled token", so a
    top list has up to logprobs + 1 entries; with logprobs: 0 only the token's own."""
    for k in (0, 1):
        body = {"prompt": [PROMPT], "max_tokens": 12, "temperature": 1.5, "seed": 3,
                "logprobs": k, "ignore_eos": True}
        lp = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
        for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert top[token] == value and len(top) <= k + 1, (k, token, top)
        if k == 0:
            assert all(len(top) == 1 for top in lp["top_logprobs"])


def test_echo_of_a_text_prompt(server):
    r = post(server, "/v1/completions", {"prompt": "Hello there", "echo": True, "max_tokens": 3,
                                         "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("Hello there")
    r = post(server, "/v1/completions", {"prompt": "Hello there", "echo": True, "max_tokens": 0})
    assert r.json()["choices"][0]["text"] == "Hello there"


def test_text_offsets_of_split_and_cut_short_characters():
    """Unit: a character split over tokens shares its start; a byte that began a
    character the next token does not finish is a U+FFFD of its own, before that token."""
    from server.logprobs import CompletionLogprobs

    pieces = [b"h", b"\xe2", b"J", b"\xc3", b"\xa9", b"L", b"\xf0", b"\x9f\x90", b"\x8d", b" x"]

    class Texts:
        def __call__(self, tid):
            return pieces[tid].decode("utf-8", "replace")

        def raw(self, tid):
            return pieces[tid]

        label = __call__

    text = b"".join(pieces).decode("utf-8", "replace")
    assert text == "h\ufffdJ\u00e9L\U0001f40d x"
    part = CompletionLogprobs(Texts()).part(range(len(pieces)), [0.0] * len(pieces),
                                            [None] * len(pieces))
    assert part["text_offset"] == [0, 1, 2, 3, 3, 4, 5, 5, 5, 6]


def _assert_tokens_at_their_offsets(text: str, lp: dict) -> None:
    """Each token named by its text is that text at its ``text_offset`` (a byte token,
    ``bytes:\\xHH``, is a part of a character the text shows whole, or as U+FFFD)."""
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        if not token.startswith("bytes:"):
            assert text[offset:offset + len(token)] == token, (token, offset, text)


def _joined(chunks: list[dict]) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for key in out:
            out[key] += c[key]
    return out


@pytest.mark.parametrize("echo", [False, True])
def test_completion_stream_logprobs_equal_non_streamed(server, echo):
    body = {"prompt": [PROMPT], "echo": echo, "logprobs": 2, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    whole = post(server, "/v1/completions", body).json()["choices"][0]
    events = stream_events(server, "/v1/completions", body)
    chunks = [e["choices"][0] for e in events if e["choices"]]
    assert _joined([c["logprobs"] for c in chunks]) == whole["logprobs"]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert len(whole["logprobs"]["tokens"]) == 8 + (len(PROMPT) if echo else 0)


def test_chat_logprobs_streamed_and_not(server):
    body = {"messages": [{"role": "user", "content": "Say something"}], "logprobs": True,
            "top_logprobs": 3, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    whole = post(server, "/v1/chat/completions", body).json()["choices"][0]
    content = whole["logprobs"]["content"]
    assert len(content) == 6
    for item in content:
        top = item["top_logprobs"]
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert (top[0]["token"], top[0]["logprob"]) == (item["token"], item["logprob"])  # greedy
        assert item["bytes"] == list(item["token"].encode())
    events = stream_events(server, "/v1/chat/completions", body)
    streamed = [x for e in events if e["choices"] and e["choices"][0]["logprobs"]
                for x in e["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    r = post(server, "/v1/chat/completions", {**body, "logprobs": False})
    assert r.status_code == 400 and "top_logprobs" in r.text
    # A token that is one byte of a multi-byte character: its text alone is U+FFFD, its
    # bytes are its own (a client joins them into the character).
    forced = post(server, "/v1/chat/completions", {**body, "max_tokens": 2,
                                                   "logit_bias": {"240": 100}}).json()
    items = forced["choices"][0]["logprobs"]["content"]
    assert [(x["token"], x["bytes"]) for x in items] == [("\ufffd", [240])] * 2


def test_completion_logprobs_of_a_character_split_over_tokens(server):
    """Byte tokens of one character are named by their bytes (distinct names, so a top
    list keeps k entries), share the character's offset, and every later
    ``text_offset`` points at its token in the text."""
    body = {"prompt": "\U0001f40d is a snake", "echo": True, "logprobs": 5, "max_tokens": 0}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert text == "\U0001f40d is a snake"
    parts = [t for t in lp["tokens"] if t.startswith("bytes:")]
    assert parts and "".join(parts).count("\\x") == 4  # the snake's 4 UTF-8 bytes
    assert "".join(t for t in lp["tokens"] if not t.startswith("bytes:")) == text[1:]
    assert all(o == 0 for t, o in zip(lp["tokens"], lp["text_offset"]) if t.startswith("bytes:"))
    _assert_tokens_at_their_offsets(text, lp)
    tops = lp["top_logprobs"][1:]
    assert all(len(top) in (5, 6) for top in tops), tops  # 6: the token itself added
    assert all(top[t] == v for top, t, v in zip(tops, lp["tokens"][1:],
                                                lp["token_logprobs"][1:])), tops


# ---- logit_bias and unimplemented fields ----------------------------------------------
def test_logit_bias_forces_a_token_under_greedy(server):
    forced = 77
    r = post(server, "/generate", {"input_ids": PROMPT, "sampling_params": {
        **GREEDY, "max_new_tokens": 5, "logit_bias": {str(forced): 100.0}}})
    assert r.json()["output_ids"] == [forced] * 5
    for route, base in (("/v1/completions", {"prompt": [PROMPT]}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = post(server, route, {**base, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                 "logprobs": True if "chat" in route else 0,
                                 "logit_bias": {str(forced): 100}})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        tokens = [c["token"] for c in lp["content"]] if "chat" in route else lp["tokens"]
        assert len(tokens) == 4 and len(set(tokens)) == 1, tokens
    unbiased = post(server, "/generate", {"input_ids": PROMPT, "sampling_params": {
        **GREEDY, "max_new_tokens": 5}}).json()["output_ids"]
    assert unbiased != [forced] * 5


@pytest.mark.parametrize("bias, word", [({"77": 100.5}, "[-100, 100]"),
                                        ({"abc": 1}, "not a token id"),
                                        ({"999999": 1}, "not a token id")])
def test_bad_logit_bias_is_a_400(server, bias, word):
    r = post(server, "/v1/completions", {"prompt": "x", "logit_bias": bias})
    assert r.status_code == 400 and "logit_bias" in r.text and word in r.text


UNSUPPORTED = [
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "auto"),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/chat/completions", "parallel_tool_calls", True),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
    ("/v1/completions", "suffix", "tail"),
    ("/v1/completions", "best_of", 2),
    ("/v1/completions", "response_format", {"type": "json_object"}),
    ("/v1/completions", "stream_options", {"include_usage": True}),  # without stream
    ("/v1/chat/completions", "stream_options", {"include_usage": False}),
    # SGLang's extras on the OpenAI routes (constrained decoding, LoRA) and vLLM's
    ("/v1/chat/completions", "regex", "[ab]+"),
    ("/v1/chat/completions", "json_schema", '{"type": "object"}'),
    ("/v1/completions", "ebnf", "root ::= 'a'"),
    ("/v1/completions", "lora_path", "adapter"),
    ("/v1/chat/completions", "return_hidden_states", True),
    ("/v1/chat/completions", "continue_final_message", True),
    ("/v1/chat/completions", "echo", True),
    ("/v1/completions", "top_logprobs", 2),
    ("/generate", "image_data", "http://x/img.png"),
    ("/generate", "input_embeds", [[0.1, 0.2]]),
    ("/generate", "lora_path", ["adapter"]),
    ("/generate", "session_params", {"id": "s"}),
    ("/generate", "custom_logit_processor", "x"),
    ("/generate", "return_hidden_states", True),
    ("/generate", "token_ids_logprob", [1, 2]),
    ("/generate", "priority", 5),
    # SGLang's and vLLM's extras that would change the answer (silently ignored before)
    ("/v1/chat/completions", "custom_logit_processor", "x"),
    ("/v1/completions", "session_params", {"id": "s"}),
    ("/v1/completions", "return_token_ids", True),
    ("/v1/chat/completions", "cache_salt", "tenant-a"),
    ("/v1/chat/completions", "guided_json", {"type": "object"}),
    ("/v1/completions", "guided_choice", ["yes", "no"]),
    ("/v1/chat/completions", "structured_outputs", {"regex": "a+"}),
    ("/v1/completions", "allowed_token_ids", [1, 2]),
    ("/v1/completions", "bad_words", ["x"]),
    ("/v1/completions", "prompt_logprobs", 1),
    ("/v1/completions", "truncate_prompt_tokens", 4),
    ("/v1/chat/completions", "chat_template", "{{ messages }}"),
    ("/v1/chat/completions", "documents", [{"text": "d"}]),
    ("/v1/completions", "use_beam_search", True),
    ("/v1/completions", "return_tokens_as_token_ids", True),
    ("/v1/chat/completions", "logits_processors", ["pkg.module:Processor"]),
    ("/v1/chat/completions", "spaces_between_special_tokens", False),
]


@pytest.mark.parametrize("route, field, value", UNSUPPORTED)
def test_unimplemented_field_is_a_400_naming_it(server, route, field, value):
    base = {"/v1/completions": {"prompt": "x", "max_tokens": 1},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}],
                                     "max_tokens": 1},
            "/generate": {"text": "x", "sampling_params": {"max_new_tokens": 1}}}[route]
    r = post(server, route, {**base, field: value})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def test_stream_usage_in_every_chunk_is_a_400(server):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "stream": True,
                                         "stream_options": {"continuous_usage_stats": True}})
    assert r.status_code == 400 and "continuous_usage_stats" in r.text


def test_openai_errors_name_the_fields_sent(server):
    chat = {"messages": [{"role": "user", "content": "x"}]}
    for route, body, name in [
            ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
            ("/v1/chat/completions", {**chat, "max_completion_tokens": 10**6},
             "max_completion_tokens"),
            ("/v1/chat/completions", {**chat, "max_tokens": 3, "min_tokens": 5}, "min_tokens")]:
        message = post(server, route, body).json()["error"]["message"]
        assert name in message and "_new_tokens" not in message, message
    for route, body in [("/generate", {"text": "x", "rid": ""}),
                        ("/generate", {"text": ["x", "y"], "rid": ["a", ""]}),
                        ("/v1/completions", {"prompt": "x", "rid": ""})]:
        r = post(server, route, body)
        assert r.status_code == 400 and "rid" in r.text, r.text


def test_values_that_ask_for_nothing_are_accepted(server):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "best_of": 1,
                                         "suffix": None})
    assert r.status_code == 200, r.text
    r = post(server, "/generate", {"text": ["x", "y"], "lora_path": [None, None],
                                   "image_data": "", "return_hidden_states": False,
                                   "session_params": {},
                                   "sampling_params": {"max_new_tokens": 1, "regex": None,
                                                       "json_schema": None}})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "top_logprobs": 0,
                                         "stream": True,
                                         "stream_options": {"continuous_usage_stats": None}})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                              "max_tokens": 1, "response_format": {"type": "text"},
                                              "tool_choice": "none", "parallel_tool_calls": False,
                                              "priority": 0, "return_token_ids": False,
                                              "bad_words": [], "use_beam_search": False,
                                              "logits_processors": [],
                                              "spaces_between_special_tokens": True,
                                              "return_tokens_as_token_ids": False})
    assert r.status_code == 200, r.text
    r = post(server, "/generate", {"text": "x", "sampling_params": {
        "max_new_tokens": 1, "spaces_between_special_tokens": True}})
    assert r.status_code == 200, r.text
    r = post(server, "/generate", {"text": "x", "sampling_params": {
        "max_new_tokens": 1, "spaces_between_special_tokens": False}})
    assert r.status_code == 400 and "spaces_between_special_tokens" in r.text, r.text


def test_other_servers_names_for_fields_are_honoured(server):
    """vLLM's ``include_stop_str_in_output`` (SGLang's ``no_stop_trim``), chat's
    ``max_completion_tokens`` on completions, and ``add_generation_prompt``."""
    free = post(server, "/v1/completions", {"prompt": [PROMPT], "max_tokens": 12,
                                            "temperature": 0}).json()["choices"][0]["text"]
    stop = free[4:6]
    for extra, kept in [({}, False), ({"include_stop_str_in_output": True}, True)]:
        text = post(server, "/v1/completions", {"prompt": [PROMPT], "max_tokens": 12,
                                                "temperature": 0, "stop": stop,
                                                **extra}).json()["choices"][0]["text"]
        assert text.endswith(stop) is kept and free.startswith(text), (extra, text)
    usage = post(server, "/v1/completions", {"prompt": "x", "max_completion_tokens": 3,
                                             "ignore_eos": True}).json()["usage"]
    assert usage["completion_tokens"] == 3
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    opened = post(server, "/v1/chat/completions", chat).json()["usage"]["prompt_tokens"]
    closed = post(server, "/v1/chat/completions",
                  {**chat, "add_generation_prompt": False}).json()["usage"]["prompt_tokens"]
    assert closed < opened


# ---- PD ----------------------------------------------------------------------------------
def test_pd_prompt_logprobs_equal_non_pd(server, tmp_path):
    body = {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 0,
            "top_logprobs_num": 3, "sampling_params": {**GREEDY, "max_new_tokens": 5}}
    plain = post(server, "/generate", body).json()["meta_info"]
    flags = ["--disaggregation-mode", "pd", "--prefill-dp-size", "1", "--decode-dp-size", "1",
             *COMMON]
    seeded = {"input_ids": PROMPT, "sampling_params": {"temperature": 1.0, "max_new_tokens": 8,
                                                       "ignore_eos": True, "sampling_seed": 11}}
    plain_seeded = [post(server, "/generate", {**seeded, "routed_dp_rank": r}).json()["output_ids"]
                    for r in (0, 1)]
    with ServerProcess(*flags, log_path=tmp_path / "pd.log") as pd:
        # A request's own seed: the same samples on every rank and through PD.
        assert post(pd.url, "/generate", seeded).json()["output_ids"] == plain_seeded[0] \
            == plain_seeded[1]
        meta = post(pd.url, "/generate", body).json()["meta_info"]
        echo = post(pd.url, "/v1/completions", {"prompt": [PROMPT], "echo": True, "logprobs": 1,
                                                "max_tokens": 1, "temperature": 0}).json()
    for key in ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs",
                "output_top_logprobs"):
        assert json.dumps(meta[key]) and _close(meta[key], plain[key]), key
    lps = echo["choices"][0]["logprobs"]["token_logprobs"]
    assert _close(lps[:len(PROMPT)], [e[0] for e in plain["input_token_logprobs"]])


def _close(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= TOL
    return a == b
