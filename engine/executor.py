"""ModelExecutor: the real (torch) executor behind `scheduler.executor.Executor`.

A thin adapter: the scheduler's `ForwardItem`s (a request, the tokens whose KV this
pass computes, where they start) become `ForwardReq`s for `ModelRunner`. The slots of
a request are `req.slots`, reserved by the scheduler through `self.kv` (the pool's
plain-Python allocator); position i of the request lives in `req.slots[i]`.

Built once per scheduler process, in that process: it resolves the device, sets one
torch thread on CPU, loads the model and allocates the KV pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import ModelConfig, load_model_config
from engine.device import configure_worker_threads, resolve_device, resolve_dtype
from engine.kv_slots import KVSlotAllocator
from engine.runner import ForwardReq, ModelRunner
from engine.tokenizer import Tokenizer

# KV pool size when --max-total-tokens is not given: enough for this many full-context
# requests, bounded by a memory budget so several CPU ranks fit on a small machine.
DEFAULT_POOL_CONTEXTS = 16
DEFAULT_POOL_BYTES = 512 * 2**20


class ModelExecutor:
    def __init__(self, runner: ModelRunner, context_len: int, tokenizer: Tokenizer | None) -> None:
        self.runner = runner
        self.context_len = context_len
        self.vocab_size = runner.model_config.vocab_size
        self.eos_token_ids = runner.eos_token_ids
        self.device = str(runner.device)
        self.kv: KVSlotAllocator = runner.kv_pool.allocator
        self.tokenizer = tokenizer
        # PD: a prefill rank's pool lives in this shared segment (owned, unlinked by
        # close()); a decode rank copies peers' KV in through the importer.
        self.kv_segment = None
        self._importer = None

    @classmethod
    def from_config(cls, cfg: Any) -> ModelExecutor:
        """`cfg`: a `scheduler.config.SchedulerConfig` (model_path, device,
        max_total_tokens, context_length, random_seed)."""
        device = resolve_device(cfg.device)
        configure_worker_threads(device)
        config = load_model_config(cfg.model_path)
        context_len = min(cfg.context_length or config.context_len, config.context_len)
        dtype = None if cfg.dtype == "auto" else cfg.dtype
        dtype_bytes = resolve_dtype(device, config.dtype, dtype).itemsize
        max_total_tokens = cfg.max_total_tokens or default_max_total_tokens(
            config, context_len, dtype_bytes
        )
        kv_segment = _pd_kv_segment(cfg, config, max_total_tokens, device, dtype)
        try:
            runner = ModelRunner.from_model_path(
                cfg.model_path, device, max_total_tokens, dtype=dtype, random_seed=cfg.random_seed,
                kv_buffer=kv_segment.kv_buf if kv_segment is not None else None,
            )
        except BaseException:
            if kv_segment is not None:
                kv_segment.close()
            raise
        executor = cls(runner, context_len, _optional_tokenizer(cfg.model_path))
        executor.kv_segment = kv_segment
        return executor

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
        unless the request asked for logprobs."""
        reqs = [
            ForwardReq(
                input_ids=item.token_ids,
                cached_slots=item.req.slots[: item.start_pos],
                new_slots=item.req.slots[item.start_pos : item.start_pos + len(item.token_ids)],
                is_sampling=item.sample,
                sampling_params=item.req.params,
                prompt_ids=item.req.input_ids,
                output_ids=item.req.output_ids,
                return_logprob=item.req.return_logprob,
            )
            for item in items
        ]
        out = self.runner.forward(reqs)
        return [
            (token, logprob if logprob is not None else 0.0)
            for token, logprob in zip(out.next_token_ids, out.logprobs)
            if token is not None
        ]


    def import_kv(self, peer, src_slots, dst_slots: list[int]) -> None:
        """PD decode: copy a peer pool's ``src_slots`` into this pool's ``dst_slots``."""
        if self._importer is None:
            from engine.kv_transfer import KVImporter
            self._importer = KVImporter(self.runner.model_config, self.runner.kv_pool.kv_buffer)
        self._importer.import_kv(peer, src_slots, dst_slots)

    def close(self) -> None:
        """Unlink the shared KV segment, if any (the mapping lives until exit)."""
        if self.kv_segment is not None:
            self.kv_segment.close()


def _pd_kv_segment(cfg: Any, config: ModelConfig, capacity: int, device: str,
                   dtype: str | None = None):
    """A PD prefill rank's pool goes in shared memory, so decode ranks can map it."""
    if getattr(cfg, "pd", None) is None or cfg.role != "prefill":
        return None
    from engine.kv_transfer import create_kv_segment
    from scheduler.pd import kv_segment_kind
    from shm.segment import segment_name
    name = segment_name(kv_segment_kind(cfg.dp_rank), cfg.pd.launch_id)
    return create_kv_segment(name, config, capacity, resolve_dtype(device, config.dtype, dtype),
                             device)


def _optional_tokenizer(model_path: str) -> Tokenizer | None:
    # Only stop strings need text on the scheduler side; a checkpoint without a
    # tokenizer.json can still serve input_ids requests.
    if model_path == "tiny" or Path(model_path, "tokenizer.json").is_file():
        return Tokenizer.load(model_path)
    return None


def default_max_total_tokens(config: ModelConfig, context_len: int, dtype_bytes: int = 4) -> int:
    by_memory = DEFAULT_POOL_BYTES // config.kv_bytes_per_token(dtype_bytes)
    return max(context_len, min(DEFAULT_POOL_CONTEXTS * context_len, by_memory))
