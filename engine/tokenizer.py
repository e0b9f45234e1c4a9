"""Tokenizer wrapper over the `tokenizers` library (no torch, no transformers).

Loads a folder's `tokenizer.json` (+ `tokenizer_config.json` for special tokens and the
chat template). The built-in tiny model's byte-level tokenizer is the committed folder
`engine/data/tiny/`, loaded the same way, so HF clients reading that folder count
exactly the tokens we do.

Chat: the folder's jinja template is used when there is one (`engine.chat_template`:
found and rendered as transformers does), or the one `--chat-template` gives; otherwise a documented fallback, one block per message then the assistant
cue:  "<|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n".
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from engine.chat_template import (chat_template_from_folder, iterates_content,
                                  render_chat_template)
from engine.config import ModelLoadError
from engine.tiny import bytes_to_unicode

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        eos_token_ids: tuple[int, ...] = (),
        bos_token_id: int | None = None,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}

    @classmethod
    def load(cls, model_path: str) -> Tokenizer:
        """`tiny` means the built-in byte-level tokenizer; anything else is a folder."""
        if model_path == "tiny":
            return cls.byte_level()
        return cls.from_folder(model_path)

    @classmethod
    def byte_level(cls) -> Tokenizer:
        from engine.tiny import tiny_model_path

        return cls.from_folder(tiny_model_path())

    @classmethod
    def from_folder(cls, folder: str | Path, chat_template: str | None = None) -> Tokenizer:
        """`chat_template`: overrides the folder's own (``--chat-template``)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{path} not found (only tokenizer.json tokenizers are supported)")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise ModelLoadError(f"cannot parse {path}: {e}") from e
        config = _read_json(folder / "tokenizer_config.json")
        special = {
            key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token")
        }
        special = {k: v for k, v in special.items() if v is not None}
        eos_id = backend.token_to_id(special["eos_token"]) if "eos_token" in special else None
        bos_id = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
        return cls(
            backend,
            eos_token_ids=() if eos_id is None else (eos_id,),
            bos_token_id=bos_id,
            chat_template=chat_template or chat_template_from_folder(folder, config),
            special_tokens=special,
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_bytes_per_token(self) -> int | None:
        """An upper bound on the UTF-8 bytes of input text one token stands for, or
        None when this tokenizer gives no sound bound. With a bound, a text of B bytes
        has at least B / bound tokens: the API refuses a certainly-too-long prompt
        without tokenizing it. Sound when nothing before the model deletes text and
        the model never fuses a run of unknown text into one token (``_can_bound``);
        a normalizer may still shrink text (NFC composes up to 3 code points into
        one), which the API's safety factor covers. Computed once, ~1 us per id."""
        if not _can_bound(json.loads(self.backend.to_str())):
            return None
        longest = 1
        for token, token_id in self.backend.get_vocab(with_added_tokens=True).items():
            # Both spellings: the vocabulary's ("Ġhi", "▁hi") and the decoded text's; a
            # lone byte of a multi-byte character decodes to U+FFFD (3 bytes), an over-,
            # never an under-estimate.
            decoded = self.backend.decode([token_id], skip_special_tokens=False)
            longest = max(longest, len(token.encode()), len(decoded.encode()))
        return longest

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (OpenAI's logprobs ``bytes``). A token that is
        part of a multi-byte character decodes alone to U+FFFD; its own bytes come from
        the vocabulary's spelling instead: ByteLevel's byte characters, or
        sentencepiece's ``<0xHH>`` byte fallback."""
        text = self.backend.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode()
        token = self.backend.id_to_token(token_id) or ""
        fallback = _BYTE_FALLBACK.fullmatch(token)
        if fallback is not None:
            return bytes([int(fallback.group(1), 16)])
        if self._byte_level_decoder:
            table = _unicode_to_bytes()
            if token and all(c in table for c in token):
                return bytes(table[c] for c in token)
        return text.encode()

    @functools.cached_property
    def _byte_level_decoder(self) -> bool:
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        return "ByteLevel" in {decoder.get("type"),
                               *(d.get("type") for d in decoder.get("decoders") or ())}

    @property
    def chat_add_special_tokens(self) -> bool:
        """A checkpoint's template writes its own BOS: its rendering is encoded without
        adding special tokens again."""
        return self.chat_template is None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids as `AutoTokenizer(...).encode(text)` gives (its post-processor may add BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``encode`` of each text. Unlike ``encode``, the library releases the GIL while
        it works, so this is what a worker thread calls to leave the event loop free."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """``template_kwargs``: more variables for the template (a request's
        ``chat_template_kwargs``, e.g. ``enable_thinking``); they cannot replace the
        messages, the generation prompt flag or the special tokens (``ValueError``)."""
        # As SGLang hands messages to a template: keys whose value is None left out (a
        # template testing ``m.name is defined``), and content as the template reads it:
        # a list of text parts where it loops over them, else their text joined by spaces.
        as_parts = self.chat_template is not None and iterates_content(self.chat_template)
        messages = [{**{k: v for k, v in m.items() if v is not None},
                     "content": _content_parts(m.get("content")) if as_parts
                     else _content_text(m.get("content"))} for m in messages]
        if self.chat_template is None:
            return fallback_chat_prompt(messages, add_generation_prompt)
        taken = {"messages", "add_generation_prompt", *self.special_tokens}
        clash = sorted(taken & set(template_kwargs or ()))
        if clash:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(clash)}")
        return render_chat_template(
            self.chat_template,
            **(template_kwargs or {}),
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Prompt ids for /v1/chat/completions (see ``chat_add_special_tokens``)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=self.chat_add_special_tokens)


class IncrementalDecoder:
    """Turns a stream of ids into a stream of text deltas for streaming responses.

    Decodes a short window of recent ids (some tokenizers' text depends on the token
    before) and emits only what is new. While the window's text ends in U+FFFD the
    last tokens are a partial UTF-8 sequence (e.g. the first bytes of a CJK character
    or an emoji), so nothing is emitted until the sequence completes. `flush()` at
    the end releases whatever is still held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: context for the next delta
        self._read_offset = 0  # ids before this are already emitted as text
        self.text = ""  # everything emitted so far

    def step(self, new_ids: list[int]) -> str:
        self._ids.extend(new_ids)
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset, len(self._ids))
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset, len(self._ids))
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)


def fallback_chat_prompt(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    parts = [f"<|{m.get('role', 'user')}|>\n{_content_text(m.get('content'))}\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def _content_parts(content: Any) -> Any:
    """For a template that loops over content: a string stays one; a list keeps its
    text parts (the only ones the API lets through)."""
    if content is None or isinstance(content, str):
        return content or ""
    return [p for p in content if isinstance(p, dict) and p.get("type") == "text"]


def _content_text(content: Any) -> str:
    # OpenAI content may be a list of parts; only text parts mean anything here, joined
    # by a space as SGLang joins them for a template that renders content as a string.
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict))


# What may stand between input text and the model's tokens without deleting text (see
# Tokenizer.max_bytes_per_token); anything else (Strip, BertPreTokenizer, a WordPiece
# word over its length as one [UNK], a sentencepiece charsmap, ...) gives no bound.
_KEEPING_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Replace"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation",
                           "UnicodeScripts"}


def _can_bound(config: dict[str, Any]) -> bool:
    """Whether a tokenizer.json's pipeline keeps every byte of input in some token."""
    def keeps(part: dict[str, Any] | None, allowed: set[str], key: str) -> bool:
        if part is None:
            return True
        if part.get("type") == "Sequence":
            return all(keeps(p, allowed, key) for p in part.get(key, []))
        if part.get("type") == "Replace":  # a one-character pattern to non-empty text
            pattern = part.get("pattern", {}).get("String")
            return isinstance(pattern, str) and len(pattern) == 1 and bool(part.get("content"))
        return part.get("type") in allowed and part.get("behavior") != "Removed"

    model = config.get("model") or {}
    fuses_unknown = model.get("type") != "BPE" or (
        model.get("unk_token") is not None and model.get("fuse_unk") and not model.get("byte_fallback"))
    return (not fuses_unknown
            and keeps(config.get("normalizer"), _KEEPING_NORMALIZERS, "normalizers")
            and keeps(config.get("pre_tokenizer"), _KEEPING_PRE_TOKENIZERS, "pretokenizers"))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores a token either as text or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def optional_tokenizer(model_path: str) -> Tokenizer | None:
    """A rank's tokenizer, for stop strings (the only text a rank needs); None for a
    checkpoint without a tokenizer.json, which can still serve input_ids requests."""
    if model_path == "tiny" or Path(model_path, "tokenizer.json").is_file():
        return Tokenizer.load(model_path)
    return None
