"""Messages between the API process and the per-rank schedulers.

One ``msgspec.Struct`` per kind, tagged, encoded as msgpack; no pickle on the hot path.
Grouped by destination: ``ToScheduler`` travels API -> rank over the rank's request
pipe; ``ToServer`` travels rank -> API over the rank's output pipe. Load never travels
here: it is on the board (``shm.board``).

The transport is a ``multiprocessing`` pipe per direction per rank, carrying one
encoded message per ``send_bytes``; ``encode``/``decode_*`` below are the only codec.
"""

from __future__ import annotations

import msgspec

from engine.sampling import SamplingParams


# ---- API -> scheduler ------------------------------------------------------------------
class GenerateReq(msgspec.Struct, tag="generate", kw_only=True):
    """A new request. The dispatcher already counted it on the board as
    ``counted_tokens`` tokens from dispatcher ``dispatcher_id``: the scheduler must ack
    exactly that (``acked_tokens[dispatcher_id] += counted_tokens``) when it starts
    counting the request in its own load."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    dispatcher_id: int
    counted_tokens: int
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # prompt positions from here get logprobs; -1: none
    arrival_time: float = 0.0
    bootstrap_room: int | None = None
    disagg_prefill_dp_rank: int | None = None
    group_rid: str | None = None  # the body's rid when it became several requests


class AbortReq(msgspec.Struct, tag="abort", kw_only=True):
    """Drop a request (client gone): free its KV and its load at once.

    ``requested``: asked through ``/abort_request`` (SGLang's), by any API process: the
    request ``rid``, and those whose ``group_rid`` it is, end with an abort finish of
    status ``ABORT_REQUESTED``, which their clients receive as the end of their output
    (a 200, as SGLang answers); ``abort_all``: every request the rank holds."""

    rid: str = ""
    message: str = "aborted by client"
    requested: bool = False
    abort_all: bool = False


class FlushCacheReq(msgspec.Struct, tag="flush_cache"):
    """Empty the rank's prefix cache. Refused while the rank holds any request (as
    SGLang does); the rank answers with ``FlushCacheResult``."""


class ShutdownReq(msgspec.Struct, tag="shutdown"):
    """Finish nothing more; exit the loop, mark the row DEAD and return."""


ToScheduler = GenerateReq | AbortReq | FlushCacheReq | ShutdownReq


# ---- scheduler -> API ------------------------------------------------------------------
class ReqOutput(msgspec.Struct, kw_only=True, array_like=True):
    """What one request gained in one batch.

    ``finish_reason`` is None while running, else an ``engine.finish.FinishReason``
    (``FinishLength``, ``FinishStop`` or ``FinishAbort``), which travels as its wire
    form, SGLang's JSON object, and arrives as a plain dict: the receiver reads it back
    with ``engine.finish.finish_from_json`` (``server.inflight``). A rank that ends a
    request itself (it cannot serve it) gives its abort a ``status_code``, as SGLang's
    ``FINISH_ABORT`` does: 400 when the request is at fault (``CLIENT_ERROR``), 503 when
    the server is (``SERVER_ERROR``); the API answers with that status
    (``EngineClient.outputs``). The echo of the API's own ``AbortReq`` has none.
    """

    rid: str
    new_token_ids: list[int]
    finish_reason: dict | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    output_logprobs: list[float] | None = None
    # With return_logprob (``scheduler.request.Req``): top lists ``[(logprob, id)]`` per
    # new token (None where this rank did not sample it); the prompt's logprobs, whole,
    # in the request's first output (None for position 0).
    output_top_logprobs: list[list[tuple[float, int]] | None] | None = None
    input_token_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[float, int]] | None] | None = None


CLIENT_ERROR = 400  # the request is wrong: sending it again fails the same way
SERVER_ERROR = 503  # this server could not finish it: a gateway may retry it elsewhere


class BatchOutput(msgspec.Struct, tag="batch", kw_only=True):
    """One message per scheduler batch: every request that advanced or finished."""

    dp_rank: int
    outputs: list[ReqOutput]


class RankReady(msgspec.Struct, tag="ready", kw_only=True):
    """Sent once, after the model is loaded and the board row says READY."""

    dp_rank: int
    pid: int
    max_total_num_tokens: int
    max_running_requests: int
    context_len: int
    device: str
    # SGLang's memory_usage: weights and KV pool in GB (2**30 bytes); 0 when simulated.
    weight_gb: float = 0.0
    kv_cache_gb: float = 0.0


class RankStats(msgspec.Struct, tag="rank_stats", kw_only=True):
    """Sent with each periodic "Decode batch." line (``scheduler.stats``): the figures
    SGLang's ``internal_states`` and ``sglang:gen_throughput`` report per rank."""

    dp_rank: int
    num_running_reqs: int
    num_used_tokens: int  # KV tokens holding data for running requests
    token_usage: float  # num_used_tokens over the KV pool
    num_queue_reqs: int
    last_gen_throughput: float  # tokens/s decoded since the previous RankStats
    decode_step_time_s: float  # mean wall seconds per decoding batch, same span
    num_decode_batches: int  # since start


class PrefixCopyStats(msgspec.Struct, tag="prefix_copy_stats", kw_only=True):
    """With ``--enable-cross-rank-prefix-cache``, after a step that changed them (a PD
    prefill rank never decodes, so these do not wait for a "Decode batch." line)."""

    dp_rank: int
    num_copied_prefix_tokens: int  # prompt tokens whose KV came from other ranks' caches
    num_dropped_prefix_copies: int  # copies thrown away: the holder evicted meanwhile


class FlushCacheResult(msgspec.Struct, tag="flush_cache_result", kw_only=True):
    """The answer to ``FlushCacheReq``: whether the cache was emptied, and why not."""

    dp_rank: int
    success: bool
    message: str = ""


class RankError(msgspec.Struct, tag="rank_error", kw_only=True):
    """A fatal error in the rank (at start-up or in its loop); the rank then exits."""

    dp_rank: int
    message: str


ToServer = BatchOutput | RankReady | RankStats | PrefixCopyStats | FlushCacheResult | RankError

_encoder = msgspec.msgpack.Encoder()
_to_scheduler = msgspec.msgpack.Decoder(ToScheduler)
_to_server = msgspec.msgpack.Decoder(ToServer)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_to_scheduler(data: bytes) -> ToScheduler:
    return _to_scheduler.decode(data)


def decode_to_server(data: bytes) -> ToServer:
    return _to_server.decode(data)
