"""SGLang's ``POST /generate`` (also PUT): one prompt or a batch, streamed or not.

Response, per prompt: ``{"text", "output_ids", "meta_info"}`` (a list for a batch).
Streaming sends one event per rank output, each *cumulative* (the whole text and all
``output_ids`` so far, cumulative ``completion_tokens``), as SGLang's benchmark
client expects; batch events carry ``"index"``. A batch of B prompts with
``sampling_params.n = k`` becomes B*k requests, prompt-major (caps: ``server.bounds``).
``rid``: a string for one prompt, a list (one per prompt) for a batch; a prompt's
copies under ``n`` are ``rid_0`` ... ``rid_{n-1}``; two equal rids in one body are a 400.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.engine_client import EngineClient
from server.bounds import MAX_BATCH_REQUESTS, MAX_PORT, check_fan_out, check_ints, check_request
from server.errors import ApiError, BadRequest
from server.prompts import encode_texts
from server.logprobs import TokenTexts, sglang_logprobs
from server.protocol import (AbortRequest, GenerateRequest, decode_body, routed_rank_of,
                             to_sampling_params)
from server.prepared import PreparedRequest, request_rooms
from server.request_flow import (Progress, RunningRequest, new_rid, refuse_body_rooms, release,
                                 run_all, start_all)
from server.sse import DONE, SSEResponse, error_event, event, merged, unless_disconnected


async def generate(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    body = decode_body(await request.body(), GenerateRequest)
    try:
        prepared, is_batch = await prepare_generate(engine, body)
    except ApiError as exc:
        # The prompt's ids where tokenizing got that far (prepare_generate notes them).
        refuse_body_rooms(engine, body.bootstrap_room,
                          getattr(exc, "prompt_ids", None) or body.input_ids)
        raise
    running = start_all(engine, prepared)
    if body.stream:
        return SSEResponse(stream_generate(running, is_batch, body.return_text_in_logprobs))
    try:
        results = await unless_disconnected(request, run_all(running))
    finally:
        release(running)
    texts = TokenTexts(engine.tokenizer)
    out = [generate_result(p, r.prepared, texts, body.return_text_in_logprobs)
           for p, r in zip(results, running)]
    return JSONResponse(out if is_batch else out[0])


async def stream_generate(running: list[RunningRequest], is_batch: bool, with_text: bool):
    texts = TokenTexts(running[0].engine.tokenizer)
    try:
        async for index, progress in merged([r.progress() for r in running]):
            chunk = generate_result(progress, running[index].prepared, texts, with_text)
            if is_batch:
                chunk["index"] = index
            yield event(chunk)
    except ApiError as exc:
        yield error_event(exc)
    finally:
        release(running)
    yield DONE


def generate_result(p: Progress, prepared: PreparedRequest | None = None,
                    texts: TokenTexts | None = None, with_text: bool = False) -> dict:
    """``prepared`` and ``texts`` only when the request asked for logprobs."""
    finish = None if p.finish_reason is None else p.finish_reason.to_json()
    meta = {
        "id": p.rid, "finish_reason": finish, "prompt_tokens": p.prompt_tokens,
        "completion_tokens": p.completion_tokens, "cached_tokens": p.cached_tokens,
        "e2e_latency": p.e2e_latency, "dp_rank": p.dp_rank,
    }
    if prepared is not None and prepared.return_logprob:
        start = max(prepared.logprob_start_len, 0)
        scored = prepared.input_ids[start:] if prepared.logprob_start_len >= 0 else []
        meta.update(sglang_logprobs(texts, p, scored, with_text))
    return {"text": p.text, "output_ids": list(p.output_ids), "meta_info": meta}


# ---- request -> prepared requests ---------------------------------------------------------
async def prepare_generate(engine: EngineClient,
                           body: GenerateRequest) -> tuple[list[PreparedRequest], bool]:
    """Validate and tokenize; returns one ``PreparedRequest`` per (prompt, n) and
    whether the body was a batch. Raises ``BadRequest``."""
    name = body.unsupported_field()
    if name is not None:
        raise BadRequest(f"{name} is not supported by this server")
    texts, ids_list, is_batch = _prompt_inputs(body)
    size = len(texts if texts is not None else ids_list)
    if size > MAX_BATCH_REQUESTS:
        raise BadRequest(f"a batch of {size} prompts is more than {MAX_BATCH_REQUESTS}")
    params_list = [to_sampling_params(p)
                   for p in _per_item(body.sampling_params, size, "sampling_params")]
    check_fan_out(size, [p.n for p in params_list])
    if is_batch and isinstance(body.rid, str):
        raise BadRequest("rid must be a list with one rid per prompt for a batch, "
                         f"got the single rid {body.rid!r}")
    rids = _per_item(body.rid, size, "rid")
    if "" in rids:
        raise BadRequest("rid must not be empty (leave it out and the server makes one)")
    logprob = _per_item(body.return_logprob, size, "return_logprob")
    top_n = _per_item(body.top_logprobs_num, size, "top_logprobs_num")
    start_len = _per_item(body.logprob_start_len, size, "logprob_start_len")
    check_ints(start_len, -1, engine.context_len - 1, "logprob_start_len")
    check_ints(body.bootstrap_port, 0, MAX_PORT, "bootstrap_port")
    routed = routed_rank_of(body)
    routed_list = _per_item(routed, size, "routed_dp_rank")
    prefill_rank = _per_item(body.disagg_prefill_dp_rank, size, "disagg_prefill_dp_rank")
    rooms = request_rooms(body.bootstrap_room, [p.n for p in params_list])
    prompts = ids_list if texts is None else await encode_texts(engine, texts, "text")
    prepared = []
    for i, ids in enumerate(prompts):
        params = params_list[i]
        try:
            check_request(engine, ids, params)
        except ApiError as exc:
            if len(prompts) == 1:
                exc.prompt_ids = ids  # for giving its room up (generate)
            raise
        copies = params.n
        rid = rids[i] or new_rid()
        for j in range(copies):
            prepared.append(PreparedRequest(
                rid=rid if copies == 1 else f"{rid}_{j}", group_rid=None if copies == 1 else rid,
                input_ids=ids,
                params=params.for_copy(j),
                return_logprob=bool(logprob[i]), top_logprobs_num=top_n[i] or 0,
                logprob_start_len=start_len[i] if start_len[i] is not None else -1,
                routed_dp_rank=routed_list[i],
                bootstrap_room=rooms[len(prepared)],
                disagg_prefill_dp_rank=prefill_rank[i]))
    return prepared, is_batch or len(prepared) > 1


def _prompt_inputs(body: GenerateRequest) -> tuple[list[str] | None, list[list[int]] | None, bool]:
    """(texts, None) or (None, id lists), and whether the body is a batch."""
    if (body.text is None) == (body.input_ids is None):
        raise BadRequest("give exactly one of text or input_ids")
    if body.text is not None:
        texts = [body.text] if isinstance(body.text, str) else body.text
        if not texts:
            raise BadRequest("text is an empty batch")
        return texts, None, not isinstance(body.text, str)
    ids = body.input_ids
    if ids and all(isinstance(x, list) for x in ids):
        return None, [list(x) for x in ids], True
    if any(isinstance(x, list) for x in ids):
        raise BadRequest("input_ids must be a list of token ids or a list of such lists")
    return None, [ids], False


def _per_item(value, size: int, name: str) -> list:
    """A scalar applies to every item; a list must have one entry per item."""
    if isinstance(value, list):
        if len(value) != size:
            raise BadRequest(f"{name} has {len(value)} entries for a batch of {size}")
        return value
    return [value] * size


async def abort_request(request: Request) -> Response:
    """SGLang's ``/abort_request``: the request with ``rid`` (any API process's), or with
    ``abort_all`` every request, ends on its rank; its client receives what was generated
    so far with finish reason ``{"type": "abort", ...}`` (a 200, as SGLang answers). An
    empty 200 whether or not such a request was running, as SGLang's."""
    engine: EngineClient = request.state.engine
    body = decode_body(await request.body(), AbortRequest)
    if not body.abort_all and not body.rid:
        raise BadRequest("abort_request needs rid (the request's id) or abort_all: true")
    message = body.abort_message or "aborted by /abort_request"
    engine.abort_requests(None if body.abort_all else body.rid, message)
    return Response(status_code=200)


def generate_routes() -> list[Route]:
    return [Route("/generate", generate, methods=["POST", "PUT"]),
            Route("/abort_request", abort_request, methods=["POST"])]
