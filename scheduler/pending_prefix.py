"""Prompts a dispatcher just sent that no rank caches yet: where their prefill is going.

The prefix-cache summaries (``shm.prefix_summary``) say what each rank *holds*. Between
the moment a new prompt is sent to a rank and the moment that rank has prefilled it
and cached it, the summaries know nothing of it, so a second prompt sharing its
beginning that arrives meanwhile looks like a miss everywhere and would compute the
same prefix again elsewhere. On SGLang's shared-prefix shape (16 questions per system
prompt, 0.75 s prefills) that was about 5% of the requests, and smg's tree, which
remembers what it routed, kept that reuse.

``PendingPrefixes`` is the dispatcher's short memory of its own recent misses: for
``PENDING_S`` seconds after a prompt whose first block no rank caches goes to rank r,
a prompt beginning with the same 64 tokens is taken to find at rank r the whole blocks
it shares with that prompt (compared by their chained block keys, as the summaries are),
and ``cache_aware`` weighs that as it weighs a cached prefix. Once the prefix is cached the
summaries answer and this memory is not consulted. It is per dispatcher (several API
processes each remember their own) and bounded (``PENDING_MAX`` prompts,
``PENDING_MAX_TOKENS`` tokens; the oldest go first), and a prompt is let go once its
``PENDING_S`` are over (at the next one noted), whether or not another asked for it.
Wrong guesses cost one routing decision: the rank's own cache compares tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.prefix_hash import BLOCK_LEN, chain_hashes, first_hash
from shm.prefix_summary import STRIDE

PENDING_S = 10.0
PENDING_MAX = 4096
PENDING_MAX_TOKENS = 1 << 20  # about 36 MB at most held (the prompts, with their ints)


class PendingPrefixes:
    def __init__(self, ttl_s: float = PENDING_S):
        self.ttl_ns = int(ttl_s * 1e9)
        # first block's hash -> (rank, expiry in monotonic ns, the prompt, the chained
        # hashes of its blocks computed so far, from the first): oldest first
        self._by_first: dict[int, tuple[int, int, Sequence[int], list[int]]] = {}
        self._num_tokens = 0

    def __len__(self) -> int:
        return len(self._by_first)

    def clear(self) -> None:
        """Forget every pending prompt."""
        self._by_first.clear()
        self._num_tokens = 0

    def forget_ranks(self, ranks: set[int]) -> None:
        """Forget the prompts sent to ``ranks`` (their caches were emptied)."""
        for first in [f for f, entry in self._by_first.items() if entry[0] in ranks]:
            self._num_tokens -= len(self._by_first.pop(first)[2])

    def note(self, tokens: Sequence[int], rank: int, now_ns: int,
             first: int | None = None) -> None:
        """``tokens`` (a prompt no rank caches) was sent to ``rank`` at ``now_ns``."""
        if self.ttl_ns <= 0 or len(tokens) < BLOCK_LEN:
            return
        first = first_hash(tokens) if first is None else first
        old = self._by_first.pop(first, None)
        if old is not None:
            self._num_tokens -= len(old[2])
        self._by_first[first] = (rank, now_ns + self.ttl_ns, tokens, [first])
        self._num_tokens += len(tokens)
        # Oldest first, one TTL: the expired ones are at the front. Dropped here, or a
        # prompt nobody sends again would be held until the caps push it out.
        while self._by_first and (len(self._by_first) > PENDING_MAX
                                  or self._num_tokens > PENDING_MAX_TOKENS
                                  or self._oldest_expiry() < now_ns):
            _, (_, _, dropped, _) = self._pop_oldest()
            self._num_tokens -= len(dropped)

    def cached_tokens(self, tokens: Sequence[int], num_ranks: int, now_ns: int,
                      first: int | None = None) -> list[int] | None:
        """Per rank, the leading whole blocks of ``tokens`` a pending prompt shares with
        it (at the rank it went to), or None when no unexpired one begins like it."""
        if not self._by_first or len(tokens) < BLOCK_LEN:
            return None
        first = first_hash(tokens) if first is None else first
        entry = self._by_first.get(first)
        if entry is None:
            return None
        rank, expiry, sent, hashes = entry
        if now_ns > expiry or rank >= num_ranks:
            del self._by_first[first]
            self._num_tokens -= len(sent)
            return None
        # The shared whole blocks, by their chained keys (the summaries' keys): this
        # prompt's are hashed STRIDE blocks at a time while they equal the sent prompt's,
        # which are hashed once for every prompt that shares them. (Comparing the tokens
        # instead costs about 10 ns a token against 7: ints that are other objects.)
        if type(sent) is not tuple:
            sent = tuple(sent)
            self._by_first[first] = (rank, expiry, sent, hashes)
        limit = min(len(tokens), len(sent)) // BLOCK_LEN
        query = tokens if type(tokens) is tuple else tuple(tokens)
        mine = [first]
        while len(mine) < limit:
            n = min(len(mine) + STRIDE, limit)
            chain_hashes(query, n, mine)
            if len(hashes) < n:
                chain_hashes(sent, n, hashes)
            if mine[n - 1] != hashes[n - 1]:
                break
        shared = len(mine)
        while mine[shared - 1] != hashes[shared - 1]:  # chained: equal up to a point
            shared -= 1
        cached = [0] * num_ranks
        cached[rank] = shared * BLOCK_LEN
        return cached

    def prefix_key(self, first: int, num_blocks: int) -> int:
        """The chained hash (``scheduler.prefix_hash``) of the first ``num_blocks`` blocks
        of the pending prompt beginning with block hash ``first``, which ``cached_tokens``
        just found shared: the key the summaries will give that prefix once it is cached.
        Each pending prompt's blocks are hashed once, however many requests share them."""
        _, _, sent, hashes = self._by_first[first]
        if len(hashes) < num_blocks:
            chain_hashes(tuple(sent), num_blocks, hashes)
        return hashes[num_blocks - 1]

    def _oldest_expiry(self) -> int:
        return next(iter(self._by_first.values()))[1]

    def _pop_oldest(self) -> tuple[int, tuple[int, int, Sequence[int], list[int]]]:
        key = next(iter(self._by_first))
        return key, self._by_first.pop(key)

