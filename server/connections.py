"""The HTTP connection layer: the bounds uvicorn's HTTP protocols lack, and open files.

uvicorn's protocols (``H11Protocol``, and ``HttpToolsProtocol`` that ``http="auto"``
runs when httptools is installed; checked on 0.55) time a connection out only while it
idles between requests, and only after a first response: a connection that never
sends a byte, a request line and headers sent a byte at a time, or a body trickled
slowly each hold a socket and a file descriptor for good. Their own
``limit_concurrency`` counts open connections (idle ones too) and in-flight requests,
and answers a plain-text 503 without ``Retry-After``. ``ConnectionBounds`` adds, per
connection, over either protocol (``BoundedH11Protocol``, and the httptools one that
``bounded_httptools_protocol`` builds when httptools is installed):

- a request-read deadline (``--timeout-request-read``), armed when the connection
  opens and, on a kept-alive connection, at the first byte of each later request (until
  then uvicorn's keep-alive timer runs); disarmed once the parser holds the whole
  request, headers and body. On expiry the connection gets a 408 (unless a response has
  begun) and is closed; a route still reading the body sees a disconnect.
- a connection bound (``--limit-concurrency``). A connection opened past it closes the
  oldest connection that is waiting for a request (none sent yet, headers incomplete, or
  kept alive after a response), as nginx reuses idle keep-alive connections: idle and
  slow-header clients cannot hold the descriptors new clients need. A request that
  arrives while more connections are still open (all of them mid-request) gets the
  JSON 503 that every "cannot serve now" answer uses, with ``Retry-After``, and
  ``Connection: close`` so its descriptor is freed.

``--http-stack fast`` (the default when uvloop and httptools are installed) runs the
server on uvloop's event loop and httptools' parser: less API CPU per request
(``python -m bench.micro.http_stack`` measures it); ``asyncio`` on asyncio's loop and h11.

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
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import ServiceUnavailable

if TYPE_CHECKING:
    from server.args import ServerArgs

logger = logging.getLogger(__name__)

# Descriptors the API process holds besides connections: the listening socket, logs,
# the tokenizer and model files it reads, the board. Measured 5 with 2 ranks.
FDS_RESERVED = 64
# Per rank: two pipes, its process sentinel, segments (measured 4); twice that for margin.
FDS_PER_RANK = 8
# The target when the hard limit is unlimited (macOS); Linux's default fs.nr_open.
UNLIMITED_NOFILE_TARGET = 1 << 20
_TIMEOUT_BODY = (b'{"error": {"message": "no whole request within --timeout-request-read", '
                 b'"type": "RequestTimeout", "code": 408}}')
# What a connection whose request did not arrive in time gets before it is closed.
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                   b"Connection: close\r\nContent-Length: " + str(len(_TIMEOUT_BODY)).encode()
                   + b"\r\n\r\n" + _TIMEOUT_BODY)


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


def soft_open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED_NOFILE_TARGET if soft == resource.RLIM_INFINITY else soft


def accept_backlog() -> int:
    """uvicorn's ``backlog``: asyncio accepts up to this many connections per wake-up
    (and the kernel queues as many); uvicorn's 2048, less where descriptors are few."""
    return max(16, min(2048, soft_open_file_limit() // 8))


def default_connection_limit(num_ranks: int) -> int:
    """``--limit-concurrency`` left unset: the connections the open-file limit leaves
    room for once the ranks' descriptors and two accept rounds are set aside (below 1:
    no room; ``server.args.resolve_args`` refuses to start)."""
    return (soft_open_file_limit() - FDS_RESERVED - FDS_PER_RANK * num_ranks
            - 2 * accept_backlog())


def protocol_for(args: ServerArgs) -> functools.partial:
    """The ``http`` protocol factory to give ``uvicorn.Config`` (one per server: the
    waiting connections are shared by all of its connections): httptools' parser with
    ``--http-stack fast``, h11's with ``asyncio``, each with the same bounds."""
    protocol = bounded_httptools_protocol() if args.http_stack == "fast" else BoundedH11Protocol
    return functools.partial(protocol, timeout_request_read=args.timeout_request_read,
                             max_connections=args.limit_concurrency, waiting=WaitingConnections())


def event_loop_factory(args: ServerArgs) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop with ``--http-stack fast``, else asyncio's."""
    if args.http_stack == "fast":
        import uvloop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


class WaitingConnections:
    """The server's connections that wait for a request, oldest first. Owned by the
    event loop's thread, like uvicorn's own set of connections."""

    def __init__(self):
        self._ordered: dict[ConnectionBounds, None] = {}
        # Connections closed to make room whose close has not completed yet: uvicorn
        # counts them until their connection_lost, which a burst of accepts (uvloop
        # runs many in one loop iteration) can precede.
        self.closing: set[ConnectionBounds] = set()

    def __len__(self) -> int:
        return len(self._ordered)

    def add(self, protocol: ConnectionBounds) -> None:
        self._ordered.setdefault(protocol)  # a connection keeps its place while it waits

    def discard(self, protocol: ConnectionBounds) -> None:
        self._ordered.pop(protocol, None)

    def pop_oldest(self) -> ConnectionBounds | None:
        for protocol in self._ordered:
            del self._ordered[protocol]
            return protocol
        return None


class ConnectionBounds:
    """The bounds, over either of uvicorn's HTTP protocols (a mixin placed before it).
    A subclass says, from its parser's state, whether the request being read is whole
    (``_has_whole_request``) and whether the connection waits for one (``_is_waiting``).
    """

    def __init__(self, *args, timeout_request_read: float, max_connections: int,
                 waiting: WaitingConnections, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout_request_read = timeout_request_read
        self.max_connections = max_connections  # not limit_concurrency: the parent reads that
        self.waiting = waiting
        self._read_deadline: asyncio.TimerHandle | None = None
        self._served_app = self.app
        self.app = self._admit

    def _has_whole_request(self) -> bool:
        raise NotImplementedError

    def _is_waiting(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_deadline()
        if self._num_open() > self.max_connections and (victim := self.waiting.pop_oldest()):
            logger.debug("closing the waiting connection from %s: %d connections open, more "
                         "than --limit-concurrency", victim.client, self._num_open())
            victim.transport.close()
            self.waiting.closing.add(victim)
        self.waiting.add(self)

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None:  # the first byte of a later request
            self._arm_read_deadline()
        super().data_received(data)
        if self._has_whole_request():
            self._disarm_read_deadline()
        self._note_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._note_waiting()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_deadline()
        self.waiting.discard(self)
        self.waiting.closing.discard(self)
        super().connection_lost(exc)

    def _num_open(self) -> int:
        return len(self.connections) - len(self.waiting.closing)

    def _note_waiting(self) -> None:
        if self._is_waiting() and not self.transport.is_closing():
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
        if not (self.cycle is not None and self.cycle.response_started):
            self.transport.write(REQUEST_TIMEOUT)  # nothing answered yet: say why
        self.transport.close()

    async def _admit(self, scope, receive, send) -> None:
        """The ASGI app uvicorn runs for each request on this connection."""
        if self._num_open() > self.max_connections:
            logger.warning("503: %d connections open, more than --limit-concurrency %d",
                           self._num_open(), self.max_connections)
            exc = ServiceUnavailable(f"more than {self.max_connections} open connections "
                                     f"(--limit-concurrency); retry later")
            response = JSONResponse(exc.body(), status_code=exc.status_code,
                                    headers={**exc.headers, "Connection": "close"})
            await response(scope, receive, send)
            return
        await self._served_app(scope, receive, send)


class BoundedH11Protocol(ConnectionBounds, H11Protocol):
    def _has_whole_request(self) -> bool:
        # IDLE: the request line or headers are incomplete; SEND_BODY: the body is.
        # DONE or MUST_CLOSE: the whole request is in; ERROR: uvicorn answered 400.
        return self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY

    def _is_waiting(self) -> bool:
        """No request in progress (its headers are not all in, and no response is
        being sent)."""
        in_progress = self.cycle is not None and not self.cycle.response_complete
        return self.conn.their_state is h11.IDLE and not in_progress


@functools.cache
def bounded_httptools_protocol() -> type:
    """The httptools variant, built on first use: httptools is an optional dependency."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpTools(ConnectionBounds, HttpToolsProtocol):
        # httptools calls on_message_begin at a request's first byte and
        # on_message_complete once its body is all in.
        _message_complete = False

        def on_message_begin(self) -> None:
            self._message_complete = False
            super().on_message_begin()

        def on_message_complete(self) -> None:
            self._message_complete = True
            super().on_message_complete()

        def _has_whole_request(self) -> bool:
            return self._message_complete

        def _is_waiting(self) -> bool:
            """No request in progress: a request's cycle starts once its headers are
            all in (uvicorn queues pipelined ones), and ends with its response."""
            in_progress = self.cycle is not None and not self.cycle.response_complete
            return not in_progress and not self.pipeline

    return BoundedHttpTools
