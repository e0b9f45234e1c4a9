"""Token-slot accounting for the KV pool, in plain Python (no torch).

The KV pool stores one entry per token ("slot"); a page size of 1. Per-token slots
waste nothing to fragmentation and keep this allocator trivial, and the attention code
gathers by slot index anyway. Scheduling code asks `can_alloc(n)` / `num_free` from
this object without touching torch.

Contract: `alloc(n)` either returns exactly n distinct free slots or raises
`KVPoolFullError` and changes nothing; callers that do not want an exception ask
`can_alloc(n)` first. `free(slots)` returns slots; freeing a slot that is not in use
raises `ValueError` (a double free would let two requests share KV silently).
"""

from __future__ import annotations

from collections.abc import Iterable


class KVPoolFullError(Exception):
    """Not enough free KV slots for an allocation."""

    def __init__(self, num_requested: int, num_free: int) -> None:
        super().__init__(f"KV pool full: requested {num_requested} slots, {num_free} free")
        self.num_requested = num_requested
        self.num_free = num_free


class KVSlotAllocator:
    def __init__(self, max_total_num_tokens: int) -> None:
        if max_total_num_tokens <= 0:
            raise ValueError(f"max_total_num_tokens must be positive, got {max_total_num_tokens}")
        self.max_total_num_tokens = max_total_num_tokens
        # A stack: the end of the list is handed out first, so a fresh pool gives 0, 1, 2...
        self._free = list(range(max_total_num_tokens - 1, -1, -1))
        self._in_use = bytearray(max_total_num_tokens)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.max_total_num_tokens - len(self._free)

    def can_alloc(self, num_tokens: int) -> bool:
        return num_tokens <= len(self._free)

    def alloc(self, num_tokens: int) -> list[int]:
        if num_tokens < 0:
            raise ValueError(f"cannot allocate {num_tokens} slots")
        if num_tokens > len(self._free):
            raise KVPoolFullError(num_tokens, len(self._free))
        if num_tokens == 0:
            return []
        slots = self._free[-num_tokens:]
        del self._free[-num_tokens:]
        slots.reverse()
        in_use = self._in_use
        for slot in slots:
            in_use[slot] = 1
        return slots

    def free(self, slots: Iterable[int]) -> None:
        slots = list(slots)
        in_use = self._in_use
        for i, slot in enumerate(slots):
            if not (0 <= slot < self.max_total_num_tokens) or not in_use[slot]:
                # Undo the part already returned so the accounting stays consistent.
                for done in slots[:i]:
                    in_use[done] = 1
                del self._free[len(self._free) - i :]
                raise ValueError(f"KV slot {slot} is not in use (double free or foreign slot)")
            in_use[slot] = 0
            self._free.append(slot)
