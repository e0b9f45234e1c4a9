"""The dispatcher: read the load board, pick a rank, count the request on the board.

One ``Dispatcher`` per API process, each with its own dispatcher id (its own block of
``dispatched`` cells on the board). The API calls ``pick`` once per request, before
sending it to the chosen rank's scheduler, and puts ``dispatcher_id`` and the
``num_tokens`` it passed into the request message: the scheduler acks exactly that
when it starts counting the request (see ``shm.board`` for the accounting).

Several dispatchers balance as one: each reads every dispatcher's counters, so a
request another API process sent but no scheduler has reported yet is already in the
effective load. The only overlap left is a race between two dispatchers that read
before either bumps, which costs at most one request per other dispatcher.

Not thread-safe: one dispatcher belongs to one thread (the API's event loop).
"""

from __future__ import annotations

import time
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Sequence

from scheduler.policy import (InvalidDpRankError, InvalidLoadBalanceMethod, LoadBalanceMethod,
                              MissingBootstrapRoomError, NoLiveRankError, RankUnavailableError,
                              RotationState, cache_aware, follow_bootstrap_room, prefill_tokens,
                              round_robin, routed_rank, total_requests, total_tokens)
from scheduler.pending_prefix import PENDING_S, PendingPrefixes
from scheduler.prefix_hash import BLOCK_LEN, first_hash
from scheduler.prefix_traffic import PrefixTraffic

if TYPE_CHECKING:
    from shm.board import LoadBoard
    from shm.prefix_summary import PrefixSummary

__all__ = ["Dispatcher", "DEFAULT_STALE_NS", "CHOOSERS", "InvalidDpRankError",
           "MissingBootstrapRoomError", "NoLiveRankError", "RankUnavailableError"]

# A rank whose heartbeat is older than this is not picked. Schedulers refresh it every
# step and every 50 ms while idle; the bound must exceed the longest single forward
# pass (a long CPU prefill takes seconds), or a busy rank would look dead.
DEFAULT_STALE_NS = 10_000_000_000

# A chooser reads what its method needs (the board, the prompt's cached prefix per rank)
# and leaves the decision to its policy function.
Chooser = Callable[["Dispatcher", Sequence[bool], Sequence[int], "int | None"], int]


# ---- one chooser per method: it reads what its method needs, the policy decides -------
def _by_round_robin(d, alive, input_ids, bootstrap_room) -> int:
    return round_robin(alive, d.rotation)


def _by_bootstrap_room(d, alive, input_ids, bootstrap_room) -> int:
    return follow_bootstrap_room(bootstrap_room, alive)


def _by_total_requests(d, alive, input_ids, bootstrap_room) -> int:
    return total_requests(d.board.read_requests(), alive, d.rotation)  # the single-cell read


def _by_total_tokens(d, alive, input_ids, bootstrap_room) -> int:
    loads = d.board.read_loads()  # the seqlocked row read
    return total_tokens(loads.tokens, loads.reqs, alive, d.rotation)


def _by_prefill_tokens(d, alive, input_ids, bootstrap_room) -> int:
    loads = d.board.read_loads()  # the seqlocked row read
    return prefill_tokens(loads.prefill_tokens, loads.tokens, loads.reqs, alive, d.rotation)


def _by_cache_aware(d, alive, input_ids, bootstrap_room) -> int:
    # The first block's hash, once: both the summaries and the pending memory start there.
    first = first_hash(input_ids) if len(input_ids) >= BLOCK_LEN else None
    # The summaries before the loads, so that the loads are the fresher read.
    cached, hashes = d.summary.lookup(input_ids, first)
    # The prefix the request would reuse, by the key of its deepest cached block.
    key, new = None, False
    if cached is not None:
        depth = max(cached) // BLOCK_LEN
        key = hashes[depth - 1] if depth else None
    elif first is not None and d.pending.ttl_ns > 0:
        # No rank caches its first block: maybe a prompt sent just before is being
        # prefilled with the same beginning (scheduler.pending_prefix).
        now = time.monotonic_ns()
        cached = d.pending.cached_tokens(input_ids, d.num_ranks, now, first)
        new = cached is None
        if cached is not None:  # the key the summaries will have for that prefix
            key = d.pending.prefix_key(first, max(cached) // BLOCK_LEN)
    count = d.traffic.note(key)
    hot = key is not None and d.traffic.is_hot(count, alive.count(True))
    loads = d.board.read_loads()
    rank = cache_aware(cached, loads.prefill_tokens, loads.tokens, loads.reqs, alive, d.rotation,
                       hot, d.shared_prefixes)
    if new:
        d.pending.note(input_ids, rank, now, first)
    return rank


CHOOSERS: "MappingProxyType[LoadBalanceMethod, Chooser]" = MappingProxyType({
    LoadBalanceMethod.ROUND_ROBIN: _by_round_robin,
    LoadBalanceMethod.FOLLOW_BOOTSTRAP_ROOM: _by_bootstrap_room,
    LoadBalanceMethod.TOTAL_REQUESTS: _by_total_requests,
    LoadBalanceMethod.TOTAL_TOKENS: _by_total_tokens,
    LoadBalanceMethod.PREFILL_TOKENS: _by_prefill_tokens,
    LoadBalanceMethod.CACHE_AWARE: _by_cache_aware,
})


class Dispatcher:
    """Picks a rank per request with one balancing method and counts it on the board."""

    def __init__(self, board: "LoadBoard", dispatcher_id: int,
                 method: LoadBalanceMethod | str, stale_ns: int = DEFAULT_STALE_NS,
                 summary: "PrefixSummary | None" = None, pending_s: float = PENDING_S):
        """``summary``: the ranks' prefix-cache summaries, which ``cache_aware`` reads
        (and needs: it is refused without them); the other methods ignore it.
        ``pending_s``: how long ``cache_aware`` remembers where a prompt nobody cached
        went (``scheduler.pending_prefix``; 0: not at all)."""
        try:
            method = LoadBalanceMethod(method)
        except ValueError:
            raise InvalidLoadBalanceMethod(
                f"unknown load balance method {method!r}; resolve names (and deprecated "
                "aliases) with scheduler.policy.resolve_method(name, role) first") from None
        if method is LoadBalanceMethod.AUTO:
            raise InvalidLoadBalanceMethod(
                "resolve 'auto' once at start-up with scheduler.policy.resolve_method(name, role)")
        if stale_ns <= 0:
            raise ValueError(f"stale_ns must be positive, got {stale_ns}")
        if method is LoadBalanceMethod.CACHE_AWARE:
            if summary is None:
                raise InvalidLoadBalanceMethod(
                    "cache_aware reads the ranks' prefix-cache summaries; these ranks "
                    "publish none (their prefix cache is off)")
            if summary.num_ranks != board.num_ranks:
                raise ValueError(f"the summary has {summary.num_ranks} ranks, "
                                 f"the board {board.num_ranks}")
        self.summary = summary
        # The ranks copy each other's cached prefixes (--enable-cross-rank-prefix-cache).
        self.shared_prefixes = summary is not None and summary.records is not None
        self.pending = PendingPrefixes(pending_s)
        self.traffic = PrefixTraffic()
        self.board = board
        self.dispatcher_id = dispatcher_id
        self.method = method
        self.stale_ns = stale_ns
        self.num_ranks = board.num_ranks
        self.rotation = RotationState()
        self._choose = CHOOSERS[method]
        self._writer = board.dispatcher_writer(dispatcher_id)
        self._liveness = board.liveness

    def pick(self, num_tokens: int, routed_dp_rank: int | None = None,
             bootstrap_room: int | None = None, input_ids: Sequence[int] = (),
             has_room: Sequence[bool] | None = None) -> int:
        """Choose the rank for one request, count it there, return the rank.

        ``num_tokens`` is the request's prompt length: the load it adds until the
        rank's scheduler reports it. ``input_ids``: the prompt, which ``cache_aware``
        looks up in the ranks' prefix-cache summaries (the other methods ignore it). ``routed_dp_rank`` (the API maps the
        ``data_parallel_rank`` alias onto it) wins over the method. ``has_room``: per
        rank, whether its queue takes another request (``--max-queued-requests``); a
        rank without room is no candidate, as a dead one is not. The bump happens
        here, before the caller sends, so a concurrent reader never misses the request;
        if the send then fails the caller takes it back with ``cancel``.

        Raises ``InvalidDpRankError``/``MissingBootstrapRoomError`` (400) or
        ``RankUnavailableError``/``NoLiveRankError`` (503); nothing is counted then.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        live = alive = self._liveness.check(self.stale_ns)
        if has_room is not None:
            alive = [a and r for a, r in zip(live, has_room, strict=True)]
        try:
            if routed_dp_rank is None:
                rank = self._choose(self, alive, input_ids, bootstrap_room)
            else:
                rank = routed_rank(routed_dp_rank, alive)
        except RankUnavailableError as exc:
            if alive is live or all(r or not a for a, r in zip(live, has_room)):
                raise  # no live rank was left out for being full
            raise type(exc)(f"{exc} (a rank at its queue limit, --max-queued-requests, "
                            "counts as unavailable)") from None
        self._writer.bump(rank, num_tokens)
        return rank

    def forget_prefixes(self) -> None:
        """The ranks' prefix caches were flushed: forget the prompts sent to be cached
        (``pending``) and which prefixes were hot (``traffic``), so that ``cache_aware``
        starts over as it did at start-up."""
        self.pending.clear()
        self.traffic.clear()

    def cancel(self, rank: int, num_tokens: int) -> None:
        """Undo a ``pick`` whose request could not be sent to ``rank``; without this the
        rank would stay over-counted by one request for good."""
        self._writer.unbump(rank, num_tokens)
