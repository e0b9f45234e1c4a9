"""Cell layout of the load board: offsets, columns and who writes each cell.

The board (``shm.board``) reads these cells and the writers (``shm.board_writers``)
write them; both take every offset from here. One POSIX segment of int64 cells (native
little-endian)::

    cell 0                                                                 HEADER_LEN
    +-------+---------+-----------+-----------------+---------+----------+----------+-----------+
    | magic | version | num_ranks | num_dispatchers | row_len | disp_off | disp_len | owner_pid |
    +-------+---------+-----------+-----------------+---------+----------+----------+-----------+

    rank rows: rank r at row(r) = HEADER_LEN + r * row_len (row_len rounded up to 8 cells)
    +-----+-----------+-----------+------------+----------+----------+----------+-----------+
    | seq | base_reqs | base_toks | base_pfill | num_reqs | num_wait | num_toks | num_pfill | ...
    +-----+-----------+-----------+------------+----------+----------+----------+-----------+
      ... | max_tok | max_run | pid | num_kv | acked_reqs[0..D) | acked_tokens[0..D) | pad |
      column: SEQ, BASE_REQS, BASE_TOKENS, BASE_PREFILL, NUM_REQS, NUM_WAITING, NUM_TOKENS,
              NUM_PREFILL, MAX_TOTAL_TOKENS, MAX_RUNNING, PID, NUM_KV, ACKED + d,
              ACKED + D + d

    liveness block at live_off = HEADER_LEN + N * row_len, column-major (each column
    padded to live_col_len = N rounded up to 8; cell r of a column is rank r's):
    +------------------------+-----+--------------------+-----+
    | heartbeat_ns[0..N)     | pad | status[0..N)       | pad |
    +------------------------+-----+--------------------+-----+
      heartbeat_cell(r), status_cell(r)

    dispatcher blocks: dispatcher d at disp_block(d) = disp_off + d * disp_len:
    +---------------------------+-----------------------------+-----+
    | dispatched_reqs[0..N)     | dispatched_tokens[0..N)     | pad |
    +---------------------------+-----------------------------+-----+

Who writes what (exactly one writer per cell; ``+=`` on shared memory is not atomic):

- header: the creator (``LoadBoard.create``), once, before anyone attaches.
- rank row r: the scheduler of rank r, through its ``RankWriter``, every cell but
  ``seq`` under the row's seqlock. ``base_reqs = num_reqs - sum(acked_reqs)``,
  ``base_toks = num_toks - sum(acked_tokens)`` and ``base_pfill = num_pfill -
  sum(acked_tokens)`` are derived by the writer so that a reader needs one cell per
  quantity, not 1 + 2D, to get the rank's load net of what it has acknowledged.
  ``num_pfill``: the prompt tokens the rank has yet to prefill (queued or mid-prefill).
  ``num_kv``: the KV slots the rank holds for requests (its pool's use less the cached
  tokens no request reads: reservations, and KV a PD prefill rank keeps for decode,
  included): memory, where ``num_toks`` is load; never balanced on (``/v1/loads``'
  ``num_used_tokens`` and ``token_usage``, the ``/metrics`` gauges of those names).
- ``heartbeat_ns[r]`` (CLOCK_MONOTONIC, shared by all processes on the node, so it only
  grows, also across a restart of the rank) and ``status[r]``: rank r's scheduler, as
  single-cell stores outside the seqlock; the launcher may set ``status`` to DEAD only
  after that scheduler has exited. They live in columns so that "is every rank READY"
  is one compare of ``8N`` bytes (``shm.board_liveness``).
- dispatcher block d: dispatcher d, through its ``DispatcherWriter``. The counters only
  grow, but for a ``cancel`` that takes back a request never sent (never acked).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

MAGIC = 0x445053_424F415244  # "DPS" "BOARD"
LAYOUT_VERSION = 4
HEADER_LEN = 8
MAX_RANKS = 4096  # rows a board holds (LoadBoard.create refuses more)
MAX_DISPATCHERS = 256  # dispatcher blocks (API processes) a board holds
H_MAGIC, H_VERSION, H_NUM_RANKS, H_NUM_DISP, H_ROW_LEN, H_DISP_OFF, H_DISP_LEN, H_OWNER = range(8)

# Rank-row columns.
SEQ, BASE_REQS, BASE_TOKENS, BASE_PREFILL = range(4)
NUM_REQS, NUM_WAITING, NUM_TOKENS, NUM_PREFILL = range(4, 8)
MAX_TOTAL_TOKENS, MAX_RUNNING, PID, NUM_KV = range(8, 12)
ACKED = 12  # acked_reqs[0..D) then acked_tokens[0..D)
LOAD_COLS = BASE_PREFILL + 1  # seq and the three base columns: what a pick reads
# Liveness-block columns (cell offsets from live_off are column * live_col_len + rank).
HEARTBEAT_COL, STATUS_COL = 0, 1


class RankStatus(IntEnum):
    STARTING = 0
    READY = 1
    DRAINING = 2
    DEAD = 3


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


@dataclass(frozen=True)
class BoardLayout:
    num_ranks: int
    num_dispatchers: int

    @property
    def row_len(self) -> int:
        return _round8(ACKED + 2 * self.num_dispatchers)

    @property
    def live_off(self) -> int:
        return HEADER_LEN + self.num_ranks * self.row_len

    @property
    def live_col_len(self) -> int:
        return _round8(self.num_ranks)

    @property
    def disp_off(self) -> int:
        return self.live_off + 2 * self.live_col_len

    @property
    def disp_len(self) -> int:
        return _round8(2 * self.num_ranks)

    @property
    def num_cells(self) -> int:
        return self.disp_off + self.num_dispatchers * self.disp_len

    def header(self, owner_pid: int) -> list[int]:
        """The header cells, in order, of a board with this layout."""
        return [MAGIC, LAYOUT_VERSION, self.num_ranks, self.num_dispatchers, self.row_len,
                self.disp_off, self.disp_len, owner_pid]

    def row(self, rank: int) -> int:
        return HEADER_LEN + rank * self.row_len

    def acked_reqs_cell(self, rank: int, dispatcher: int) -> int:
        return self.row(rank) + ACKED + dispatcher

    def acked_tokens_cell(self, rank: int, dispatcher: int) -> int:
        return self.row(rank) + ACKED + self.num_dispatchers + dispatcher

    def heartbeat_cell(self, rank: int) -> int:
        return self.live_off + HEARTBEAT_COL * self.live_col_len + rank

    def status_cell(self, rank: int) -> int:
        return self.live_off + STATUS_COL * self.live_col_len + rank

    def disp_block(self, dispatcher: int) -> int:
        return self.disp_off + dispatcher * self.disp_len

    def dispatched_reqs_cell(self, dispatcher: int, rank: int) -> int:
        return self.disp_block(dispatcher) + rank

    def dispatched_tokens_cell(self, dispatcher: int, rank: int) -> int:
        return self.disp_block(dispatcher) + self.num_ranks + rank
