"""A pass-through HTTP proxy that records what a gateway sends to an engine and what it got.

``python -m tests.recording_proxy PORT TARGET_URL LOG_PATH`` listens on 127.0.0.1:PORT and
forwards every request to TARGET_URL unchanged (streams stay streams). When a response
ends it appends one JSON line to LOG_PATH:

    {"t": <request arrival, time.time()>, "method", "path", "query",
     "body": <the JSON request body or null>, "status",
     "response": <the JSON response body, or the last ``data:`` object of an event
                  stream, or null>}

Gateway tests read it to see, independently of the engine's own answer, which routing
keys the gateway injected (``data_parallel_rank``, ``routed_dp_rank``, ...), which load
endpoints it polls, and which ``meta_info.dp_rank`` came back on each hop (in PD mode the
gateway drops the prefill server's response; this is where it is still visible).
"""

from __future__ import annotations

import json
import sys
import time

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}


def create_app(target: str, log_path: str) -> Starlette:
    client = httpx.AsyncClient(base_url=target, timeout=httpx.Timeout(120.0, connect=5.0))

    def record(entry: dict) -> None:
        with open(log_path, "a") as log:  # one write per line: readers never see half
            log.write(json.dumps(entry) + "\n")

    async def forward(request: Request):
        arrived = time.time()
        raw = await request.body()
        entry = {"t": arrived, "method": request.method, "path": request.url.path,
                 "query": request.url.query, "body": _json_or_none(raw),
                 "status": None, "response": None}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            upstream = await client.send(client.build_request(
                request.method, request.url.path, params=request.url.query, content=raw,
                headers=headers), stream=True)
        except httpx.HTTPError as exc:
            entry["response"] = {"proxy_error": repr(exc)}
            record(entry)
            raise  # the gateway sees a 500 from us, as it would a dead engine's reset
        entry["status"] = upstream.status_code

        async def body():
            chunks = []
            try:
                async for chunk in upstream.aiter_raw():
                    chunks.append(chunk)
                    yield chunk
            finally:
                await upstream.aclose()
                entry["response"] = _response(b"".join(chunks))
                record(entry)

        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(body(), status_code=upstream.status_code, headers=out_headers)

    return Starlette(routes=[Route("/{path:path}", forward,
                                   methods=["GET", "POST", "PUT", "DELETE", "PATCH"])])


def _json_or_none(raw: bytes):
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _response(raw: bytes):
    """A JSON body as is; for an event stream the last ``data:`` JSON object."""
    parsed = _json_or_none(raw)
    if parsed is not None:
        return parsed
    last = None
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            last = _json_or_none(line[len("data: "):].encode()) or last
    return last


if __name__ == "__main__":
    port, target, log_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    uvicorn.run(create_app(target, log_path), host="127.0.0.1", port=port, log_level="warning")
