"""Log-probabilities from the forward pass the rank already runs.

Two kinds, as SGLang and OpenAI define them:
- prompt (input) logprobs: position p of the prompt (p >= 1) gets
  ``log_softmax(logits at p - 1)[token p]``, from the model's own logits (no
  temperature, bias or penalty: the prompt was not sampled). A prefill chunk covering
  positions [s, s + L) scores the rows whose next token is a prompt token; the row
  before the next chunk's first token is this chunk's last, so chunks join seamlessly;
- output logprobs: the sampled token's, under the distribution it was drawn from
  (``engine.sampler.sample_tensors``), and the top k of that same distribution.

Top-k lists are ``[(logprob, token_id), ...]``, most likely first. Logits over many
prompt rows are computed a slice at a time, so a long chunk never holds
rows x vocabulary floats at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

TopList = list[tuple[float, int]]
MAX_ROWS_PER_SLICE = 512


def chosen_logprobs(
    basis: torch.Tensor, chosen: torch.Tensor, top_nums: Sequence[int]
) -> tuple[list[float], list[TopList]]:
    """Per row: the chosen token's logprob, and its top ``top_nums[i]`` (may be 0)."""
    logp = torch.log_softmax(basis.float(), dim=-1)
    values = logp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    return values, _top_lists(logp, top_nums)


def prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: Sequence[int],
    top_num: int,
) -> tuple[list[float], list[TopList]]:
    """``hidden[i]`` predicts ``targets[i]``: each target's logprob and the top ``top_num``."""
    values: list[float] = []
    tops: list[TopList] = []
    for lo in range(0, len(targets), MAX_ROWS_PER_SLICE):
        hi = min(lo + MAX_ROWS_PER_SLICE, len(targets))
        logp = torch.log_softmax(compute_logits(hidden[lo:hi]).float(), dim=-1)
        ids = torch.tensor(targets[lo:hi], dtype=torch.int64, device=logp.device)
        values.extend(logp.gather(-1, ids[:, None]).squeeze(-1).tolist())
        tops.extend(_top_lists(logp, [top_num] * (hi - lo)))
    return values, tops


def _top_lists(logp: torch.Tensor, top_nums: Sequence[int]) -> list[TopList]:
    k = min(max(top_nums, default=0), logp.shape[-1])
    if k == 0:
        return [[] for _ in top_nums]
    top = logp.topk(k, dim=-1)  # sorted, most likely first
    vals, ids = top.values.tolist(), top.indices.tolist()
    return [list(zip(v[:n], i[:n])) for v, i, n in zip(vals, ids, top_nums)]
