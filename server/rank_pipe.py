"""Non-blocking framing for the ranks' pipes, on the API's event loop: a sender for
each rank's request pipe (``RequestPipe``) and a reader for its output pipe
(``FrameReader``).

``Connection.send_bytes`` blocks while the pipe is full (64 KiB on Linux), and a rank
that is stopped or stuck in a long forward pass does not drain it: one such rank
would freeze the whole API. ``RequestPipe`` writes the same frames without ever
blocking: what the pipe does not take now is buffered and written by a
``loop.add_writer`` callback as the rank reads. The rank keeps reading with
``Connection.recv_bytes``.

``Connection.recv_bytes`` is no better on the reading side: the event loop may turn a
watched fd non-blocking (uvloop's libuv does), and then a message larger than the pipe
(a long rid, prompt logprobs) comes in pieces, and ``recv_bytes`` fails mid-frame as if
the rank were gone. ``FrameReader`` reads what is there and keeps partial frames for
the next wake-up. The rank writes with ``Connection.send_bytes``, or, behind several
API processes, with ``scheduler.rank_io.Outbox``, the same non-blocking writer
``RequestPipe`` is built on.

Frame format (``multiprocessing.connection.Connection``'s, CPython 3.8+): a 4-byte
big-endian signed length, then the payload (payloads of 2 GiB or more use -1 and an
8-byte length; messages here are far smaller and are refused above ``MAX_FRAME``).
"""

from __future__ import annotations

import asyncio
import os
import struct
from multiprocessing.connection import Connection

from scheduler.rank_io import Outbox

MAX_FRAME = 0x7FFFFFFF
DEFAULT_MAX_BUFFERED = 64 << 20
READ_CHUNK = 1 << 16


class PipeBackedUp(RuntimeError):
    """More than ``max_buffered`` bytes wait for a rank that does not read."""


class RequestPipe:
    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop,
                 max_buffered: int = DEFAULT_MAX_BUFFERED):
        self.conn = conn
        self.loop = loop
        self.max_buffered = max_buffered
        # The frames and the non-blocking writes are a rank's own (scheduler.rank_io);
        # here the loop writes what waits, as the rank reads.
        self._box = Outbox(conn)
        self.fd = self._box.fd

    @property
    def num_buffered(self) -> int:
        return len(self._box.waiting)

    def send(self, payload: bytes) -> None:
        """Queue one message; raises ``BrokenPipeError`` if the rank is gone and
        ``PipeBackedUp`` if it has stopped reading for long."""
        if len(payload) > MAX_FRAME:
            raise ValueError(f"message of {len(payload)} bytes is too large for a pipe frame")
        waiting = self._box.waiting
        if len(waiting) + len(payload) > self.max_buffered:
            raise PipeBackedUp(f"{len(waiting)} bytes already wait for this rank")
        had_waiting = bool(waiting)
        self._box.send(payload)
        if waiting and not had_waiting:
            self.loop.add_writer(self.fd, self._flush)

    def _flush(self) -> None:
        try:
            self._box.flush()
        except OSError:  # the rank is gone; its exit is handled through its sentinel
            self._box.waiting.clear()
        if not self._box.waiting:
            self.loop.remove_writer(self.fd)

    def detach(self, timeout_s: float = 1.0) -> bool:
        """Stop using the loop; write what is still buffered within ``timeout_s`` and
        make the pipe blocking again for the launcher's ``ShutdownReq``. Returns False
        if a frame is left half-written (the pipe must then not be used again)."""
        if self._box.waiting:
            self.loop.remove_writer(self.fd)
        try:
            self._box.drain(timeout_s)
        except OSError:
            pass
        os.set_blocking(self.fd, True)
        return not self._box.waiting


class FrameReader:
    """The frames a rank wrote to its output pipe, read without ever blocking."""

    def __init__(self, conn: Connection):
        self.fd = conn.fileno()
        self._buf = bytearray()
        os.set_blocking(self.fd, False)

    def read(self, max_bytes: int = 1 << 22) -> tuple[list[bytes], bool]:
        """(whole frames read now, whether the pipe reached EOF). Reads at most about
        ``max_bytes`` per call, so one busy rank cannot hold the loop; a frame cut short
        stays buffered for the next call."""
        eof = False
        num_read = 0
        while num_read < max_bytes:
            try:
                chunk = os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            self._buf += chunk
            num_read += len(chunk)
        return self._frames(), eof

    def _frames(self) -> list[bytes]:
        frames, buf, at = [], self._buf, 0
        while len(buf) - at >= 4:
            (size,) = struct.unpack_from("!i", buf, at)
            header = 4
            if size == -1:  # Connection's framing for payloads of 2 GiB and more
                if len(buf) - at < 12:
                    break
                (size,) = struct.unpack_from("!Q", buf, at + 4)
                header = 12
            if len(buf) - at - header < size:
                break
            frames.append(bytes(buf[at + header:at + header + size]))
            at += header + size
        del buf[:at]
        return frames
