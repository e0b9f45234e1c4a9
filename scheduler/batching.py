"""Which requests run in the next forward pass. Pure functions over plain data.

One step makes one *mixed* batch:
1. every running request that is decoding contributes one token;
2. requests still prefilling (admitted earlier, chunked) continue, oldest first;
3. waiting requests are admitted in arrival order while the prefill token budget
   (``chunked_prefill_size``), ``max_running_requests`` and KV reservation allow.
Prefill chunks share the budget; a prompt longer than what remains is chunked, and its
last chunk is the one that samples the first output token. A prefill-only rank
(PD prefill role) simply never has decoding requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.request import Req


@dataclass(slots=True)
class ForwardItem:
    req: Req
    token_ids: list[int]  # tokens whose KV this pass computes
    start_pos: int  # how many of the request's tokens were already computed
    sample: bool  # True when the pass ends the known tokens: sample the next one


def select_batch(
    running: list[Req],
    waiting: deque[Req],
    chunked_prefill_size: int,
    max_running_requests: int,
    try_reserve: Callable[[Req], bool],
) -> list[ForwardItem]:
    """Build the next batch; admitted requests move from ``waiting`` to ``running``.

    ``try_reserve(req)`` reserves the request's KV and returns False if the pool
    cannot hold it now (admission then stops, keeping arrival order: no overtaking).
    """
    items: list[ForwardItem] = []
    budget = chunked_prefill_size
    for req in running:
        if not req.is_prefilling:
            items.append(ForwardItem(req, req.tokens_to_compute(1), req.num_computed, True))
    for req in running:
        if req.is_prefilling and budget > 0:
            items.append(_prefill_item(req, budget))
            budget -= len(items[-1].token_ids)
    while waiting and budget > 0 and len(running) < max_running_requests:
        req = waiting[0]
        if not try_reserve(req):
            break
        waiting.popleft()
        running.append(req)
        items.append(_prefill_item(req, budget))
        budget -= len(items[-1].token_ids)
    return items


def _prefill_item(req: Req, budget: int) -> ForwardItem:
    tokens = req.tokens_to_compute(budget)
    return ForwardItem(req, tokens, req.num_computed,
                       req.num_computed + len(tokens) == req.fill_len)
