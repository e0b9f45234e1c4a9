"""Load-balancing methods: pure functions from effective loads to a DP rank.

Every method takes plain data read from the load board by the dispatcher (lists of
effective requests/tokens per rank, a tuple of alive flags) plus a ``RotationState``
it owns, and returns a rank. Nothing here touches processes, shared memory or torch,
so each method is tested directly on lists (``tests/test_policy.py``).

Contracts shared by every method:
- a dead rank (``alive[r]`` false) is never returned; with no live rank at all,
  ``NoLiveRankError``;
- ties rotate: the search for the least-loaded rank starts just after the rank picked
  last, so equal ranks take turns instead of the first one receiving every request
  that arrives while the loads are equal (requests that finish before the next one
  arrives leave all loads equal again, which without rotation sends everything to
  rank 0).

Error classes and the HTTP status the API gives them: ``InvalidDpRankError`` and
``MissingBootstrapRoomError`` 400 (the request is wrong), ``RankUnavailableError``
and its subclass ``NoLiveRankError`` 503 (the server cannot serve it right now).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Sequence

from scheduler.roles import RANK_ROLES, Role

# Stand-in load of a dead rank when masking: larger than any int64 board value.
_DEAD_LOAD = float("inf")


class InvalidLoadBalanceMethod(ValueError):
    """``--load-balance-method`` names no method."""


class InvalidRoleError(ValueError):
    """A role other than mixed, prefill or decode."""


class InvalidDpRankError(ValueError):
    """``routed_dp_rank`` is not a rank of this server (API: 400)."""


class MissingBootstrapRoomError(ValueError):
    """``follow_bootstrap_room`` needs the request's ``bootstrap_room`` (API: 400)."""


class RankUnavailableError(RuntimeError):
    """The rank a request must go to is dead, draining or not ready yet (API: 503)."""


class NoLiveRankError(RankUnavailableError):
    """No rank is alive: nothing can be dispatched (API: 503)."""


class LoadBalanceMethod(StrEnum):
    """SGLang's ``--load-balance-method`` values (new names; old ones are aliases)."""

    AUTO = "auto"
    ROUND_ROBIN = "round_robin"
    FOLLOW_BOOTSTRAP_ROOM = "follow_bootstrap_room"
    TOTAL_REQUESTS = "total_requests"
    TOTAL_TOKENS = "total_tokens"
    # Not an SGLang method: fewest prompt tokens waiting for prefill, then total_tokens.
    PREFILL_TOKENS = "prefill_tokens"
    # The gateway's name (smg ``--policy cache_aware``): the rank with the earliest first
    # token given what each rank caches of the prompt (``cache_aware``).
    CACHE_AWARE = "cache_aware"


DEPRECATED_METHOD_ALIASES = MappingProxyType({
    "shortest_queue": LoadBalanceMethod.TOTAL_REQUESTS,
    "minimum_tokens": LoadBalanceMethod.TOTAL_TOKENS,
})

# What ``auto`` becomes per role without a prefix cache. Prefill cost grows with prompt
# tokens, so prefill balances tokens; decode is bound by batch slots and latency while KV
# suffices, so it balances requests (SGLang's guideline). Mixed ranks balance the prompt
# tokens waiting for prefill, then tokens: it had the lowest mean TTFT in the simulated
# mixed runs of ``python -m bench.compare --scenarios mixed`` (figures, and how sure they
# are, in ``docs/results.md``, "Plain DP ranks").
AUTO_METHOD_BY_ROLE = MappingProxyType({
    Role.PREFILL: LoadBalanceMethod.TOTAL_TOKENS,
    Role.DECODE: LoadBalanceMethod.TOTAL_REQUESTS,
    Role.MIXED: LoadBalanceMethod.PREFILL_TOKENS,
})
# Where the ranks keep a prefix cache (the default), ``auto`` is ``cache_aware`` on mixed
# and prefill ranks: for a prompt no rank caches it picks exactly as ``prefill_tokens``
# (on prefill ranks level with ``total_tokens``: no-reuse 981 ms both), and where prompts
# share prefixes it had the lower TTFT and the higher throughput on both roles
# (``python -m bench.compare.cache``, ``--pd``; ``docs/results.md``, "Prefix caches").
AUTO_METHOD_WITH_PREFIX_CACHE = MappingProxyType({
    **AUTO_METHOD_BY_ROLE,
    Role.MIXED: LoadBalanceMethod.CACHE_AWARE,
    Role.PREFILL: LoadBalanceMethod.CACHE_AWARE,
})


def resolve_method(name: str | LoadBalanceMethod, role: Role | str,
                   has_prefix_cache: bool = True) -> LoadBalanceMethod:
    """The concrete method for ``name`` on a server of ``role``; called once at start-up.

    ``auto`` resolves by role and by whether the ranks keep a prefix cache; deprecated
    aliases resolve with a ``DeprecationWarning``.
    ``cache_aware`` needs ranks that keep a prefix cache: not decode ranks (they receive
    each prompt's KV), not with ``has_prefix_cache`` false (``--disable-radix-cache``).
    """
    if role not in RANK_ROLES:
        raise InvalidRoleError(f"role must be one of {', '.join(RANK_ROLES)}; got {role!r}")
    key = name.value if isinstance(name, LoadBalanceMethod) else str(name).strip().lower()
    if key in DEPRECATED_METHOD_ALIASES:
        new = DEPRECATED_METHOD_ALIASES[key]
        warnings.warn(f"load balance method {key!r} is deprecated; use {new.value!r}",
                      DeprecationWarning, stacklevel=2)
        return new
    try:
        method = LoadBalanceMethod(key)
    except ValueError:
        valid = [m.value for m in LoadBalanceMethod]  # current names only, not the aliases
        raise InvalidLoadBalanceMethod(
            f"unknown load balance method {name!r}; valid: {', '.join(valid)}") from None
    if method is LoadBalanceMethod.CACHE_AWARE and (role == Role.DECODE or not has_prefix_cache):
        why = ("decode ranks keep no prefix cache (they receive each prompt's KV from "
               "prefill)" if role == Role.DECODE else "the prefix cache is off "
               "(--disable-radix-cache)")
        raise InvalidLoadBalanceMethod(
            f"cache_aware weighs what each rank's prefix cache holds, but {why}; choose "
            "another method")
    if method is LoadBalanceMethod.AUTO:
        by_role = AUTO_METHOD_WITH_PREFIX_CACHE if has_prefix_cache else AUTO_METHOD_BY_ROLE
        return by_role[role]
    return method


@dataclass
class RotationState:
    """Where the next search starts: the rank after the one a method picked last.

    One per dispatcher, mutated only by the method functions below.
    """

    next_start: int = 0


# ---- methods ---------------------------------------------------------------------------
def round_robin(alive: Sequence[bool], state: RotationState) -> int:
    """The next live rank in turn, starting at ``state.next_start``.

    Dead ranks are skipped without losing the turn order of the others: between two
    picks of a rank, every other rank alive throughout is picked exactly once.
    """
    n = len(alive)
    start = state.next_start
    if start >= n:
        start = 0
    if not alive[start]:
        start = _next_alive(alive, start)
    state.next_start = start + 1 if start + 1 < n else 0
    return start


def follow_bootstrap_room(bootstrap_room: int | None, alive: Sequence[bool]) -> int:
    """``bootstrap_room % n``: SGLang's old PD placement, kept for comparison.

    A dead target is ``RankUnavailableError``, not a reroute: this method's contract
    is that the rank is a function of the room alone (a gateway or a peer may compute
    it too), so sending elsewhere would silently break it.
    """
    if bootstrap_room is None:
        raise MissingBootstrapRoomError(
            "load balance method follow_bootstrap_room needs bootstrap_room in the request; "
            "send requests through the router, or choose another --load-balance-method")
    rank = bootstrap_room % len(alive)
    if not alive[rank]:
        raise RankUnavailableError(f"rank {rank} (bootstrap_room % {len(alive)}) is not alive")
    return rank


def total_requests(eff_reqs: list[int], alive: Sequence[bool], state: RotationState) -> int:
    """A live rank with the fewest effective requests; ties rotate."""
    rank = _rotated_argmin(_masked(eff_reqs, alive), state.next_start)
    state.next_start = rank + 1
    return rank


def total_tokens(eff_tokens: list[int], eff_reqs: list[int], alive: Sequence[bool],
                 state: RotationState) -> int:
    """A live rank with the fewest effective tokens, then fewest requests; ties rotate."""
    least = _least_or_tied(_masked(eff_tokens, alive))
    if type(least) is int:
        rank = least
    else:
        rank = _rotated_argmin(_masked(eff_reqs, least), state.next_start)
    state.next_start = rank + 1
    return rank


def prefill_tokens(eff_prefill: list[int], eff_tokens: list[int], eff_reqs: list[int],
                   alive: Sequence[bool], state: RotationState) -> int:
    """A live rank with the fewest prompt tokens waiting for prefill (queued, mid-prefill
    or in flight to it), then ``total_tokens`` among those; ties rotate.

    A new request's first token waits behind the prompts its rank has yet to prefill;
    ``total_tokens`` on a mixed rank is mostly decoding KV, so it sends a burst of
    arrivals to the rank with the least KV, where they prefill one after another.
    """
    least = _least_or_tied(_masked(eff_prefill, alive))
    if type(least) is int:
        state.next_start = least + 1
        return least
    return total_tokens(eff_tokens, eff_reqs, least, state)


# The guard: a rank carrying more than RATIO times the mean live rank's requests (and
# more than SLACK above it) gets no preference for what it caches, so the request goes
# where its first token comes soonest among the other ranks (which then cache its
# prefix too). How tight depends on the prefix (``scheduler.prefix_traffic``):
# - a hot one, carrying more than half a rank's share of the recent requests, is worth
#   a copy on every rank its traffic needs: it leaves a rank as soon as that rank is
#   above the mean (no slack). Looser, the ranks holding it sat above the others while
#   the rest never took it (hot-prefix max/mean of the requests each rank took, over
#   the same prompts: at 1.25x the mean 1.05-1.36 with 4 ranks; at 1.25-1.5x and 1-2
#   above it 1.28-1.41 with 16; above the mean, 1.02-1.16 and 1.06-1.13);
# - any other only once a rank's queue runs away (2x, and 4 above the mean). Spilling
#   those on the chance differences between ranks recomputed whole prefixes elsewhere:
#   SGLang's shared-prefix shape (16 questions per group, 4 ranks) with the 1.5x guard
#   for every prefix reused 0.84 of the prompt tokens (0.88 possible) at a mean TTFT of
#   211 ms; with this one, 0.87 and 175 ms.
HOT_GUARD_RATIO = 1.0
HOT_GUARD_SLACK = 0
GUARD_RATIO = 2.0
GUARD_SLACK = 4
# What an uncached prompt token costs in the prediction, against a token of prefill
# already queued: this request's first token waits for it, and so do the requests that
# queue behind its prefill; and every spill computes the whole prefix again elsewhere.
# Measured (simulated shared-prefix, 4 ranks, docs/results.md "Prefix caches", with the
# guard then at 1.5x for every prefix): weight 1 spilled at the first miss queued (hit
# rate 0.46 of a possible 0.70); weight 2 with a 1.25 guard kept 0.33 when the ranks were
# full (5.41 req/s); weight 8 kept 0.57 (7.08 req/s, smg's tree 7.05), with hot-prefix
# max/mean 1.08. Past 8 the guard alone decides.
MISS_WEIGHT = 8
# With --enable-cross-rank-prefix-cache a rank copies what a peer caches of the prompt
# (scheduler.prefix_share): a rank short of the deepest cache by d tokens counts as
# caching all but d / SHARED_DISCOUNT of them, d * MISS_WEIGHT / SHARED_DISCOUNT = d
# prefill tokens: a request leaves a holder for a copy only when the holder has about
# the copied length more prefill queued (another prompt's miss ahead of it). The copy
# itself costs little (2,048 tokens of the simulated 235B profile: 16 ms, about 50
# prefill tokens), but it duplicates the prefix in a second cache. Measured (simulated
# shared-prefix, 4 ranks, docs/results.md): 64 and 8 gave the same mean TTFT (303 and
# 302 ms over five repeats at one rate); saturated 7.67 with 64, 7.87 and 7.41 with 8
# (single runs: not told apart).
SHARED_DISCOUNT = MISS_WEIGHT


def cache_aware(cached_tokens: list[int] | None, eff_prefill: list[int], eff_tokens: list[int],
                eff_reqs: list[int], alive: Sequence[bool], state: RotationState,
                hot: bool = False, shared: bool = False) -> int:
    """The live rank where the request's first token comes soonest, weighing what each
    rank caches of its prompt against the prefill queued there; ties to ``total_tokens``.

    ``cached_tokens[r]``: how many leading prompt tokens rank r caches (the prefix-cache
    summaries), or None when no rank caches any. The predicted cost on rank r is the
    prefill queued ahead (``eff_prefill[r]``, prompts dispatched, queued or mid-prefill)
    plus the prompt's uncached tokens (``num_tokens - cached_tokens[r]``) weighted by
    ``MISS_WEIGHT``, in prefill tokens; ``num_tokens`` is common to every rank, so the
    rank with the least ``eff_prefill[r] - MISS_WEIGHT * cached_tokens[r]`` wins.

    Guard: a rank whose effective requests exceed ``GUARD_RATIO`` times the live mean
    (and ``GUARD_SLACK`` above it) is not a candidate; with ``hot`` (the prefix the
    request reuses carries a large share of the traffic, ``scheduler.prefix_traffic``)
    ``HOT_GUARD_RATIO`` and ``HOT_GUARD_SLACK`` instead. The rank with the fewest
    requests is always one, so something is picked whenever a rank is alive. Without it a
    prefix that half the traffic shares would pile onto the ranks that cache it, whose
    decode batches then grow without bound while its prefills stay cheap.

    With no cache anywhere (None, or zeros) the prediction is the prefill queued alone,
    so this is ``prefill_tokens`` exactly (the least prefill queued, ties to
    ``total_tokens``): nothing to gain from a cache, and no hot prefix to spill. Where the
    prefill queues are equal that is ``total_tokens``. (Falling back to ``total_tokens``
    instead doubled the mean TTFT of uncached prompts on mixed ranks: ``docs/results.md``,
    "Prefix caches".)

    ``shared``: the ranks copy each other's cached prefixes: a rank short of the deepest
    one by d tokens counts as caching all but ``d // SHARED_DISCOUNT`` of them.
    """
    if cached_tokens is None or not any(cached_tokens):
        return prefill_tokens(eff_prefill, eff_tokens, eff_reqs, alive, state)
    if shared:
        most = max(cached_tokens)
        cached_tokens = [most - (most - c) // SHARED_DISCOUNT for c in cached_tokens]
    reqs = _masked(eff_reqs, alive)
    live = [x for x in reqs if x != _DEAD_LOAD]
    if not live:
        raise NoLiveRankError("no rank is alive")
    mean = sum(live) / len(live)
    limit = (max(mean * HOT_GUARD_RATIO, mean + HOT_GUARD_SLACK) if hot
             else max(mean * GUARD_RATIO, mean + GUARD_SLACK))
    ttft = [p - MISS_WEIGHT * c if q <= limit else _DEAD_LOAD
            for p, c, q in zip(eff_prefill, cached_tokens, reqs)]
    least = _least_or_tied(ttft)
    if type(least) is int:
        state.next_start = least + 1
        return least
    return total_tokens(eff_tokens, eff_reqs, least, state)


def routed_rank(routed_dp_rank: object, alive: Sequence[bool]) -> int:
    """Validate a rank the request names (``routed_dp_rank``/``data_parallel_rank``)."""
    n = len(alive)
    if type(routed_dp_rank) is not int or not 0 <= routed_dp_rank < n:
        raise InvalidDpRankError(f"routed_dp_rank must be an integer in [0, {n}); "
                                 f"got {routed_dp_rank!r}")
    if not alive[routed_dp_rank]:
        raise RankUnavailableError(f"routed_dp_rank {routed_dp_rank} is not alive")
    return routed_dp_rank


# ---- helpers ---------------------------------------------------------------------------
def _masked(loads: list[int], alive: Sequence[bool]) -> list:
    """``loads`` with dead ranks raised to ``_DEAD_LOAD`` (no copy when all are alive)."""
    if False not in alive:  # C-level scan; all() is a Python-level iteration here
        return loads
    return [x if a else _DEAD_LOAD for x, a in zip(loads, alive)]


def _least_or_tied(loads: list) -> int | list[bool]:
    """The index of the one least load, or, when several ranks share it, a mask of them."""
    least = min(loads)
    if least == _DEAD_LOAD:
        raise NoLiveRankError("no rank is alive")
    if loads.count(least) == 1:
        return loads.index(least)
    return [x == least for x in loads]


def _rotated_argmin(loads: list, start: int) -> int:
    """First index of the minimum at or after ``start``, wrapping around.

    ``list.index(value, start)`` does the rotated scan at C speed.
    """
    least = min(loads)
    if least == _DEAD_LOAD:
        raise NoLiveRankError("no rank is alive")
    try:
        return loads.index(least, start)
    except ValueError:
        return loads.index(least)


def _next_alive(alive: Sequence[bool], start: int) -> int:
    for rank in range(start + 1, len(alive)):
        if alive[rank]:
            return rank
    for rank in range(start):
        if alive[rank]:
            return rank
    raise NoLiveRankError("no rank is alive")
