"""The named scenarios of ``bench.compare``: workload shape, methods, server flags.

Each PD scenario reproduces the shape of one published SGLang run on DP balancing in PD
mode (``docs/results.md`` lists them: issue #13052, PRs #14726, #11469 and #20435) and
names the methods compared in it; the *baseline* is the method the others are measured
against. Lengths are the published ones for the simulated accelerator
(``seed-qwen3-235b-dp4``, derived from those runs in ``bench/PROFILES.md``); the real
tiny model on CPU gets the same shape at ``REAL_LENGTH_DIVISOR`` times smaller lengths
(its context is 2048 tokens, and a CPU prefill of 3,500 tokens takes seconds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

REAL_LENGTH_DIVISOR = 8
# With the seed profile every forward pays base_s (17.9 ms); a small chunk size would
# charge it once per 512 tokens of a 3,500-token prompt, which the published runs' servers did not.
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
    pd: bool = False  # PD mode (one server with prefill and decode ranks)
    # PD: the ranks the compared methods balance ("prefill", "decode" or "both"); the
    # other side runs the engine's default for its role (auto: prefill total_tokens,
    # decode total_requests).
    pd_balanced: str = "prefill"
    # PD: decode ranks = max(1, ranks * this); prefill-heavy's decode ranks only carry 5
    # tokens per request, a quarter of them suffice.
    pd_decode_share: float = 0.25
    lockstep: bool = False  # --sim-lockstep (sim only)
    concurrency_per_rank: int | None = None  # --max-concurrency = this x ranks
    # TTFT measured as SGLang PR #20435 did (max_out_len=1, "to eliminate the impact of decoding
    # on prefill"): per rate, a second pass of the same prompts with this many output
    # tokens at the same fraction of that shape's own capacity; the TTFT columns and
    # the TTFT headline come from it, TPOT and throughput from the full-length pass.
    ttft_output_len: int | None = None
    # Prompts of that pass at 4 ranks (scaled like num_prompts); None: num_prompts. The
    # pass is cheap (one output token), and with lockstep prefill one run's mean TTFT
    # swings widely between prompt sets, so it gets more prompts than the full pass.
    ttft_num_prompts: int | None = None

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    def prompts(self, ranks: int) -> int:
        return _scaled(self.num_prompts, ranks)

    def ttft_prompts(self, ranks: int) -> int:
        return _scaled(self.ttft_num_prompts or self.num_prompts, ranks)

    def decode_ranks(self, ranks: int) -> int:
        return max(1, int(ranks * self.pd_decode_share))

    @property
    def sampled_role(self) -> str | None:
        """The ranks whose load ``bench.compare`` samples: the balanced ones (PD "both":
        decode, where a request's load lasts its whole output)."""
        if not self.pd:
            return None
        return "prefill" if self.pd_balanced == "prefill" else "decode"

    def max_concurrency(self, ranks: int) -> int | None:
        return self.concurrency_per_rank * ranks if self.concurrency_per_rank else None

    def for_real(self) -> "Scenario":
        return dataclasses.replace(self, input_len=max(8, self.input_len // REAL_LENGTH_DIVISOR),
                                   output_len=max(2, self.output_len // REAL_LENGTH_DIVISOR))


def _scaled(prompts_at_4: int, ranks: int) -> int:
    """A run's prompt count: given for 4 ranks, proportional above."""
    return max(prompts_at_4, prompts_at_4 * ranks // 4)


SCENARIOS = {
    # SGLang PR #14726: PD, long fixed input, 5 output tokens; TTFT by rate near prefill saturation.
    "prefill-heavy": Scenario(
        "prefill-heavy", ("total_tokens", "follow_bootstrap_room", "round_robin"),
        "follow_bootstrap_room", 3500, 5, 1.0, (0.6, 0.8, 0.9, 1.0), 96, pd=True),
    # SGLang PR #20435: PD (prefill DP2 and decode DP2 servers), variable-length prompts
    # of 1,481-4,120 tokens (mean 2,561) and outputs of 187-4,068 (mean 1,160); "enable dp minimum
    # tokens" picks both the prefill and the decode rank, against bootstrap_room-based
    # round robin on both. Here 4 prefill + 4 decode ranks, each group in lockstep, the
    # method on both; uniform lengths with one range ratio: inputs 409-4,096 (mean
    # 2,252), outputs 204-2,048 (mean 1,126, the PR's mean). The PR measured TTFT
    # with max_out_len=1 "to eliminate the impact of decoding on prefill", so does this
    # (ttft_output_len); TPOT comes from the full-length pass. The PR's baseline (its
    # "round_robin") placed requests by bootstrap_room mod dp size, which is
    # follow_bootstrap_room here; round_robin here is a true turn counter.
    "variable-length": Scenario(
        "variable-length",
        ("total_tokens", "total_requests", "follow_bootstrap_room", "round_robin"), "round_robin",
        4096, 2048, 0.1, (0.9, 1.0), 96, pd=True, pd_balanced="both", pd_decode_share=1.0,
        lockstep=True, ttft_output_len=1, ttft_num_prompts=192),
    # SGLang PR #11469: PD, prefill and decode servers each TP4/EP4/DP4 with DP attention (decode
    # ranks in lockstep); the method balances the decode ranks. The PR ran 400 prompts
    # of 500 in / 1,500 out at 4 req/s with --max-concurrency 100 and completed about
    # 1.2 req/s: the concurrency cap bound, so throughput measured the server. Hence 25
    # per rank and a rate of 3x capacity. The PR's lengths were fixed (range ratio 1);
    # with fixed lengths round robin is self-balancing under a concurrency cap (each
    # completion frees a slot that the next request in turn refills on the same rank;
    # the PR's baseline was a shortest-queue fed by stale load reports), so this
    # scenario spreads the output lengths (ratio 0.1) to give round robin something to
    # get wrong.
    "decode-heavy": Scenario(
        "decode-heavy", ("total_requests", "round_robin"), "round_robin",
        500, 1500, 0.1, (1.0, 3.0), 400, pd=True, pd_balanced="decode", pd_decode_share=1.0,
        lockstep=True, concurrency_per_rank=25),
    # Plain DP (no PD): mixed ranks that step on their own, as `--dp-size N` without DP
    # attention runs them; no published run measured this. Prompts and outputs spread as in
    # variable-length (outputs shorter, so a run takes minutes): every prefill chunk
    # stalls the decoding requests of its own rank, so the placement shows in TTFT
    # and TPOT alike. What this measures decides `auto` for mixed ranks.
    "mixed": Scenario(
        "mixed", ("prefill_tokens", "total_tokens", "total_requests", "round_robin"), "round_robin",
        4096, 512, 0.1, (0.8, 1.0), 96),
}

# The scenarios bench.compare runs when none are named: the published runs' shapes.
DEFAULT_SCENARIOS = ("prefill-heavy", "variable-length", "decode-heavy")

# --quick: what a newcomer runs first (< 3 minutes on the 2-core VM, 4 ranks).
QUICK = {
    "prefill-heavy": dict(methods=("total_tokens", "follow_bootstrap_room"),
                          fractions=(0.8, 1.0), num_prompts=36),
    "variable-length": dict(methods=("total_tokens", "round_robin"), fractions=(1.0,),
                            num_prompts=24, ttft_num_prompts=None, output_len=128),
    "decode-heavy": dict(fractions=(3.0,), num_prompts=64, output_len=200,
                         concurrency_per_rank=8),
    "mixed": dict(fractions=(1.0,), num_prompts=32, output_len=128),
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


def server_flags(s: Scenario, method: str, ranks: int, executor: str, profile: str,
                 time_scale: float = 1.0) -> list[str]:
    """``engine.serve`` flags for one method of a scenario at ``ranks`` ranks
    (``time_scale``: ``--sim-time-scale``).

    The ranks' prefix caches are off: every method sends the same prompts at every
    rate, so a cache would answer each rate after the first from what the earlier ones
    left (a 3,500-token prefill measured at 27 ms instead of about 1.25 s); these
    scenarios compare load-only balancing, as measured before the caches existed
    (``bench.compare.cache`` compares cache-aware balancing, flushing between runs)."""
    flags = ["--executor", executor, "--log-level", "warning", "--disable-radix-cache"]
    if executor == "sim":
        flags += ["--sim-profile", profile, "--chunked-prefill-size", str(SIM_CHUNKED_PREFILL_SIZE)]
        if time_scale != 1.0:
            flags += ["--sim-time-scale", f"{time_scale:g}"]
        if s.lockstep:
            flags.append("--sim-lockstep")
    if s.pd:
        if s.pd_balanced not in ("prefill", "decode", "both"):
            raise ValueError(f"pd_balanced must be prefill, decode or both; got {s.pd_balanced!r}")
        flags += ["--disaggregation-mode", "pd", "--prefill-dp-size", str(ranks),
                  "--decode-dp-size", str(s.decode_ranks(ranks)),
                  "--prefill-load-balance-method",
                  method if s.pd_balanced in ("prefill", "both") else "auto",
                  "--decode-load-balance-method",
                  method if s.pd_balanced in ("decode", "both") else "auto"]
    else:
        flags += ["--dp-size", str(ranks), "--load-balance-method", method]
    return flags
