"""The requests the API has dispatched and not yet seen finish, keyed by rid.

Each ``RequestHandle`` has an asyncio queue that receives, in order, the request's
``ReqOutput``s and at most one ``RequestFailed`` (then nothing more). A handle leaves
the registry when its finish output arrives, when it fails, or when the route aborts
it; later outputs for its rid are dropped. Event-loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.finish import ABORT_REQUESTED, FinishAbort, finish_from_json
from scheduler.messages import ReqOutput
from server.errors import RequestFailed

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class RequestHandle:
    rid: str
    dp_rank: int
    prompt_len: int
    # The rank whose prefix cache the request's prompt met: ``dp_rank``, except for a
    # PD front door's request (its prefill rank; ``server.pd`` sets it).
    cache_rank: int = -1
    arrival_time: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    first_token_time: float | None = None
    last_token_time: float | None = None
    is_finished: bool = False
    # Ended by /abort_request: its abort finish is the client's answer, not an error.
    abort_requested: bool = False
    # Called once when the handle leaves the registry: True if it ended well (a finish
    # output, an abort /abort_request asked for included, or the route aborted it),
    # False if it failed (its rank was lost, or the rank aborted it: a timeout, a
    # refusal, a hand-off it could not publish).
    # PD prefill uses it to retire the room's route entry (scheduler.pd_router).
    on_exit: Callable[[bool], None] | None = None
    # Tokens the rank generates that the client never gets (a prompt-only request's
    # one, ``server.request_flow``): neither counted as generated in the metrics nor
    # timed as a first token.
    hidden_tokens: int = 0


class MetricsObserver:
    """Told about every output as it arrives; ``server.metrics`` implements it."""

    def on_first_token(self, ttft_s: float) -> None: ...
    def on_tokens(self, num_tokens: int, interval_s: float) -> None: ...
    def on_finish(self, e2e_s: float, prompt_tokens: int, completion_tokens: int) -> None: ...
    def on_prompt_cache(self, prompt_tokens: int, cached_tokens: int, dp_rank: int) -> None:
        """A dispatched request finished; ``cached_tokens`` of its ``prompt_tokens`` came
        from rank ``dp_rank``'s prefix cache (in PD, its prefill rank's). Told by the
        request flow (``server.request_flow``)."""
    def on_abort(self) -> None:
        """A request ended without its finish: aborted by its rank or by the API (the
        client left), or failed with its rank."""


class InFlight:
    def __init__(self) -> None:
        self._reqs: dict[str, RequestHandle] = {}
        self.observer = MetricsObserver()

    def __len__(self) -> int:
        return len(self._reqs)

    def __contains__(self, rid: str) -> bool:
        return rid in self._reqs

    def add(self, handle: RequestHandle) -> None:
        self._reqs[handle.rid] = handle

    def remove(self, handle: RequestHandle, ok: bool = True) -> None:
        handle.is_finished = True
        if self._reqs.get(handle.rid) is handle:
            del self._reqs[handle.rid]
        if handle.on_exit is not None:
            on_exit, handle.on_exit = handle.on_exit, None
            on_exit(ok)

    def on_rank(self, dp_rank: int) -> list[RequestHandle]:
        return [h for h in self._reqs.values() if h.dp_rank == dp_rank]

    def deliver(self, dp_rank: int, out: ReqOutput, now: float) -> None:
        handle = self._reqs.get(out.rid)
        if handle is None or handle.dp_rank != dp_rank:
            return  # aborted or failed already
        if out.new_token_ids:
            if handle.first_token_time is None:
                handle.first_token_time = now  # also: a PD decode rank took its KV
                if not handle.hidden_tokens:  # no latency for a token nobody gets
                    self.observer.on_first_token(now - handle.arrival_time)
            else:
                self.observer.on_tokens(len(out.new_token_ids), now - handle.last_token_time)
            handle.last_token_time = now
        # The one place the API reads a finish reason off the wire: typed from here on.
        reason = out.finish_reason = finish_from_json(out.finish_reason)
        if reason is not None:
            aborted = isinstance(reason, FinishAbort)
            if aborted and reason.status_code == ABORT_REQUESTED:
                # Asked for (/abort_request): the client gets what it has, and this end.
                logger.info("request %s aborted on rank %d: %s", out.rid, dp_rank, reason.message)
                out.finish_reason = FinishAbort(reason.message)
                handle.abort_requested, aborted = True, False
                self.observer.on_abort()
            elif aborted:
                # The rank ended it (a timeout, a request it could not take): the
                # route's own aborts have left the registry before their echo.
                logger.warning("request %s aborted on rank %d: %s", out.rid, dp_rank,
                               reason.message)
                self.observer.on_abort()
            self.remove(handle, ok=not aborted)
            self.observer.on_finish(now - handle.arrival_time, out.prompt_tokens,
                                    max(out.completion_tokens - handle.hidden_tokens, 0))
        handle.queue.put_nowait(out)

    def fail(self, handle: RequestHandle, message: str) -> None:
        logger.warning("request %s on rank %d failed: %s", handle.rid, handle.dp_rank, message)
        self.observer.on_abort()
        self.remove(handle, ok=False)
        handle.queue.put_nowait(RequestFailed(message))

    def fail_rank(self, dp_rank: int, message: str) -> list[RequestHandle]:
        failed = self.on_rank(dp_rank)
        for handle in failed:
            self.fail(handle, message)
        return failed

    def fail_all(self, message: str) -> None:
        for handle in list(self._reqs.values()):
            self.fail(handle, message)
