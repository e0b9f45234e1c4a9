"""The prefix cache (scheduler.radix_cache) against a plain-Python model of it.

The model keeps every cached prefix as a tuple mapped to the slot of its last token
(a prefix-closed dict), the prefixes requests lock, and a clock per cached position. A
hypothesis state machine drives the cache the way the scheduler does (admit: match,
lock, allocate the rest, evicting if needed; finish: insert what was computed, free
duplicates, unlock), plus direct evictions and flushes, and checks after every step:
matched lengths and slots, locked and evictable sizes, and that every slot is exactly
one of free, cached, or a request's own, never two.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.kv_slots import KVSlotAllocator
from scheduler.radix_cache import RadixCache

POOL = 48
tokens_st = st.lists(st.integers(1, 3), min_size=1, max_size=12)


class Recorder:
    """The observer: every evicted run, for the machine to check and apply."""

    def __init__(self):
        self.evicted: list[tuple[tuple, int]] = []
        self.cached: list[tuple[tuple, int]] = []
        self.flushed = 0

    def on_cached(self, tokens, start):
        self.cached.append((tuple(tokens), start))

    def on_evicted(self, tokens, start):
        self.evicted.append((tuple(tokens), start))

    def on_flush(self):
        self.flushed += 1


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.alloc = KVSlotAllocator(POOL)
        self.events = Recorder()
        self.cache = RadixCache(self.alloc, self.events)
        self.model: dict[tuple, int] = {}  # cached prefix -> slot of its last token
        self.touched: dict[tuple, int] = {}  # cached prefix -> clock of its last use
        self.clock = 0
        self.reqs: dict[int, dict] = {}
        self.next_id = 0

    # ---- model helpers ---------------------------------------------------------------
    def model_match(self, tokens) -> int:
        k = 0
        while k < len(tokens) and tuple(tokens[:k + 1]) in self.model:
            k += 1
        return k

    def locked_prefixes(self) -> set[tuple]:
        return {tuple(r["tokens"][:i]) for r in self.reqs.values()
                for i in range(1, r["prefix_len"] + 1)}

    def touch(self, tokens, n):
        self.clock += 1
        for i in range(1, n + 1):
            self.touched[tuple(tokens[:i])] = self.clock

    def evictable_leaves(self) -> list[tuple]:
        locked = self.locked_prefixes()
        return [p for p in self.model if p not in locked
                and not any(q[:len(p)] == p and len(q) > len(p) for q in self.model)]

    def apply_evictions(self):
        """Check what the cache evicted was evictable, least recently used first, and
        remove it from the model."""
        runs, self.events.evicted = self.events.evicted, []
        if not runs:
            return
        locked = self.locked_prefixes()
        newest = 0
        for path, start in runs:
            for i in range(start + 1, len(path) + 1):
                p = path[:i]
                assert p in self.model and p not in locked, p
            newest = max(newest, self.touched[path])
            for i in range(start + 1, len(path) + 1):
                del self.model[path[:i]]
                del self.touched[path[:i]]
        # Prefix-closed still, and nothing left was used less recently than what went.
        assert all(p[:-1] in self.model or len(p) == 1 for p in self.model)
        assert all(self.touched[p] >= newest for p in self.evictable_leaves())

    # ---- rules ---------------------------------------------------------------------
    @rule(tokens=tokens_st, extra=st.integers(0, 6))
    def admit(self, tokens, extra):
        expect = self.model_match(tokens)
        slots, node = self.cache.match_prefix(tokens)
        assert len(slots) == expect
        assert slots == [self.model[tuple(tokens[:i + 1])] for i in range(expect)]
        self.touch(tokens, expect)
        self.cache.lock(node)
        own = len(tokens) + extra - len(slots)
        rid = self.next_id
        self.next_id += 1
        self.reqs[rid] = {"tokens": tokens, "prefix_len": len(slots), "node": node, "slots": slots}
        if not self.alloc.can_alloc(own):
            self.cache.evict(own - self.alloc.num_free)
            self.apply_evictions()
        if not self.alloc.can_alloc(own):
            self.cache.unlock(node)
            del self.reqs[rid]
            return
        self.reqs[rid]["slots"] = slots + self.alloc.alloc(own)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        r = self.reqs.pop(rid)
        tokens, prefix_len, slots = r["tokens"], r["prefix_len"], r["slots"]
        n = data.draw(st.integers(prefix_len, len(tokens)))  # computed before it ended
        expect = self.model_match(tokens[:n])
        had = self.cache.insert(tokens[:n], slots[:n])
        assert had == expect >= prefix_len
        for i in range(had, n):
            self.model[tuple(tokens[:i + 1])] = slots[i]
        self.touch(tokens, n)
        self.alloc.free(slots[prefix_len:had] + slots[n:])
        self.cache.unlock(r["node"])

    @rule(n=st.integers(1, POOL))
    def evict(self, n):
        evictable = self.cache.evictable_size
        freed = self.cache.evict(n)
        assert freed >= min(n, evictable)
        self.apply_evictions()

    @rule()
    def flush(self):
        ok = self.cache.flush()
        assert ok == (not self.reqs or all(r["prefix_len"] == 0 for r in self.reqs.values()))
        if ok:
            self.model.clear()
            self.touched.clear()

    # ---- invariants ----------------------------------------------------------------
    @invariant()
    def sizes_agree(self):
        locked = self.locked_prefixes()
        assert self.cache.protected_size == len(locked)
        assert self.cache.evictable_size == len(self.model) - len(locked)

    @invariant()
    def every_slot_has_one_owner(self):
        cached = self.cache.cached_slots()
        assert sorted(cached) == sorted(self.model.values())
        own = [s for r in self.reqs.values() for s in r["slots"][r["prefix_len"]:]]
        free = self.alloc._free
        everything = cached + own + free
        assert len(everything) == len(set(everything)) == POOL
        assert all(self.alloc._in_use[s] for s in cached + own)


CacheMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40,
                                          deadline=None)
TestRadixCache = CacheMachine.TestCase


def test_split_keeps_locks_and_a_prefix_of_another_prompt_matches_whole():
    alloc = KVSlotAllocator(32)
    cache = RadixCache(alloc)
    slots = alloc.alloc(6)
    assert cache.insert([1, 2, 3, 4, 5, 6], slots) == 0
    got, node = cache.match_prefix([1, 2, 3])  # the whole of a shorter prompt
    assert got == slots[:3]
    cache.lock(node)
    assert (cache.protected_size, cache.evictable_size) == (3, 3)
    assert cache.evict(10) == 3  # only the unlocked tail goes
    assert cache.match_prefix([1, 2, 3, 4])[0] == slots[:3]
    assert not cache.flush()
    cache.unlock(node)
    assert cache.flush() and alloc.num_used == 0


def test_a_copy_a_peer_still_holds_is_evicted_before_older_own_prefixes():
    """Copies first: KV copied from a peer (``copy_key``), and what was cached below it,
    goes before this rank's own entries, however recent, while the peer holds the copy's
    prefix; once the peer lets it go, or another request here reuses it, plain LRU."""
    peers_hold = {"sys-b"}
    alloc = KVSlotAllocator(64)
    cache = RadixCache(alloc, held_elsewhere=peers_hold.__contains__)
    own = [1] * 8
    cache.insert(own, alloc.alloc(8))  # the oldest entry: plain LRU would take it first
    copied = [2] * 8
    cache.insert(copied, alloc.alloc(8), copy_key="sys-b")
    cache.insert(copied + [3, 3], cache.match_prefix(copied)[0] + alloc.alloc(2))  # its question
    assert cache.evict(1) == 2 and cache.cached_len(copied + [3, 3]) == 8  # question first
    assert cache.evict(1) == 8 and cache.cached_len(copied) == 0  # then the copy
    assert cache.cached_len(own) == 8

    # A copy whose prefix the peer let go is as precious as any: LRU again.
    cache.insert(copied, alloc.alloc(8), copy_key="sys-c")
    assert cache.evict(1) == 8 and cache.cached_len(own) == 0
    assert cache.cached_len(copied) == 8

    # Reused by another admission here: this rank's own from then on.
    cache.insert(own, alloc.alloc(8))
    cache.insert([4] * 8, alloc.alloc(8), copy_key="sys-b")
    cache.match_prefix([4] * 8, reuse=True)
    cache.match_prefix(own)  # own is now more recent than the reused copy
    assert cache.evict(1) == 8 and cache.cached_len(copied) == 0  # the oldest: [2] * 8
    assert cache.evict(1) == 8 and cache.cached_len([4] * 8) == 0  # then the reused copy
    assert cache.cached_len(own) == 8


def test_without_a_peer_check_copies_are_evicted_as_any_entry():
    alloc = KVSlotAllocator(32)
    cache = RadixCache(alloc)
    cache.insert([1] * 4, alloc.alloc(4))
    cache.insert([2] * 4, alloc.alloc(4), copy_key="k")
    assert cache.evict(1) == 4 and cache.cached_len([1] * 4) == 0
