"""One checked, tokenized request as the front door takes it.

The routes build a ``PreparedRequest`` per (prompt, n) (``server.generate``,
``server.openai``, ``/health_generate``); ``server.request_flow.start`` hands it to
``EngineClient.submit`` (or the PD front door's, which derives its two halves from it
with ``dataclasses.replace``), and the rank's ``GenerateReq`` is built from it in one
place (``EngineClient._submit``). A new request field is added here, then read where it
is used: no signature in between spells the fields out.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling import SamplingParams
from server.errors import BadRequest


@dataclass(frozen=True)
class PreparedRequest:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # with return_logprob: score the prompt from here
    routed_dp_rank: int | None = None
    bootstrap_room: int | None = None
    # PD decode: the prefill rank that holds the KV, when the client names it.
    disagg_prefill_dp_rank: int | None = None
    # The body's rid when it became several requests (rid_0, rid_1, ...): what
    # /abort_request with that rid ends.
    group_rid: str | None = None
    # vLLM's include_stop_str_in_output: the final text ends with the matched stop string
    # (what followed it in its last token is cut, as without the flag).
    include_stop_str: bool = False


def request_rooms(room: int | list[int] | None, copies: list[int]) -> list[int | None]:
    """One ``bootstrap_room`` per request of a body whose prompts fan out into ``copies``
    requests each (``n``), in order (prompt by prompt, its copies together), derived
    identically on a prefill and a decode server that get the same body: a scalar means
    room + request index (SGLang's rule for a batch); a list with one room per prompt
    gives each copy its prompt's + the copy's index; a list with one room per request
    (what gateways send for a chat with ``n``: a room per choice) is taken as it is."""
    total = sum(copies)
    if room is None:
        return [None] * total
    if not isinstance(room, list):
        return [room + k for k in range(total)]
    if len(room) == len(copies):
        return [r + j for r, n in zip(room, copies) for j in range(n)]
    if len(room) == total:
        return list(room)
    raise BadRequest(f"bootstrap_room has {len(room)} entries: give one per prompt "
                     f"({len(copies)}) or one per request ({total}, the prompts times n)")
