"""Errors the HTTP routes answer with, in SGLang's shape: ``{"error": {"message": ...}}``.

Routes raise an ``ApiError`` subclass; the app's exception handler turns it into the
response. Status classes (SGLang's gateways, sglang-router and smg, act on them): 4xx
is the client's fault and passed through; 5xx and 429 are retried, maybe on another worker,
so every "cannot serve right now" answer is 503 with ``Retry-After``.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

RETRY_AFTER_S = 1


class ApiError(Exception):
    status_code = 500
    error_type = "InternalServerError"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str] | None:
        return None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "code": self.status_code}}


class BadRequest(ApiError):
    """The request is wrong; sending it again will not help."""

    status_code = 400
    error_type = "BadRequestError"


class Unauthorized(ApiError):
    """``--api-key`` is set and the request does not carry it."""

    status_code = 401
    error_type = "AuthenticationError"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}  # RFC 9110: every 401 names its scheme


class NotFound(ApiError):
    status_code = 404
    error_type = "NotFoundError"


class PayloadTooLarge(ApiError):
    """The request body exceeds ``--max-request-body-bytes``."""

    status_code = 413
    error_type = "PayloadTooLargeError"


class ServiceUnavailable(ApiError):
    """No rank can take the request now (all full, dead, or the server is stopping)."""

    status_code = 503
    error_type = "ServiceUnavailableError"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


class RequestFailed(ApiError):
    """A request already dispatched ended without a result (its rank died or stalled).

    503 so that a gateway retries it elsewhere: the failure is the server's, and
    nothing was returned to the client yet."""

    status_code = 503
    error_type = "RequestFailedError"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)
