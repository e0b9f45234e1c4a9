"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Shapes follow OpenAI's API (what the ``openai`` SDK parses); streams are *delta*
events (OpenAI's convention, unlike ``/generate``), then a usage event when
``stream_options.include_usage``, then ``data: [DONE]``. SGLang's extras are kept:
``matched_stop`` on each choice, and sampling keys OpenAI lacks (``top_k``,
``min_p``, ``ignore_eos``, ...). ``n`` copies of each prompt become choices
``prompt_index * n + j``. The ``model`` field is echoed, not checked: a gateway in
front does that (smg answers 404 to an unknown model).
"""

from __future__ import annotations

import time

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.engine_client import EngineClient
from server.bounds import MAX_BATCH_REQUESTS, check_fan_out, check_int, check_request
from server.errors import ApiError, BadRequest
from server.prompts import encode_chat, encode_texts
from server.protocol import (ChatCompletionRequest, CompletionRequest, OpenAISampling,
                             decode_body)
from server.request_flow import (PreparedRequest, Progress, RunningRequest, new_rid, release,
                                 run_all, start_all)
from server.sse import DONE, SSEResponse, error_event, event, merged, unless_disconnected

FINISH_REASONS = {"length": "length", "stop": "stop", "abort": "abort"}


async def completions(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    body = decode_body(await request.body(), CompletionRequest)
    if body.echo:
        raise BadRequest("echo is not supported")
    check_int(body.logprobs, 0, engine.model_config.vocab_size, "logprobs")
    prompts = await _completion_prompts(engine, body)
    rid = body.rid or new_rid()
    prepared = _prepare(engine, body, prompts, rid, lambda ids: body.max_tokens,
                        return_logprob=body.logprobs is not None)
    return await _respond(request, engine, body, prepared, _Shape("text_completion", f"cmpl-{rid}"))


async def chat_completions(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    body = decode_body(await request.body(), ChatCompletionRequest)
    if not body.messages:
        raise BadRequest("messages is empty")
    check_fan_out(1, [body.n])
    ids = await encode_chat(engine, [msgspec.structs.asdict(m) for m in body.messages])
    rid = body.rid or new_rid()
    requested = body.requested_max_tokens
    room = min(engine.context_len, engine.max_total_num_tokens)
    prepared = _prepare(engine, body, [ids], rid,
                        lambda ids: requested if requested is not None else max(room - len(ids), 0),
                        return_logprob=body.logprobs)
    return await _respond(request, engine, body, prepared,
                          _Shape("chat.completion", f"chatcmpl-{rid}"))


async def models(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    args = engine.args
    return JSONResponse({"object": "list", "data": [{
        "id": args.served_model_name, "object": "model", "created": int(engine.started_at),
        "owned_by": "dpserve", "root": args.tokenizer_path, "max_model_len": engine.context_len,
    }]})


# ---- shared machinery --------------------------------------------------------------------
class _Shape:
    """How one route names and shapes its objects."""

    def __init__(self, obj: str, response_id: str):
        self.object = obj
        self.id = response_id
        self.created = int(time.time())
        self.is_chat = obj == "chat.completion"

    def envelope(self, model: str, choices: list, chunk: bool = False) -> dict:
        obj = self.object + (".chunk" if chunk and self.is_chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": model,
                "choices": choices}

    def choice(self, index: int, p: Progress, text: str, finished: bool, chunk: bool,
               first: bool = False) -> dict:
        reason = FINISH_REASONS.get(p.finish_reason["type"]) if finished else None
        choice: dict = {"index": index, "logprobs": None, "finish_reason": reason}
        if finished:
            choice["matched_stop"] = p.finish_reason.get("matched")
        if not self.is_chat:
            choice["text"] = text
        elif chunk:
            choice["delta"] = {"role": "assistant", "content": text} if first else (
                {"content": text} if text else {})
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return choice


def _usage(results: list[Progress], n: int) -> dict:
    """Token counts; each prompt counts once however many (n) choices it has."""
    prompt = sum(p.prompt_tokens for p in results[::n])
    completion = sum(p.completion_tokens for p in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _logprobs(engine: EngineClient, p: Progress, is_chat: bool) -> dict:
    tokens = [engine.tokenizer.decode([t], skip_special_tokens=False) for t in p.output_ids]
    lps = p.output_logprobs
    if is_chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": []} for t, lp in zip(tokens, lps)]}
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": offsets}


def _prepare(engine: EngineClient, body: OpenAISampling, prompts: list[list[int]], rid: str,
             max_tokens_for, return_logprob: bool) -> list[PreparedRequest]:
    check_fan_out(len(prompts), [body.n] * len(prompts))
    routed = body.routed_dp_rank if body.routed_dp_rank is not None else body.data_parallel_rank
    num = len(prompts)
    prepared = []
    for i, ids in enumerate(prompts):
        params = body.sampling_params(max_tokens_for(ids))
        check_request(engine, ids, params)
        for j in range(body.n):
            index = i * body.n + j
            prepared.append(PreparedRequest(
                rid=rid if num * body.n == 1 else f"{rid}_{index}", input_ids=ids,
                params=params, return_logprob=return_logprob,
                routed_dp_rank=_of_prompt(routed, i, num, "routed_dp_rank"),
                disagg_prefill_dp_rank=_of_prompt(body.disagg_prefill_dp_rank, i, num,
                                                  "disagg_prefill_dp_rank"),
                bootstrap_room=_room(body.bootstrap_room, i, j, index, num)))
    return prepared


def _of_prompt(value, i: int, num_prompts: int, name: str):
    """A scalar applies to every prompt; a list has one entry per prompt."""
    if not isinstance(value, list):
        return value
    if len(value) != num_prompts:
        raise BadRequest(f"{name} has {len(value)} entries for {num_prompts} prompt(s)")
    return value[i]


def _room(room, i: int, j: int, index: int, num_prompts: int) -> int | None:
    """Each request of the body gets its own room, the same on the prefill and the decode
    server (both apply this to the identical body): a scalar means room + request index
    (SGLang's rule for a batch); a list gives each prompt's, + copy index under ``n``."""
    if isinstance(room, list):
        return _of_prompt(room, i, num_prompts, "bootstrap_room") + j
    return None if room is None else room + index


async def _respond(request: Request, engine: EngineClient, body: OpenAISampling,
                   prepared: list[PreparedRequest], shape: _Shape) -> Response:
    model = body.model or engine.args.served_model_name
    running = start_all(engine, prepared)
    if body.stream:
        return SSEResponse(_stream(running, shape, model, body.include_usage, body.n))
    try:
        results = await unless_disconnected(request, run_all(running))
    finally:
        release(running)
    choices = [shape.choice(i, p, p.text, True, chunk=False) for i, p in enumerate(results)]
    for choice, p, r in zip(choices, results, running):
        if r.prepared.return_logprob:
            choice["logprobs"] = _logprobs(engine, p, shape.is_chat)
    return JSONResponse({**shape.envelope(model, choices), "usage": _usage(results, body.n)})


async def _stream(running: list[RunningRequest], shape: _Shape, model: str, include_usage: bool,
                  n: int):
    last: dict[int, Progress] = {}
    try:
        async for index, p in merged([r.progress() for r in running]):
            first = index not in last
            last[index] = p
            finished = p.finish_reason is not None
            if not (p.delta or finished or (first and shape.is_chat)):
                continue
            choice = shape.choice(index, p, p.delta, finished, chunk=True, first=first)
            yield event(shape.envelope(model, [choice], chunk=True))
        if include_usage:
            usage = _usage([last[i] for i in range(len(running))], n)
            yield event({**shape.envelope(model, [], chunk=True), "usage": usage})
    except ApiError as exc:
        yield error_event(exc)
    finally:
        release(running)
    yield DONE


async def _completion_prompts(engine: EngineClient, body: CompletionRequest) -> list[list[int]]:
    """str, [str], [int] or [[int]] -> token id lists; the fan-out caps come first."""
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
        return await encode_texts(engine, prompt, "prompt")
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise BadRequest("prompt must be a string, a list of strings, a list of token ids "
                     "or a list of such lists")


def openai_routes() -> list[Route]:
    return [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]
