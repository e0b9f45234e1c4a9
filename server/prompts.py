"""Prompt text to token ids without stalling the event loop.

Tokenizing runs at about 1 MB/s on one core (byte-level BPE), and on the event loop
it would stop every other client meanwhile. So:
- a text that is certainly longer than the context is a 400 before it is tokenized:
  a text of B UTF-8 bytes has at least B / ``Tokenizer.max_bytes_per_token`` tokens,
  and we refuse it only past ``SAFETY`` times that (normalizers such as NFC may
  shrink a text, up to 3 code points into one), so a prompt that fits is never
  refused here; the exact check (``bounds.check_request``) follows tokenizing;
- a text (or batch of texts) of ``THREAD_MIN_CHARS`` or more is tokenized in a worker
  thread (``asyncio.to_thread``) with ``Tokenizer.encode_batch``, which releases the
  GIL while it works (``encode`` holds it throughout: in a thread it would stall the
  loop just the same), so the loop keeps serving; smaller ones stay on the loop, where
  a thread hop would cost more than the tokenizing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.errors import BadRequest

SAFETY = 8
THREAD_MIN_CHARS = 16 * 1024  # ~16 ms of tokenizing: past this the hop (~50 us) is cheap


def check_text_len(engine, text: str, name: str) -> None:
    """400 if ``text`` certainly has more tokens than the context holds."""
    per_token = engine.tokenizer.max_bytes_per_token
    if per_token is None:
        return
    limit = SAFETY * per_token * engine.context_len
    # Characters are at most bytes: most long texts are refused before encoding them.
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise BadRequest(f"{name} is too long: {len(text)} characters are more than the "
                         f"model's context length of {engine.context_len} tokens")


async def encode_texts(engine, texts: list[str], name: str,
                       add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text (``name``: the field, for errors; ``add_special_tokens``:
    let the tokenizer's post-processor add its special tokens, BOS for many models)."""
    for text in texts:
        check_text_len(engine, text, name)
    encode = engine.tokenizer.encode
    if sum(len(t) for t in texts) < THREAD_MIN_CHARS:
        return [encode(t, add_special_tokens=add_special_tokens) for t in texts]
    return await asyncio.to_thread(engine.tokenizer.encode_batch, texts, add_special_tokens)


async def encode_chat(engine, messages: list[dict[str, Any]],
                      template_kwargs: dict[str, Any] | None = None,
                      add_generation_prompt: bool = True,
                      add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of a chat rendered with the model's template (``template_kwargs``: the
    request's ``chat_template_kwargs``; ``add_generation_prompt``: open the assistant's
    turn; ``add_special_tokens``: vLLM's field, None for the tokenizer's choice,
    ``chat_add_special_tokens``); the template's own errors are a 400 naming what is
    wrong in the messages."""
    tokenizer = engine.tokenizer
    is_large = sum(len(str(m.get("content"))) for m in messages) >= THREAD_MIN_CHARS
    try:
        if is_large:
            text = await asyncio.to_thread(tokenizer.apply_chat_template, messages,
                                           add_generation_prompt, template_kwargs)
        else:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt, template_kwargs)
    except Exception as exc:
        # The template's own errors (jinja2's, or raise_exception in the template) name
        # what is wrong in the messages; anything else is ours (500).
        if not (isinstance(exc, (ValueError, TypeError, KeyError))
                or type(exc).__module__.startswith("jinja2")):
            raise
        raise BadRequest(f"cannot apply the chat template: {exc}") from None
    check_text_len(engine, text, "messages")
    add_special = (tokenizer.chat_add_special_tokens if add_special_tokens is None
                   else add_special_tokens)
    if len(text) < THREAD_MIN_CHARS:
        return tokenizer.encode(text, add_special_tokens=add_special)
    (ids,) = await asyncio.to_thread(tokenizer.encode_batch, [text], add_special)
    return ids
