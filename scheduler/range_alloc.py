"""First-fit allocation of contiguous ranges in ``[0, size)``. Plain Python.

Used by a prefill rank for its hand-off arena (``shm.kv_segment``): each hand-off
needs one contiguous record of ``1 + kv_len`` cells. Free ranges are kept sorted by
start and coalesced on free, so a free is O(log n + moves) and an allocation scans
the free ranges first-fit (few ranges in practice: hand-offs are freed roughly in the
order they were made).

Contract: ``alloc(n)`` returns a start or None (nothing changed) when no free range
is long enough; ``free(start, n)`` must name exactly a range ``alloc`` returned.
"""

from __future__ import annotations

from bisect import bisect_left


class RangeAllocator:
    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"range allocator size must be positive, got {size}")
        self.size = size
        self._starts = [0]  # free ranges, sorted and never adjacent
        self._lens = [size]
        self.num_used = 0

    def alloc(self, n: int) -> int | None:
        if n < 1:
            raise ValueError(f"cannot allocate {n} cells")
        lens = self._lens
        for i, length in enumerate(lens):
            if length >= n:
                start = self._starts[i]
                if length == n:
                    del self._starts[i], lens[i]
                else:
                    self._starts[i] = start + n
                    lens[i] = length - n
                self.num_used += n
                return start
        return None

    def free(self, start: int, n: int) -> None:
        starts, lens = self._starts, self._lens
        i = bisect_left(starts, start)
        end = start + n
        if n < 1 or start < 0 or end > self.size or (i < len(starts) and starts[i] < end) \
                or (i > 0 and starts[i - 1] + lens[i - 1] > start):
            raise ValueError(f"range [{start}, {end}) is not allocated (double free?)")
        merge_prev = i > 0 and starts[i - 1] + lens[i - 1] == start
        merge_next = i < len(starts) and starts[i] == end
        if merge_prev and merge_next:
            lens[i - 1] += n + lens[i]
            del starts[i], lens[i]
        elif merge_prev:
            lens[i - 1] += n
        elif merge_next:
            starts[i] = start
            lens[i] += n
        else:
            starts.insert(i, start)
            lens.insert(i, n)
        self.num_used -= n

    @property
    def num_free_ranges(self) -> int:
        return len(self._starts)
