"""One request from validated ids to text, shared by ``/generate`` and the OpenAI routes.

``server.bounds`` turns everything the engine would refuse into a 400 before anything
is dispatched (so a bad request never costs a rank a thing). ``start`` dispatches;
``progress`` then yields one ``Progress`` per output the rank sent: the new token ids,
the text so far and the new text (incremental detokenization, holding back partial
UTF-8 and any end of the text that may begin a stop string, so that a stream never
sends what the stop would cut), and at the end the finish reason with the text trimmed
as SGLang does: a matched stop string and what follows it is cut, and so is a matched
stop token's text, unless ``no_stop_trim``.

``max_new_tokens`` 0 asks for no token: such a request is not dispatched (there is
nothing for a rank to compute that the client receives); it ends at once with
``FinishLength(0)`` (SGLang's ``{"type": "length", "length": 0}``), no output and
``dp_rank`` None. Unless it asks for prompt logprobs (``logprob_start_len`` >= 0, OpenAI
``echo``): then it runs with one new token, which the client never sees (the rank scores
the prompt in the prefill that token needs; in PD the prefill half does, exactly as for
any request).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import msgspec

from engine.finish import FinishAbort, FinishLength, FinishReason, FinishStop, trim_stop_str
from scheduler.messages import ReqOutput
from server.bounds import MAX_BATCH_REQUESTS, check_prepared
from server.engine_client import EngineClient, RequestHandle
from server.errors import ApiError
from server.prepared import PreparedRequest
from shm.bootstrap_layout import MAX_ROOM

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """A request's state after one output; cumulative fields plus this step's deltas."""

    rid: str
    dp_rank: int | None  # None: never dispatched (max_new_tokens 0)
    text: str
    delta: str
    output_ids: list[int]
    num_new_ids: int
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the rank's prefix cache
    e2e_latency: float
    output_logprobs: list[float] = field(default_factory=list)
    # With return_logprob: top lists per output token (None where unknown), and the
    # prompt's logprobs from logprob_start_len (None for position 0) with top lists.
    output_top_logprobs: list = field(default_factory=list)
    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)

    @property
    def new_output_slice(self) -> slice:
        return slice(len(self.output_ids) - self.num_new_ids, len(self.output_ids))


def new_rid() -> str:
    return uuid.uuid4().hex


class RunningRequest:
    """A dispatched request; iterate ``progress()`` once, to the end or until closed."""

    def __init__(self, engine: EngineClient, prepared: PreparedRequest, handle: RequestHandle):
        self.engine = engine
        self.prepared = prepared
        self.handle = handle
        self.start_time = time.perf_counter()
        params = prepared.params
        self._decoder = engine.tokenizer.incremental_decoder(params.skip_special_tokens)
        self._emitted = ""
        # Stop strings the client's text is cut at: text that may be the start of one
        # is held back until the next tokens tell (it cannot be taken back once sent).
        self._held_stops = () if params.no_stop_trim else params.stop_strs
        # max_new_tokens 0 with prompt logprobs: its one token is computed, not shown.
        self._hides_output = wants_prompt_only(prepared)

    @property
    def dp_rank(self) -> int | None:
        return self.handle.dp_rank if self.handle.dp_rank >= 0 else None

    def progress(self) -> AsyncIterator[Progress]:
        """The request's steps (an async generator: close it, ``aclosing``, to abort)."""
        return self._logged_progress() if self.engine.args.log_requests else self._progress()

    async def _logged_progress(self) -> AsyncIterator[Progress]:
        # Closed before its finish: its client left, or another request of its body failed.
        last, ended = None, "ended: closed before its finish (client gone, or its body failed)"
        try:
            async with aclosing(self._progress()) as steps:
                async for last in steps:
                    if last.finish_reason is not None:
                        ended = f"finished: {json.dumps(last.finish_reason)}"
                    yield last
        except ApiError as exc:
            ended = f"failed ({exc.status_code}): {exc.message}"
            raise
        finally:
            self._log(ended, last)

    def _log(self, ended: str, last: Progress | None) -> None:
        """``--log-requests``: one line per request, however it ended."""
        logger.info("request %s on rank %s %s; prompt_tokens=%d completion_tokens=%d "
                    "e2e_latency=%.3fs", self.prepared.rid, self.dp_rank, ended,
                    len(self.prepared.input_ids), last.completion_tokens if last else 0,
                    time.perf_counter() - self.start_time)

    async def _progress(self) -> AsyncIterator[Progress]:
        output_ids: list[int] = []
        logprobs: list[float] = []
        tops: list = []
        inputs: tuple[list, list] = ([], [])
        cached = 0
        async with aclosing(self.engine.outputs(self.handle)) as outputs:
            async for out in outputs:
                if self._hides_output:
                    out = _hidden(out)
                # Matched when its rank admitted it; an output may not repeat it (a PD
                # decode rank's after the first, which ``PDEngineClient`` fills in).
                cached = max(cached, out.cached_tokens)
                output_ids.extend(out.new_token_ids)
                if out.output_logprobs:
                    logprobs.extend(out.output_logprobs)
                    tops.extend(out.output_top_logprobs or [None] * len(out.output_logprobs))
                if out.input_token_logprobs:
                    inputs = (out.input_token_logprobs, out.input_top_logprobs or [])
                self._decoder.step(out.new_token_ids)
                if out.finish_reason is None:
                    text = self._decoder.text
                    if self._held_stops:
                        text = text[:len(text) - self._held_back(text, len(output_ids))]
                else:
                    text = self._final_text(output_ids, out.finish_reason)
                if text.startswith(self._emitted):
                    delta, self._emitted = text[len(self._emitted):], text
                else:  # a stop token's text trimmed at the end: already streamed
                    delta = ""
                if out.finish_reason is not None and self.dp_rank is not None:
                    handle = self.handle
                    self.engine.observer.on_prompt_cache(
                        out.prompt_tokens, cached,
                        handle.cache_rank if handle.cache_rank >= 0 else handle.dp_rank)
                elif out.finish_reason is not None:
                    # Served here, with no token: counted as the ranks' requests are
                    # (server.inflight), once its answer is on its way.
                    self.engine.observer.on_finish(0.0, out.prompt_tokens, 0)
                yield Progress(
                    rid=self.prepared.rid, dp_rank=self.dp_rank, text=text, delta=delta,
                    # Copies: a consumer may hold this step while the next one arrives.
                    output_ids=list(output_ids), num_new_ids=len(out.new_token_ids),
                    finish_reason=out.finish_reason, prompt_tokens=out.prompt_tokens,
                    completion_tokens=out.completion_tokens, cached_tokens=cached,
                    e2e_latency=time.perf_counter() - self.start_time,
                    output_logprobs=list(logprobs), output_top_logprobs=list(tops),
                    input_token_logprobs=inputs[0], input_top_logprobs=inputs[1])

    def _held_back(self, text: str, num_out: int) -> int:
        """How much of the end of ``text`` a stream keeps back: what may begin a stop
        string; and before ``min_new_tokens``, also what the rank's first check will
        look back over (``_stop_search_start``): a stop string there still ends it."""
        held = stop_prefix_len(text, self._held_stops)
        if num_out < self.prepared.params.min_new_tokens:
            held = max(held, min(len(text), max(map(len, self._held_stops)) - 1))
        return held

    def _final_text(self, output_ids: list[int], finish_reason: FinishReason) -> str:
        params = self.prepared.params
        ids = output_ids
        trim = isinstance(finish_reason, FinishStop) and not params.no_stop_trim
        matched = finish_reason.matched if trim else None
        if trim and isinstance(matched, int) and ids and ids[-1] == matched:
            ids = ids[:-1]
        text = self.engine.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
        if trim and isinstance(matched, str):
            text = trim_stop_str(text, matched, self._stop_search_start(ids, text),
                                 keep_stop=self.prepared.include_stop_str)
        return text

    def _stop_search_start(self, ids: list[int], text: str) -> int:
        """Where in ``text`` (the output's) the rank's stop-string search began
        (``engine.finish.check_finish``): at its first check, after ``min_new_tokens``
        tokens, it looked back the longest stop string less one character from the end
        of the text of the tokens before (a character those tokens only began not
        counted: its replacement character is not in ``text`` there)."""
        params = self.prepared.params
        if params.min_new_tokens <= 1:
            return 0
        before = self.engine.tokenizer.decode(ids[:params.min_new_tokens - 1],
                                              skip_special_tokens=params.skip_special_tokens)
        end = len(before)
        while end and before[end - 1] == "\ufffd" and text[end - 1:end] != "\ufffd":
            end -= 1
        return max(end - max(len(s) for s in params.stop_strs) + 1, 0)


def stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that begins one of ``stops`` (and is
    not all of it): what a stream holds back until the next tokens show whether a stop
    string follows."""
    longest, end = 0, len(text)
    for stop in stops:
        k = min(len(stop) - 1, end)
        if k <= longest:
            continue
        # Candidates start where the stop's first character does, longest first: one
        # C-level find each, instead of a slice and compare for every length.
        first = stop[0]
        i = text.find(first, end - k)
        while 0 <= i < end - longest:
            if text.startswith(stop[:end - i], i):
                longest = end - i
                break
            i = text.find(first, i + 1)
    return longest


def wants_prompt_only(prepared: PreparedRequest) -> bool:
    """No new token asked, but the prompt's logprobs are."""
    return (prepared.params.max_new_tokens == 0 and prepared.return_logprob
            and prepared.logprob_start_len >= 0)


def _hidden(out: ReqOutput) -> ReqOutput:
    """A prompt-only request's output as the client sees it: no token, length 0."""
    finish = out.finish_reason
    if finish is not None and not isinstance(finish, FinishAbort):
        finish = FinishLength(0)
    return msgspec.structs.replace(
        out, new_token_ids=[], finish_reason=finish, completion_tokens=0,
        output_logprobs=[], output_top_logprobs=[])


def release(running: list[RunningRequest], message: str = "the client disconnected") -> None:
    """Abort every request of ``running`` that has not finished. Routes call this in a
    ``finally``: whatever way a response ends, nothing stays allocated on a rank."""
    for r in running:
        if not r.handle.is_finished:
            r.engine.abort(r.handle, message)


NOT_DISPATCHED = -1  # the dp_rank of a handle no rank holds


def start(engine: EngineClient, prepared: PreparedRequest) -> RunningRequest:
    """Dispatch a checked request; raises ``BadRequest``/``ServiceUnavailable``."""
    if wants_prompt_only(prepared):
        handle = engine.submit(dataclasses.replace(prepared, params=msgspec.structs.replace(
            prepared.params, max_new_tokens=1, min_new_tokens=0)))
        handle.hidden_tokens = 1
        return RunningRequest(engine, prepared, handle)
    if prepared.params.max_new_tokens == 0:
        return RunningRequest(engine, prepared, _finished_at_once(prepared))
    return RunningRequest(engine, prepared, engine.submit(prepared))


def _finished_at_once(prepared: PreparedRequest) -> RequestHandle:
    """A handle that already holds its only output: no token, finished by length 0."""
    handle = RequestHandle(prepared.rid, NOT_DISPATCHED, len(prepared.input_ids),
                           is_finished=True)
    handle.queue.put_nowait(ReqOutput(
        rid=prepared.rid, new_token_ids=[], finish_reason=FinishLength(0),
        prompt_tokens=len(prepared.input_ids), completion_tokens=0))
    return handle


def start_all(engine: EngineClient, prepared: list[PreparedRequest]) -> list[RunningRequest]:
    """Check a body's requests (``bounds.check_prepared``), then dispatch them; if one
    fails, the ones already dispatched are aborted, and on a PD server the rooms of the
    others are given up (``EngineClient.refused_room``): their other halves, sent to the
    other server too, would otherwise wait for them (decode) or hold their KV (prefill)
    until the timeout."""
    running: list[RunningRequest] = []
    try:
        check_prepared(engine, prepared)
        for p in prepared:
            running.append(start(engine, p))
    except BaseException:
        release(running, "another request of its batch was refused")
        for p in prepared[len(running):]:
            engine.refused_room(p.bootstrap_room, p.input_ids)
        raise
    return running


def refuse_body_rooms(engine: EngineClient, rooms: object, prompt: object = None) -> None:
    """A body refused before its requests were prepared (a field, a number out of range,
    the prompt): give up each room it names, as ``start_all`` does for the requests it
    refuses (``EngineClient.refused_room``), so the other server's half of each does not
    wait for this one. ``prompt``: the token ids of the body's one request, where known
    (a decode server releases a hand-off only for its own prompt); otherwise unknown.

    At most ``MAX_BATCH_REQUESTS`` distinct rooms, else none: a body naming more is
    refused for its shape by both servers alike, and each room given up costs a table
    insert (a client must not buy that many with one small body)."""
    named = rooms if isinstance(rooms, list) else [rooms]
    distinct = {r for r in named if type(r) is int and 0 <= r <= MAX_ROOM}
    if len(distinct) > MAX_BATCH_REQUESTS:
        return
    ids = (prompt if len(distinct) == 1 and isinstance(prompt, list)
           and all(type(t) is int and 0 <= t < 1 << 62 for t in prompt) else [])
    for room in distinct:
        engine.refused_room(room, ids)


async def run_to_end(running: RunningRequest) -> Progress:
    """Consume a request and return its last progress (the finished state)."""
    last = None
    async with aclosing(running.progress()) as steps:
        async for last in steps:
            pass
    assert last is not None and last.finish_reason is not None  # outputs() ends on a finish
    return last


async def run_all(running: list[RunningRequest]) -> list[Progress]:
    """Run a batch to the end; the first failure ends the others (cancelled here, then
    aborted by the caller's ``release``)."""
    tasks = [asyncio.ensure_future(run_to_end(r)) for r in running]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
