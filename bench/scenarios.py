"""The named scenarios of ``bench.compare``: workload shape, methods, server flags.

Each scenario reproduces the shape of one seed (``../shared/seeds``) and names the
methods compared in it; the *baseline* is the method the others are measured against.
Lengths are the seeds' for the simulated accelerator (``seed-qwen3-235b-dp4``); the real
tiny model on CPU gets the same shape at ``REAL_LENGTH_DIVISOR`` times smaller lengths
(its context is 2048 tokens, and a CPU prefill of 3,500 tokens takes seconds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

REAL_LENGTH_DIVISOR = 8
# With the seed profile every forward pays base_s (17.9 ms); a small chunk size would
# charge it once per 512 tokens of a 3,500-token prompt, which the seeds' server did not.
SIM_CHUNKED_PREFILL_SIZE = 16384


@dataclass(frozen=True)
class Scenario:
    name: str
    methods: tuple[str, ...]  # the board method compared first; baseline included
    baseline: str
    input_len: int
    output_len: int
    range_ratio: float  # lengths uniform in [len * ratio, len]
    fractions: tuple[float, ...]  # request rates, as fractions of measured capacity
    num_prompts: int  # per run, at 4 ranks; scaled with the rank count
    pd: bool = False  # PD mode: the methods balance the prefill ranks
    lockstep: bool = False  # --sim-lockstep (sim only)
    concurrency_per_rank: int | None = None  # --max-concurrency = this x ranks

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    def prompts(self, ranks: int) -> int:
        return max(self.num_prompts, self.num_prompts * ranks // 4)

    def max_concurrency(self, ranks: int) -> int | None:
        return self.concurrency_per_rank * ranks if self.concurrency_per_rank else None

    def for_real(self) -> "Scenario":
        return dataclasses.replace(self, input_len=max(8, self.input_len // REAL_LENGTH_DIVISOR),
                                   output_len=max(2, self.output_len // REAL_LENGTH_DIVISOR))


SCENARIOS = {
    # 001: PD, long fixed input, 5 output tokens; TTFT by rate near prefill saturation.
    "prefill-heavy": Scenario(
        "prefill-heavy", ("total_tokens", "follow_bootstrap_room", "round_robin"),
        "follow_bootstrap_room", 3500, 5, 1.0, (0.6, 0.8, 0.9, 1.0), 96, pd=True),
    # 003: variable-length input and output; DP attention + EP, hence lockstep.
    "variable-length": Scenario(
        "variable-length", ("total_tokens", "total_requests", "round_robin"), "round_robin",
        4000, 400, 0.05, (0.6, 0.8, 0.9), 96, lockstep=True),
    # 002: short input, long output, bounded concurrency; decode throughput. The seed's
    # decode server ran DP attention too: a rank with more requests slows every rank.
    "decode-heavy": Scenario(
        "decode-heavy", ("total_requests", "round_robin"), "round_robin",
        500, 1500, 0.1, (0.8, 1.0), 160, lockstep=True, concurrency_per_rank=15),
}

# --quick: what a newcomer runs first (< 3 minutes on the 2-core VM, 4 ranks).
QUICK = {
    "prefill-heavy": dict(methods=("total_tokens", "follow_bootstrap_room"),
                          fractions=(0.8, 1.0), num_prompts=36),
    "variable-length": dict(methods=("total_tokens", "round_robin"), fractions=(0.9,),
                            num_prompts=32, output_len=160),
    "decode-heavy": dict(fractions=(1.0,), num_prompts=64, output_len=200,
                         concurrency_per_rank=8),
}


def get_scenarios(names: list[str], quick: bool) -> list[Scenario]:
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}")
    out = []
    for name in names:
        s = SCENARIOS[name]
        out.append(dataclasses.replace(s, **QUICK[name]) if quick else s)
    return out


def server_flags(s: Scenario, method: str, ranks: int, executor: str, profile: str) -> list[str]:
    """``engine.serve`` flags for one method of a scenario at ``ranks`` ranks."""
    flags = ["--executor", executor, "--log-level", "warning"]
    if executor == "sim":
        flags += ["--sim-profile", profile, "--chunked-prefill-size", str(SIM_CHUNKED_PREFILL_SIZE)]
        if s.lockstep:
            flags.append("--sim-lockstep")
    if s.pd:
        # Decode ranks only carry 5 tokens per request here: a quarter of them suffice.
        flags += ["--disaggregation-mode", "pd", "--prefill-dp-size", str(ranks),
                  "--decode-dp-size", str(max(1, ranks // 4)),
                  "--prefill-load-balance-method", method,
                  "--decode-load-balance-method", "total_requests"]
    else:
        flags += ["--dp-size", str(ranks), "--load-balance-method", method]
    return flags
