"""ModelRunner: one forward pass over a batch of plain data -> next token per request.

The scheduler owns requests, slots and policy; the runner owns tensors. A batch is a
list of `ForwardReq`: per request, the new token ids of this step (a prefill chunk, or
one token when decoding), the KV slots already filled for it (in position order), the
slots the scheduler allocated for the new tokens, and whether to sample after this
chunk (the last prefill chunk, or a decode step). The runner writes the new tokens'
k/v into those slots; it never allocates or frees slots.

Typical use in a scheduler process:

    device = resolve_device(args.device); configure_worker_threads(device)
    runner = ModelRunner.from_model_path("tiny", device, max_total_num_tokens=65536)
    out = runner.forward([ForwardReq(ids, cached, runner.kv_pool.alloc(len(ids)), ...)])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.attention import AttentionMetadata
from engine.config import ModelConfig, load_model_config
from engine.device import configure_worker_threads, resolve_device, resolve_dtype
from engine.kv_cache import KVPool
from engine.loader import load_model
from engine.logprobs import TopList, chosen_logprobs, prompt_logprobs
from engine.model import CausalLM
from engine.sampler import SampleRow, sample_tensors
from engine.sampling import SamplingParams

__all__ = [
    "ForwardOutput",
    "ForwardReq",
    "ModelRunner",
    "configure_worker_threads",
    "resolve_device",
]


@dataclass
class ForwardReq:
    input_ids: Sequence[int]  # new tokens this step
    cached_slots: Sequence[int]  # slots of the tokens before them, position order
    new_slots: Sequence[int]  # one slot per new token, allocated by the scheduler
    is_sampling: bool = True  # False for a prefill chunk that is not the prompt's last
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    prompt_ids: Sequence[int] = ()  # read only for repetition_penalty
    output_ids: Sequence[int] = ()  # generated so far: penalties, min_new_tokens, seed step
    return_logprob: bool = False
    top_logprobs_num: int = 0  # with return_logprob: the top k of each scored position
    # Prompt logprobs (engine.logprobs): rows [logprob_row_start, + len(targets)) of
    # this step's tokens are scored against the prompt tokens that follow them.
    logprob_row_start: int = 0
    logprob_targets: Sequence[int] = ()


@dataclass(frozen=True)
class ForwardOutput:
    # Aligned with the batch; None for requests that did not sample this step.
    next_token_ids: list[int | None]
    logprobs: list[float | None]
    # Aligned with the batch, None where not asked: the sampled token's top list, and
    # the prompt logprobs (with their top lists) of the request's logprob_targets.
    top_logprobs: list[TopList | None] = field(default_factory=list)
    input_logprobs: list[list[float] | None] = field(default_factory=list)
    input_top_logprobs: list[list[TopList] | None] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        device: str,
        kv_pool: KVPool,
        model: CausalLM,
        random_seed: int | None = None,
    ) -> None:
        self.model_config = model_config
        self.device = torch.device(device)
        self.kv_pool = kv_pool
        self.model = model
        self.eos_token_ids = frozenset(model_config.eos_token_ids)
        # Only for requests without sampling_seed; seeded ones never touch it.
        seed = random_seed if random_seed is not None else int.from_bytes(os.urandom(8)) >> 1
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @classmethod
    def from_model_path(
        cls,
        model_path: str,
        device: str,
        max_total_num_tokens: int,
        dtype: str | None = None,
        kv_buffer: object | None = None,
        random_seed: int | None = None,
    ) -> ModelRunner:
        """Load the model and allocate its KV pool (over `kv_buffer` if given)."""
        torch_dtype = resolve_dtype(device, load_model_config(model_path).dtype, dtype)
        config, model = load_model(model_path, device, torch_dtype)
        pool = KVPool.for_model(config, max_total_num_tokens, torch_dtype, device, kv_buffer)
        return cls(config, device, pool, model, random_seed)

    def forward(self, reqs: Sequence[ForwardReq]) -> ForwardOutput:
        if not reqs:
            return ForwardOutput([], [])
        _check_batch(reqs, self.model_config.max_position_embeddings)
        # Decode requests first: attention batches them in one padded call.
        order = sorted(range(len(reqs)), key=lambda i: len(reqs[i].input_ids) != 1)
        decode_reqs, extend_reqs, flat_ids, last_rows, first_rows = [], [], [], [], {}
        for i in order:
            req = reqs[i]
            if len(req.input_ids) == 1:
                decode_reqs.append((req.cached_slots, req.new_slots[0]))
            else:
                extend_reqs.append((req.cached_slots, req.new_slots))
            first_rows[i] = len(flat_ids)
            flat_ids.extend(req.input_ids)
            last_rows.append(len(flat_ids) - 1)
        meta = AttentionMetadata.build(decode_reqs, extend_reqs, self.device)
        input_ids = torch.tensor(flat_ids, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, meta, self.kv_pool)
        out = self._sample(reqs, order, last_rows, hidden)
        self._score_prompts(reqs, first_rows, hidden, out)
        return out

    def _score_prompts(self, reqs: Sequence[ForwardReq], first_rows: dict[int, int],
                       hidden: torch.Tensor, out: ForwardOutput) -> None:
        """Prompt logprobs of the requests that asked, from this pass's hidden states."""
        out.input_logprobs.extend([None] * len(reqs))
        out.input_top_logprobs.extend([None] * len(reqs))
        for i, req in enumerate(reqs):
            if not (req.return_logprob and req.logprob_targets):
                continue
            lo = first_rows[i] + req.logprob_row_start
            rows = hidden[lo:lo + len(req.logprob_targets)]
            values, tops = prompt_logprobs(self.model.compute_logits, rows,
                                           req.logprob_targets, req.top_logprobs_num)
            out.input_logprobs[i], out.input_top_logprobs[i] = values, tops

    def _sample(
        self,
        reqs: Sequence[ForwardReq],
        order: list[int],
        last_rows: list[int],
        hidden: torch.Tensor,
    ) -> ForwardOutput:
        sampled = [(i, row) for i, row in zip(order, last_rows) if reqs[i].is_sampling]
        next_ids: list[int | None] = [None] * len(reqs)
        logprobs: list[float | None] = [None] * len(reqs)
        tops: list[TopList | None] = [None] * len(reqs)
        if not sampled:
            return ForwardOutput(next_ids, logprobs, tops)
        rows = torch.tensor([row for _, row in sampled], dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        sample_rows = [
            SampleRow(reqs[i].sampling_params, reqs[i].prompt_ids, reqs[i].output_ids)
            for i, _ in sampled
        ]
        chosen, basis = sample_tensors(logits, sample_rows, self.eos_token_ids, self.generator)
        tokens = chosen.tolist()
        wanted = [k for k, (i, _) in enumerate(sampled) if reqs[i].return_logprob]
        if wanted:
            picked = torch.tensor(wanted, dtype=torch.int64, device=self.device)
            values, top_lists = chosen_logprobs(
                basis[picked], chosen[picked],
                [reqs[sampled[k][0]].top_logprobs_num for k in wanted])
            for k, value, top in zip(wanted, values, top_lists):
                logprobs[sampled[k][0]], tops[sampled[k][0]] = value, top
        for k, (i, _) in enumerate(sampled):
            next_ids[i] = tokens[k]
        return ForwardOutput(next_ids, logprobs, tops)


def _check_batch(reqs: Sequence[ForwardReq], max_positions: int) -> None:
    for req in reqs:
        if not req.input_ids or len(req.input_ids) != len(req.new_slots):
            raise ValueError(
                f"ForwardReq needs >= 1 new token and one slot per token, got "
                f"{len(req.input_ids)} tokens and {len(req.new_slots)} slots"
            )
        if len(req.cached_slots) + len(req.input_ids) > max_positions:
            raise ValueError(
                f"request length {len(req.cached_slots) + len(req.input_ids)} exceeds "
                f"max_position_embeddings={max_positions}"
            )
