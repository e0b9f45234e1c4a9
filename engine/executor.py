"""ModelExecutor: the real (torch) executor behind `scheduler.executor.Executor`.

A thin adapter: the scheduler's `ForwardItem`s (a request, the tokens whose KV this
pass computes, where they start) become `ForwardReq`s for `ModelRunner`. The slots of
a request are `req.slots`, reserved by the scheduler through `self.kv` (the pool's
plain-Python allocator); position i of the request lives in `req.slots[i]`.

Built once per scheduler process, in that process: it resolves the device, sets one
torch thread on CPU, loads the model and allocates the KV pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.config import ModelConfig, load_model_config
from engine.device import configure_worker_threads, resolve_device, resolve_dtype
from engine.kv_slots import KVSlotAllocator
from engine.kv_transfer import create_kv_segment
from engine.runner import ForwardReq, ModelRunner
from engine.tokenizer import Tokenizer, optional_tokenizer
from scheduler.executor import Executor
from shm.kv_segment import KVSegment

# KV pool size for a config without one: the launcher always sets it (server.placement
# sizes it from memory and checks that it fits); configs built by hand (tests, benches,
# sim profiles) get this many full contexts, bounded by a fixed budget.
DEFAULT_POOL_CONTEXTS = 16
DEFAULT_POOL_BYTES = 512 * 2**20


class ModelExecutor(Executor):
    def __init__(self, runner: ModelRunner, context_len: int, tokenizer: Tokenizer | None,
                 kv_segment: KVSegment | None = None) -> None:
        self.runner = runner
        self.context_len = context_len
        self.vocab_size = runner.model_config.vocab_size
        self.eos_token_ids = runner.eos_token_ids
        self.device = str(runner.device)
        self.kv: KVSlotAllocator = runner.kv_pool.allocator
        self.tokenizer = tokenizer
        # PD: a prefill rank's pool lives in this shared segment (owned, unlinked by
        # close()); a decode rank copies peers' KV in through the importer.
        self.kv_segment = kv_segment
        self._importer = None

    @classmethod
    def from_config(cls, cfg: Any,
                    new_kv_segment: Callable[[int, int], KVSegment] | None = None
                    ) -> ModelExecutor:
        """`cfg`: a `scheduler.config.SchedulerConfig` (model_path, device,
        max_total_tokens, context_length, random_seed). `new_kv_segment(capacity,
        token_bytes)`, when given, creates the shared segment the KV pool lives in
        (a PD prefill rank's, so decode ranks can map it)."""
        device = resolve_device(cfg.device)
        configure_worker_threads(device)
        config = load_model_config(cfg.model_path)
        context_len = min(cfg.context_length or config.context_len, config.context_len)
        dtype = None if cfg.dtype == "auto" else cfg.dtype
        dtype_bytes = resolve_dtype(device, config.dtype, dtype).itemsize
        max_total_tokens = cfg.max_total_tokens or default_max_total_tokens(
            config, context_len, dtype_bytes
        )
        kv_segment = None
        if new_kv_segment is not None:
            kv_segment = create_kv_segment(new_kv_segment, config, max_total_tokens,
                                           resolve_dtype(device, config.dtype, dtype), device)
        try:
            runner = ModelRunner.from_model_path(
                cfg.model_path, device, max_total_tokens, dtype=dtype, random_seed=cfg.random_seed,
                kv_buffer=kv_segment.kv_buf if kv_segment is not None else None,
            )
        except BaseException:
            if kv_segment is not None:
                kv_segment.close()
            raise
        return cls(runner, context_len, optional_tokenizer(cfg.model_path), kv_segment)

    @property
    def max_total_num_tokens(self) -> int:
        return self.kv.max_total_num_tokens

    def memory_bytes(self) -> tuple[int, int]:
        """(weights, KV pool) in bytes."""
        weights = sum(p.numel() * p.element_size() for p in self.runner.model.parameters())
        kv = self.runner.kv_pool.kv_buffer
        return weights, kv.numel() * kv.element_size()

    def forward(self, items: list) -> list[tuple[int, float]]:
        """(token id, logprob) per item with `sample` set, in order. The logprob is 0.0
        unless the request asked for logprobs; then the rest of what it asked (prompt
        logprobs, top lists) is appended to the request's lists here
        (`scheduler.request.Req`)."""
        reqs = [self._forward_req(item) for item in items]
        out = self.runner.forward(reqs)
        for item, top, values, tops in zip(items, out.top_logprobs, out.input_logprobs,
                                           out.input_top_logprobs):
            _record_logprobs(item, top, values, tops)
        return [
            (token, logprob if logprob is not None else 0.0)
            for token, logprob in zip(out.next_token_ids, out.logprobs)
            if token is not None
        ]

    @staticmethod
    def _forward_req(item) -> ForwardReq:
        req = item.req
        row_start, targets = req.prompt_logprob_rows(item.start_pos, len(item.token_ids))
        return ForwardReq(
            input_ids=item.token_ids,
            cached_slots=req.slots[: item.start_pos],
            new_slots=req.slots[item.start_pos : item.start_pos + len(item.token_ids)],
            is_sampling=item.sample,
            sampling_params=req.params,
            prompt_ids=req.input_ids,
            output_ids=req.output_ids,
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
            logprob_row_start=row_start,
            logprob_targets=targets,
        )

    def import_kv(self, peer, src_slots, dst_slots: list[int]) -> None:
        """Copy a peer pool's ``src_slots`` into this pool's ``dst_slots`` (PD decode;
        a cached prefix from a peer, ``copy_prefix``)."""
        if self._importer is None:
            from engine.kv_transfer import KVImporter
            self._importer = KVImporter(self.runner.model_config, self.runner.kv_pool.kv_buffer)
        self._importer.import_kv(peer, src_slots, dst_slots)

    def forget_peer(self, peer) -> None:
        if self._importer is not None:
            self._importer.forget(peer)


def _record_logprobs(item, top, values, tops) -> None:
    req = item.req
    if not req.return_logprob:
        return
    if item.start_pos == 0 and req.logprob_start_len == 0 and not req.recompute_len:
        req.input_token_logprobs.append(None)  # the first prompt token has no logprob
        req.input_top_logprobs.append(None)
    if values is not None:
        req.input_token_logprobs.extend(values)
        req.input_top_logprobs.extend(tops)
    if item.sample:
        req.output_top_logprobs.append(top)


def default_max_total_tokens(config: ModelConfig, context_len: int, dtype_bytes: int = 4) -> int:
    by_memory = DEFAULT_POOL_BYTES // config.kv_bytes_per_token(dtype_bytes)
    return max(context_len, min(DEFAULT_POOL_CONTEXTS * context_len, by_memory))
