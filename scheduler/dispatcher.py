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

from operator import add
from typing import TYPE_CHECKING

import numpy as np

from scheduler.policy import (InvalidDpRankError, InvalidLoadBalanceMethod, LoadBalanceMethod,
                              MissingBootstrapRoomError, NoLiveRankError, RankUnavailableError,
                              RotationState, follow_bootstrap_room, prefill_tokens, round_robin,
                              routed_rank, total_requests, total_tokens)

if TYPE_CHECKING:
    from shm.board import LoadBoard

__all__ = ["Dispatcher", "DEFAULT_STALE_NS", "use_numpy_read", "InvalidDpRankError",
           "MissingBootstrapRoomError", "NoLiveRankError", "RankUnavailableError"]

# A rank whose heartbeat is older than this is not picked. Schedulers refresh it every
# step and every 50 ms while idle; the bound must exceed the longest single forward
# pass (a long CPU prefill takes seconds), or a busy rank would look dead.
DEFAULT_STALE_NS = 10_000_000_000

# total_tokens on numpy ranks by tokens * this + requests (one argmin).
_REQS_KEY_SCALE = 1 << 20
_MASKED_KEY = np.iinfo(np.int64).max  # a rank out of the running in such a key

# Which read path ``pick`` uses, per board shape: lists from one ``struct`` unpack cost
# per rank (a Python int per cell, a C call per element in ``map(add, ...)``), numpy
# costs a flat ~0.3-1 us per call whatever the size. ``python -m bench.board
# --crossover`` times both ``pick`` paths side by side per N; the thresholds below are
# where numpy won on the project's 2-core VM (medians of 7 interleaved rounds, some
# shown below). The crossover, not the absolute numbers, is what matters. Numpy from
# N ranks on, by dispatchers D on the board (the last entry for any larger D).
# total_requests (single-cell reads), us lists / numpy:
#   D=1: N=16 2.38 / 2.62, N=24 2.66 / 2.65, N=64 4.55 / 2.79
#   D=2: N=4 2.97 / 3.38, N=8 3.46 / 3.35, N=64 9.01 / 3.54
# total_tokens (seqlocked reads), us lists / numpy:
#   D=1: N=16 7.71 / 8.16, N=24 9.56 / 8.20, N=64 18.7 / 8.9
#   D=2: N=16 9.75 / 10.2, N=24 12.7 / 10.4;  D=4: N=8 8.92 / 10.2, N=16 13.0 / 10.3
# prefill_tokens (seqlocked reads of three cells per row), us lists / numpy:
#   D=1: N=16 11.0 / 11.3, N=24 14.1 / 11.4, N=64 28.8 / 12.3
#   D=2: N=4 8.60 / 13.5, N=16 16.4 / 13.6;  D=4: N=4 10.8 / 13.5, N=16 20.6 / 13.6
NUMPY_MIN_RANKS_REQUESTS = (24, 8)
NUMPY_MIN_RANKS_TOKENS = (24, 24, 16)
NUMPY_MIN_RANKS_PREFILL = (24, 16)
_NUMPY_MIN_RANKS = {LoadBalanceMethod.TOTAL_REQUESTS: NUMPY_MIN_RANKS_REQUESTS,
                    LoadBalanceMethod.TOTAL_TOKENS: NUMPY_MIN_RANKS_TOKENS,
                    LoadBalanceMethod.PREFILL_TOKENS: NUMPY_MIN_RANKS_PREFILL}


def use_numpy_read(num_ranks: int, num_dispatchers: int,
                   method: LoadBalanceMethod | str = LoadBalanceMethod.TOTAL_TOKENS) -> bool:
    """True if the numpy read is the faster one for this board shape and method (False
    for methods that read no load)."""
    table = _NUMPY_MIN_RANKS.get(LoadBalanceMethod(method))
    return table is not None and num_ranks >= table[min(num_dispatchers, len(table)) - 1]


class Dispatcher:
    """Picks a rank per request with one balancing method and counts it on the board."""

    def __init__(self, board: "LoadBoard", dispatcher_id: int,
                 method: LoadBalanceMethod | str, stale_ns: int = DEFAULT_STALE_NS,
                 read_path: str = "auto"):
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
        self._liveness = board.liveness
        self._all_alive = board.liveness.all_alive
        self._own_reqs = self._writer.dispatched_reqs
        self._own_tokens = self._writer.dispatched_tokens
        # One dispatcher knows every dispatched count there is: its own.
        self._read_base = board.base_requests_reader() if board.num_dispatchers == 1 else None
        # The token methods read a rank's cells together, under its seqlock;
        # total_requests reads single cells (see LoadBoard.read_requests).
        if read_path not in ("auto", "lists", "numpy"):
            raise ValueError(f"read_path must be auto, lists or numpy; got {read_path!r}")
        self._numpy = (use_numpy_read(board.num_ranks, board.num_dispatchers, method)
                       if read_path == "auto" else read_path == "numpy")
        self._choose = {
            LoadBalanceMethod.ROUND_ROBIN: self._round_robin,
            LoadBalanceMethod.FOLLOW_BOOTSTRAP_ROOM: self._follow_bootstrap_room,
            LoadBalanceMethod.TOTAL_REQUESTS:
                self._total_requests_np if self._numpy else self._total_requests,
            LoadBalanceMethod.TOTAL_TOKENS:
                self._total_tokens_np if self._numpy else self._total_tokens,
            LoadBalanceMethod.PREFILL_TOKENS:
                self._prefill_tokens_np if self._numpy else self._prefill_tokens,
        }[method]
        if self._choose == self._total_requests and self._read_base is not None:
            # The commonest case (one API process, total_requests, a small board) gets
            # ``pick`` as one function: on these machines each Python call layer costs
            # ~0.1 us of a 2 us budget. Same contract and result as ``pick``.
            self.pick = self._pick_total_requests_one_dispatcher

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
        if routed_dp_rank is None:
            rank = self._choose(bootstrap_room)
        else:
            rank = routed_rank(routed_dp_rank, self._liveness.check(self.stale_ns))
        self._writer.bump(rank, num_tokens)
        return rank

    def _pick_total_requests_one_dispatcher(self, num_tokens: int, routed_dp_rank: int | None = None,
                                            bootstrap_room: int | None = None) -> int:
        if routed_dp_rank is not None or num_tokens < 0:
            return Dispatcher.pick(self, num_tokens, routed_dp_rank, bootstrap_room)
        eff_reqs = list(map(add, self._read_base(), self._own_reqs))
        alive = self._liveness.check(self.stale_ns)
        if alive is self._all_alive:
            least = min(eff_reqs)  # policy.total_requests inlined (tests check they agree)
            rotation = self.rotation
            try:
                rank = eff_reqs.index(least, rotation.next_start)
            except ValueError:
                rank = eff_reqs.index(least)
            rotation.next_start = rank + 1
        else:
            rank = total_requests(eff_reqs, alive, self.rotation)
        self._writer.bump(rank, num_tokens)
        return rank

    def cancel(self, rank: int, num_tokens: int) -> None:
        """Undo a ``pick`` whose request could not be sent to ``rank``; without this the
        rank would stay over-counted by one request for good."""
        self._writer.unbump(rank, num_tokens)

    # ---- one chooser per method: each reads what its method needs ----------------------
    def _round_robin(self, bootstrap_room) -> int:
        return round_robin(self._liveness.check(self.stale_ns), self.rotation)

    def _follow_bootstrap_room(self, bootstrap_room) -> int:
        return follow_bootstrap_room(bootstrap_room, self._liveness.check(self.stale_ns))

    def _total_requests(self, bootstrap_room) -> int:
        eff_reqs, alive = self.board.read_requests(self.stale_ns, self._own_reqs)
        return total_requests(eff_reqs, alive, self.rotation)

    def _total_requests_np(self, bootstrap_room) -> int:
        alive = self._liveness.check(self.stale_ns)
        eff = self.board.effective_requests_np()
        if alive is not self._all_alive:
            return total_requests(eff.tolist(), alive, self.rotation)
        return self._rotated_argmin_np(eff)

    def _total_tokens(self, bootstrap_room) -> int:
        if self._read_base is not None:  # one dispatcher: its own counters are exact
            base_reqs, base_tokens = self.board.read_bases()
            eff_reqs = list(map(add, base_reqs, self._own_reqs))
            eff_tokens = list(map(add, base_tokens, self._own_tokens))
            alive = self._liveness.check(self.stale_ns)
        else:
            eff_reqs, eff_tokens, alive = self.board.read_effective(self.stale_ns)
        return total_tokens(eff_tokens, eff_reqs, alive, self.rotation)

    def _total_tokens_np(self, bootstrap_room) -> int:
        alive = self._liveness.check(self.stale_ns)
        eff_reqs, eff_tokens = self.board.effective_np()
        if alive is not self._all_alive or eff_reqs[eff_reqs.argmax()] >= _REQS_KEY_SCALE:
            return total_tokens(eff_tokens.tolist(), eff_reqs.tolist(), alive, self.rotation)
        # Fewest tokens, then fewest requests, then rotation: policy.total_tokens's
        # order, as one integer key per rank (requests < 2**20 is checked above).
        return self._rotated_argmin_np(eff_tokens * _REQS_KEY_SCALE + eff_reqs)

    def _prefill_tokens(self, bootstrap_room) -> int:
        base_reqs, base_tokens, base_prefill = self.board.read_prefill_bases()
        if self._read_base is not None:  # one dispatcher: its own counters are exact
            own_reqs, own_tokens = self._own_reqs, self._own_tokens
        else:  # every dispatcher's counters, read after the rows (acks before dispatches)
            own_reqs, own_tokens = self.board.dispatched_totals()
        alive = self._liveness.check(self.stale_ns)
        return prefill_tokens(list(map(add, base_prefill, own_tokens)),
                              list(map(add, base_tokens, own_tokens)),
                              list(map(add, base_reqs, own_reqs)), alive, self.rotation)

    def _prefill_tokens_np(self, bootstrap_room) -> int:
        alive = self._liveness.check(self.stale_ns)
        eff_reqs, eff_tokens, eff_prefill = self.board.effective_prefill_np()
        if alive is not self._all_alive or eff_reqs[eff_reqs.argmax()] >= _REQS_KEY_SCALE:
            return prefill_tokens(eff_prefill.tolist(), eff_tokens.tolist(), eff_reqs.tolist(),
                                  alive, self.rotation)
        # Among the ranks of least prefill, total_tokens's key (the others masked out).
        key = eff_tokens * _REQS_KEY_SCALE + eff_reqs
        key[eff_prefill != eff_prefill[eff_prefill.argmin()]] = _MASKED_KEY
        return self._rotated_argmin_np(key)

    def _rotated_argmin_np(self, loads) -> int:
        """The first least ``loads`` at or after ``next_start``, wrapping (policy's
        ``_rotated_argmin``): argmin gives the first overall; only when that lies
        before the start can an equal one after it win."""
        rank = int(loads.argmin())
        start = self.rotation.next_start
        if rank < start < len(loads):
            later = start + int(loads[start:].argmin())
            if loads[later] == loads[rank]:
                rank = later
        self.rotation.next_start = rank + 1
        return rank
