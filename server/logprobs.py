"""Log-probabilities in the shapes clients read: SGLang's ``meta_info`` and OpenAI's.

What a rank sends (``scheduler.messages.ReqOutput``, gathered in ``Progress``): the
sampled tokens' logprobs, per token a top list ``[(logprob, token_id), ...]`` (most
likely first; None where unknown), and the prompt's logprobs from
``logprob_start_len`` (None for prompt position 0, which nothing predicts).

- SGLang ``/generate``: entries ``[logprob, token_id, text or None]`` (text with
  ``return_text_in_logprobs``); a top list per position (None for position 0).
- OpenAI completions: ``{tokens, token_logprobs, top_logprobs, text_offset}``, the top
  lists as ``{token text: logprob}`` with the position's own token added where the top
  ``logprobs`` leave it out (OpenAI's "up to logprobs + 1"); ``echo`` puts the prompt's
  positions first. A token that is part of a multi-byte character is named
  ``bytes:\\xHH...``, as OpenAI does (its text alone would be U+FFFD, the same for
  every such token).
- OpenAI chat: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``; ``bytes``
  are the token's own (a client joins them to rebuild a character split over tokens).

JSON has no infinity: a logprob of -inf (a token the sampler masked) is sent as
``MIN_LOGPROB``, as vLLM does.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence

MIN_LOGPROB = -9999.0


def finite(logprob: float | None) -> float | None:
    if logprob is None or math.isfinite(logprob):
        return logprob
    return 0.0 if logprob > 0 else MIN_LOGPROB  # NaN is no probability of 1


class TokenTexts:
    """Each token's own text (special tokens included), decoded once per response."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._raw: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id],
                                                                 skip_special_tokens=False)
        return text

    def label(self, token_id: int) -> str:
        """The token as OpenAI's completions name it: its text, or for a part of a
        multi-byte character (alone it reads U+FFFD) ``bytes:`` and its bytes as
        ``\\xHH``, so distinct byte tokens keep distinct names."""
        text = self(token_id)
        if "\ufffd" not in text:
            return text
        raw = self.raw(token_id)
        if raw == text.encode():  # a real U+FFFD, or bytes the vocabulary does not spell
            return text
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def raw(self, token_id: int) -> bytes:
        """The token's own bytes: those of a part of a multi-byte character too, whose
        text alone is U+FFFD (``Tokenizer.token_bytes``)."""
        raw = self._raw.get(token_id)
        if raw is None:
            raw = self._raw[token_id] = self.tokenizer.token_bytes(token_id)
        return raw


# ---- SGLang /generate ---------------------------------------------------------------------
def sglang_logprobs(texts: TokenTexts, p, scored_prompt: Sequence[int], with_text: bool) -> dict:
    """The four ``meta_info`` keys of a request that asked for logprobs;
    ``scored_prompt``: the prompt's ids from ``logprob_start_len``."""
    prompt = scored_prompt
    name = texts if with_text else (lambda _: None)

    def entry(lp, tid):
        return [finite(lp), tid, name(tid)]

    def top_list(top):
        return None if top is None else [entry(lp, tid) for lp, tid in top]

    return {
        "input_token_logprobs": [entry(lp, t) for lp, t in zip(p.input_token_logprobs, prompt)],
        "input_top_logprobs": [top_list(top) for top in p.input_top_logprobs],
        "output_token_logprobs": [entry(lp, t) for lp, t in zip(p.output_logprobs,
                                                                p.output_ids)],
        "output_top_logprobs": [top_list(top) for top in p.output_top_logprobs],
    }


# ---- OpenAI -------------------------------------------------------------------------------
class CompletionLogprobs:
    """Builds ``choices[].logprobs`` of completions, whole or a streamed chunk at a time;
    ``text_offset`` runs on across chunks, from the start of the choice's text: each
    token's is the number of characters its earlier tokens' bytes make (a character
    split over tokens counts once; its parts share the offset where it starts; bytes
    that began a character the next token does not finish are a U+FFFD before it)."""

    def __init__(self, texts: TokenTexts):
        self.texts = texts
        self.offset = 0
        self._chars = codecs.getincrementaldecoder("utf-8")("replace")

    def part(self, ids: Sequence[int], logprobs: Sequence[float | None],
             tops: Sequence) -> dict:
        tokens, offsets = [], []
        for tid in ids:
            raw = self.texts.raw(tid)
            tokens.append(self.texts.label(tid))
            offsets.append(self.offset + self._cut_short(raw))
            self.offset += len(self._chars.decode(raw))
        lps = _padded(logprobs, len(ids))
        return {"tokens": tokens,
                "token_logprobs": [finite(lp) for lp in lps],
                "top_logprobs": [self._top(top, tid, lp)
                                 for top, tid, lp in zip(_padded(tops, len(ids)), ids, lps)],
                "text_offset": offsets}

    def _cut_short(self, raw: bytes) -> int:
        """Characters that bytes held back from earlier tokens (the start of a sequence)
        become because ``raw`` does not continue them: they come before this token."""
        pending = self._chars.getstate()[0]
        if not pending or not raw:
            return 0
        probe = codecs.getincrementaldecoder("utf-8")("replace").decode(pending + raw)
        if not probe.startswith("\ufffd"):
            return 0  # continued (or not yet decided): this token is inside that character
        return len(pending.decode("utf-8", "replace"))

    def _top(self, top, token: int, logprob: float | None) -> dict | None:
        """The most likely tokens, and the token itself where they leave it out (OpenAI
        always lists the sampled token: up to ``logprobs`` + 1 entries)."""
        if top is None:
            return None
        out: dict[str, float] = {}
        for lp, tid in top:  # most likely first: two ids with one name keep the larger
            out.setdefault(self.texts.label(tid), finite(lp))
        if logprob is not None:
            out.setdefault(self.texts.label(token), finite(logprob))
        return out


def join_parts(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


def chat_logprobs(texts: TokenTexts, ids: Sequence[int], logprobs: Sequence[float],
                  tops: Sequence) -> dict:
    def item(tid, lp):
        return {"token": texts(tid), "logprob": finite(lp), "bytes": list(texts.raw(tid))}

    return {"content": [
        {**item(tid, lp), "top_logprobs": [item(t, v) for v, t in (top or ())]}
        for tid, lp, top in zip(ids, logprobs, _padded(tops, len(ids)))]}


def _padded(tops: Sequence, n: int) -> list:
    return list(tops[:n]) + [None] * (n - len(tops))
