"""Waiting on a bootstrap table entry, for tests (production ranks poll each step:
``scheduler.pd_decode``; they never block on one room)."""

from __future__ import annotations

import asyncio
import time

from shm.bootstrap import FAILED, LIVE_STATES, BootstrapEntry, BootstrapTable, BootstrapTableError
from shm.bootstrap_layout import EntryState

WAIT_FIRST_SLEEP_S = 20e-6
WAIT_MAX_SLEEP_S = 1e-3


class BootstrapTimeoutError(BootstrapTableError, TimeoutError):
    """``wait_for`` gave up: prefill never placed the room (or never reached the state)."""


def wait_for(table: BootstrapTable, room: int, timeout_s: float,
             states: tuple[int, ...] = LIVE_STATES) -> BootstrapEntry:
    """Block until ``room`` has an entry whose state is in ``states`` (or FAILED).

    Sleeps with exponential backoff (20 us doubling to 1 ms) instead of spinning a core.
    FAILED always returns, so a caller never waits out a failed prefill; check
    ``entry.state``. Raises ``BootstrapTimeoutError`` after ``timeout_s``.
    """
    polls = _Polls(table, room, timeout_s, states)
    for sleep_s in polls:
        time.sleep(sleep_s)
    return polls.entry


async def async_wait_for(table: BootstrapTable, room: int, timeout_s: float,
                         states: tuple[int, ...] = LIVE_STATES) -> BootstrapEntry:
    """``wait_for`` for an event loop: the same backoff through ``asyncio.sleep``.

    The loop's timer granularity (about 1 ms with epoll) stretches the short sleeps.
    """
    polls = _Polls(table, room, timeout_s, states)
    for sleep_s in polls:
        await asyncio.sleep(sleep_s)
    return polls.entry


class _Polls:
    """The shared back-off of ``wait_for``/``async_wait_for``: iterating yields how long
    to sleep before the next look-up (20 us doubling to 1 ms); it stops once the entry
    is there (then in ``entry``) and raises ``BootstrapTimeoutError`` at the deadline."""

    def __init__(self, table: BootstrapTable, room: int, timeout_s: float,
                 states: tuple[int, ...]):
        self.table, self.room, self.timeout_s, self.states = table, room, timeout_s, states
        self.entry: BootstrapEntry | None = None

    def __iter__(self):
        deadline = time.monotonic() + self.timeout_s
        sleep_s = WAIT_FIRST_SLEEP_S
        while True:
            entry = self.table.lookup(self.room)
            if entry is not None and (entry.state in self.states or entry.state == FAILED):
                self.entry = entry
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout_error(entry)
            yield min(sleep_s, left)
            sleep_s = min(sleep_s * 2, WAIT_MAX_SLEEP_S)

    def _timeout_error(self, entry: BootstrapEntry | None) -> BootstrapTimeoutError:
        room, timeout_s = self.room, self.timeout_s
        wanted = "/".join(EntryState(s).name for s in self.states)
        if entry is None:
            return BootstrapTimeoutError(
                f"bootstrap_room {room}: no prefill placed it within {timeout_s} s "
                f"(prefill never came, or the gateway retried with a new room)")
        return BootstrapTimeoutError(
            f"bootstrap_room {room}: still {EntryState(entry.state).name} on prefill rank "
            f"{entry.prefill_rank} after {timeout_s} s (waited for {wanted})")
