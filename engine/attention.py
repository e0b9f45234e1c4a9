"""Attention over a flat batch of mixed work, reading k/v from the KV pool by slot.

The runner lays the flat batch out as: all decode requests first (one new token each),
then each extend request (a prefill chunk of one or more tokens) as a contiguous span.

- Decode requests are attended in ONE padded call: their k/v are gathered into
  [num_decode, max_kv_len] (padding masked out), and grouped-query heads are folded
  into the query-length axis ([B, kv_heads, queries_per_kv, head_dim]) so k/v are never
  repeated. This is what makes batch-32 decode cost a few big ops instead of 32 small
  ones per layer.
- Each extend request gets its own call: prefill chunks differ in length, and padding
  a 1-token decode to a 512-token chunk would waste far more than the per-call overhead.

Metadata (slot indices, masks, positions) is built once per forward and shared by all
layers. Plain torch ops only, so the same code runs on CPU and CUDA.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ExtendSpan:
    start: int  # first row of this request in the flat batch
    end: int
    kv_slots: torch.Tensor  # [kv_len] all slots: cached prefix then the new tokens
    mask: torch.Tensor | None  # [num_new, kv_len] bool; None means plain causal (no prefix)


@dataclass(frozen=True)
class AttentionMetadata:
    positions: torch.Tensor  # [num_tokens]
    new_slots: torch.Tensor  # [num_tokens] where each new token's k/v is written
    num_decode: int
    decode_kv_slots: torch.Tensor | None  # [num_decode, max_kv_len], padding -> slot 0
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_kv_len] bool, True = attend
    extends: tuple[ExtendSpan, ...]

    @classmethod
    def build(
        cls,
        decode_reqs: Sequence[tuple[Sequence[int], int]],
        extend_reqs: Sequence[tuple[Sequence[int], Sequence[int]]],
        device: torch.device,
    ) -> AttentionMetadata:
        """decode_reqs: per decode request, (cached slots, the new token's slot).
        extend_reqs: per extend request, (cached slots, the new tokens' slots)."""
        positions = array("q", [len(cached) for cached, _ in decode_reqs])
        new_slots = array("q", [slot for _, slot in decode_reqs])
        extends = []
        row = len(decode_reqs)
        for cached, new in extend_reqs:
            positions.extend(range(len(cached), len(cached) + len(new)))
            new_slots.extend(new)
            extends.append(_extend_span(row, cached, new, device))
            row += len(new)
        decode_kv, decode_mask = _padded_decode(decode_reqs, device)
        return cls(
            positions=_to_tensor(positions, device),
            new_slots=_to_tensor(new_slots, device),
            num_decode=len(decode_reqs),
            decode_kv_slots=decode_kv,
            decode_mask=decode_mask,
            extends=tuple(extends),
        )


def _extend_span(
    row: int, cached: Sequence[int], new: Sequence[int], device: torch.device
) -> ExtendSpan:
    num_cached, kv_len = len(cached), len(cached) + len(new)
    mask = None
    if num_cached:
        # Query i sits at position num_cached + i and may see keys at positions <= that.
        key_pos = torch.arange(kv_len, device=device)
        query_pos = torch.arange(num_cached, kv_len, device=device)
        mask = key_pos[None, :] <= query_pos[:, None]
    slots = array("q", cached)
    slots.extend(new)
    return ExtendSpan(start=row, end=row + len(new), kv_slots=_to_tensor(slots, device), mask=mask)


def _padded_decode(
    decode_reqs: Sequence[tuple[Sequence[int], int]], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not decode_reqs:
        return None, None
    flat = array("q")
    for cached, slot in decode_reqs:
        flat.extend(cached)
        flat.append(slot)
    lens = torch.tensor([len(cached) + 1 for cached, _ in decode_reqs], dtype=torch.int64)
    max_len = int(lens.max())
    valid = torch.arange(max_len)[None, :] < lens[:, None]
    index = torch.zeros((len(decode_reqs), max_len), dtype=torch.int64)
    index[valid] = _to_tensor(flat, torch.device("cpu"))  # row-major fill = concatenation order
    return index.to(device), valid[:, None, None, :].to(device)


def _to_tensor(values: array, device: torch.device) -> torch.Tensor:
    # Collecting slots in an array('q') and wrapping it is about 2x faster than
    # torch.tensor(list) for the tens of thousands of slots of a long-context batch.
    if not values:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.frombuffer(values, dtype=torch.int64).to(device)


def attend(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; kv_cache: one layer of the pool,
    [capacity, 2, num_kv_heads, head_dim], already holding this batch's new k/v.
    Returns [num_tokens, num_heads, head_dim]."""
    parts = []
    if meta.num_decode:
        parts.append(_attend_decode(q[: meta.num_decode], kv_cache, meta))
    for span in meta.extends:
        parts.append(_attend_extend(q[span.start : span.end], kv_cache, span))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _attend_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[2]
    # Query head h uses kv head h // queries_per_kv (HF repeat_kv order).
    q = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    kv = _gather(kv_cache, meta.decode_kv_slots)  # [B, max_len, 2, kv_heads, d]
    k = kv[:, :, 0].transpose(1, 2)  # [B, kv_heads, max_len, d]
    v = kv[:, :, 1].transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.decode_mask)
    return out.reshape(batch, num_heads, head_dim)


def _attend_extend(q: torch.Tensor, kv_cache: torch.Tensor, span: ExtendSpan) -> torch.Tensor:
    kv = _gather(kv_cache, span.kv_slots)  # [kv_len, 2, kv_heads, d]
    k = kv[:, 0].transpose(0, 1)  # [kv_heads, kv_len, head_dim]
    v = kv[:, 1].transpose(0, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k,
        v,
        attn_mask=span.mask,
        is_causal=span.mask is None,
        enable_gqa=True,
    )
    return out.transpose(0, 1)


def _gather(kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """kv_cache[slots] for slots of any shape. A row index_select is several times
    faster on CPU than advanced indexing."""
    capacity, *row_shape = kv_cache.shape
    rows = kv_cache.view(capacity, -1).index_select(0, slots.reshape(-1))
    return rows.view(*slots.shape, *row_shape)
