"""Server-sent events as SGLang and OpenAI clients read them.

Each event is ``data: <json>\\n\\n``; the stream ends with ``data: [DONE]\\n\\n``; an
error after the response started is ``data: {"error": {...}}\\n\\n`` before ``[DONE]``
(the status line is already sent, so it cannot say it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import msgspec
from starlette.requests import Request
from starlette.responses import StreamingResponse

from server.errors import ApiError

DONE = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()


def event(obj: object) -> bytes:
    return b"data: " + _encoder.encode(obj) + b"\n\n"


def error_event(exc: ApiError) -> bytes:
    return event(exc.body())


class SSEResponse(StreamingResponse):
    """A streaming response that always closes its body iterator.

    Starlette stops iterating when the client disconnects (it cancels the task), but
    closing the async generator is what runs its ``finally`` blocks, which abort the
    request on its rank; do it here rather than leave it to garbage collection.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]):
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


class ClientDisconnected(Exception):
    """The client went away before a non-streaming response was ready."""


async def unless_disconnected(request: Request, work):
    """Await ``work`` (a coroutine) but cancel it if the client disconnects first;
    cancelling it closes its requests' iterators, which aborts them on their ranks."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merged(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as they come, tagged with the iterator's index.

    An exception in one is raised here; leaving early (or an exception) cancels and
    closes every iterator still running.
    """
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(index: int, iterator: AsyncIterator) -> None:
        try:
            async with aclosing(iterator) as items:
                async for item in items:
                    await queue.put((index, item, None))
        except Exception as exc:  # delivered to the consumer, which re-raises it
            await queue.put((index, None, exc))
        await queue.put((index, end, None))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is end:
                remaining -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
