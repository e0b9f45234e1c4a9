"""``internal_states`` in ``/server_info``: one entry per rank, in SGLang's shape.

SGLang's scheduler answers ``get_internal_state`` with its resolved arguments plus
``world_size``, ``effective_max_running_requests_per_dp``, ``last_gen_throughput``,
``memory_usage``, ``avg_spec_accept_length`` and step times. Clients read it:
SGLang's ``bench_serving`` (0.5.3 and older) indexes
``internal_states[0]["avg_spec_accept_length"]`` at the end of every run. Here the
figures come from each rank's ``RankReady`` (capacity, memory) and its latest
``RankStats`` (sent with every "Decode batch." line, ``scheduler.stats``) and, with
``--enable-cross-rank-prefix-cache``, its latest ``PrefixCopyStats``, kept per rank by
``RankStatsLog`` on the API's event loop.
"""

from __future__ import annotations

from collections import deque

from scheduler.messages import PrefixCopyStats, RankStats
from scheduler.roles import Role

# Step times kept per running-batch size (SGLang's step_time_dict), the newest few.
MAX_STEP_TIMES_PER_SIZE = 16
MAX_STEP_TIME_SIZES = 64


class RankStatsLog:
    """The latest ``RankStats`` of one rank and its recent decode step times."""

    def __init__(self) -> None:
        self.latest: RankStats | None = None
        self.copies: PrefixCopyStats | None = None  # --enable-cross-rank-prefix-cache
        self.step_times: dict[int, deque[float]] = {}

    def add(self, stats: RankStats) -> None:
        self.latest = stats
        times = self.step_times.get(stats.num_running_reqs)
        if times is None:
            if len(self.step_times) >= MAX_STEP_TIME_SIZES:
                self.step_times.pop(next(iter(self.step_times)))  # the oldest size seen
            times = self.step_times[stats.num_running_reqs] = deque(maxlen=MAX_STEP_TIMES_PER_SIZE)
        times.append(stats.decode_step_time_s)

    @property
    def last_gen_throughput(self) -> float:
        return self.latest.last_gen_throughput if self.latest is not None else 0.0


def rank_internal_state(rank, role: Role, startup_time: float) -> dict:
    """``rank``: a ready ``server.ranks.RankHandle``."""
    ready, latest, copies = rank.ready, rank.stats.latest, rank.stats.copies
    return {
        "dp_rank": rank.dp_rank,
        "disaggregation_mode": role,
        "pid": ready.pid,
        "device": ready.device,
        "world_size": 1,  # one process, one device per rank (tp_size 1)
        "startup_time": startup_time,
        "effective_max_running_requests_per_dp": ready.max_running_requests,
        "max_total_num_tokens": ready.max_total_num_tokens,
        "context_length": ready.context_len,
        "last_gen_throughput": rank.stats.last_gen_throughput,
        "memory_usage": {
            "weight": round(ready.weight_gb, 3),
            "kvcache": round(ready.kv_cache_gb, 3),
            "token_capacity": ready.max_total_num_tokens,
            "graph": {},  # no CUDA graphs are captured
        },
        "avg_spec_accept_length": None,  # no speculative decoding
        "num_decode_batches": latest.num_decode_batches if latest is not None else 0,
        # --enable-cross-rank-prefix-cache (ours): prefix KV copied from other ranks
        "copied_prefix_tokens": copies.num_copied_prefix_tokens if copies is not None else 0,
        "dropped_prefix_copies": copies.num_dropped_prefix_copies if copies is not None else 0,
        "step_time_dict": {str(size): [round(t, 6) for t in times]
                           for size, times in sorted(rank.stats.step_times.items())},
        "lost_reason": rank.lost_reason,
    }
