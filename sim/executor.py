"""The simulated accelerator: the scheduler's real path with a cost model for the forward.

Everything else stays real (scheduler, board, dispatcher, KV slot accounting, HTTP
path); only ``forward`` is replaced: it sleeps for the time the profile predicts and
returns deterministic pseudo-random tokens. It exists to benchmark balancing with 8-64
ranks on a 2-core machine, never as a stand-in for the model in correctness tests.
Every report built on it must say "simulated".

Cost model of one step (seconds), from the batch's plain data::

    base_s
    + prefill_token_s * (prefill tokens in the batch)
    + prefill_attn_s  * sum over prefill chunks of chunk_len * (start_pos + chunk_len / 2)
    + decode_seq_s    * (decoding requests in the batch)
    + decode_kv_s     * sum over decoding requests of their KV length
    + kv_bytes_per_token / peer_copy_bytes_per_s * (tokens of cached prefixes copied
      from peer ranks since the last step, ``--enable-cross-rank-prefix-cache``)

Sleeping (not spinning) lets dozens of simulated ranks share two cores.

``--sim-time-scale K`` (``cfg.sim_time_scale``) stretches every step to K times its
modelled time in wall-clock time. Each rank's own scheduling work (batching, outputs,
heartbeats) runs on the host's CPU between steps; with more ranks than cores it
queues for a core and adds to every step, which a GPU host, with a core per rank,
would not. Stretching the steps leaves that work K times less of each step.
``busy_s`` stays in modelled seconds; clients convert what they measure back
(``bench.client.serving`` reads the factor from ``/server_info``).

With ``--sim-lockstep`` (``cfg.sim_lockstep_name`` names the segment the launcher
created) every rank's step lasts as long as the slowest rank's, as with DP attention
and expert parallelism; see ``sim.lockstep``. The executor then sets
``wants_idle_steps`` while its peers need it to step, and the scheduler runs an empty
batch (cost ``base_s``) for it.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.kv_slots import KVSlotAllocator
from engine.tokenizer import optional_tokenizer
from scheduler.batching import ForwardItem
from scheduler.executor import Executor
from shm.kv_segment import KVSegment

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class SimProfile:
    name: str
    base_s: float
    prefill_token_s: float
    prefill_attn_s: float
    decode_seq_s: float
    decode_kv_s: float
    max_total_num_tokens: int = 1 << 20
    context_len: int = 32768
    vocab_size: int = 32000
    # A cached prefix copied from a peer rank (--enable-cross-rank-prefix-cache) costs
    # kv_bytes_per_token / peer_copy_bytes_per_s a token, added to the next step; 0: free.
    kv_bytes_per_token: int = 0
    peer_copy_bytes_per_s: float = 0.0
    source: str = ""

    def step_time(self, items: list[ForwardItem]) -> float:
        t = self.base_s
        for item in items:
            n = len(item.token_ids)
            if item.req.is_prefilling:
                t += self.prefill_token_s * n + self.prefill_attn_s * n * (item.start_pos + n / 2)
            else:
                t += self.decode_seq_s + self.decode_kv_s * (item.start_pos + 1)
        return t

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


def load_profile(name: str) -> SimProfile:
    """A named profile from ``sim/profiles/<name>.json``, or a path to one."""
    path = Path(name)
    if not path.suffix:
        path = PROFILE_DIR / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
        raise ValueError(f"unknown simulation profile {name!r}; known: {known}")
    return SimProfile(**json.loads(path.read_text()))


class SimExecutor(Executor):
    """``Executor`` whose forward pass is a calibrated sleep (see the module docstring)."""

    device = "sim"

    def __init__(self, profile: SimProfile, max_total_num_tokens: int | None = None,
                 lockstep=None, time_scale: float = 1.0,
                 new_kv_segment: Callable[[int, int], KVSegment] | None = None,
                 tokenizer=None):
        """``tokenizer``: the served model's (``--model-path``), which the API detokenizes
        with: the rank decodes its simulated tokens with it to match stop strings."""
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.profile = profile
        self.time_scale = time_scale  # wall-clock seconds per modelled second
        self.lockstep = lockstep  # a sim.lockstep.LockstepMember, or None
        self.steps_in_lockstep = lockstep is not None
        self.context_len = profile.context_len
        self.vocab_size = profile.vocab_size
        # No eos: simulated requests run to max_new_tokens, like ignore_eos benchmarks.
        self.eos_token_ids: frozenset[int] = frozenset()
        self.kv = KVSlotAllocator(max_total_num_tokens or profile.max_total_num_tokens)
        self.tokenizer = tokenizer
        self.busy_s = 0.0  # total simulated forward time, for reports
        self.copy_s = 0.0  # modelled time of prefix copies, added to the next step
        self.lockstep_wait_s = 0.0  # modelled time spent waiting for slower lockstep peers
        # PD prefill: no KV data, but the same hand-off arena and protocol as the real pool.
        self.kv_segment = (new_kv_segment(self.max_total_num_tokens, 0)
                           if new_kv_segment is not None else None)

    @classmethod
    def from_config(cls, cfg, new_kv_segment: Callable[[int, int], KVSegment] | None = None
                    ) -> SimExecutor:
        """``cfg``: a ``SchedulerConfig``; ``new_kv_segment`` as for ``ModelExecutor``."""
        lockstep = None
        if cfg.sim_lockstep_name:
            from sim.lockstep import LockstepMember
            lockstep = LockstepMember.attach(cfg.sim_lockstep_name, cfg.dp_rank)
        try:
            return cls(load_profile(cfg.sim_profile), cfg.max_total_tokens, lockstep,
                       cfg.sim_time_scale, new_kv_segment, optional_tokenizer(cfg.model_path))
        except BaseException:
            if lockstep is not None:
                lockstep.close()
            raise

    def import_kv(self, peer, src_slots, dst_slots: list[int]) -> None:
        """PD decode: there is no KV data to copy; slot counts must still agree."""
        if len(src_slots) != len(dst_slots):
            raise ValueError(f"copying {len(src_slots)} slots into {len(dst_slots)}")

    def copy_prefix(self, peer, src_slots, dst_slots: list[int]) -> None:
        """A cached prefix from a peer: no data, but the copy's modelled time is added
        to the next step (the rank copies before that forward pass)."""
        self.import_kv(peer, src_slots, dst_slots)
        p = self.profile
        if p.kv_bytes_per_token and p.peer_copy_bytes_per_s:
            self.copy_s += len(dst_slots) * p.kv_bytes_per_token / p.peer_copy_bytes_per_s

    def close(self) -> None:
        """At rank exit: unlink the PD arena; leave the lockstep so peers stop waiting."""
        super().close()
        if self.lockstep is not None:
            self.lockstep.close()
            self.lockstep = None

    @property
    def wants_idle_steps(self) -> bool:
        """Run a forward pass even with an empty batch: lockstep peers wait for this rank."""
        return self.lockstep is not None and self.lockstep.wants_idle_steps

    @property
    def max_total_num_tokens(self) -> int:
        return self.kv.max_total_num_tokens

    def memory_bytes(self) -> tuple[int, int]:
        """Nothing is allocated for a simulated model."""
        return 0, 0

    def forward(self, items: list[ForwardItem]) -> list[tuple[int, float]]:
        """Sleep for the step's cost times ``time_scale`` (with lockstep: until the
        slowest rank's step ends); an empty batch is a lockstep idle step and costs
        ``base_s``."""
        start_ns = time.monotonic_ns()
        cost = self.profile.step_time(items) + self.copy_s
        self.copy_s = 0.0
        wall = cost * self.time_scale
        out = [(self._token(item), 0.0) for item in items if item.sample]
        if self.lockstep is not None:
            waited = self.lockstep.step(wall, bool(items), start_ns)
            self.lockstep_wait_s += waited / self.time_scale
        else:
            remaining = wall - (time.monotonic_ns() - start_ns) / 1e9
            if remaining > 0:
                time.sleep(remaining)
        self.busy_s += cost
        return out

    def _token(self, item: ForwardItem) -> int:
        """Deterministic per (request, position): the same request gives the same output
        on any rank and in any batch."""
        key = f"{item.req.rid}:{item.start_pos + len(item.token_ids)}".encode()
        return zlib.crc32(key) % self.vocab_size
