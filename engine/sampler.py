"""Batched next-token sampling over float32 logits [num_rows, vocab].

Pipeline per row: `logit_bias` (OpenAI's: added to the logits) -> penalties (repetition
over prompt+output, frequency/presence over output) -> mask eos/stop tokens while fewer than `min_new_tokens` -> greedy rows take
the argmax -> other rows divide by temperature, filter by top_k, then top_p (on the
renormalised top-k mass, as HF and SGLang do), then min_p, and draw.

Drawing uses the exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with
probability p_i. Seeded rows get their E from a generator seeded with
(sampling_seed, number of tokens generated so far), so a request's draw depends only
on its own seed and step: not on batch composition, and not on generator state that a
PD hand-off would have to carry. Unseeded rows share the runner's generator.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from engine.sampling import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SampleRow:
    params: SamplingParams
    prompt_ids: Sequence[int] = ()  # only read for repetition_penalty
    output_ids: Sequence[int] = ()  # tokens generated so far (penalties, min_new, seed step)


def step_seed(sampling_seed: int, step: int) -> int:
    """A well-mixed 64-bit seed for (seed, step) (splitmix64 finaliser)."""
    z = (sampling_seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def sample(
    logits: torch.Tensor,
    rows: Sequence[SampleRow],
    eos_token_ids: Collection[int],
    generator: torch.Generator | None = None,
    return_logprob: bool = False,
) -> tuple[list[int], list[float] | None]:
    """Next token per row, and (if asked) its log-probability under the distribution
    it was drawn from before top-k/top-p/min-p filtering (after bias, penalties and
    temperature; unscaled logits for greedy rows)."""
    chosen, basis = sample_tensors(logits, rows, eos_token_ids, generator)
    return chosen.tolist(), _logprobs(basis, chosen) if return_logprob else None


def sample_tensors(
    logits: torch.Tensor,
    rows: Sequence[SampleRow],
    eos_token_ids: Collection[int],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen ids [num_rows], the logits their log-probabilities are taken from)."""
    if _needs_adjustment(rows):
        logits = logits.clone()
        for i, row in enumerate(rows):
            _apply_logit_bias(logits[i], row)
            _apply_penalties(logits[i], row)
            _mask_early_stop(logits[i], row, eos_token_ids)
    greedy = [row.params.is_greedy for row in rows]
    if all(greedy):
        return logits.argmax(dim=-1), logits
    temps = torch.tensor(
        [1.0 if g else row.params.temperature for g, row in zip(greedy, rows)],
        dtype=logits.dtype,
        device=logits.device,
    )
    scaled = logits / temps[:, None]
    probs = _filtered_probs(scaled, rows)
    drawn = (probs / _exponential_noise(probs, rows, generator)).argmax(dim=-1)
    is_greedy = torch.tensor(greedy, device=logits.device)
    return torch.where(is_greedy, logits.argmax(dim=-1), drawn), scaled


def _needs_adjustment(rows: Sequence[SampleRow]) -> bool:
    return any(
        row.params.has_penalties or row.params.logit_bias
        or len(row.output_ids) < row.params.min_new_tokens
        for row in rows
    )


def _apply_logit_bias(logits: torch.Tensor, row: SampleRow) -> None:
    bias = row.params.logit_bias
    if not bias:
        return
    # Keys are token ids as strings (OpenAI's JSON shape), validated at the API.
    ids = torch.tensor([int(k) for k in bias], dtype=torch.int64, device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    logits.index_add_(0, ids, values)


def _apply_penalties(logits: torch.Tensor, row: SampleRow) -> None:
    params = row.params
    if not params.has_penalties:
        return
    vocab = logits.shape[-1]
    device = logits.device
    if params.repetition_penalty != 1.0:
        seen = torch.tensor([*row.prompt_ids, *row.output_ids], dtype=torch.int64, device=device)
        if seen.numel():
            vals = logits[seen]
            p = params.repetition_penalty
            penalized = torch.where(vals > 0, vals / p, vals * p)
            if torch.isfinite(penalized).all():
                logits[seen] = penalized
            else:  # so tiny a penalty that a logit overflows: its limit, all the mass on
                # the seen tokens of the largest positive logit (every gap is infinite),
                # kept finite (10,000 above the rest: exp underflows to exactly 0) so a
                # later mask or temperature leaves a distribution
                top = seen[vals == vals.max()]
                logits[top] = logits.max() + 1e4
    if row.output_ids and (params.frequency_penalty or params.presence_penalty):
        out = torch.tensor(list(row.output_ids), dtype=torch.int64, device=device)
        counts = torch.bincount(out, minlength=vocab).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)


def _mask_early_stop(
    logits: torch.Tensor, row: SampleRow, eos_token_ids: Collection[int]
) -> None:
    params = row.params
    if len(row.output_ids) >= params.min_new_tokens:
        return
    banned = set(params.stop_token_ids or ())
    if not params.ignore_eos:
        banned.update(eos_token_ids)
    banned_ids = sorted(t for t in banned if 0 <= t < logits.shape[-1])
    if banned_ids:
        logits[banned_ids] = float("-inf")


def _filtered_probs(scaled: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    probs = torch.softmax(scaled, dim=-1)
    vocab = probs.shape[-1]
    top_ks = [row.params.top_k if row.params.has_top_k else vocab for row in rows]
    # top_p == 1 must keep everything even when float cumsums overshoot 1.0.
    top_ps = [row.params.top_p if row.params.top_p < 1.0 else float("inf") for row in rows]
    min_ps = [row.params.min_p for row in rows]
    no_top_p = all(p == float("inf") for p in top_ps)
    if all(k >= vocab for k in top_ks) and no_top_p and not any(min_ps):
        return probs
    device = probs.device
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    drop = ranks >= torch.tensor(top_ks, device=device)[:, None]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    # Keep a token while the mass before it is below top_p: the top token always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = mass_before >= torch.tensor(top_ps, dtype=probs.dtype, device=device)[:, None]
    # min_p is relative to the most likely token, so renormalising does not change it.
    min_keep = torch.tensor(min_ps, dtype=probs.dtype, device=device)[:, None] * sorted_probs[:, :1]
    drop |= sorted_probs < min_keep
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _exponential_noise(
    probs: torch.Tensor, rows: Sequence[SampleRow], generator: torch.Generator | None
) -> torch.Tensor:
    noise = torch.empty_like(probs)
    unseeded = [i for i, row in enumerate(rows) if row.params.sampling_seed is None]
    if unseeded:
        shared = torch.empty((len(unseeded), probs.shape[-1]), dtype=probs.dtype,
                             device=probs.device)
        noise[unseeded] = shared.exponential_(generator=generator)
    for i, row in enumerate(rows):
        seed = row.params.sampling_seed
        if seed is not None:
            g = torch.Generator(device=probs.device)
            g.manual_seed(step_seed(seed, len(row.output_ids)))
            noise[i].exponential_(generator=g)
    # A zero draw would turn p/E into inf (or nan for p == 0).
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _logprobs(logits: torch.Tensor, chosen: torch.Tensor) -> list[float]:
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
