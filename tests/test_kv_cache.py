"""KV slot accounting and the KV pool tensors."""

from __future__ import annotations

import mmap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import tiny_model_config
from engine.kv_cache import KVPool, KVPoolFullError
from engine.kv_slots import KVSlotAllocator


def test_alloc_and_free_return_to_full_capacity():
    pool = KVSlotAllocator(16)
    a, b = pool.alloc(5), pool.alloc(11)
    assert sorted(a + b) == list(range(16))
    assert (pool.num_free, pool.num_used) == (0, 16)
    pool.free(a)
    assert pool.can_alloc(5) and not pool.can_alloc(6)
    pool.free(b)
    assert (pool.num_free, pool.num_used) == (16, 0)


def test_full_pool_raises_and_changes_nothing():
    pool = KVSlotAllocator(8)
    pool.alloc(6)
    with pytest.raises(KVPoolFullError) as info:
        pool.alloc(3)
    assert (info.value.num_requested, info.value.num_free) == (3, 2)
    assert pool.num_free == 2
    assert pool.alloc(0) == []


def test_double_free_and_foreign_slots_are_refused():
    pool = KVSlotAllocator(8)
    slots = pool.alloc(4)
    pool.free(slots[:2])
    with pytest.raises(ValueError, match="not in use"):
        pool.free(slots)  # the first two are already free
    assert pool.num_used == 2  # the failed call undid its partial work
    with pytest.raises(ValueError, match="not in use"):
        pool.free([99])
    pool.free(slots[2:])
    assert pool.num_free == 8


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=60))
def test_random_alloc_free_keeps_slots_distinct(ops):
    pool = KVSlotAllocator(32)
    held: list[list[int]] = []
    for is_alloc, n in ops:
        if is_alloc:
            if pool.can_alloc(n):
                held.append(pool.alloc(n))
            else:
                with pytest.raises(KVPoolFullError):
                    pool.alloc(n)
        elif held:
            pool.free(held.pop(n % len(held)))
        in_use = [s for slots in held for s in slots]
        assert len(in_use) == len(set(in_use)) == pool.num_used
    for slots in held:
        pool.free(slots)
    assert pool.num_free == 32


def test_pool_tensors_and_write():
    config = tiny_model_config()
    pool = KVPool.for_model(config, 64)
    assert pool.k_buffer.shape == (config.num_hidden_layers, 64, config.num_key_value_heads, config.head_dim)
    assert pool.v_buffer.shape == pool.k_buffer.shape
    slots = pool.alloc(3)
    k = torch.randn(3, config.num_key_value_heads, config.head_dim)
    v = torch.randn(3, config.num_key_value_heads, config.head_dim)
    pool.write(1, torch.tensor(slots), k, v)
    assert torch.equal(pool.k_buffer[1, slots], k) and torch.equal(pool.v_buffer[1, slots], v)
    assert pool.k_buffer[0].abs().sum() == 0
    pool.free(slots)
    assert pool.num_free == pool.max_total_num_tokens == 64


def test_pool_over_an_external_buffer_is_zero_copy():
    config = tiny_model_config()
    size = KVPool.required_bytes(config, 16)
    with mmap.mmap(-1, size) as buffer:
        pool = KVPool.for_model(config, 16, buffer=buffer)
        peer = KVPool.for_model(config, 16, buffer=buffer)  # e.g. another rank's mapping
        slot = pool.alloc(1)
        k = torch.ones(1, config.num_key_value_heads, config.head_dim)
        pool.write(2, torch.tensor(slot), k, 2 * k)
        assert torch.equal(peer.v_buffer[2, slot], 2 * k)
        assert any(buffer[:])  # the bytes really are in the shared buffer
        del pool, peer  # views must go before the mapping closes
    with pytest.raises(ValueError, match="bytes"):
        KVPool.for_model(config, 16, buffer=bytearray(size - 1))
