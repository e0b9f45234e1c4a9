"""Sampling parameters, the batched sampler and finish checks."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.finish import check_finish, find_stop_str, trim_stop_str
from engine.sampler import SampleRow, sample
from engine.sampling import INT64_MAX, INT64_MIN, InvalidSamplingParams, SamplingParams

torch.set_num_threads(1)

EOS = frozenset({9})
VOCAB = 10


def _logits_for(probs: list[float]) -> torch.Tensor:
    p = torch.tensor(probs + [0.0] * (VOCAB - len(probs)))
    return torch.log(p.clamp_min(1e-30))[None, :]


def _draws(probs: list[float], params: SamplingParams, num: int = 400) -> list[int]:
    """`num` draws from the same logits, each with its own seed."""
    logits = _logits_for(probs).expand(num, VOCAB)
    rows = [SampleRow(msgspec.structs.replace(params, sampling_seed=s)) for s in range(num)]
    return sample(logits, rows, EOS)[0]


# ---- SamplingParams ----------------------------------------------------------------


def test_defaults_follow_sglang():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (128, 1.0, 1.0, -1, 0.0)
    assert not p.ignore_eos and p.skip_special_tokens and not p.no_stop_trim
    assert p.sampling_seed is None and p.n == 1 and p.repetition_penalty == 1.0
    p.validate(vocab_size=VOCAB, context_len=2048)


def test_json_roundtrip_ignores_unknown_keys_and_accepts_ints_for_floats():
    raw = b'{"temperature": 0, "stop": ["a", "b"], "max_new_tokens": 5, "model": null}'
    p = msgspec.json.decode(raw, type=SamplingParams)
    assert p.temperature == 0.0 and p.is_greedy and p.stop_strs == ("a", "b")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p
    assert SamplingParams(stop="x").stop_strs == ("x",)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"min_new_tokens": 200}, "min_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"n": 0}, "n must"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": ["ok", ""]}, "stop strings"),
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
        ({"sampling_seed": 2**64}, "sampling_seed"),
    ],
)
def test_validate_names_the_bad_field(kwargs, words):
    with pytest.raises(InvalidSamplingParams, match=words):
        SamplingParams(**kwargs).validate(vocab_size=VOCAB, context_len=2048)


def test_validate_checks_the_context():
    SamplingParams(max_new_tokens=48).validate(VOCAB, context_len=64, prompt_len=16)
    with pytest.raises(InvalidSamplingParams, match="context length 64"):
        SamplingParams(max_new_tokens=49).validate(VOCAB, context_len=64, prompt_len=16)


# ---- sampler -----------------------------------------------------------------------


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    rows = [SampleRow(SamplingParams(temperature=0.0)), SampleRow(SamplingParams(top_k=1))]
    tokens, logprobs = sample(logits, rows, EOS, return_logprob=True)
    assert tokens == [1, 0]
    assert logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[1]))


def test_seeded_draw_is_independent_of_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    target = SampleRow(SamplingParams(temperature=0.7, top_k=20, sampling_seed=99), output_ids=[1, 2])
    alone = sample(logits[2:3], [target], EOS)[0][0]
    others = [
        SampleRow(SamplingParams(temperature=0.0)),
        SampleRow(SamplingParams(top_p=0.5)),
        SampleRow(SamplingParams(min_p=0.2, sampling_seed=5)),
    ]
    batch = [others[0], others[1], target, others[2]]
    for _ in range(3):  # the unseeded row advances the shared generator each time
        assert sample(logits[:4], batch, EOS, torch.Generator().manual_seed(7))[0][2] == alone


def test_seed_and_step_both_change_the_draw():
    draws = {
        sample(torch.zeros(1, 1000), [SampleRow(SamplingParams(sampling_seed=s), output_ids=[0] * k)],
               EOS)[0][0]
        for s in range(4) for k in range(4)
    }
    assert len(draws) > 12


def test_draws_follow_the_distribution():
    probs = [0.5, 0.3, 0.2]
    draws = _draws(probs, SamplingParams(), num=3000)
    for token, p in enumerate(probs):
        assert draws.count(token) / len(draws) == pytest.approx(p, abs=0.04)


def test_temperature_sharpens():
    hot = _draws([0.5, 0.3, 0.2], SamplingParams(temperature=2.0), num=2000)
    cold = _draws([0.5, 0.3, 0.2], SamplingParams(temperature=0.25), num=2000)
    assert cold.count(0) > 0.85 * 2000 > hot.count(0) * 2


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.7), {0, 1}),  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
        (SamplingParams(top_p=0.85), {0, 1, 2}),
        (SamplingParams(min_p=0.5), {0, 1}),  # keeps p >= 0.25
        (SamplingParams(top_k=3, top_p=0.7), {0, 1}),
        # top_p applies to the renormalised top-k mass: 0.5/0.8 = 0.625 >= 0.6.
        (SamplingParams(top_k=2, top_p=0.6), {0}),
        (SamplingParams(top_p=1.0, top_k=-1, min_p=0.0), {0, 1, 2, 3}),
    ],
)
def test_filters_keep_exactly_the_allowed_tokens(params, allowed):
    assert set(_draws([0.5, 0.3, 0.15, 0.05], params)) == allowed


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    row = SampleRow(SamplingParams(temperature=0.0, repetition_penalty=1.5), prompt_ids=[0])
    assert sample(logits, [row], EOS)[0] == [1]
    row = SampleRow(SamplingParams(temperature=0.0, repetition_penalty=1.5), prompt_ids=[2])
    assert sample(logits, [row], EOS)[0] == [0]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_tiny_repetition_penalty_keeps_the_distribution_a_distribution(temperature):
    """Dividing a seen positive logit by 1e-40 overflows float32: the sampler takes the
    limit, every token but the seen one of the largest logit at probability 0, not every
    logprob NaN (which went out as 0.0)."""
    logits = torch.tensor([[2.0, 1.0, 5.0, 0.5]])
    row = SampleRow(SamplingParams(temperature=temperature, repetition_penalty=1e-40,
                                   sampling_seed=3), prompt_ids=[1, 2])
    ids, logprobs = sample(logits, [row], EOS, return_logprob=True)
    assert ids == [2] and logprobs == [0.0]
    # The seen token of the largest logit is masked (min_new_tokens): still a distribution.
    row = SampleRow(SamplingParams(temperature=temperature, repetition_penalty=1e-40,
                                   min_new_tokens=1, stop_token_ids=[2], sampling_seed=3),
                    prompt_ids=[1, 2])
    ids, logprobs = sample(logits, [row], EOS, return_logprob=True)
    assert ids[0] != 2 and math.isfinite(logprobs[0])


def test_frequency_and_presence_penalties_use_output_counts():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    freq = SampleRow(SamplingParams(temperature=0.0, frequency_penalty=0.3), output_ids=[0, 0])
    assert sample(logits, [freq], EOS)[0] == [1]  # 2.0 - 0.6 < 1.5
    once = SampleRow(SamplingParams(temperature=0.0, frequency_penalty=0.3), output_ids=[0])
    assert sample(logits, [once], EOS)[0] == [0]  # 1.7 > 1.5
    pres = SampleRow(SamplingParams(temperature=0.0, presence_penalty=0.6), output_ids=[0])
    assert sample(logits, [pres], EOS)[0] == [1]
    # Prompt tokens do not count for frequency/presence.
    prompt = SampleRow(SamplingParams(temperature=0.0, presence_penalty=0.6), prompt_ids=[0])
    assert sample(logits, [prompt], EOS)[0] == [0]


def test_min_new_tokens_masks_eos_and_stop_tokens():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 9], logits[0, 4], logits[0, 2] = 5.0, 4.0, 1.0  # eos, stop id, other
    params = SamplingParams(temperature=0.0, min_new_tokens=2, stop_token_ids=[4])
    assert sample(logits, [SampleRow(params, output_ids=[1])], EOS)[0] == [2]
    assert sample(logits, [SampleRow(params, output_ids=[1, 1])], EOS)[0] == [9]
    ignoring = msgspec.structs.replace(params, ignore_eos=True)
    assert sample(logits, [SampleRow(ignoring, output_ids=[1])], EOS)[0] == [9]


def test_sampling_never_returns_nan_or_out_of_vocab():
    logits = torch.full((64, VOCAB), -math.inf)
    logits[:, 3] = 0.0
    rows = [SampleRow(SamplingParams(temperature=1.3, top_p=0.9, sampling_seed=i)) for i in range(64)]
    assert sample(logits, rows, EOS)[0] == [3] * 64


# ---- finish checks -----------------------------------------------------------------


def test_finish_length_and_zero_tokens():
    p = SamplingParams(max_new_tokens=3)
    assert check_finish(p, [1, 2], EOS) is None
    assert check_finish(p, [1, 2, 3], EOS) == {"type": "length", "length": 3}
    assert check_finish(SamplingParams(max_new_tokens=0), [], EOS) == {"type": "length", "length": 0}
    assert check_finish(p, [], EOS) is None


def test_finish_on_eos_and_stop_token_ids():
    p = SamplingParams(stop_token_ids=[4])
    assert check_finish(p, [1, 9], EOS) == {"type": "stop", "matched": 9}
    assert check_finish(p, [1, 4], EOS) == {"type": "stop", "matched": 4}
    ignoring = SamplingParams(stop_token_ids=[4], ignore_eos=True)
    assert check_finish(ignoring, [1, 9], EOS) is None
    assert check_finish(ignoring, [1, 4], EOS) == {"type": "stop", "matched": 4}


def test_finish_on_stop_strings_in_new_text_only():
    p = SamplingParams(stop=["END", "\n\n"])
    assert check_finish(p, [1], EOS, "abc EN", num_new_chars=1) is None
    assert check_finish(p, [1, 2], EOS, "abc END", num_new_chars=1) == {"type": "stop", "matched": "END"}
    # A match wholly inside old text was already seen (and not acted on): not re-found.
    assert find_stop_str("END then more", ["END"], num_new_chars=4) is None
    assert find_stop_str("x\n\ny", ["END", "\n\n"]) == "\n\n"
    assert trim_stop_str("hello END rest", "END") == "hello "
    # A search that began past the first occurrence stopped at the next one.
    assert trim_stop_str("a END b END c", "END", 3) == "a END b "
    assert trim_stop_str("a END b END c", "END", 2) == "a "
    # vLLM's include_stop_str_in_output: the stop string stays, what followed it goes.
    assert trim_stop_str("hello END rest", "END", keep_stop=True) == "hello END"


def test_min_new_tokens_defers_every_stop():
    p = SamplingParams(min_new_tokens=3, stop=["a"], stop_token_ids=[4])
    assert check_finish(p, [9], EOS, "a") is None
    assert check_finish(p, [1, 4], EOS, "aa") is None
    assert check_finish(p, [1, 1, 9], EOS, "aaa") == {"type": "stop", "matched": 9}


def test_logit_bias_moves_only_its_rows_tokens():
    logits = torch.zeros(3, 10)
    logits[:, 2] = 5.0
    biased = SamplingParams(temperature=0.0, logit_bias={"7": 100.0, "2": -100.0})
    sampled = SamplingParams(temperature=1.0, sampling_seed=1, logit_bias={"4": 100.0})
    rows = [SampleRow(biased), SampleRow(SamplingParams(temperature=0.0)), SampleRow(sampled)]
    tokens, logprobs = sample(logits, rows, EOS, return_logprob=True)
    assert tokens == [7, 2, 4]
    assert logprobs[0] == pytest.approx(0.0, abs=1e-6)  # the bias is in the distribution
    assert logits[0, 7] == 0.0  # the caller's logits are untouched


@pytest.mark.parametrize("bias, word", [({"10": 1.0}, "token id"), ({"x": 1.0}, "token id"),
                                        ({"1" * 5000: 1.0}, "token id"),
                                        ({"\u00b9": 1.0}, "token id"),  # isdigit, not int()
                                        ({"\u0663": 1.0}, "token id"),  # int() reads 3
                                        ({"3": -100.01}, "[-100, 100]"),
                                        ({"3": math.nan}, "[-100, 100]"),
                                        ({"5": 100.0, "05": 100.0}, "token 5 twice")])
def test_logit_bias_is_validated(bias, word):
    with pytest.raises(InvalidSamplingParams, match="logit_bias") as exc:
        SamplingParams(logit_bias=bias).validate(vocab_size=10, context_len=100)
    assert word in str(exc.value)


def test_copies_of_a_seeded_request_get_consecutive_seeds():
    params = SamplingParams(n=3, sampling_seed=INT64_MAX - 1)
    seeds = [params.for_copy(j).sampling_seed for j in range(3)]
    assert seeds == [INT64_MAX - 1, INT64_MAX, INT64_MIN]  # wraps within int64
    assert all(params.for_copy(j).n == 1 for j in range(3))
    assert SamplingParams(n=2).for_copy(1).sampling_seed is None  # unseeded stays so


def test_stop_strings_are_bounded_in_all():
    ok = SamplingParams(stop=["x" * 2048, "y" * 2048])
    ok.validate(vocab_size=10, context_len=1000)
    with pytest.raises(InvalidSamplingParams, match="stop strings") as exc:
        SamplingParams(stop=["x" * 2048, "y" * 2049]).validate(vocab_size=10, context_len=1000)
    assert "4096" in str(exc.value) and "4097" in str(exc.value)


@settings(max_examples=300, deadline=None)
@given(st.text("ab\u00e9", max_size=14), st.lists(st.text("ab\u00e9", min_size=1, max_size=8),
                                                 min_size=1, max_size=4))
def test_held_back_stop_prefix_is_the_longest_by_definition(text, stops):
    """``stop_prefix_len`` (what a stream holds back): the longest end of the text that
    is a proper prefix of some stop string."""
    from server.request_flow import stop_prefix_len
    expected = max((k for stop in stops for k in range(1, min(len(stop) - 1, len(text)) + 1)
                    if text.endswith(stop[:k])), default=0)
    assert stop_prefix_len(text, tuple(stops)) == expected


def test_stop_strings_are_searched_where_the_client_text_has_them():
    """``StopStringSearch``: a stop string is found in the text the client gets, where
    the API trims it and holds back its beginning (a special token between its
    characters, left out of that text, does not hide it), and one that spells a special
    token is found in the text with it (as SGLang matches ``<|im_end|>``)."""
    from engine.finish import FinishStop, StopStringSearch
    from engine.tiny import PAD_ID, PAD_TOKEN
    from engine.tokenizer import Tokenizer
    tokenizer = Tokenizer.load("tiny")
    a, b, x = (ord(c) for c in "abx")
    ids = [a, PAD_ID, b, x, a, b]

    def stops_after(stop: str, skip_special_tokens: bool = True) -> tuple[int, object]:
        params = SamplingParams(max_new_tokens=10, stop=[stop],
                                skip_special_tokens=skip_special_tokens)
        search = StopStringSearch(tokenizer, skip_special_tokens)
        for n in range(1, len(ids) + 1):
            reason = search.check(params, ids[:n], ())
            if reason is not None:
                return n, reason
        return 0, None

    assert stops_after("ab") == (3, FinishStop("ab"))  # the client's text is "ab..."
    assert stops_after(PAD_TOKEN) == (2, FinishStop(PAD_TOKEN))
    # With special tokens in the client's text, that text is searched as it is.
    assert stops_after("ab", skip_special_tokens=False) == (6, FinishStop("ab"))
    assert stops_after(PAD_TOKEN, skip_special_tokens=False) == (2, FinishStop(PAD_TOKEN))
