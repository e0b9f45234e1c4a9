"""A rank's serving figures: SGLang's periodic "Decode batch." line and ``RankStats``.

Every ``--decode-log-interval`` decoding batches (forward passes that generate at least
one token for a request past its prompt, SGLang's ``forward_ct_decode``) the rank logs
SGLang's line, which operators watch and tools parse::

    Decode batch. #running-req: 3, #token: 412, token usage: 0.01, gen throughput (token/s): 151.22, #queue-req: 0,

and sends the same figures to the API as ``RankStats`` (``/server_info``'s
``internal_states``, Prometheus ``sglang:gen_throughput``). ``gen throughput`` is the
tokens those batches decoded over the wall time since the previous line (SGLang's
``last_gen_throughput``), so a rank that idled in between reports it lower, as SGLang's
does. Plain Python: the scheduler's clock and counters only.
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
        self.last_gen_throughput = 0.0

    def on_batch(self, num_decoded: int) -> float | None:
        """Count a forward pass that decoded ``num_decoded`` tokens. At every
        ``interval``-th decoding pass, returns the mean wall seconds per decoding pass
        since the last line (and updates ``last_gen_throughput``); else None."""
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
