"""One streamed request per backend, timed the way SGLang's ``bench_serving`` times it.

``sglang``: ``POST /generate`` with ``input_ids`` (or ``text``) and ``sampling_params``
``{temperature: 0, max_new_tokens: N, ignore_eos: true}``, ``stream: true``. Chunks are
cumulative; the tokens a chunk brings are the growth of ``meta_info.completion_tokens``.
``openai``: ``POST /v1/completions`` with ``stream_options.include_usage``; chunks are
deltas, each counted as one inter-token gap (token counts per chunk are not sent), the
output length from the final usage event. Output whose tokens all decode to empty text
(special tokens) counts as arriving with the finishing chunk.

Timing (``time.perf_counter``, from the moment the request is sent):
- TTFT: the first chunk that carries output (new tokens or non-empty text);
- ITL: for each later chunk bringing k tokens, k gaps of (chunk gap / k);
- E2E: until ``data: [DONE]``; TPOT is derived from these in ``bench.client.metrics``.
  A failed request's ``latency`` runs until its failure was seen (error status, error
  event, broken stream, timeout): its time in flight, which no figure of successful
  requests uses but the run's duration and peak concurrency count.

Prefix cache: ``cached_tokens`` is what the server says the request reused, from
``meta_info.cached_tokens`` (sglang) or ``usage.prompt_tokens_details.cached_tokens``
(openai); None when it says nothing. ``answer`` keeps the output (ids for an ids prompt,
else text) for a conversation's next turn.

SSE is parsed from raw chunks (not ``readline``): a cumulative event of a long output
is larger than aiohttp's 64 KiB line limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
import msgspec

from bench.client.dataset import BenchRequest

_decode = msgspec.json.Decoder().decode


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int = 0
    success: bool = False
    error: str = ""
    start_time: float = 0.0  # perf_counter when sent
    ttft: float = 0.0
    latency: float = 0.0  # E2E; for a failure, until the failure was seen
    itl: list[float] = field(default_factory=list)
    # (seconds since sent, tokens) per chunk that brought output; for peak throughput.
    chunks: list[tuple[float, int]] = field(default_factory=list)
    dp_rank: int | None = None
    cached_tokens: int | None = None  # prompt tokens the server's prefix cache held
    answer: list[int] | str = ""  # the output, as ids for an ids prompt, else as text


class StreamError(Exception):
    """The server reported an error in the stream or ended it early."""


async def sse_events(response: aiohttp.ClientResponse):
    """The ``data:`` payloads of an SSE body, as bytes, with their arrival time."""
    buf = b""
    async for piece in response.content.iter_any():
        buf += piece
        now = time.perf_counter()
        while (end := buf.find(b"\n\n")) >= 0:
            event, buf = buf[:end], buf[end + 2:]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    yield line[5:].strip(), now


class _Timer:
    """Turns chunk arrivals into TTFT, ITL and per-chunk token counts."""

    def __init__(self, result: RequestResult):
        self.result = result
        self.last_time = 0.0

    def chunk(self, now: float, new_tokens: int) -> None:
        r = self.result
        since = now - r.start_time
        if not r.chunks:
            r.ttft = since
        else:
            gap = (now - self.last_time) / max(new_tokens, 1)
            r.itl.extend([gap] * max(new_tokens, 1))
        r.chunks.append((since, new_tokens))
        self.last_time = now


async def send_sglang(session: aiohttp.ClientSession, base_url: str, req: BenchRequest,
                      model: str | None = None) -> RequestResult:
    key = "text" if isinstance(req.prompt, str) else "input_ids"
    payload = {key: req.prompt, "stream": True, "sampling_params": {
        "temperature": 0.0, "max_new_tokens": req.output_len, "ignore_eos": True}}
    if req.bootstrap_room is not None:
        payload["bootstrap_room"] = req.bootstrap_room
    result = RequestResult(prompt_len=req.prompt_len)
    timer, seen = _Timer(result), 0

    def on_event(data: dict, now: float) -> None:
        nonlocal seen
        meta = data.get("meta_info") or {}
        total = meta.get("completion_tokens", seen)
        if total > seen or (not result.chunks and data.get("text")):
            timer.chunk(now, total - seen)
            seen = total
        result.prompt_len = meta.get("prompt_tokens", result.prompt_len)
        result.dp_rank = meta.get("dp_rank", result.dp_rank)
        result.cached_tokens = meta.get("cached_tokens", result.cached_tokens)
        result.answer = data.get("text", "") if key == "text" else data.get("output_ids", [])
        _check_finish(meta.get("finish_reason"))

    await _stream(session, base_url + "/generate", payload, result, on_event)
    result.output_len = seen
    return result


async def send_openai(session: aiohttp.ClientSession, base_url: str, req: BenchRequest,
                      model: str | None = None) -> RequestResult:
    prompt = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
    payload = {"prompt": prompt, "max_tokens": req.output_len, "temperature": 0.0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        payload["model"] = model
    result = RequestResult(prompt_len=req.prompt_len)
    timer, usage, texts = _Timer(result), {}, []

    def on_event(data: dict, now: float) -> None:
        for choice in data.get("choices") or ():
            reason = choice.get("finish_reason")
            if reason == "abort":
                raise StreamError("request aborted by the server")
            texts.append(choice.get("text") or "")
            # Tokens that decode to no text (a special token, e.g. EOS under ignore_eos)
            # bring no text chunk; if no text came at all, the output arrived with the
            # finishing chunk, and usage still counts its tokens.
            if choice.get("text") or (reason and not result.chunks):
                timer.chunk(now, 1)
        usage.update(data.get("usage") or {})

    await _stream(session, base_url + "/v1/completions", payload, result, on_event)
    result.output_len = usage.get("completion_tokens", len(result.chunks))
    result.prompt_len = usage.get("prompt_tokens", result.prompt_len)
    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    result.answer = "".join(texts)
    return result


def _check_finish(reason) -> None:
    if isinstance(reason, dict) and reason.get("type") == "abort":
        raise StreamError(f"request aborted by the server: {reason.get('message')}")


async def _stream(session, url: str, payload: dict, result: RequestResult, on_event) -> None:
    """POST, feed each event to ``on_event(data, now)``; sets success/error/latency."""
    result.start_time = time.perf_counter()
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                body = (await response.text())[:300]
                raise StreamError(f"HTTP {response.status}: {body}")
            done = False
            async for data, now in sse_events(response):
                if data == b"[DONE]":
                    done = True
                    break
                event = _decode(data)
                if isinstance(event, dict) and "error" in event:
                    raise StreamError(f"error in stream: {event['error']}")
                on_event(event, now)
            if not done:
                raise StreamError("stream ended without [DONE]")
        result.latency = time.perf_counter() - result.start_time
        result.success = bool(result.chunks)
        if not result.success:
            result.error = "no output tokens received"
    except (StreamError, aiohttp.ClientError, msgspec.DecodeError, TimeoutError) as exc:
        result.latency = time.perf_counter() - result.start_time
        result.error = f"{type(exc).__name__}: {exc}"


BACKENDS = {"sglang": send_sglang, "openai": send_openai}
