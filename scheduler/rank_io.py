"""A rank's pipes to its API processes: one request pipe and one output pipe per
dispatcher (``--api-server-count``; one of each by default).

Each API process is one dispatcher on the load board; a request's outputs go back on
the output pipe of the dispatcher that sent it (``GenerateReq.dispatcher_id``).
Messages that concern every API process (``RankStats``, ``RankError``) go to all of
them; a ``FlushCacheResult`` to the one that sent the ``FlushCacheReq``; ``RankReady``
to dispatcher 0's pipe, which the launcher reads at start-up.

An API process that goes away closes its request pipe: the rank reads EOF there
(after every whole frame it wrote) and ``RankPipes.receive`` reports the dispatcher
as gone. The rank then ends that dispatcher's requests and retires its in-flight
count on the board (``retire_dispatcher``); it stops only once every dispatcher is
gone.

With several API processes, one that stops reading (stopped, or its event loop stuck)
must not stop the rank: a blocking write to its full pipe (64 KiB) would hold the
rank's loop, its heartbeat with it, and every other API process would then find the
rank dead. So each output pipe is written without blocking (``Outbox``): what the pipe
does not take waits in the rank, in order, and goes out as that API process reads
again (every loop iteration tries). What waits is that process's requests' outputs
(each ends at its ``max_new_tokens``) and a ``RankStats`` every
``--decode-log-interval`` batches while it stays stalled; nothing caps it: cutting the
pipe would read as a lost rank to that process, which would then kill a rank the others
are using. One API
process (the default) keeps the blocking write: nobody else would serve meanwhile.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Sequence

from scheduler.messages import (AbortReq, FlushCacheReq, FlushCacheResult, decode_to_scheduler,
                                encode)

logger = logging.getLogger(__name__)

WAITING_POLL_S = 0.005  # the loop's longest sleep while some output waits for its reader


class Outbox:
    """One pipe, written without blocking: ``multiprocessing.connection``'s frames (a
    4-byte big-endian length, then the payload), so ``Connection.recv_bytes`` or
    ``server.rank_pipe.FrameReader`` reads them. A rank's output pipes behind several
    API processes (``RankPipes``), and the API's request pipes to the ranks
    (``server.rank_pipe.RequestPipe``, which writes what waits from its event loop)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.fd = conn.fileno()
        self.waiting = bytearray()
        os.set_blocking(self.fd, False)

    def send(self, payload: bytes) -> None:
        """Write one frame, or what the pipe takes of it; the rest waits. Raises
        ``BrokenPipeError`` if the reader is gone."""
        frame = struct.pack("!i", len(payload)) + payload
        if self.waiting:
            self.waiting += frame
            self.flush()
        else:
            self.waiting += frame[self._write(frame):]

    def flush(self) -> None:
        if self.waiting:
            del self.waiting[:self._write(self.waiting)]

    def drain(self, timeout_s: float) -> None:
        """Write what waits, blocking up to ``timeout_s`` (the rank is stopping)."""
        deadline = time.monotonic() + timeout_s
        while self.waiting and (left := deadline - time.monotonic()) > 0:
            if select.select([], [self.fd], [], left)[1]:
                self.flush()

    def _write(self, data) -> int:
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0


class RankPipes:
    def __init__(self, req_conns: Sequence[Connection], out_conns: Sequence[Connection]):
        if len(req_conns) != len(out_conns) or not req_conns:
            raise ValueError("one request pipe and one output pipe per dispatcher")
        self.req_conns = list(req_conns)
        self.out_conns = list(out_conns)
        self.num_dispatchers = len(req_conns)
        self.is_open = [True] * self.num_dispatchers  # its request pipe has not closed
        self._can_send = [True] * self.num_dispatchers  # its output pipe still takes frames
        self._dispatcher_of = {conn: d for d, conn in enumerate(self.req_conns)}
        # Several API processes: each output pipe written without blocking (docstring).
        self._outboxes = ([Outbox(c) for c in self.out_conns] if self.num_dispatchers > 1
                          else None)
        # Who asked each FlushCacheReq not answered yet: the scheduler answers each with
        # one FlushCacheResult, in the order it handles them (the order received here).
        self._flush_askers: deque[int] = deque()

    @property
    def any_open(self) -> bool:
        return any(self.is_open)

    def receive(self, timeout_s: float) -> tuple[list[tuple[int, object]], list[int]]:
        """Wait up to ``timeout_s`` for messages; returns ((dispatcher, message) pairs,
        dispatchers whose request pipe closed now). Drains each ready pipe."""
        live = [c for d, c in enumerate(self.req_conns) if self.is_open[d]]
        if not live:
            return [], []
        if self._outboxes is not None and self._flush_waiting():
            timeout_s = min(timeout_s, WAITING_POLL_S)
        if len(live) == 1:
            ready = live if live[0].poll(timeout_s) else []
        else:
            ready = wait(live, timeout_s)
        messages, gone = [], []
        for conn in ready:
            d = self._dispatcher_of[conn]
            try:
                while True:
                    msg = decode_to_scheduler(conn.recv_bytes())
                    if isinstance(msg, FlushCacheReq):
                        self._flush_askers.append(d)
                    messages.append((d, msg))
                    if not conn.poll(0):
                        break
            except (EOFError, OSError):
                self.is_open[d] = False
                self._stop_sending(d)  # nobody reads its outputs any more
                gone.append(d)
        return messages, gone

    def send_to(self, dispatcher: int, msg) -> None:
        """Send ``msg`` to one API process; dropped if that process is gone."""
        if self._can_send[dispatcher]:
            self._send_payload(dispatcher, encode(msg))

    def _send_payload(self, dispatcher: int, payload: bytes) -> None:
        if self._outboxes is None:  # the only API process: as before, the caller decides
            self.out_conns[dispatcher].send_bytes(payload)
            return
        try:
            self._outboxes[dispatcher].send(payload)
        except (OSError, ValueError):
            self._stop_sending(dispatcher)
            logger.info("dispatcher %d's output pipe closed; its outputs are dropped",
                        dispatcher)

    def _stop_sending(self, dispatcher: int) -> None:
        self._can_send[dispatcher] = False
        if self._outboxes is not None:
            self._outboxes[dispatcher].waiting.clear()  # nobody will read it

    def _flush_waiting(self) -> bool:
        """Write what waits for each API process; whether some output still waits."""
        waiting = False
        for d, box in enumerate(self._outboxes):
            if box.waiting and self._can_send[d]:
                try:
                    box.flush()
                except OSError:
                    self._stop_sending(d)
                    continue
                waiting = waiting or bool(box.waiting)
        return waiting

    def send_final(self, msg, timeout_s: float = 1.0) -> None:
        """The rank is stopping: send ``msg`` to every API process still there and
        write whatever waits, within ``timeout_s`` in all; never raises."""
        try:
            self.broadcast(msg)
        except (OSError, ValueError):
            pass  # the only API process is gone
        self.drain(timeout_s)

    def drain(self, timeout_s: float = 1.0) -> None:
        """Write what waits for the API processes, within ``timeout_s`` (never raises)."""
        if self._outboxes is None:
            return
        deadline = time.monotonic() + timeout_s
        for d, box in enumerate(self._outboxes):
            if self._can_send[d]:
                try:
                    box.drain(max(deadline - time.monotonic(), 0.0))
                except (OSError, ValueError):
                    self._stop_sending(d)

    def send(self, msg) -> None:
        """The scheduler's ``send``: a ``FlushCacheResult`` to the API process that
        asked; anything else (``RankStats``) to every API process."""
        if isinstance(msg, FlushCacheResult) and self._flush_askers:
            self.send_to(self._flush_askers.popleft(), msg)
        else:
            self.broadcast(msg)

    def broadcast(self, msg) -> None:
        """Send ``msg`` to every API process still there."""
        payload = encode(msg)
        for d in range(self.num_dispatchers):
            if self._can_send[d]:
                self._send_payload(d, payload)


def retire_dispatcher(scheduler, board, dispatcher: int, message: str) -> int:
    """Dispatcher ``dispatcher``'s API process is gone: end its requests on this rank
    (their KV and load are freed; their outputs have nowhere to go) and retire what it
    counted for this rank that never arrived, so the board returns to zero.

    The dispatcher's counters are frozen (no process writes them any more) and the
    rank has read every whole frame it sent, so ``dispatched - acked`` is exactly the
    requests it counted but never delivered (it died between the bump and the send,
    or mid-frame). Acking them lowers ``base`` as much as the in-flight term: the
    effective load loses them and nothing else. Returns how many requests ended."""
    rids = [rid for rid, req in scheduler.reqs.items() if req.dispatcher_id == dispatcher]
    for rid in rids:
        scheduler.on_abort(AbortReq(rid=rid, message=message))
    layout, cells, rank = board.layout, board.cells, scheduler.cfg.dp_rank
    scheduler.acked_reqs[dispatcher] = cells[layout.dispatched_reqs_cell(dispatcher, rank)]
    scheduler.acked_tokens[dispatcher] = cells[layout.dispatched_tokens_cell(dispatcher, rank)]
    scheduler.publish_load()
    return len(rids)


def owned_by(scheduler, dispatcher: int, msg) -> bool:
    """An ``AbortReq`` acts only on a request of the dispatcher that sent it: two API
    processes may use the same rid (``/abort_request``'s act on any)."""
    if isinstance(msg, AbortReq):
        if msg.requested:  # /abort_request: whichever API process it came through
            return True
        req = scheduler.reqs.get(msg.rid)
        return req is None or req.dispatcher_id == dispatcher
    return True
