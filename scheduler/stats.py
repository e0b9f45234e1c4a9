"""A rank's serving figures: SGLang's "Prefill batch." and periodic "Decode batch."
lines, and ``RankStats``.

Each batch that admits requests logs SGLang's prefill line, with the prompt tokens the
new requests found in the prefix cache (``#cached-token``)::

    Prefill batch. #new-seq: 1, #new-token: 128, #cached-token: 2048, token usage: 0.02, #running-req: 1, #queue-req: 0,

Every ``--decode-log-interval`` decoding batches (forward passes that generate at least
one token for a request past its prompt, SGLang's ``forward_ct_decode``) the rank logs
SGLang's line, which operators watch and tools parse::

    Decode batch. #running-req: 3, #token: 412, token usage: 0.01, gen throughput (token/s): 151.22, #queue-req: 0,

and sends the same figures to the API as ``RankStats`` (``/server_info``'s
``internal_states``, Prometheus ``sglang:gen_throughput``). ``gen throughput`` is the
tokens those batches decoded over the wall time since the previous line (SGLang's
``last_gen_throughput``), leaving out time the rank had nothing to run (SGLang counts it,
so its first line after a pause shows a throughput near 0). Plain Python: the scheduler's clock and counters only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from scheduler.messages import RankStats


class DecodeStats:
    """Counts decoding batches; says when the next line is due."""

    def __init__(self, interval: int, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self.num_decode_batches = 0
        self._num_decoded = 0  # tokens decoded since the last line
        self._tic = clock()
        self._was_idle = True
        self.last_gen_throughput = 0.0

    def on_step(self, num_items: int, num_decoded: int, step_start: float) -> float | None:
        """Count a scheduler step that began at ``step_start`` (``clock`` time) and ran
        ``num_items`` requests, ``num_decoded`` of them decoding. At every
        ``interval``-th decoding batch, returns the mean wall seconds per decoding
        batch since the last line (and updates ``last_gen_throughput``); else None.
        Time the rank spent with nothing to run is left out: the span restarts at the
        first batch after an idle step."""
        if num_items == 0:
            self._was_idle = True
            return None
        if self._was_idle:
            self._was_idle = False
            if self._num_decoded == 0:
                self._tic = step_start
        if num_decoded == 0:
            return None
        self.num_decode_batches += 1
        self._num_decoded += num_decoded
        if self.num_decode_batches % self.interval:
            return None
        now = self.clock()
        gap_s = max(now - self._tic, 1e-9)
        self.last_gen_throughput = self._num_decoded / gap_s
        self._num_decoded, self._tic = 0, now
        return gap_s / self.interval


def decode_batch_line(stats: RankStats) -> str:
    """SGLang's line, field for field (its trailing ", " included)."""
    return (f"Decode batch. #running-req: {stats.num_running_reqs}, "
            f"#token: {stats.num_used_tokens}, token usage: {stats.token_usage:.2f}, "
            f"gen throughput (token/s): {stats.last_gen_throughput:.2f}, "
            f"#queue-req: {stats.num_queue_reqs}, ")


def prefill_batch_line(num_new: int, num_new_tokens: int, num_cached: int,
                       token_usage: float, num_running: int, num_queued: int) -> str:
    """SGLang's line for a batch that admitted ``num_new`` requests: the prompt tokens
    the batch computes and those the new requests reused from the cache."""
    return (f"Prefill batch. #new-seq: {num_new}, #new-token: {num_new_tokens}, "
            f"#cached-token: {num_cached}, token usage: {token_usage:.2f}, "
            f"#running-req: {num_running}, #queue-req: {num_queued}, ")
