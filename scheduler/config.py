"""Per-rank scheduler configuration.

One frozen dataclass; the launcher builds one per rank with ``dataclasses.replace``.
``None`` means "derive at start-up" (from the model and the KV memory available); the
rank reports the resolved values in its ``RankReady`` message.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.pd import PDConfig
from scheduler.roles import RANK_ROLES, Role


@dataclass(frozen=True)
class SchedulerConfig:
    dp_rank: int
    board_name: str
    num_dispatchers: int = 1
    role: Role = Role.MIXED  # a plain string that names one is accepted too
    model_path: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"  # --dtype: auto, float32, bfloat16 or float16
    max_running_requests: int | None = None
    max_total_tokens: int | None = None
    chunked_prefill_size: int = 512
    # KV reserved at admission for a request's new tokens, at most (scheduler.request).
    clip_max_new_tokens_estimation: int = 4096
    context_length: int | None = None
    random_seed: int = 0
    # How often an idle rank wakes to refresh its heartbeat; the dispatcher treats a
    # rank as dead after ``stale_after_s`` without one (several intervals).
    heartbeat_interval_s: float = 0.05
    executor: str = "real"
    sim_profile: str = "tiny-cpu"
    # With --sim-lockstep: the lockstep segment the launcher created (sim.lockstep);
    # None lets every simulated rank step on its own.
    sim_lockstep_name: str | None = None
    # --sim-time-scale: a simulated step sleeps this many times its modelled time.
    sim_time_scale: float = 1.0
    log_level: str = "info"
    # --decode-log-interval: the rank logs its "Decode batch." line every this many
    # decoding batches and sends the API its figures (RankStats).
    decode_log_interval: int = 40
    # --disable-radix-cache: no prefix cache on this rank (every prompt is computed whole).
    # A PD decode rank never caches: it receives the prompt's KV from prefill.
    disable_radix_cache: bool = False
    # The prefix-summary segment (shm.prefix_summary) where this rank publishes what its
    # cache holds, for cache_aware dispatch; None: it publishes nothing (no cache).
    prefix_summary_name: str | None = None
    # --enable-cross-rank-prefix-cache: copy a cached prefix's KV from the rank that holds
    # it (scheduler.prefix_share); the pool then lives in a shared KV segment.
    cross_rank_prefix_cache: bool = False
    # PD disaggregation (role prefill/decode): where the shared tables and peers are.
    pd: PDConfig | None = None

    def __post_init__(self) -> None:
        if self.role not in RANK_ROLES:
            raise ValueError(f"role must be one of {', '.join(RANK_ROLES)}, got {self.role!r}")
        if self.chunked_prefill_size < 1:
            raise ValueError("chunked_prefill_size must be >= 1")
