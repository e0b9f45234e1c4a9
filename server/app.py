"""``create_app(engine)``: the Starlette app over one ``EngineClient``.

No module globals: the engine client and this app's metrics live in the lifespan
state (``request.state.engine``, ``request.state.metrics``). The lifespan starts the
client inside the serving event loop (it registers readers on the ranks' pipes) and
stops it on shutdown, which fails whatever is still in flight. ``server.middleware``
checks ``--api-key`` and ``--max-request-body-bytes`` in front of every route; the
connection-level bounds live in ``server.connections``.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from server.engine_client import EngineClient
from server.inflight import MetricsObserver
from server.errors import ApiError, error_response
from server.generate import generate_routes
from server.info import info_routes
from server.metrics import ServerMetrics, metrics_routes
from server.middleware import LimitRequestBody, RequireApiKey
from server.openai import openai_routes
from server.sse import ClientDisconnected

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's code; nobody is left to read it


def create_app(engine: EngineClient) -> Starlette:
    metrics = ServerMetrics(engine)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await engine.start()
        engine.observer = metrics
        try:
            yield {"engine": engine, "metrics": metrics}
        finally:
            engine.observer = MetricsObserver()
            await engine.stop()

    # The first is the outermost: the key is checked before any body is read.
    middleware = [Middleware(LimitRequestBody, max_bytes=engine.args.max_request_body_bytes)]
    if engine.args.api_key is not None:
        middleware.insert(0, Middleware(RequireApiKey, api_key=engine.args.api_key))
    return Starlette(
        routes=[*generate_routes(), *openai_routes(), *info_routes(), *metrics_routes()],
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            ClientDisconnected: _client_gone,
            ClientDisconnect: _client_gone,  # the client left (or was cut off) mid-body
            Exception: _internal_error,
        },
    )


async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return JSONResponse({"error": {"message": exc.detail, "code": exc.status_code}},
                        status_code=exc.status_code, headers=exc.headers)


async def _client_gone(request: Request, exc: ClientDisconnected | ClientDisconnect) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                                   "code": 500}}, status_code=500)
