"""What the scheduler needs from whatever runs the forward pass.

Two implementations: ``engine.executor.ModelExecutor`` (the torch model) and the
simulated accelerator (a cost model, for balancing benchmarks at scale). The scheduler
sees only this interface, so it never imports torch.
"""

from __future__ import annotations

from typing import Protocol

from engine.kv_slots import KVSlotAllocator
from scheduler.batching import ForwardItem


class Executor(Protocol):
    context_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    device: str
    # Slot accounting of this rank's KV pool (plain Python); the scheduler allocates
    # and frees through it, the executor writes KV into the slots it is given.
    kv: KVSlotAllocator

    @property
    def max_total_num_tokens(self) -> int: ...

    # Optional (read with getattr, default False): True while the executor needs a
    # forward pass even with an empty batch; the simulated executor sets it while its
    # lockstep peers wait for this rank (scheduler.lockstep). The rank loop then does
    # not block waiting for requests, and the scheduler runs the empty batch.
    # wants_idle_steps: bool
    # Optional (getattr, default False): True when this rank's every step lasts as long
    # as its peers' (DP attention with expert parallelism; the simulated executor with
    # --sim-lockstep). The scheduler then publishes its load before each forward too,
    # as it will stand when that forward ends (scheduler.scheduler).
    # steps_in_lockstep: bool

    # PD (scheduler.pd), optional: ``kv_segment`` (a prefill rank's shared pool and
    # hand-off arena, None elsewhere), ``import_kv(peer_segment, src_slots, dst_slots)``
    # (a decode rank copies a prefill peer's KV into its own slots) and ``close()``
    # (unlinks the segment at exit).

    def memory_bytes(self) -> tuple[int, int]:
        """(weights, KV pool) in bytes on the device: /server_info's memory_usage."""
        ...

    def forward(self, items: list[ForwardItem]) -> list[tuple[int, float]]:
        """Run one pass. Returns (token id, logprob) for each item with ``sample`` set,
        in order. KV for every item's ``token_ids`` is written to
        ``item.req.slots[item.start_pos : item.start_pos + len(item.token_ids)]``."""
        ...


def make_executor(cfg) -> Executor:
    """Build the executor named by ``cfg.executor`` ("real" or "sim")."""
    if cfg.executor == "real":
        from engine.executor import ModelExecutor
        return ModelExecutor.from_config(cfg)
    if cfg.executor == "sim":
        from scheduler.sim_executor import SimExecutor
        return SimExecutor.from_config(cfg)
    raise ValueError(f"unknown executor {cfg.executor!r}: expected 'real' or 'sim'")
