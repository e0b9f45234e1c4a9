"""The HTTP connection layer: the bounds uvicorn's h11 protocol lacks, and open files.

uvicorn's ``H11Protocol`` (what ``http="auto"`` runs without httptools, checked on
0.55) times a connection out only while it idles between requests, and only after a
first response: a connection that never sends a byte, a request line and headers sent
a byte at a time, or a body trickled slowly each hold a socket and a file descriptor
for good. Its own ``limit_concurrency`` counts open connections (idle ones too) and
in-flight requests, and answers a plain-text 503 without ``Retry-After``.
``BoundedH11Protocol`` adds, per connection:

- a request-read deadline (``--timeout-request-read``), armed when the connection
  opens and, on a kept-alive connection, at the first byte of each later request (until
  then uvicorn's keep-alive timer runs); disarmed once h11 holds the whole request,
  headers and body. On expiry the connection is closed; a route still reading the body
  sees a disconnect.
- a connection bound (``--limit-concurrency``). A connection opened past it closes the
  oldest connection that is waiting for a request (none sent yet, headers incomplete, or
  kept alive after a response), as nginx reuses idle keep-alive connections: idle and
  slow-header clients cannot hold the descriptors new clients need. A request that
  arrives while more connections are still open (all of them mid-request) gets the
  JSON 503 that every "cannot serve now" answer uses, with ``Retry-After``, and
  ``Connection: close`` so its descriptor is freed.

Every connection holds a descriptor; once the process has none left, ``accept`` fails,
and asyncio (3.11) then logs and re-schedules its accept loop once per pending
connection: new clients stall and the log floods. ``raise_open_file_limit`` lifts the
soft limit to the hard one at start (as SGLang does), and ``default_connection_limit``
keeps the bound below it, with room for the ranks' pipes and segments and for the
connections asyncio accepts in one go (``accept_backlog``, at most two rounds before a
closed one frees its descriptor).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.args import InvalidServerArgs, ServerArgs
from server.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

# Descriptors the API process holds besides connections: the listening socket, logs,
# the tokenizer and model files it reads, the board. Measured 5 with 2 ranks.
FDS_RESERVED = 64
# Per rank: two pipes, its process sentinel, segments (measured 4); twice that for margin.
FDS_PER_RANK = 8
# The target when the hard limit is unlimited (macOS); Linux's default fs.nr_open.
UNLIMITED_NOFILE_TARGET = 1 << 20


def raise_open_file_limit() -> int:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_NOFILE_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        logger.debug("open-file limit: soft %s already at its hard limit %s", soft, hard)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    logger.debug("open-file limit: soft %d raised to %d (hard %s)", soft, target, hard)
    return target


def _soft_open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED_NOFILE_TARGET if soft == resource.RLIM_INFINITY else soft


def accept_backlog() -> int:
    """uvicorn's ``backlog``: asyncio accepts up to this many connections per wake-up
    (and the kernel queues as many); uvicorn's 2048, less where descriptors are few."""
    return max(16, min(2048, _soft_open_file_limit() // 8))


def default_connection_limit(num_ranks: int) -> int:
    """``--limit-concurrency`` left unset: the connections the open-file limit leaves
    room for once the ranks' descriptors and two accept rounds are set aside."""
    soft = _soft_open_file_limit()
    limit = soft - FDS_RESERVED - FDS_PER_RANK * num_ranks - 2 * accept_backlog()
    if limit < 1:
        raise InvalidServerArgs(
            f"the open-file limit ({soft}) leaves no descriptor for HTTP connections with "
            f"{num_ranks} rank(s): raise it (ulimit -n) or set --limit-concurrency")
    return limit


def protocol_for(args: ServerArgs) -> functools.partial:
    """The ``http`` protocol factory to give ``uvicorn.Config`` (one per server: the
    waiting connections are shared by all of its connections)."""
    return functools.partial(BoundedH11Protocol, timeout_request_read=args.timeout_request_read,
                             max_connections=args.limit_concurrency, waiting=WaitingConnections())


class WaitingConnections:
    """The server's connections that wait for a request, oldest first. Owned by the
    event loop's thread, like uvicorn's own set of connections."""

    def __init__(self):
        self._ordered: dict[BoundedH11Protocol, None] = {}

    def __len__(self) -> int:
        return len(self._ordered)

    def add(self, protocol: BoundedH11Protocol) -> None:
        self._ordered.setdefault(protocol)  # a connection keeps its place while it waits

    def discard(self, protocol: BoundedH11Protocol) -> None:
        self._ordered.pop(protocol, None)

    def pop_oldest(self) -> BoundedH11Protocol | None:
        for protocol in self._ordered:
            del self._ordered[protocol]
            return protocol
        return None


class BoundedH11Protocol(H11Protocol):
    def __init__(self, *args, timeout_request_read: float, max_connections: int,
                 waiting: WaitingConnections, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout_request_read = timeout_request_read
        self.max_connections = max_connections  # not limit_concurrency: the parent reads that
        self.waiting = waiting
        self._read_deadline: asyncio.TimerHandle | None = None
        self._served_app = self.app
        self.app = self._admit

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_deadline()
        if len(self.connections) > self.max_connections and (victim := self.waiting.pop_oldest()):
            logger.debug("closing the waiting connection from %s: %d connections open, more "
                         "than --limit-concurrency", victim.client, len(self.connections))
            victim.transport.close()
        self.waiting.add(self)

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None:  # the first byte of a later request
            self._arm_read_deadline()
        super().data_received(data)
        # IDLE: the request line or headers are incomplete; SEND_BODY: the body is.
        # DONE or MUST_CLOSE: the whole request is in; ERROR: uvicorn answered 400.
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm_read_deadline()
        self._note_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._note_waiting()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_deadline()
        self.waiting.discard(self)
        super().connection_lost(exc)

    def _note_waiting(self) -> None:
        """Waiting: no request in progress (its headers are not all in, and no response
        is being sent)."""
        in_progress = self.cycle is not None and not self.cycle.response_complete
        if self.conn.their_state is h11.IDLE and not in_progress and not self.transport.is_closing():
            self.waiting.add(self)
        else:
            self.waiting.discard(self)

    def _arm_read_deadline(self) -> None:
        self._read_deadline = self.loop.call_later(self.timeout_request_read, self._read_timed_out)

    def _disarm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        # Debug, not info: a flood of slow clients must not flood the log too.
        logger.debug("closing the connection from %s: no whole request within %g s "
                     "(--timeout-request-read)", self.client, self.timeout_request_read)
        self.transport.close()

    async def _admit(self, scope, receive, send) -> None:
        """The ASGI app uvicorn runs for each request on this connection."""
        if len(self.connections) > self.max_connections:
            logger.warning("503: %d connections open, more than --limit-concurrency %d",
                           len(self.connections), self.max_connections)
            exc = ServiceUnavailable(f"more than {self.max_connections} open connections "
                                     f"(--limit-concurrency); retry later")
            response = JSONResponse(exc.body(), status_code=exc.status_code,
                                    headers={**exc.headers, "Connection": "close"})
            await response(scope, receive, send)
            return
        await self._served_app(scope, receive, send)
