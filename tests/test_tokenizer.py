"""The tokenizer wrapper and the committed tiny tokenizer folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import ModelLoadError
from engine.tiny import BOS_ID, EOS_ID, PAD_ID, tiny_folder_files, tiny_model_path
from engine.tokenizer import Tokenizer, fallback_chat_prompt

transformers = pytest.importorskip("transformers")

SAMPLES = [
    "",
    "hello world",
    "  leading spaces\n\ttabs and newlines\r\n",
    "héllo wörld, naïve café",
    "你好，世界",
    "emoji 🎉👩‍👩‍👧 mixed",
    "Ünïcödé ∑ ≠ ∞ and Ελληνικά and русский",
    "special <|eos|> inside",
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.load("tiny")


@pytest.fixture(scope="module")
def hf():
    return transformers.AutoTokenizer.from_pretrained(tiny_model_path())


def test_committed_folder_matches_the_generator():
    folder = Path(tiny_model_path())
    for name, text in tiny_folder_files().items():
        assert (folder / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: run python -m engine.tiny --write-tokenizer"
        )


@pytest.mark.parametrize("text", SAMPLES)
def test_same_ids_as_transformers(ours, hf, text):
    assert ours.encode(text) == hf.encode(text)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_same_ids_as_transformers_for_any_text(ours, hf, text):
    assert ours.encode(text) == hf.encode(text)


def test_ids_are_the_utf8_bytes(ours):
    text = "aé你🎉"
    assert ours.encode(text) == list(text.encode("utf-8"))
    assert ours.decode(list(text.encode("utf-8"))) == text
    assert ours.vocab_size == 259 and ours.eos_token_ids == (EOS_ID,)
    assert ours.bos_token_id == BOS_ID and hf_special_ids_agree(ours)


def hf_special_ids_agree(ours: Tokenizer) -> bool:
    backend = ours.backend
    return [backend.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>")] == [BOS_ID, EOS_ID, PAD_ID]


def test_decode_skips_special_tokens_unless_asked(ours):
    ids = ours.encode("a") + [EOS_ID]
    assert ours.decode(ids) == "a"
    assert ours.decode(ids, skip_special_tokens=False) == "a<|eos|>"


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_decoding_streams_complete_text(ours, text):
    decoder = ours.incremental_decoder()
    deltas = [decoder.step([i]) for i in ours.encode(text)]
    deltas.append(decoder.flush())
    assert "".join(deltas) == ours.decode(ours.encode(text)) == decoder.text
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_decoding_holds_back_partial_characters(ours):
    decoder = ours.incremental_decoder()
    emoji = list("🎉".encode("utf-8"))
    assert [decoder.step([b]) for b in emoji[:-1]] == ["", "", ""]
    assert decoder.step(emoji[-1:]) == "🎉"
    # An unfinished sequence at the end comes out on flush, as a replacement char.
    assert decoder.step([0xE4]) == ""
    assert decoder.flush() == "\ufffd"


def test_chat_template_matches_transformers(ours, hf):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    expected = "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello\n<|user|>\nagain\n<|assistant|>\n"
    assert ours.apply_chat_template(messages) == expected
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert fallback_chat_prompt(messages) == expected
    assert ours.encode_chat(messages) == list(expected.encode())


def test_chat_accepts_openai_content_parts(ours):
    """Text parts are joined by a space, as SGLang joins them for a template that renders
    content as a string ("ab" before: another prompt than SGLang's model sees)."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == "<|user|>\na b\n"


def test_a_template_that_loops_over_content_gets_the_parts(ours):
    """A template that iterates ``message['content']`` gets OpenAI's list of parts (it
    looped over the characters of a joined string and rendered no text at all)."""
    from engine.tokenizer import Tokenizer
    loops = ("{% for m in messages %}<{{ m.role }}>{% for c in m['content'] %}"
             "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
             "</{{ m.role }}>{% endfor %}")
    tok = Tokenizer(ours.backend, chat_template=loops, special_tokens=ours.special_tokens)
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}], False) \
        == "<user>Helloworld</user>"
    assert ours.apply_chat_template([{"role": "user", "content": parts}], False) \
        == "<|user|>\nHello world\n"  # a template that renders content as a string


def test_keys_given_as_none_do_not_reach_the_template(ours):
    """The API passes every message field, None where absent; a template testing
    ``is defined`` must see it absent, as SGLang leaves such keys out."""
    from engine.tokenizer import Tokenizer
    tok = Tokenizer(ours.backend, chat_template=(
        "{% for m in messages %}{% if m.name is defined %}[{{ m.name }}]{% endif %}"
        "{{ m.content }}{% endfor %}"), special_tokens=ours.special_tokens)
    assert tok.apply_chat_template([{"role": "user", "content": "hi", "name": None}], False) == "hi"
    assert tok.apply_chat_template([{"role": "user", "content": "hi", "name": "ann"}], False) \
        == "[ann]hi"


def test_folder_without_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot parse"):
        Tokenizer.from_folder(tmp_path)


def test_max_bytes_per_token_bounds_the_byte_level_tokenizer():
    from engine.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    bound = tok.max_bytes_per_token
    assert bound == len("<|eos|>")  # the longest token: a special token's text
    for text in ("hello world", "<|eos|>" * 50, "é" * 100, "ab " * 1000):
        assert len(tok.encode(text)) >= len(text.encode()) / bound


def test_no_bound_where_text_can_vanish_or_fuse():
    from engine.tokenizer import _can_bound
    bpe = {"type": "BPE", "unk_token": None}
    assert _can_bound({"model": bpe, "normalizer": None, "pre_tokenizer": {"type": "ByteLevel"}})
    assert _can_bound({"model": bpe, "pre_tokenizer": None, "normalizer": {
        "type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Replace",
                                            "pattern": {"String": " "}, "content": "▁"}]}})
    for config in ({"model": {"type": "WordPiece"}},
                   {"model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": True}},
                   {"model": bpe, "normalizer": {"type": "Strip"}},
                   {"model": bpe, "normalizer": {"type": "Replace", "pattern": {"String": " "},
                                                 "content": ""}},
                   {"model": bpe, "pre_tokenizer": {"type": "BertPreTokenizer"}},
                   {"model": bpe, "pre_tokenizer": {"type": "Split", "behavior": "Removed"}}):
        assert not _can_bound(config), config


def test_add_special_tokens_reaches_the_tokenizer():
    """vLLM's ``add_special_tokens``: a completion's prompt gets the tokenizer's special
    tokens (here a BOS) unless it is false; a chat's follows it when given, else the
    model's choice (``chat_add_special_tokens``)."""
    import asyncio
    from types import SimpleNamespace

    from tokenizers.processors import TemplateProcessing

    from engine.tiny import BOS_TOKEN
    from server.prompts import encode_chat, encode_texts

    tok = Tokenizer.load("tiny")
    tok.backend.post_processor = TemplateProcessing(single=f"{BOS_TOKEN} $A",
                                                    special_tokens=[(BOS_TOKEN, BOS_ID)])
    engine = SimpleNamespace(tokenizer=tok, context_len=1000)
    plain = tok.encode("hi", add_special_tokens=False)
    for texts in (["hi"], ["hi" * 9000]):  # on the loop, and in a worker thread
        assert asyncio.run(encode_texts(engine, texts, "prompt"))[0][0] == BOS_ID
        without = asyncio.run(encode_texts(engine, texts, "prompt", add_special_tokens=False))
        assert without[0][0] != BOS_ID
    assert asyncio.run(encode_texts(engine, ["hi"], "prompt", False)) == [plain]
    chat = [{"role": "user", "content": "hi"}]
    default = asyncio.run(encode_chat(engine, chat))
    assert (default[0] == BOS_ID) == tok.chat_add_special_tokens
    for add in (True, False):
        ids = asyncio.run(encode_chat(engine, chat, add_special_tokens=add))
        assert (ids[0] == BOS_ID) == add
