"""What the scheduler needs from whatever runs the forward pass.

Two subclasses: ``engine.executor.ModelExecutor`` (the torch model) and the
simulated accelerator (a cost model, for balancing benchmarks at scale). The scheduler
sees only this interface, so it never imports torch. ``scheduler.process.make_executor``
builds the one ``cfg.executor`` names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from engine.kv_slots import KVSlotAllocator
from scheduler.batching import ForwardItem

if TYPE_CHECKING:
    from shm.kv_segment import KVSegment


class Executor(ABC):
    """Subclasses set the four attributes below in ``__init__`` and implement the
    abstract members; the rest are optional, with defaults that do nothing."""

    context_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    device: str
    # Slot accounting of this rank's KV pool (plain Python); the scheduler allocates
    # and frees through it, the executor writes KV into the slots it is given.
    kv: KVSlotAllocator
    # Only stop strings need text on the scheduler side; None when there is none.
    tokenizer: Any = None
    # PD prefill (and a mixed rank whose peers copy its cached prefixes): the shared
    # segment holding this rank's pool and hand-off arena, made through the factory
    # ``scheduler.pd.kv_segment_factory`` gives the executor (which owns it and unlinks
    # it at ``close()``). None on every other rank.
    kv_segment: KVSegment | None = None
    # True when this rank's every step lasts as long as its peers' (DP attention with
    # expert parallelism; the simulated executor with --sim-lockstep). The scheduler
    # then publishes its load before each forward too, as it will stand when that
    # forward ends (scheduler.scheduler).
    steps_in_lockstep: bool = False

    @property
    def wants_idle_steps(self) -> bool:
        """Asked by the rank loop and each step: True while the executor needs a forward
        pass even with an empty batch (the simulated executor, while its lockstep peers
        wait for this rank: sim.lockstep). The loop then does not block waiting for
        requests, and the scheduler runs the empty batch."""
        return False

    @property
    @abstractmethod
    def max_total_num_tokens(self) -> int: ...

    @abstractmethod
    def memory_bytes(self) -> tuple[int, int]:
        """(weights, KV pool) in bytes on the device: /server_info's memory_usage."""

    @abstractmethod
    def forward(self, items: list[ForwardItem]) -> list[tuple[int, float]]:
        """Run one pass. Returns (token id, logprob) for each item with ``sample`` set,
        in order. KV for every item's ``token_ids`` is written to
        ``item.req.slots[item.start_pos : item.start_pos + len(item.token_ids)]``."""

    def import_kv(self, peer: KVSegment, src_slots, dst_slots: list[int]) -> None:
        """Called by a PD decode rank (``scheduler.pd_decode``) once it claimed a prefill
        peer's KV: copy the peer pool's ``src_slots`` into this pool's ``dst_slots``."""
        raise NotImplementedError(f"{type(self).__name__} cannot take KV from a peer")

    def forget_peer(self, peer: KVSegment) -> None:
        """Called before a peer's segment is unmapped (``shm.kv_segment.PeerSegments``: the
        peer restarted or its server did): drop anything that reads its pool."""

    def copy_prefix(self, peer: KVSegment, src_slots, dst_slots: list[int]) -> None:
        """Called by a rank that shares its peers' prefix caches (``scheduler.prefix_share``):
        copy a cached prefix's KV from a peer pool's ``src_slots`` into ``dst_slots``."""
        self.import_kv(peer, src_slots, dst_slots)

    def close(self) -> None:
        """Called once at rank exit (and when the scheduler cannot be built): release
        what outlives the process otherwise (the PD segment, lockstep membership)."""
        if self.kv_segment is not None:
            self.kv_segment.close()
