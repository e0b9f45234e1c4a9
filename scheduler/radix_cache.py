"""One rank's prefix cache: a radix tree over token ids whose nodes own KV slots.

The KV pool has a page size of 1 (``engine.kv_slots``), so a cached token is one slot
and the tree can share any prefix, to the token. Each node holds a run of tokens
(``key``) and the slots holding their KV (``slots``, one per token, in order); the path
from the root to a node spells a cached prefix. Children are keyed by their first token.

    root ── [sys prompt 0..2047] ─┬─ [question A + answer A]
                                  └─ [question B ...]

A running request that reuses a prefix *locks* the node where its match ends: every
node on the path then has ``lock_ref > 0`` and is never evicted. Unlocked nodes are
*evictable*: when the pool needs room, unlocked leaves go back to the allocator least
recently used first (a leaf's parent becomes a leaf in turn), except that KV copied from
a peer that still holds it goes before anything else (below). Three sizes, in tokens:
``protected_size`` (in locked nodes: KV some request reads), ``evictable_size`` (the
rest) and ``total_size``. The board counts protected tokens as load and evictable ones
not (``scheduler.scheduler``).

The owner contract (``scheduler.scheduler`` is the only caller):
- ``match_prefix(tokens)`` -> the slots of the longest cached prefix and the node it
  ends at (a node is split so that it ends exactly there); lock that node before
  anything can evict.
- ``insert(tokens, slots)`` after each prefill chunk (the prompt so far; the request
  then matches it, moves its lock there and reads the tree's slots) and when a request
  ends: the tree adopts the slots of the part it did not hold; it returns how many
  leading tokens it held already, and the caller frees its own slots for those
  (duplicates another request computed meanwhile), except the ones it had matched
  (they are the tree's).
- A slot is owned either by the tree or by a request, never both, and never free while
  either owns it.

Copies first (``--enable-cross-rank-prefix-cache``, ``scheduler.prefix_share``): a
prefix whose KV was copied from a peer is inserted with a ``copy_key`` (the peer's
summary key of its deepest copied block). Until another request reuses it here, it and
everything cached below it is *cheap*: if ``held_elsewhere(copy_key)`` says a peer still
holds the prefix, losing it costs one more copy, not a prefill, so evictions take cheap
leaves first (least recently used among them), then the rest. A copy made for one request
and never reused is a duplicate of what the peer keeps; left to plain LRU it would push
out this rank's own prefixes when the pools are full (measured: docs/results.md). Once an
admission reuses the copy (``match_prefix(..., reuse=True)``) it is this rank's own.

An observer (``CacheObserver``) hears every addition and removal with the whole token
path, so a summary of what is cached can be kept elsewhere (the board's prefix
summaries). Plain Python: no torch, no shared memory.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Protocol

from engine.kv_slots import KVSlotAllocator


class CacheObserver(Protocol):
    # When true, ``on_cached`` also gets the KV slots of the whole path (``slots=``).
    wants_slots: bool

    def on_cached(self, tokens: Sequence[int], start: int) -> None:
        """``tokens[start:]`` were just added; ``tokens`` is the whole path from the root
        (``tokens[:start]`` were cached before)."""

    def on_evicted(self, tokens: Sequence[int], start: int) -> None:
        """``tokens[start:]`` were just removed; ``tokens`` is the whole path from the
        root (``tokens[:start]`` stay cached)."""

    def on_flush(self) -> None:
        """Everything was removed."""


class _Node:
    __slots__ = ("children", "parent", "key", "slots", "lock_ref", "last_access", "copy_key")

    def __init__(self, key: list[int], slots: list[int], parent: _Node | None) -> None:
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.key = key
        self.slots = slots
        self.lock_ref = 0
        self.last_access = 0
        self.copy_key = None  # copied from a peer and not reused since (module docstring)


class RadixCache:
    def __init__(self, allocator: KVSlotAllocator, observer: CacheObserver | None = None,
                 held_elsewhere: Callable[[object], bool] | None = None):
        """``held_elsewhere(copy_key)``: whether a peer still holds the prefix a copy was
        made from (``insert(..., copy_key=)``); without it copies are evicted as any entry."""
        self.allocator = allocator
        self.observer = observer
        self.held_elsewhere = held_elsewhere
        self._clock = 0
        self.root = _Node([], [], None)
        self.root.lock_ref = 1  # never evicted, never counted
        self._reset()

    def _reset(self) -> None:
        # The root stays the same object: a request that matched nothing holds it.
        self.root.children = {}
        self.evictable_size = 0
        self.protected_size = 0

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    # ---- lookups ---------------------------------------------------------------------
    def match_prefix(self, tokens: Sequence[int], reuse: bool = False) -> tuple[list[int], _Node]:
        """The slots of the longest cached prefix of ``tokens`` and the node it ends at
        (the root for no match). Touches the path (least recently used goes first).
        ``reuse``: a new request's admission: copies on the path become this rank's own."""
        node, _, slots = self._walk(tokens, reuse)
        return slots, node

    def cached_len(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` the tree holds, read only: nothing is
        split or touched (the scheduler's estimate of a queued request's hit)."""
        node, i, n = self.root, 0, len(tokens)
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                break
            common = _common_len(child.key, tokens, i)
            i += common
            if common < len(child.key):
                break
            node = child
        return i

    def lock(self, node: _Node) -> None:
        """Protect ``node`` and its ancestors from eviction (one lock per request)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: _Node) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise ValueError("unlocking a cache node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.protected_size -= len(node.key)
                self.evictable_size += len(node.key)
            node = node.parent

    # ---- changes ---------------------------------------------------------------------
    def insert(self, tokens: Sequence[int], slots: Sequence[int], copy_key: object = None) -> int:
        """Cache ``tokens`` with their KV in ``slots`` (one each). Returns how many
        leading tokens were cached already: the tree keeps its own slots for them and
        adopts ``slots`` from there on. ``copy_key``: the KV of the new part was copied
        from a peer (module docstring, "Copies first")."""
        if len(tokens) != len(slots):
            raise ValueError(f"{len(tokens)} tokens but {len(slots)} slots")
        node, i, held = self._walk(tokens)
        n = len(tokens)
        if i < n:
            leaf = _Node(list(tokens[i:]), list(slots[i:]), node)
            leaf.last_access = self._clock
            leaf.copy_key = copy_key
            node.children[tokens[i]] = leaf
            self.evictable_size += n - i
            if self.observer is not None:
                if getattr(self.observer, "wants_slots", False):
                    self.observer.on_cached(tokens, i, slots=held + leaf.slots)
                else:
                    self.observer.on_cached(tokens, i)
        return i

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots of unlocked entries, cheap copies first, then
        least recently used leaves, as far as there are such; returns how many were freed."""
        if num_tokens <= 0 or self.evictable_size == 0:
            return 0
        heap = [self._eviction_order(leaf) for leaf in self._evictable_leaves()]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            leaf = heapq.heappop(heap)[-1]
            freed += len(leaf.key)
            parent = leaf.parent
            self._remove_leaf(leaf)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, self._eviction_order(parent))
        return freed

    def _eviction_order(self, leaf: _Node) -> tuple:
        """Heap entry: cheap leaves (under a copy a peer still holds) before the rest,
        each least recently used first."""
        return (not self._cheap(leaf), leaf.last_access, id(leaf), leaf)

    def _cheap(self, leaf: _Node) -> bool:
        if self.held_elsewhere is None:
            return False
        node = leaf
        while node is not self.root:
            if node.copy_key is not None:  # the nearest copy above decides
                return self.held_elsewhere(node.copy_key)
            node = node.parent
        return False

    def flush(self) -> bool:
        """Drop every entry; refused (False) while any is locked."""
        if self.protected_size:
            return False
        slots = [s for node in self._nodes() for s in node.slots]
        if slots:
            self.allocator.free(slots)
        self._reset()
        if self.observer is not None:
            self.observer.on_flush()
        return True

    # ---- internals -------------------------------------------------------------------
    def _walk(self, tokens: Sequence[int], reuse: bool = False) -> tuple[_Node, int, list[int]]:
        """Follow ``tokens`` down the tree as far as it holds them, splitting the node
        where they part so that a node ends exactly there, and touching the path (and,
        with ``reuse``, making copies on it this rank's own).
        Returns (that node, how many tokens matched, their slots)."""
        node, slots, i, n = self.root, [], 0, len(tokens)
        self._clock += 1
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                break
            common = _common_len(child.key, tokens, i)
            if common < len(child.key):
                child = self._split(child, common)
            child.last_access = self._clock
            if reuse:
                child.copy_key = None
            slots += child.slots
            i += common
            node = child
        return node, i, slots

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut ``child`` after ``at`` tokens; returns the new upper part (same locks)."""
        upper = _Node(child.key[:at], child.slots[:at], child.parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.copy_key = child.copy_key  # a peer holding the deeper prefix holds this part
        upper.parent.children[upper.key[0]] = upper
        child.key = child.key[at:]
        child.slots = child.slots[at:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def _remove_leaf(self, leaf: _Node) -> None:
        path = self.path_tokens(leaf)
        self.allocator.free(leaf.slots)
        del leaf.parent.children[leaf.key[0]]
        self.evictable_size -= len(leaf.key)
        if self.observer is not None:
            self.observer.on_evicted(path, len(path) - len(leaf.key))

    def path_tokens(self, node: _Node) -> list[int]:
        """The tokens from the root to the end of ``node``."""
        parts = []
        while node is not self.root:
            parts.append(node.key)
            node = node.parent
        return [t for part in reversed(parts) for t in part]

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _evictable_leaves(self) -> list[_Node]:
        return [n for n in self._nodes() if not n.children and n.lock_ref == 0]

    def cached_slots(self) -> list[int]:
        """Every slot the tree owns (for checks and tests)."""
        return [s for node in self._nodes() for s in node.slots]


def _common_len(key: list[int], tokens: Sequence[int], start: int) -> int:
    """How many leading tokens of ``key`` equal ``tokens[start:]``."""
    n = min(len(key), len(tokens) - start)
    if key[:n] == list(tokens[start:start + n]):
        return n
    i = 0
    while i < n and key[i] == tokens[start + i]:
        i += 1
    return i
