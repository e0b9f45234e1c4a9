"""A minimal in-test driver over ModelRunner + KVPool (the real scheduler lives elsewhere).

`generate_alone` runs one request by itself; `generate_together` admits many requests
into shared, mixed batches with chunked prefill under a token budget, the way a
continuous-batching scheduler would, so tests can compare the two token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.attention import AttentionMetadata
from engine.kv_cache import KVPool
from engine.model import CausalLM
from engine.runner import ForwardReq, ModelRunner
from engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class DriverReq:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = GREEDY
    slots: list[int] = field(default_factory=list)
    num_prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)

    @property
    def is_done(self) -> bool:
        return len(self.output_ids) >= self.max_new_tokens


def generate_alone(runner: ModelRunner, prompt_ids: list[int], max_new_tokens: int,
                   params: SamplingParams = GREEDY) -> list[int]:
    return generate_together(runner, [prompt_ids], max_new_tokens=[max_new_tokens],
                             token_budget=10**9, params=params)[0]


def generate_together(runner: ModelRunner, prompts: list[list[int]], max_new_tokens: list[int],
                      token_budget: int, max_running: int = 10**9,
                      params: SamplingParams = GREEDY) -> list[list[int]]:
    pool = runner.kv_pool
    waiting = [DriverReq(list(p), n, params) for p, n in zip(prompts, max_new_tokens)]
    reqs = list(waiting)
    running: list[DriverReq] = []
    while waiting or running:
        while waiting and len(running) < max_running:
            running.append(waiting.pop(0))
        batch, members, budget = [], [], token_budget
        # Decodes first (1 token each), then prefill chunks with what budget is left.
        for req in running:
            if req.num_prefilled == len(req.prompt_ids) and budget > 0:
                new_slots = pool.alloc(1)
                batch.append(ForwardReq([req.output_ids[-1]], list(req.slots), new_slots,
                                        sampling_params=req.params, output_ids=req.output_ids))
                members.append((req, new_slots))
                budget -= 1
        for req in running:
            remaining = len(req.prompt_ids) - req.num_prefilled
            if remaining and budget > 0:
                n = min(remaining, budget)
                chunk = req.prompt_ids[req.num_prefilled: req.num_prefilled + n]
                new_slots = pool.alloc(n)
                batch.append(ForwardReq(chunk, list(req.slots), new_slots,
                                        is_sampling=(n == remaining), sampling_params=req.params))
                members.append((req, new_slots))
                req.num_prefilled += n
                budget -= n
        out = runner.forward(batch)
        for (req, new_slots), token in zip(members, out.next_token_ids):
            req.slots.extend(new_slots)
            if token is not None:
                req.output_ids.append(token)
        for req in [r for r in running if r.is_done]:
            pool.free(req.slots)
            running.remove(req)
    return [r.output_ids for r in reqs]


def full_logits(model: CausalLM, pool: KVPool, ids: list[int]) -> torch.Tensor:
    """Logits at every position of `ids`, computed in one fresh prefill."""
    slots = pool.alloc(len(ids))
    try:
        meta = AttentionMetadata.build([], [([], slots)], torch.device("cpu"))
        hidden = model(torch.tensor(ids), meta, pool)
        return model.compute_logits(hidden)
    finally:
        pool.free(slots)
