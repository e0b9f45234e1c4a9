"""Sampling parameters: SGLang's names and defaults, validated once at the API.

A `msgspec.Struct` because it travels inside request messages. No torch here: the API
process validates with it, the scheduler reads it, only `engine.sampler` turns it into
tensor ops. Unknown keys are ignored on decode (gateways add keys such as `model`).

Conventions:
- greedy when `temperature` is 0 (below 1e-5) or `top_k == 1`;
- `top_k` -1 disables top-k; 0 is accepted as "disabled" too, since some OpenAI-style
  clients send 0 for "unset";
- `stop` (strings) and `stop_token_ids` end generation; eos ends it unless `ignore_eos`;
  neither can end it before `min_new_tokens` (the sampler also masks eos and stop
  tokens until then);
- `sampling_seed` makes a request's tokens reproducible regardless of which requests
  share its batch (see `engine.sampler`); None draws from the runner's own generator;
- `n` > 1 is accepted here (up to `MAX_N`, OpenAI's cap); fanning a request out into n
  copies is the server's job, each with `for_copy(j)`: copy j's `sampling_seed` is the
  seed plus j, so that n seeded copies differ and stay reproducible (as vLLM's do);
- `logit_bias` (OpenAI's) maps token ids, as strings, to a bias in [-100, 100] added
  to the logits before anything else;
- integers that travel in rank messages (msgpack: 64-bit) are bounded here: `top_k` and
  `sampling_seed` are int64, the token counts are bounded by the context length.
"""

from __future__ import annotations

import msgspec

GREEDY_EPS = 1e-5
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # OpenAI's cap on n
MAX_STOP_CHARS = 4096  # all of a request's stop strings together


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of range; the message says which and why."""


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True):
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_new_tokens: int = 0
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    # OpenAI's: token id (as a string, JSON object keys) -> added to its logit.
    logit_bias: dict[str, float] | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    def for_copy(self, j: int) -> "SamplingParams":
        """Copy ``j`` of the ``n`` a request fans out into (``n`` becomes 1): a seed, if
        given, moves by ``j`` (wrapping within int64), or the copies would all be alike."""
        seed = self.sampling_seed
        if seed is not None:
            seed = (seed + j - INT64_MIN) % 2**64 + INT64_MIN
        return msgspec.structs.replace(self, n=1, sampling_seed=seed)

    @property
    def stop_strs(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def stop_token_id_set(self) -> frozenset[int]:
        return frozenset(self.stop_token_ids or ())

    @property
    def has_top_k(self) -> bool:
        return self.top_k > 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def validate(self, vocab_size: int, context_len: int, prompt_len: int = 0) -> None:
        """Raise `InvalidSamplingParams` for anything the engine cannot honour.
        `prompt_len` (when known) also checks prompt + max_new_tokens fits the context."""
        _check(self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        _check(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
            f"got {self.min_new_tokens}",
        )
        _check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(-1 <= self.top_k <= INT64_MAX,
               f"top_k must be -1 or 0 (disabled) or in [1, {INT64_MAX}], got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        _check(1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}], got {self.n}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}")
        _check(
            0.0 < self.repetition_penalty <= 2.0,
            f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}",
        )
        for s in self.stop_strs:
            _check(bool(s), "stop strings must be non-empty")
        # Every output is checked against every stop string (on the rank, and in the API
        # for what a stream holds back): bounded, so one request cannot stall the others.
        chars = sum(map(len, self.stop_strs))
        _check(chars <= MAX_STOP_CHARS, f"stop strings may have at most {MAX_STOP_CHARS} "
                                        f"characters in all; got {chars}")
        for token_id in self.stop_token_ids or ():
            _check(
                0 <= token_id < vocab_size,
                f"stop_token_ids entry {token_id} is outside the vocabulary [0, {vocab_size})",
            )
        spelled: dict[int, str] = {}
        for key, bias in (self.logit_bias or {}).items():
            _check(key.isascii() and key.isdigit() and len(key) <= 12 and int(key) < vocab_size,
                   f"logit_bias key {key!r} is not a token id in [0, {vocab_size})")
            # "5" and "05" name one token: its biases would add up past the range.
            _check(int(key) not in spelled, f"logit_bias names token {int(key)} twice: "
                                            f"{spelled.get(int(key))!r} and {key!r}")
            spelled[int(key)] = key
            _check(-100.0 <= bias <= 100.0,
                   f"logit_bias for token {key} must be in [-100, 100], got {bias}")
        if self.sampling_seed is not None:
            _check(
                INT64_MIN <= self.sampling_seed <= INT64_MAX,
                f"sampling_seed (seed) must be in [{INT64_MIN}, {INT64_MAX}], "
                f"got {self.sampling_seed}",
            )
        total = prompt_len + self.max_new_tokens
        _check(
            total <= context_len,
            f"prompt ({prompt_len} tokens) + max_new_tokens ({self.max_new_tokens}) = {total} "
            f"exceeds the model's context length {context_len}",
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidSamplingParams(message)
