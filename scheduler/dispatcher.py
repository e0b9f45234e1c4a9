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

from typing import TYPE_CHECKING

from scheduler.policy import (InvalidDpRankError, InvalidLoadBalanceMethod, LoadBalanceMethod,
                              MissingBootstrapRoomError, NoLiveRankError, RankUnavailableError,
                              RotationState, follow_bootstrap_room, round_robin, routed_rank,
                              total_requests, total_tokens)

if TYPE_CHECKING:
    from shm.board import LoadBoard

__all__ = ["Dispatcher", "DEFAULT_STALE_NS", "use_numpy_read", "InvalidDpRankError",
           "MissingBootstrapRoomError", "NoLiveRankError", "RankUnavailableError"]

# A rank whose heartbeat is older than this is not picked. Schedulers refresh it every
# step and every 50 ms while idle; the bound must exceed the longest single forward
# pass (a long CPU prefill takes seconds), or a busy rank would look dead.
DEFAULT_STALE_NS = 10_000_000_000

# Which read path ``pick`` uses. ``read_effective`` (one struct unpack, plain lists)
# costs per rank and per dispatcher; ``read_effective_np`` (then ``tolist`` for the
# list-based methods) has a flat ~20 us of numpy call overhead here. Whole ``pick``
# (read + total_requests + bump), best of 15 x 3k calls, interleaved, on the project's
# 2-core VM (D = dispatchers on the board), struct / numpy in us:
#   N=4:   D=1  4.7 / 18.8   D=2  5.9 / 22.8   D=4  7.4 / 21.0
#   N=8:   D=1  5.7 / 18.9   D=2  7.0 / 21.2   D=4  9.1 / 21.9
#   N=48:  D=1 15.1 / 20.6   D=2 19.0 / 23.1   D=4 30.6 / 25.0
#   N=64:  D=1 20.4 / 23.5   D=2 24.9 / 25.7   D=4 36.5 / 25.5
#   N=96:  D=1 25.8 / 24.6   D=2 33.8 / 26.8   D=4 46.5 / 27.5
#   N=128: D=1 34.2 / 27.2   D=2 45.4 / 29.8   D=4 61.0 / 29.8
# so numpy from the crossover on: about 96 ranks with one dispatcher, 64 with two, 48
# with more. Timings are this VM's; the crossover, not the absolute numbers, matters.


def use_numpy_read(num_ranks: int, num_dispatchers: int) -> bool:
    """True if ``read_effective_np`` is the faster read for this board shape."""
    min_ranks = 96 if num_dispatchers == 1 else 64 if num_dispatchers == 2 else 48
    return num_ranks >= min_ranks


class Dispatcher:
    """Picks a rank per request with one balancing method and counts it on the board."""

    def __init__(self, board: "LoadBoard", dispatcher_id: int,
                 method: LoadBalanceMethod | str, stale_ns: int = DEFAULT_STALE_NS):
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
        self.board = board
        self.dispatcher_id = dispatcher_id
        self.method = method
        self.stale_ns = stale_ns
        self.num_ranks = board.num_ranks
        self.rotation = RotationState()
        self._writer = board.dispatcher_writer(dispatcher_id)
        # Only total_tokens looks at tokens and needs the seqlocked read (its two
        # cells must agree); the others read single cells (see read_requests).
        self._with_tokens = method is LoadBalanceMethod.TOTAL_TOKENS
        self._numpy = use_numpy_read(board.num_ranks, board.num_dispatchers)
        self._read = self._read_np if self._numpy else board.read_effective
        self._read_requests = board.read_requests
        self._own_reqs = self._writer.dispatched_reqs
        self._choose = {
            LoadBalanceMethod.ROUND_ROBIN: self._round_robin,
            LoadBalanceMethod.FOLLOW_BOOTSTRAP_ROOM: self._follow_bootstrap_room,
            LoadBalanceMethod.TOTAL_REQUESTS: self._total_requests,
            LoadBalanceMethod.TOTAL_TOKENS: self._total_tokens,
        }[method]

    def pick(self, num_tokens: int, routed_dp_rank: int | None = None,
             bootstrap_room: int | None = None) -> int:
        """Choose the rank for one request, count it there, return the rank.

        ``num_tokens`` is the request's prompt length: the load it adds until the
        rank's scheduler reports it. ``routed_dp_rank`` (the API maps the
        ``data_parallel_rank`` alias onto it) wins over the method. The bump happens
        here, before the caller sends, so a concurrent reader never misses the request;
        if the send then fails the caller takes it back with ``cancel``.

        Raises ``InvalidDpRankError``/``MissingBootstrapRoomError`` (400) or
        ``RankUnavailableError``/``NoLiveRankError`` (503); nothing is counted then.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if self._with_tokens or self._numpy:
            eff_reqs, eff_tokens, alive = self._read(self.stale_ns)
        else:
            eff_reqs, alive = self._read_requests(self.stale_ns, self._own_reqs)
            eff_tokens = None
        if routed_dp_rank is not None:
            rank = routed_rank(routed_dp_rank, alive)
        else:
            rank = self._choose(eff_reqs, eff_tokens, alive, bootstrap_room)
        self._writer.bump(rank, num_tokens)
        return rank

    def cancel(self, rank: int, num_tokens: int) -> None:
        """Undo a ``pick`` whose request could not be sent to ``rank``; without this the
        rank would stay over-counted by one request for good."""
        self._writer.unbump(rank, num_tokens)

    # ---- one adapter per method: same signature, so ``pick`` has no branching ----------
    def _round_robin(self, eff_reqs, eff_tokens, alive, bootstrap_room) -> int:
        return round_robin(alive, self.rotation)

    def _follow_bootstrap_room(self, eff_reqs, eff_tokens, alive, bootstrap_room) -> int:
        return follow_bootstrap_room(bootstrap_room, alive)

    def _total_requests(self, eff_reqs, eff_tokens, alive, bootstrap_room) -> int:
        return total_requests(eff_reqs, alive, self.rotation)

    def _total_tokens(self, eff_reqs, eff_tokens, alive, bootstrap_room) -> int:
        return total_tokens(eff_tokens, eff_reqs, alive, self.rotation)

    def _read_np(self, stale_ns: int, now_ns: int | None = None, with_tokens: bool = True):
        """``read_effective_np`` as plain lists, for the list-based methods."""
        reqs, tokens, alive = self.board.read_effective_np(stale_ns)
        return reqs.tolist(), tokens.tolist(), alive.tolist()
