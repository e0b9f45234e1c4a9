"""The front door's bounds: every number a client sends is checked here, before
anything is dispatched, so that nothing out of range reaches a rank message (msgpack
carries int64/uint64 only), the load board or a PD table. Out of range is a 400 that
names the field.

| field                                            | range                          | why                                   |
|--------------------------------------------------|--------------------------------|---------------------------------------|
| ``bootstrap_room``, and ``room + i`` derived     | [0, 2**64)                     | the bootstrap table keys rooms as     |
| from a scalar room for a batch's request i       |                                | unsigned 64-bit (``MAX_ROOM``)        |
| ``routed_dp_rank`` (``data_parallel_rank``)      | [0, number of ranks)           | PD front door: its decode ranks       |
| ``disagg_prefill_dp_rank``                       | [0, number of prefill ranks)   | plain or prefill server: its ranks    |
| ``top_logprobs_num``, ``logprobs`` (completions) | [0, vocabulary size]           |                                       |
| ``logprob_start_len``                            | -1, or [0, context length)     |                                       |
|                                                  | and below the prompt's length  | the positions it scores               |
| ``logit_bias`` (key: token id, value: bias)      | [0, vocabulary), [-100, 100]   | OpenAI's; ``SamplingParams.validate`` |
| ``bootstrap_port``                               | [0, 65535]                     | a TCP port                            |
| ``n`` (every route, ``sampling_params.n`` too)   | [1, ``MAX_N``]                 | OpenAI's cap                          |
| requests in one body (prompts times ``n``)       | at most ``MAX_BATCH_REQUESTS`` | each costs a board slot and a handle  |
| ``input_ids`` entries                            | [0, vocabulary size)           | ``check_request``                     |
| sampling: ``max_new_tokens`` (``max_tokens``,    | ``SamplingParams.validate``:   | prompt + new tokens fit the context;  |
| ``max_completion_tokens``), ``min_new_tokens``   | within the context; ``top_k``  | the seed seeds a 64-bit generator     |
| (``min_tokens``), ``stop_token_ids``, ``top_k``, | and the seed int64; stop ids   |                                       |
| ``sampling_seed`` (``seed``)                     | in the vocabulary              |                                       |

The body-level caps (``check_fan_out``) come before tokenizing and before a body is
expanded into its requests, so a huge ``n`` or batch costs nothing. The per-request
checks (``check_prepared``) run over the whole expanded body before its first request
is dispatched: a body is either all checked or nothing of it is on a rank. Query
parameters of the info routes go through ``query_int``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from engine.sampling import MAX_N, InvalidSamplingParams, SamplingParams
from scheduler.roles import Role
from server.errors import BadRequest
from shm.bootstrap_layout import MAX_ROOM

if TYPE_CHECKING:
    from starlette.requests import Request

    from server.engine_client import EngineClient
    from server.prepared import PreparedRequest

# Prompts times n in one body. OpenAI takes up to 2,048 inputs in one call (embeddings);
# each request here holds a board count, a handle and, in PD, a route-table slot.
MAX_BATCH_REQUESTS = 2048
MAX_PORT = 65535

__all__ = ["MAX_BATCH_REQUESTS", "MAX_N", "check_fan_out", "check_int", "check_prepared",
           "check_request", "query_int"]


def check_int(value: int | None, lo: int, hi: int, name: str) -> None:
    """400 unless ``value`` is None or in [lo, hi] (both ends included)."""
    if value is not None and not lo <= value <= hi:
        raise BadRequest(f"{name} must be in [{lo}, {hi}], got {value}")


def check_ints(value: int | list[int] | None, lo: int, hi: int, name: str) -> None:
    """``check_int`` for a scalar or for every entry of a per-item list."""
    for v in value if isinstance(value, list) else [value]:
        check_int(v, lo, hi, name)


def check_fan_out(num_prompts: int, ns: list[int]) -> None:
    """Caps on what one body expands to; ``ns``: each prompt's ``n``."""
    for n in ns:
        check_int(n, 1, MAX_N, "n")
    total = sum(ns)
    if total > MAX_BATCH_REQUESTS:
        raise BadRequest(f"the body asks for {total} requests ({num_prompts} prompt(s) times n); "
                         f"at most {MAX_BATCH_REQUESTS} in one body")


def check_request(engine: EngineClient, input_ids: list[int], params: SamplingParams,
                  names: dict[str, str] | None = None) -> None:
    """Raise ``BadRequest`` for a prompt or parameters the engine cannot serve.
    ``names``: the request's own names of ``SamplingParams`` fields (OpenAI's
    ``max_tokens`` for ``max_new_tokens`` ...), so the message names what was sent."""
    try:
        _check_request(engine, input_ids, params)
    except BadRequest as exc:
        if not names:
            raise
        message = re.sub(r"\b(" + "|".join(map(re.escape, names)) + r")\b",
                         lambda m: names[m.group(1)], exc.message)
        raise BadRequest(message) from None


def _check_request(engine: EngineClient, input_ids: list[int], params: SamplingParams) -> None:
    if not input_ids:
        raise BadRequest("the prompt is empty")
    # The size checks first: they are O(1), the per-id loop is not (on the event loop).
    ctx = engine.context_len
    if len(input_ids) >= ctx:
        raise BadRequest(f"the prompt has {len(input_ids)} tokens; the model's context length "
                         f"is {ctx}, which must also hold at least one new token")
    if len(input_ids) + 1 > engine.max_total_num_tokens:
        raise BadRequest(f"the prompt has {len(input_ids)} tokens but a rank's KV pool holds "
                         f"{engine.max_total_num_tokens}; start the server with a larger "
                         "--max-total-tokens")
    vocab = engine.model_config.vocab_size
    for token_id in input_ids:
        if type(token_id) is not int or not 0 <= token_id < vocab:
            raise BadRequest(f"input_ids entry {token_id!r} is not a token id in [0, {vocab})")
    try:
        params.validate(vocab, ctx, len(input_ids))
    except InvalidSamplingParams as exc:
        raise BadRequest(str(exc)) from None
    need = min(len(input_ids) + params.max_new_tokens, ctx)
    if need > engine.max_total_num_tokens:
        raise BadRequest(f"the request needs {need} KV tokens (prompt + max_new_tokens) but a "
                         f"rank's KV pool holds {engine.max_total_num_tokens}; lower "
                         "max_new_tokens or start the server with a larger --max-total-tokens")


# Logprob entries (a token's logprob, or one of its top list) one body may ask for: each
# is an object in the API process and about 25 bytes of JSON. 2,048 prompts of 2,000
# tokens scored with their top 259 would be a billion (tens of GB: the API process killed
# for memory); this is about 100 MB of JSON.
MAX_LOGPROB_ENTRIES = 1 << 22


def check_prepared(engine: EngineClient, prepared: list[PreparedRequest]) -> None:
    """Every request of one body, after expansion, before the first is dispatched:
    rooms (derived ones too), ranks, logprob counts (``MAX_LOGPROB_ENTRIES``), and one
    rid per request."""
    num_ranks = len(engine.ranks)
    # A decode server or PD front door: the prefill ranks the KV comes from; a plain or
    # prefill server has no other group, so the field can only name one of its own.
    num_prefill = engine.num_prefill_ranks or num_ranks
    vocab = engine.model_config.vocab_size
    rids, rooms = set(), set()
    entries = 0
    for p in prepared:
        check_int(p.bootstrap_room, 0, MAX_ROOM,
                  "bootstrap_room (with room + i for a batch's request i)")
        check_int(p.routed_dp_rank, 0, num_ranks - 1, "routed_dp_rank")
        check_int(p.disagg_prefill_dp_rank, 0, num_prefill - 1, "disagg_prefill_dp_rank")
        check_int(p.top_logprobs_num, 0, vocab, "top_logprobs_num")
        if p.return_logprob and p.logprob_start_len >= len(p.input_ids):
            raise BadRequest(f"logprob_start_len ({p.logprob_start_len}) must be less than the "
                             f"prompt's length ({len(p.input_ids)} tokens)")
        if p.return_logprob and p.logprob_start_len >= 0 and engine.role == Role.DECODE:
            raise BadRequest("prompt logprobs (logprob_start_len >= 0, or echo with logprobs): "
                             "a PD decode server has none (its prefill server computed them); "
                             "send the request to the prefill server or to a "
                             "--disaggregation-mode pd server")
        if p.return_logprob:
            scored = len(p.input_ids) - p.logprob_start_len if p.logprob_start_len >= 0 else 0
            entries += (scored + p.params.max_new_tokens) * (1 + (p.top_logprobs_num or 0))
        if p.rid in rids:
            raise BadRequest(f"rid {p.rid!r} is given twice in one body; every request needs "
                             "its own rid")
        rids.add(p.rid)
        if p.bootstrap_room is not None and engine.role != Role.MIXED:
            if p.bootstrap_room in rooms:  # one room pairs one prefill with one decode
                raise BadRequest(f"bootstrap_room {p.bootstrap_room} is given twice in one "
                                 "body; every request needs its own room")
            rooms.add(p.bootstrap_room)
    if entries > MAX_LOGPROB_ENTRIES:
        raise BadRequest(f"the body asks for {entries} logprob entries ((prompt positions "
                         "scored + new tokens) x (1 + top logprobs), over its requests; new "
                         "tokens: max_tokens, or all the context left where it is not given); "
                         f"at most {MAX_LOGPROB_ENTRIES}: give max_tokens, or ask for fewer "
                         "top logprobs, tokens or requests")

def query_int(request: Request, name: str, lo: int, hi: int) -> int | None:
    """An optional integer query parameter in [lo, hi]; anything else is a 400."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    # ASCII digits only: str.isdigit() takes "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19):
        raise BadRequest(f"query parameter {name} must be an integer in [{lo}, {hi}], got {raw!r}")
    value = int(raw)
    check_int(value, lo, hi, f"query parameter {name}")
    return value
