"""A request as one rank's scheduler holds it. Plain Python: no torch, no shm.

Token bookkeeping: ``all_ids = input_ids + output_ids``; the first ``num_computed`` of
them have their KV in ``slots``. A prefilling request has ``num_computed < fill_len``
(its prompt; a retracted one's, everything it knew); a decoding one has every token but
the newest sampled one computed, so each decode step computes exactly one token and
samples the next.

KV is reserved at admission for the prompt and up to ``reserve_new`` new tokens
(``--clip-max-new-tokens-estimation``, ``initial_len``; the request's
``max_new_tokens`` when fewer, so a request that names a modest limit is never short of
memory). One that decodes past
its reservation grows it as it goes; when the pool has no room left for that, the
scheduler *retracts* the newest running request: its KV goes back (what it computed into
the prefix cache), it returns to the head of the queue with its output so far, and is
computed again when admitted (``recompute_len``: every token it knows, prompt and
output, before it samples the next; the prompt's logprobs are not scored twice). The
slots go back to the pool the moment a request finishes or aborts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.finish import FinishReason
from engine.sampling import SamplingParams


@dataclass(slots=True, eq=False)
class Req:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    dispatcher_id: int
    counted_tokens: int
    arrival_time: float = 0.0
    return_logprob: bool = False
    # With return_logprob: prompt positions from logprob_start_len are scored (-1: none),
    # each scored position also gets its top ``top_logprobs_num``. The executor fills
    # the input lists (position 0 has no logprob: None) and output_top_logprobs (None
    # for a token this rank did not sample: a PD decode rank's first); the scheduler
    # appends output_logprobs.
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    num_computed: int = 0
    # Prefix cache (scheduler.radix_cache): the first ``prefix_len`` slots are the
    # cache's, locked through ``cache_node`` until the request's KV goes back to the
    # cache: the prefix reused at admission, then the prompt as each prefill chunk puts
    # it in the cache; ``cached_tokens`` is what the client is told it reused.
    prefix_len: int = 0
    cache_node: object | None = None
    cached_tokens: int = 0
    # While queued: the prompt tokens the cache held when the request arrived. The board
    # counts only the rest as its load (the cached part is evictable until admission
    # locks it), so a rank is not charged a whole prompt for a hit it will mostly reuse.
    queued_cached: int = 0
    # Retracted (module docstring): the tokens, prompt and output, to compute again
    # before the next sample (0: never retracted); and how many times it was.
    recompute_len: int = 0
    num_retractions: int = 0
    # PD prefill: the KV is held for decode after the hand-off (freed by the PD role).
    kv_held: bool = False
    finish_reason: FinishReason | None = None
    # Decoded output text so far, kept only when stop strings need it.
    output_text: str = ""
    # Outputs produced since the last BatchOutput was sent.
    num_sent: int = 0
    # PD: the room that pairs this request's prefill and decode halves, and (decode)
    # the prefill rank holding its KV when the client named it.
    bootstrap_room: int | None = None
    disagg_prefill_dp_rank: int | None = None
    # The rid of the body this request is one of (``rid_0``, ``rid_1``, ...: copies under
    # n, or a list of prompts), which /abort_request ends whole; None for a lone request.
    group_rid: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def fill_len(self) -> int:
        """The tokens to compute before the first sample: the prompt, or (retracted)
        everything the request knew when it was retracted."""
        return max(len(self.input_ids), self.recompute_len)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.fill_len

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def reserve_len(self, context_len: int) -> int:
        """KV slots this request may ever need: prompt + all its new tokens, capped by
        the context (the newest sampled token never needs a slot of its own)."""
        return min(self.prompt_len + self.params.max_new_tokens, context_len)

    def initial_len(self, most: int, reserve_new: int) -> int:
        """KV slots to reserve at admission: what it must compute now and up to
        ``reserve_new`` tokens more, at most ``most`` (its ``reserve_len``)."""
        new_left = self.params.max_new_tokens - len(self.output_ids)
        return min(most, self.fill_len + min(new_left, reserve_new))

    def prompt_logprob_rows(self, start_pos: int, num_tokens: int) -> tuple[int, list[int]]:
        """For a pass computing positions [start_pos, + num_tokens): the first of its rows
        to score and the prompt tokens those rows predict (none: ``(0, [])``)."""
        if not self.return_logprob or self.logprob_start_len < 0 or self.recompute_len:
            return 0, []  # (retracted after its prompt was scored: not again)
        lo = max(max(self.logprob_start_len, 1) - 1, start_pos)
        hi = min(start_pos + num_tokens, self.prompt_len - 1)
        if hi <= lo:
            return 0, []
        return lo - start_pos, self.input_ids[lo + 1:hi + 1]

    def tokens_to_compute(self, limit: int) -> list[int]:
        """The next at most ``limit`` tokens whose KV is not computed yet (while it
        prefills, those before its first sample only)."""
        start = self.num_computed
        fill = self.fill_len
        end = min(start + limit, fill if start < fill else self.seq_len)
        prompt_len = len(self.input_ids)
        if end <= prompt_len:
            return self.input_ids[start:end]
        if start >= prompt_len:
            return self.output_ids[start - prompt_len:end - prompt_len]
        return self.input_ids[start:] + self.output_ids[:end - prompt_len]
