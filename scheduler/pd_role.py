"""The PD part of a rank's scheduler, as one declared interface.

A rank's ``Scheduler`` holds exactly one ``PDRole`` and calls it at fixed points of its
loop; it never asks which role it holds. Three implementations:

- ``MixedRole`` (this module): a mixed rank, no disaggregation. Every method does
  nothing, or answers as a rank without PD would.
- ``scheduler.pd_prefill.PrefillSender``: hands each request off after its first token
  and keeps the KV for decode until it is released.
- ``scheduler.pd_decode.DecodeReceiver``: parks requests until their KV arrives from a
  prefill rank, then lets them decode.

Plain Python: no torch, no shared memory here (``scheduler.pd`` has the whole design).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from scheduler.request import Req

EMPTY_POLL: tuple[tuple, tuple] = ((), ())  # nothing ready, nothing failed


class PDRole(ABC):
    # True on a prefill rank: a request ends here with its first token (``hand_off``),
    # and the board counts only prompt work not done yet (``Scheduler.publish_load``).
    hands_off: bool = False

    @property
    def num_held(self) -> int:
        """Requests whose KV the role keeps after they left the scheduler (a prefill
        rank's hand-offs waiting for decode): the prefix cache is not flushed then."""
        return 0

    @property
    @abstractmethod
    def has_work(self) -> bool:
        """Asked by ``Scheduler.has_work`` (the rank loop and the in-process harness):
        True while the role holds requests the loop must keep stepping for (parked
        decode requests), though no batch runs."""

    @abstractmethod
    def poll_timeout(self, idle_wait_s: float) -> float:
        """Asked when the rank has no batch to run, before it blocks on its pipe: how long
        it may sleep. ``idle_wait_s`` unless shared memory must be polled sooner."""

    @abstractmethod
    def poll(self, admit: Callable[[Req], bool]) -> tuple[Sequence, Sequence]:
        """Called once per step, after the messages are received and before the batch is
        chosen, so KV that arrived or was released is seen at once. ``admit(req)``
        reserves a request's KV if the rank can run it now. Returns (ready, failed):
        ``Ready`` requests to start decoding, ``Failure`` requests to end."""

    @abstractmethod
    def pending_load(self) -> tuple[int, int]:
        """Asked when the board row is published and stats are reported: (requests,
        prompt tokens) the role holds outside the queues, counted as waiting load."""

    @abstractmethod
    def admission_error(self, req: Req) -> str | None:
        """Asked when a request arrives, after the checks every rank makes: why this role
        cannot take it (a PD request needs a ``bootstrap_room``), or None."""

    @abstractmethod
    def reserve_len(self, req: Req, context_len: int) -> int:
        """Asked whenever the scheduler reserves or sizes a request's KV: how many slots
        it needs on this rank (a prefill rank never computes past the prompt)."""

    @abstractmethod
    def park(self, req: Req) -> bool:
        """Called with each admitted request: True if the role holds it until its KV
        arrives (a decode rank), False to queue it for a batch as usual."""

    @abstractmethod
    def discard(self, req: Req) -> bool:
        """Called when a request that is not running is aborted: True if the role held it
        (and dropped it), False if it is in the scheduler's waiting queue."""

    @abstractmethod
    def hand_off(self, req: Req, logprob: float) -> str | None:
        """Called on a ``hands_off`` rank when a request sampled its first token: publish
        its KV for decode. Returns None, or why it could not (the request is aborted)."""

    @abstractmethod
    def on_abort(self, req: Req, message: str) -> None:
        """Called when a request this rank held is aborted, so peers waiting on it learn
        at once instead of at their timeout."""

    @abstractmethod
    def on_refused(self, req: Req, message: str) -> None:
        """Called when a request is refused at admission or its hand-off failed, so peers
        waiting on it learn at once."""

    def release_handed_off(self, rid: str, message: str) -> bool:
        """Called when a request that already finished here is aborted: a prefill rank
        frees the KV it holds for it if no decode rank has claimed it (its decode half
        ended, or died, without taking it). True if something was freed."""
        return False

    @abstractmethod
    def close(self) -> None:
        """Called once at rank exit: release what the role holds in shared memory."""


class MixedRole(PDRole):
    """A rank without disaggregation: the null role."""

    @property
    def has_work(self) -> bool:
        return False

    def poll_timeout(self, idle_wait_s: float) -> float:
        return idle_wait_s

    def poll(self, admit: Callable[[Req], bool]) -> tuple[Sequence, Sequence]:
        return EMPTY_POLL

    def pending_load(self) -> tuple[int, int]:
        return 0, 0

    def admission_error(self, req: Req) -> str | None:
        return None

    def reserve_len(self, req: Req, context_len: int) -> int:
        return req.reserve_len(context_len)

    def park(self, req: Req) -> bool:
        return False

    def discard(self, req: Req) -> bool:
        return False

    def hand_off(self, req: Req, logprob: float) -> str | None:
        raise AssertionError("a mixed rank never hands a request off")  # hands_off is False

    def on_abort(self, req: Req, message: str) -> None:
        pass

    def on_refused(self, req: Req, message: str) -> None:
        pass

    def close(self) -> None:
        pass

