"""Single-writer handles onto the load board (cells and writers in ``shm.board_layout``).

A ``RankWriter`` lives in the scheduler of one rank; a ``DispatcherWriter`` in one
dispatcher. Each keeps a private copy of what it last wrote, so it never reads its
own cells back, and no other process ever writes them.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Sequence

from shm.board_layout import (BASE_PREFILL, BASE_REQS, BASE_TOKENS, MAX_RUNNING,
                              MAX_TOTAL_TOKENS, NUM_KV, NUM_PREFILL, NUM_REQS, NUM_TOKENS,
                              NUM_WAITING, PID,
                              SEQ, RankStatus)

if TYPE_CHECKING:
    from shm.board import LoadBoard


class RankWriter:
    """Writes rank ``rank``'s row. Called by that rank's scheduler after every batch."""

    def __init__(self, board: "LoadBoard", rank: int):
        self.board = board
        self.rank = rank
        layout = board.layout
        self._cells = board.cells  # released by board.close(): later use raises
        self._base = layout.row(rank)
        self._heartbeat = layout.heartbeat_cell(rank)
        self._status = layout.status_cell(rank)
        d = self._d = board.num_dispatchers
        self._acked_reqs = [layout.acked_reqs_cell(rank, i) for i in range(d)]
        self._acked_tokens = [layout.acked_tokens_cell(rank, i) for i in range(d)]
        seq = self._cells[self._base + SEQ]  # a restarted writer continues the sequence
        # Negative: the previous writer died mid-publish of -(s+1); continue at s+2.
        self._seq = -seq + 1 if seq < 0 else seq

    def publish(self, num_reqs: int, num_waiting_reqs: int, num_tokens: int,
                acked_reqs: Sequence[int], acked_tokens: Sequence[int], *,
                num_prefill_tokens: int, num_kv_tokens: int) -> None:
        """Store the load and the per-dispatcher acknowledged totals, atomically to readers.

        ``acked_reqs[d]``/``acked_tokens[d]``: how many requests (and their dispatched
        token counts) from dispatcher d this rank has received so far, all of which
        are already inside ``num_reqs``/``num_tokens`` or finished. They only grow.
        ``num_prefill_tokens``: tokens received and not prefilled yet (prompts; a
        retracted request's output too; 0 on a PD decode rank but for retracted
        requests). ``num_kv_tokens``: KV slots held for requests
        (``shm.board_layout``'s ``num_kv``).
        """
        d = self._d
        if len(acked_reqs) != d or len(acked_tokens) != d:
            raise ValueError(f"expected {d} acked counters per kind")
        mv, b = self._cells, self._base
        seq = self._seq
        mv[b + SEQ] = -(seq + 1)  # negative = writing (see shm.board)
        mv[b + BASE_REQS] = num_reqs - sum(acked_reqs)
        acked = sum(acked_tokens)
        mv[b + BASE_TOKENS] = num_tokens - acked
        mv[b + BASE_PREFILL] = num_prefill_tokens - acked
        mv[b + NUM_REQS] = num_reqs
        mv[b + NUM_WAITING] = num_waiting_reqs
        mv[b + NUM_TOKENS] = num_tokens
        mv[b + NUM_PREFILL] = num_prefill_tokens
        mv[b + NUM_KV] = num_kv_tokens
        for i in range(d):
            mv[self._acked_reqs[i]] = acked_reqs[i]
            mv[self._acked_tokens[i]] = acked_tokens[i]
        mv[b + SEQ] = seq + 2
        self._seq = seq + 2

    def acked_counts(self) -> tuple[list[int], list[int]]:
        """The acked totals this row holds now. A scheduler that takes over a row (a
        restarted rank) continues from them: the dispatchers' counters never reset."""
        mv = self._cells
        return [mv[c] for c in self._acked_reqs], [mv[c] for c in self._acked_tokens]

    def set_capacity(self, max_total_num_tokens: int, max_running_requests: int) -> None:
        mv, b = self._cells, self._base
        seq = self._seq
        mv[b + SEQ] = -(seq + 1)  # negative = writing (see shm.board)
        mv[b + MAX_TOTAL_TOKENS] = max_total_num_tokens
        mv[b + MAX_RUNNING] = max_running_requests
        mv[b + PID] = os.getpid()
        mv[b + SEQ] = seq + 2
        self._seq = seq + 2

    def heartbeat(self, now_ns: int | None = None) -> None:
        """Store CLOCK_MONOTONIC (or ``now_ns``). Readers rely on the cell only growing
        (``shm.board_liveness``): a ``now_ns`` older than the last one is refused."""
        mv, cell = self._cells, self._heartbeat
        if now_ns is None:
            now_ns = time.monotonic_ns()
        elif now_ns < mv[cell]:
            raise ValueError(f"heartbeat {now_ns} is older than the last one ({mv[cell]})")
        mv[cell] = now_ns

    def set_status(self, status: RankStatus) -> None:
        self._cells[self._status] = int(status)


class DispatcherWriter:
    """Bumps dispatcher ``dispatcher``'s counters: one request (and its tokens) to a rank."""

    def __init__(self, board: "LoadBoard", dispatcher: int):
        self.board = board
        self.dispatcher = dispatcher
        layout = board.layout
        # Rank r's cells are _off + r (requests) and _off + _tokens_off + r (tokens).
        self._off = layout.dispatched_reqs_cell(dispatcher, 0)
        self._tokens_off = layout.dispatched_tokens_cell(dispatcher, 0) - self._off
        ranks = range(board.num_ranks)
        mv = self._cells = board.cells  # released by board.close(): later use raises
        # A restarted dispatcher continues from the counters it left: the schedulers'
        # acked counts for it keep growing from there.
        self.dispatched_reqs = [mv[layout.dispatched_reqs_cell(dispatcher, r)] for r in ranks]
        self.dispatched_tokens = [mv[layout.dispatched_tokens_cell(dispatcher, r)] for r in ranks]

    def bump(self, rank: int, num_tokens: int) -> None:
        """Count one request of ``num_tokens`` tokens as sent to ``rank``. Call before sending."""
        reqs, toks = self.dispatched_reqs, self.dispatched_tokens
        reqs[rank] += 1
        toks[rank] += num_tokens
        mv, off = self._cells, self._off + rank
        mv[off + self._tokens_off] = toks[rank]
        mv[off] = reqs[rank]

    def unbump(self, rank: int, num_tokens: int) -> None:
        """Take back a ``bump`` whose request was never delivered (the send failed).

        Safe only then: a request that never reached the scheduler is never acked, so
        lowering ``dispatched`` keeps ``acked <= dispatched`` for every reader.
        """
        reqs = self.dispatched_reqs[rank] - 1
        toks = self.dispatched_tokens[rank] - num_tokens
        if reqs < 0 or toks < 0:
            raise ValueError(f"unbump of rank {rank} below zero")
        self.dispatched_reqs[rank] = reqs
        self.dispatched_tokens[rank] = toks
        mv = self._cells
        mv[self._off + rank] = reqs
        mv[self._off + self._tokens_off + rank] = toks
