"""KV between ranks of one node: a pool in shared memory, a peer's pool as a tensor, the copy.

CPU path (implemented): a PD prefill rank places its ``KVPool`` inside a
``shm.kv_segment.KVSegment`` it creates; a decode rank maps the segment and builds a
zero-copy tensor over the peer's pool bytes (``torch.frombuffer``), then gathers the
request's slots out of it and scatters them into its own pool: one ``index_select``
+ ``index_copy_`` over the token dimension for all layers at once.

CUDA seam (not implemented): a GPU pool cannot live in POSIX shared memory. The
prefill rank would export its pool's device allocation with CUDA IPC
(``torch.multiprocessing.reductions.reduce_tensor`` / ``cudaIpcGetMemHandle``),
publish the handle in its ``KVSegment`` header next to the arena (which stays in host
shared memory: the slot lists are read by the scheduler), and ``peer_pool_view`` would
open the handle instead of calling ``torch.frombuffer``. ``copy_kv`` is device-agnostic
already (for peers on one GPU, or P2P between GPUs). ``create_kv_segment`` refuses
non-CPU devices so the gap fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engine.config import ModelConfig
from shm.kv_segment import KVSegment


class KVTransferError(RuntimeError):
    """A peer's KV pool cannot be used (other model, other dtype, not mapped)."""


def pool_shape(config: ModelConfig, capacity: int) -> tuple[int, ...]:
    """``KVPool``'s layout: [layers, capacity, 2, kv_heads, head_dim]."""
    return (config.num_hidden_layers, capacity, 2, config.num_key_value_heads, config.head_dim)


def create_kv_segment(new_segment: Callable[[int, int], KVSegment], config: ModelConfig,
                      capacity: int, dtype: torch.dtype, device: str) -> KVSegment:
    """The segment a PD prefill rank builds its pool over (``KVPool(buffer=seg.kv_buf)``),
    made by ``new_segment(capacity, token_bytes)`` (the scheduler side names it)."""
    if torch.device(device).type != "cpu":
        raise KVTransferError(
            f"PD KV hand-off on {device} needs CUDA IPC, which this build does not implement; "
            "run PD ranks with --device cpu")
    return new_segment(capacity, config.kv_bytes_per_token(dtype.itemsize))


def peer_pool_view(peer: KVSegment, config: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
    """A zero-copy tensor over a peer's pool. Keep ``peer`` mapped while it is used:
    the tensor does not pin the mapping (see ``KVSegment.close``)."""
    if peer.token_bytes != config.kv_bytes_per_token(dtype.itemsize):
        raise KVTransferError(
            f"{peer.name}: {peer.token_bytes} KV bytes per token, this rank's model needs "
            f"{config.kv_bytes_per_token(dtype.itemsize)}; prefill and decode must serve the "
            "same model with the same dtype")
    shape = pool_shape(config, peer.capacity)
    return torch.frombuffer(peer.kv_buf, dtype=dtype, count=int(np.prod(shape))).view(shape)


def copy_kv(src_pool: torch.Tensor, src_slots: np.ndarray, dst_pool: torch.Tensor,
            dst_slots: list[int]) -> None:
    """``dst_pool[:, dst_slots[i]] = src_pool[:, src_slots[i]]`` for every i, all layers."""
    if len(src_slots) != len(dst_slots):
        raise ValueError(f"copying {len(src_slots)} slots into {len(dst_slots)}")
    if not len(dst_slots):
        return
    src_idx = torch.from_numpy(np.ascontiguousarray(src_slots, dtype=np.int64))
    dst_idx = torch.tensor(dst_slots, dtype=torch.int64, device=dst_pool.device)
    rows = src_pool.index_select(1, src_idx.to(src_pool.device))
    dst_pool.index_copy_(1, dst_idx, rows.to(dst_pool.device))


class KVImporter:
    """A decode rank's reader of peers' pools: one cached view per peer segment."""

    def __init__(self, config: ModelConfig, dst_pool: torch.Tensor):
        self.config = config
        self.dst_pool = dst_pool
        self._views: dict[tuple[str, int], torch.Tensor] = {}

    def import_kv(self, peer: KVSegment, src_slots: np.ndarray, dst_slots: list[int]) -> None:
        key = (peer.name, id(peer))
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = peer_pool_view(peer, self.config, self.dst_pool.dtype)
        copy_kv(view, src_slots, self.dst_pool, dst_slots)

    def forget(self, peer: KVSegment) -> None:
        """Drop the view over ``peer``'s pool: the segment is about to be unmapped."""
        self._views.pop((peer.name, id(peer)), None)
