"""``server.middleware`` on a one-route Starlette app through ``TestClient`` (no ranks).

tests/test_http_limits.py runs the same limits on the real command."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from server.errors import ApiError, error_response
from server.middleware import LimitRequestBody, RequireApiKey

LIMIT = 100


async def echo_len(request: Request) -> JSONResponse:
    return JSONResponse({"len": len(await request.body())})


async def api_error(request: Request, exc: ApiError):
    return error_response(exc)


def client(**key) -> TestClient:
    middleware = [Middleware(LimitRequestBody, max_bytes=LIMIT)]
    if key:
        middleware.insert(0, Middleware(RequireApiKey, **key))
    app = Starlette(routes=[Route("/echo", echo_len, methods=["POST"]),
                            Route("/health", echo_len, methods=["POST"])],
                    middleware=middleware, exception_handlers={ApiError: api_error})
    return TestClient(app)


def test_body_limit_by_length_and_by_counted_chunks():
    with client() as c:
        assert c.post("/echo", content=b"x" * LIMIT).json() == {"len": LIMIT}
        r = c.post("/echo", content=b"x" * (LIMIT + 1))
        assert r.status_code == 413 and "--max-request-body-bytes" in r.json()["error"]["message"]
        chunks = (b"x" * 30 for _ in range(4))  # no Content-Length: counted as it comes
        r = c.post("/echo", content=chunks)
        assert r.status_code == 413 and "more than 100 bytes" in r.json()["error"]["message"]


def test_api_key_bearer_scheme_is_case_insensitive_and_health_is_open():
    with client(api_key="k") as c:
        assert c.post("/echo", content=b"ab", headers={"Authorization": "bearer k"}).json() == {"len": 2}
        assert c.post("/echo", content=b"ab", headers={"Authorization": "Bearer k2"}).status_code == 401
        assert c.post("/echo", content=b"ab", headers={"Authorization": "Bearer"}).status_code == 401
        assert c.post("/health", content=b"ab").status_code == 200
        # The key is checked before the body: an unauthenticated big body is a 401, not a 413.
        assert c.post("/echo", content=b"x" * (LIMIT + 1)).status_code == 401
