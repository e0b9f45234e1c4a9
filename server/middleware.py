"""ASGI middleware in front of every route: ``--api-key`` and the request-body limit.

Both are plain ASGI (not Starlette's ``BaseHTTPMiddleware``), so a streaming response
and the disconnect events the routes watch pass through untouched. Order: the key is
checked first, so a client without it never gets a body read.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError, PayloadTooLarge, Unauthorized, error_response

# Liveness probes carry no key (SGLang exempts /health too). /health_generate runs a
# generation on every rank and /metrics shows the load: both need the key.
OPEN_PATHS = frozenset({"/health"})


class RequireApiKey:
    """``Authorization: Bearer <key>`` on every route but ``OPEN_PATHS``, else 401."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = api_key.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        problem = self._problem(_header(scope, b"authorization"))
        if problem is not None:
            await _answer(Unauthorized(problem), scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _problem(self, authorization: bytes | None) -> str | None:
        if authorization is None:
            return "missing API key: send the header 'Authorization: Bearer <key>'"
        scheme, _, token = authorization.strip().partition(b" ")
        # compare_digest: the time taken does not tell how much of the key matched.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
            return "invalid API key in the Authorization header (expected 'Bearer <key>')"
        return None


class LimitRequestBody:
    """413 for a body over ``max_bytes``: at once when ``Content-Length`` says so, else
    (chunked) as soon as the bytes received pass it, so no more than the limit plus one
    chunk is ever held. The rest of an oversized body is read and dropped by uvicorn, as
    long as ``--timeout-request-read`` allows, so that the client reads the 413."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")  # h11 has checked it is digits
        if declared is not None and int(declared) > self.max_bytes:
            await _answer(self._too_large(f"Content-Length {int(declared)}"), scope, receive, send)
            return
        num_received = 0

        async def receive_counted() -> Message:
            nonlocal num_received
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > self.max_bytes:
                    raise self._too_large(f"more than {self.max_bytes} bytes received")
            return message

        await self.app(scope, receive_counted, send)

    def _too_large(self, seen: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body too large: {seen}; the limit is {self.max_bytes} "
                               f"bytes (--max-request-body-bytes)")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def _answer(exc: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(exc)(scope, receive, send)
