"""Board reads only the tests use."""

from __future__ import annotations


def read_effective(board, stale_ns: int, now_ns: int | None = None):
    """(eff_reqs, eff_tokens, alive): the board's ``read_loads`` with liveness."""
    loads = board.read_loads()
    return loads.reqs, loads.tokens, board.liveness.check(stale_ns, now_ns)
