"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Shapes follow OpenAI's API (what the ``openai`` SDK parses); streams are *delta*
events (OpenAI's convention, unlike ``/generate``), then a usage event when
``stream_options.include_usage``, then ``data: [DONE]``. SGLang's extras are kept:
``matched_stop`` on each choice, and sampling keys OpenAI lacks (``top_k``,
``min_p``, ``ignore_eos``, ...). ``n`` copies of each prompt become choices
``prompt_index * n + j``. The ``model`` field is echoed, not checked: a gateway in
front does that (smg answers 404 to an unknown model). Logprobs (``server.logprobs``):
completions ``logprobs: k``, with ``echo`` the prompt's too (text and logprobs, any
``max_tokens`` from 0: lm-evaluation-harness's loglikelihood); chat ``logprobs`` and
``top_logprobs``; a streamed chunk carries its own tokens' logprobs, so the chunks
joined equal the whole. ``usage.prompt_tokens_details.cached_tokens``: prompt tokens the
ranks' prefix caches held (``meta_info.cached_tokens`` summed per prompt). Fields not
implemented are a 400 naming them.
"""

from __future__ import annotations

import time

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.finish import FinishAbort, FinishLength, FinishStop
from server.engine_client import EngineClient
from server.bounds import MAX_BATCH_REQUESTS, check_fan_out, check_int, check_request
from server.errors import ApiError, BadRequest, NotFound
from server.prompts import encode_chat, encode_texts
from server.logprobs import CompletionLogprobs, TokenTexts, chat_logprobs, join_parts
from server.protocol import (ChatCompletionRequest, CompletionRequest, OpenAISampling,
                             check_messages, decode_body, routed_rank_of)
from server.prepared import PreparedRequest, request_rooms
from server.request_flow import (Progress, RunningRequest, new_rid, refuse_body_rooms, release,
                                 run_all, start_all)
from server.sse import DONE, SSEResponse, error_event, event, merged, unless_disconnected

# OpenAI's finish_reason for each kind (an abort gets here only when /abort_request asked
# for it; any other is an error).
FINISH_REASONS = {FinishLength: "length", FinishStop: "stop", FinishAbort: "abort"}


async def completions(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    body = decode_body(await request.body(), CompletionRequest)
    prompts = None
    try:
        _check_supported(body)
        check_int(body.logprobs, 0, engine.model_config.vocab_size, "logprobs")
        prompts, texts = await _completion_prompts(engine, body)
        rid = body.rid or new_rid()
        want = body.logprobs is not None
        prepared = _prepare(engine, body, prompts, rid, lambda ids: body.requested_max_tokens,
                            return_logprob=want, top_logprobs_num=body.logprobs or 0,
                            logprob_start_len=0 if body.echo and want else -1)
    except ApiError:
        one = prompts[0] if prompts is not None and len(prompts) == 1 else body.prompt
        refuse_body_rooms(engine, body.bootstrap_room, one)
        raise
    shape = _Shape("text_completion", f"cmpl-{rid}")
    if body.echo:
        shape.echo = [text if text is not None else
                      engine.tokenizer.decode(ids, skip_special_tokens=False)
                      for ids, text in zip(prompts, texts) for _ in range(body.n)]
    return await _respond(request, engine, body, prepared, shape)


async def chat_completions(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    body = decode_body(await request.body(), ChatCompletionRequest)
    ids = None
    try:
        _check_supported(body)
        check_messages(body.messages)
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true")
        check_int(body.top_logprobs, 0, engine.model_config.vocab_size, "top_logprobs")
        check_fan_out(1, [body.n])
        ids = await encode_chat(engine, [msgspec.structs.asdict(m) for m in body.messages],
                                body.chat_template_kwargs, body.add_generation_prompt,
                                body.add_special_tokens)
        rid = body.rid or new_rid()
        requested = body.requested_max_tokens
        room = min(engine.context_len, engine.max_total_num_tokens)
        prepared = _prepare(
            engine, body, [ids], rid,
            lambda ids: requested if requested is not None else max(room - len(ids), 0),
            return_logprob=body.logprobs, top_logprobs_num=body.top_logprobs or 0)
    except ApiError:
        refuse_body_rooms(engine, body.bootstrap_room, ids)
        raise
    return await _respond(request, engine, body, prepared,
                          _Shape("chat.completion", f"chatcmpl-{rid}"))


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(request.state.engine)]})


async def model(request: Request) -> Response:
    """OpenAI's retrieve-model: the served model's card, or a 404 for another name."""
    engine: EngineClient = request.state.engine
    name = request.path_params["model"]
    if name != engine.args.served_model_name:
        raise NotFound(f"model {name!r} is not served here; this server serves "
                       f"{engine.args.served_model_name!r}")
    return JSONResponse(_model_card(engine))


def _model_card(engine: EngineClient) -> dict:
    args = engine.args
    return {"id": args.served_model_name, "object": "model", "created": int(engine.started_at),
            "owned_by": "dpserve", "root": args.tokenizer_path,
            "max_model_len": engine.context_len}


# ---- shared machinery --------------------------------------------------------------------
class _Shape:
    """How one route names and shapes its objects."""

    def __init__(self, obj: str, response_id: str):
        self.object = obj
        self.id = response_id
        self.created = int(time.time())
        self.is_chat = obj == "chat.completion"
        self.echo: list[str] | None = None  # completions with echo: each choice's prompt

    def logprobs(self, texts: TokenTexts, r: RunningRequest) -> _ChoiceLogprobs:
        echo_ids = r.prepared.input_ids if self.echo is not None else None
        return _ChoiceLogprobs(texts, self.is_chat, echo_ids)

    def echoed(self, index: int) -> str:
        """The prompt text choice ``index`` starts with (completions with echo)."""
        return self.echo[index] if self.echo is not None else ""

    def envelope(self, model: str, choices: list, chunk: bool = False) -> dict:
        obj = self.object + (".chunk" if chunk and self.is_chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": model,
                "choices": choices}

    def choice(self, index: int, p: Progress, text: str, finished: bool, chunk: bool,
               first: bool = False) -> dict:
        reason = FINISH_REASONS[type(p.finish_reason)] if finished else None
        choice: dict = {"index": index, "logprobs": None, "finish_reason": reason}
        if finished:
            stop = p.finish_reason
            choice["matched_stop"] = stop.matched if isinstance(stop, FinishStop) else None
        if not self.is_chat:
            choice["text"] = text
        elif chunk:
            choice["delta"] = {"role": "assistant", "content": text} if first else (
                {"content": text} if text else {})
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return choice


def _usage(results: list[Progress], n: int) -> dict:
    """Token counts; each prompt counts once however many (n) choices it has, and so do
    its cached tokens (its first choice's, as SGLang counts them)."""
    prompt = sum(p.prompt_tokens for p in results[::n])
    completion = sum(p.completion_tokens for p in results)
    cached = sum(p.cached_tokens for p in results[::n])
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _ChoiceLogprobs:
    """One choice's ``logprobs``: whole, or the part a streamed chunk adds.
    ``echo_ids``: completions with echo, the prompt whose positions come first."""

    def __init__(self, texts: TokenTexts, is_chat: bool, echo_ids: list[int] | None):
        self.texts = texts
        self.is_chat = is_chat
        self.echo_ids = echo_ids
        self.completion = CompletionLogprobs(texts)

    def part(self, p: Progress, new: slice, first: bool) -> dict:
        ids, lps, tops = p.output_ids[new], p.output_logprobs[new], p.output_top_logprobs[new]
        if self.is_chat:
            return chat_logprobs(self.texts, ids, lps, tops)
        if not (self.echo_ids is not None and first):
            return self.completion.part(ids, lps, tops)
        prompt = self.completion.part(self.echo_ids, p.input_token_logprobs,
                                      p.input_top_logprobs)
        return join_parts(prompt, self.completion.part(ids, lps, tops))


def _check_supported(body: OpenAISampling) -> None:
    name = body.unsupported_field()
    if name is not None:
        hint = ("; /v1/completions takes logprobs: N for the N most likely"
                if name == "top_logprobs" else "")
        raise BadRequest(f"{name} is not supported by this server{hint}")
    if body.rid == "":
        raise BadRequest("rid must not be empty (leave it out and the server makes one)")


def _prepare(engine: EngineClient, body: OpenAISampling, prompts: list[list[int]], rid: str,
             max_tokens_for, return_logprob: bool, top_logprobs_num: int = 0,
             logprob_start_len: int = -1) -> list[PreparedRequest]:
    check_fan_out(len(prompts), [body.n] * len(prompts))
    routed = routed_rank_of(body)
    num = len(prompts)
    rooms = request_rooms(body.bootstrap_room, [body.n] * num)
    prepared = []
    for i, ids in enumerate(prompts):
        params = body.sampling_params(max_tokens_for(ids))
        check_request(engine, ids, params, body.param_names())
        for j in range(body.n):
            index = i * body.n + j
            prepared.append(PreparedRequest(
                rid=rid if num * body.n == 1 else f"{rid}_{index}",
                group_rid=None if num * body.n == 1 else rid, input_ids=ids,
                params=params.for_copy(j), return_logprob=return_logprob,
                include_stop_str=body.include_stop_str_in_output,
                top_logprobs_num=top_logprobs_num, logprob_start_len=logprob_start_len,
                routed_dp_rank=_of_prompt(routed, i, num, "routed_dp_rank"),
                disagg_prefill_dp_rank=_of_prompt(body.disagg_prefill_dp_rank, i, num,
                                                  "disagg_prefill_dp_rank"),
                bootstrap_room=rooms[index]))
    return prepared


def _of_prompt(value, i: int, num_prompts: int, name: str):
    """A scalar applies to every prompt; a list has one entry per prompt."""
    if not isinstance(value, list):
        return value
    if len(value) != num_prompts:
        raise BadRequest(f"{name} has {len(value)} entries for {num_prompts} prompt(s)")
    return value[i]


async def _respond(request: Request, engine: EngineClient, body: OpenAISampling,
                   prepared: list[PreparedRequest], shape: _Shape) -> Response:
    model = body.model or engine.args.served_model_name
    running = start_all(engine, prepared)
    texts = TokenTexts(engine.tokenizer)
    if body.stream:
        return SSEResponse(_stream(running, shape, model, body.include_usage, body.n, texts))
    try:
        results = await unless_disconnected(request, run_all(running))
    finally:
        release(running)
    choices = [shape.choice(i, p, shape.echoed(i) + p.text, True, chunk=False)
               for i, p in enumerate(results)]
    for choice, p, r in zip(choices, results, running):
        if r.prepared.return_logprob:
            whole = slice(0, len(p.output_ids))
            choice["logprobs"] = shape.logprobs(texts, r).part(p, whole, first=True)
    return JSONResponse({**shape.envelope(model, choices), "usage": _usage(results, body.n)})


async def _stream(running: list[RunningRequest], shape: _Shape, model: str, include_usage: bool,
                  n: int, texts: TokenTexts):
    last: dict[int, Progress] = {}
    logprobs = {i: shape.logprobs(texts, r) for i, r in enumerate(running)
                if r.prepared.return_logprob}
    try:
        async for index, p in merged([r.progress() for r in running]):
            first = index not in last
            last[index] = p
            finished = p.finish_reason is not None
            # A token whose text is held back (partial UTF-8) still brings its logprob.
            has_logprobs = index in logprobs and (p.num_new_ids or first)
            if not (p.delta or finished or has_logprobs
                    or (first and (shape.is_chat or shape.echo is not None))):
                continue
            text = (shape.echoed(index) if first else "") + p.delta
            choice = shape.choice(index, p, text, finished, chunk=True, first=first)
            if index in logprobs:
                choice["logprobs"] = logprobs[index].part(p, p.new_output_slice, first)
            yield event(shape.envelope(model, [choice], chunk=True))
        if include_usage:
            usage = _usage([last[i] for i in range(len(running))], n)
            yield event({**shape.envelope(model, [], chunk=True), "usage": usage})
    except ApiError as exc:
        yield error_event(exc)
    finally:
        release(running)
    yield DONE


async def _completion_prompts(engine: EngineClient,
                              body: CompletionRequest) -> tuple[list[list[int]], list]:
    """str, [str], [int] or [[int]] -> token id lists, and each prompt's text (None for
    ids); the fan-out caps come first."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    elif not prompt:
        raise BadRequest("prompt is empty")
    elif all(type(p) is int for p in prompt):
        prompt = [prompt]
    if len(prompt) > MAX_BATCH_REQUESTS:
        raise BadRequest(f"a batch of {len(prompt)} prompts is more than {MAX_BATCH_REQUESTS}")
    check_fan_out(len(prompt), [body.n] * len(prompt))
    if all(isinstance(p, str) for p in prompt):
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        return await encode_texts(engine, prompt, "prompt", add_special), prompt
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt], [None] * len(prompt)
    raise BadRequest("prompt must be a string, a list of strings, a list of token ids "
                     "or a list of such lists")


def openai_routes() -> list[Route]:
    return [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
    ]
