"""Benchmark prompts: SGLang's ``bench_serving`` datasets ``random`` and
``generated-shared-prefix``, without a download.

``random``: lengths are drawn uniformly from ``[max(1, int(L * range_ratio)), L]``
(inclusive), for input and output independently, as SGLang's client does.

``generated-shared-prefix`` (SGLang's, for prefix caches): ``num_groups`` random system
prompts, each followed by ``prompts_per_group`` random questions, so every prompt of a
group begins with the group's system prompt; lengths as above with ``--gsp-range-ratio``
(system prompts per group, questions and outputs per prompt), the prompts shuffled
unless ordered. ``--gsp-group-distribution zipf`` (SGLang's flag) keeps the same prompts
but gives each of the ``num_groups * prompts_per_group`` requests a group drawn with
probability proportional to ``1 / rank ** alpha`` (``--gsp-zipf-alpha``; group 0, rank
1, the hottest), from a stream of its own, so the questions and lengths are those of the
uniform run with the same seed. With ``num_turns`` > 1 each prompt is a conversation:
turn t resends the conversation so far (the previous turn's prompt and the answer the
server gave) plus a new question (``BenchRequest.later_questions``), as SGLang's
``--gsp-num-turns`` does; the client sends turn t+1 when turn t has finished. SGLang
puts "\n\n" between system prompt and question; here they are joined as they are, so the
shared prefix is exactly the system prompt's tokens.

Prompts are random token ids (for ``/generate``, sent as ``input_ids``) or text (for
OpenAI routes): one ASCII character per token id, so a byte-level tokenizer such as the
built-in tiny model's sees exactly ``input_len`` tokens; another tokenizer sees some
other count, which is why the figures use the prompt length the server reports when it
reports one.

Everything is a function of the seed: the same arguments give the same prompts,
lengths and arrival times on any machine (numpy's PCG64 streams, one per purpose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Token ids are drawn below this bound: valid for any vocabulary of at least 256
# entries, and the plain bytes of a byte-level one (no special tokens).
DEFAULT_VOCAB_SIZE = 256
TEXT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 "

_DATASET_STREAM, _ARRIVAL_STREAM, _ROOM_STREAM, _SHARED_PREFIX_STREAM, _GROUP_STREAM = range(5)
GROUP_DISTRIBUTIONS = ("uniform", "zipf")
MAX_ROOM = 2**63 - 1


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int] | str
    prompt_len: int  # tokens as generated (the server may count differently for text)
    output_len: int  # max_new_tokens, with ignore_eos: the tokens expected back
    bootstrap_room: int | None = None  # PD: sent with the request when drawn (``rooms``)
    # A conversation's later turns: each turn's prompt is the previous turn's prompt, its
    # answer, then this question (ids or text, as ``prompt``).
    later_questions: tuple = ()

    def next_turn(self, answer: list[int] | str) -> "BenchRequest":
        """The next turn after the server answered this one with ``answer``."""
        question, *rest = self.later_questions
        prompt = self.prompt + answer + question
        return BenchRequest(prompt=prompt, prompt_len=self.prompt_len + len(answer) + len(question),
                            output_len=self.output_len, later_questions=tuple(rest))


def length_range(max_len: int, range_ratio: float) -> tuple[int, int]:
    """The inclusive [low, high] interval the lengths are drawn from."""
    if max_len < 1:
        raise ValueError(f"length must be >= 1, got {max_len}")
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")
    return max(1, int(max_len * range_ratio)), max_len


def check_counts(named_values) -> None:
    """ValueError naming the first of the ``(flag, value)`` pairs below 1."""
    for name, value in named_values:
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def check_random(num_prompts: int, input_len: int, output_len: int, range_ratio: float) -> None:
    """ValueError naming the first ``random`` dataset flag out of range (SGLang's client
    fails on the same values: nothing to send, or an empty length interval)."""
    check_counts((("--num-prompts", num_prompts), ("--random-input-len", input_len),
                  ("--random-output-len", output_len)))
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    seed: int, as_text: bool = False, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    rooms: bool = False) -> list[BenchRequest]:
    """``rooms``: give each request a ``bootstrap_room`` from its own stream of the seed
    (the prompts and lengths stay the same as without)."""
    check_random(num_prompts, input_len, output_len, range_ratio)
    rng = np.random.default_rng([seed, _DATASET_STREAM])
    in_lo, in_hi = length_range(input_len, range_ratio)
    out_lo, out_hi = length_range(output_len, range_ratio)
    input_lens = rng.integers(in_lo, in_hi + 1, size=num_prompts)
    output_lens = rng.integers(out_lo, out_hi + 1, size=num_prompts)
    room_ids = (np.random.default_rng([seed, _ROOM_STREAM]).integers(
        0, MAX_ROOM, size=num_prompts, dtype=np.int64).tolist() if rooms else [None] * num_prompts)
    requests = []
    for n_in, n_out, room in zip(input_lens.tolist(), output_lens.tolist(), room_ids):
        ids = rng.integers(0, vocab_size, size=n_in).tolist()
        prompt = ids_to_text(ids) if as_text else ids
        requests.append(BenchRequest(prompt=prompt, prompt_len=n_in, output_len=n_out,
                                     bootstrap_room=room))
    return requests


def check_shared_prefix(num_groups: int, prompts_per_group: int, system_prompt_len: int,
                        question_len: int, output_len: int, range_ratio: float,
                        num_turns: int, group_distribution: str = "uniform",
                        zipf_alpha: float | None = None) -> None:
    """ValueError naming the first ``--gsp-*`` flag out of range."""
    check_counts((("--gsp-num-groups", num_groups), ("--gsp-prompts-per-group", prompts_per_group),
                  ("--gsp-system-prompt-len", system_prompt_len),
                  ("--gsp-question-len", question_len), ("--gsp-output-len", output_len),
                  ("--gsp-num-turns", num_turns)))
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--gsp-range-ratio must be in [0, 1], got {range_ratio}")
    if group_distribution not in GROUP_DISTRIBUTIONS:
        raise ValueError(f"--gsp-group-distribution must be uniform or zipf, "
                         f"got {group_distribution!r}")
    if group_distribution == "zipf":
        if zipf_alpha is None or not math.isfinite(zipf_alpha) or zipf_alpha <= 0:
            raise ValueError(f"--gsp-group-distribution zipf needs --gsp-zipf-alpha, a finite "
                             f"number > 0; got {zipf_alpha}")
    elif zipf_alpha is not None:
        raise ValueError("--gsp-zipf-alpha applies only with --gsp-group-distribution zipf")


def zipf_groups(num_groups: int, num_requests: int, alpha: float, seed: int) -> list[int]:
    """Each request's group: group g (rank g + 1) with probability proportional to
    ``1 / (g + 1) ** alpha``."""
    weights = 1.0 / np.arange(1, num_groups + 1, dtype=np.float64) ** alpha
    rng = np.random.default_rng([seed, _GROUP_STREAM])
    return rng.choice(num_groups, size=num_requests, p=weights / weights.sum()).tolist()


def shared_prefix_requests(num_groups: int, prompts_per_group: int, system_prompt_len: int,
                           question_len: int, output_len: int, range_ratio: float, seed: int,
                           num_turns: int = 1, ordered: bool = False, as_text: bool = False,
                           vocab_size: int = DEFAULT_VOCAB_SIZE,
                           group_distribution: str = "uniform",
                           zipf_alpha: float | None = None) -> list[BenchRequest]:
    """SGLang's ``generated-shared-prefix``: ``num_groups * prompts_per_group``
    conversations of ``num_turns`` turns (module docstring)."""
    check_shared_prefix(num_groups, prompts_per_group, system_prompt_len, question_len,
                        output_len, range_ratio, num_turns, group_distribution, zipf_alpha)
    rng = np.random.default_rng([seed, _SHARED_PREFIX_STREAM])
    num_prompts = num_groups * prompts_per_group

    def lengths(max_len: int, size: int) -> list[int]:
        low, high = length_range(max_len, range_ratio)
        return rng.integers(low, high + 1, size=size).tolist()

    def tokens(n: int) -> list[int] | str:
        ids = rng.integers(0, vocab_size, size=n).tolist()
        return ids_to_text(ids) if as_text else ids

    systems = [tokens(n) for n in lengths(system_prompt_len, num_groups)]
    question_lens = lengths(question_len, num_prompts * num_turns)
    output_lens = lengths(output_len, num_prompts)
    groups = ([i // prompts_per_group for i in range(num_prompts)]
              if group_distribution == "uniform"
              else zipf_groups(num_groups, num_prompts, zipf_alpha, seed))
    requests = []
    for i in range(num_prompts):
        questions = [tokens(n) for n in question_lens[i * num_turns:(i + 1) * num_turns]]
        system = systems[groups[i]]
        requests.append(BenchRequest(prompt=system + questions[0],
                                     prompt_len=len(system) + len(questions[0]),
                                     output_len=output_lens[i],
                                     later_questions=tuple(questions[1:])))
    if not ordered:
        requests = [requests[i] for i in rng.permutation(num_prompts).tolist()]
    return requests


def ids_to_text(ids: list[int]) -> str:
    return "".join(TEXT_ALPHABET[i % len(TEXT_ALPHABET)] for i in ids)


def arrival_offsets(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process of ``request_rate``
    per second: the first at 0, then exponential gaps. ``inf``: all at 0."""
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    if np.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng([seed, _ARRIVAL_STREAM])
    gaps = rng.exponential(1.0 / request_rate, size=num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def skewed_prefix_requests(num_groups: int, prompts_per_group: int, system_prompt_len: int,
                           question_len: int, output_len: int, seed: int,
                           as_text: bool = False, vocab_size: int = DEFAULT_VOCAB_SIZE,
                           hot_share: float = 0.0) -> list[BenchRequest]:
    """The ``generated-shared-prefix`` shape (``num_groups`` system prompts of
    ``system_prompt_len`` tokens, each followed by distinct questions of ``question_len``
    tokens, ``output_len`` tokens asked, shuffled) with one hot group: ``hot_share`` > 0
    gives group 0 that share of the ``num_groups * prompts_per_group`` requests and the
    other groups the rest evenly (``bench.compare.cache``'s hot-prefix scenario).
    """
    if num_groups < 1 or prompts_per_group < 1:
        raise ValueError("num_groups and prompts_per_group must be >= 1")
    if not 0.0 <= hot_share < 1.0:
        raise ValueError(f"hot_share must be in [0, 1), got {hot_share}")
    rng = np.random.default_rng([seed, _DATASET_STREAM])
    total = num_groups * prompts_per_group
    if hot_share > 0 and num_groups > 1:
        hot = round(total * hot_share)
        sizes = [hot] + [(total - hot) // (num_groups - 1) + (g < (total - hot) % (num_groups - 1))
                         for g in range(num_groups - 1)]
    else:
        sizes = [prompts_per_group] * num_groups
    requests = []
    for size in sizes:
        system = rng.integers(0, vocab_size, size=system_prompt_len).tolist()
        for _ in range(size):
            ids = system + rng.integers(0, vocab_size, size=question_len).tolist()
            requests.append(BenchRequest(prompt=ids_to_text(ids) if as_text else ids,
                                         prompt_len=len(ids), output_len=output_len))
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def check_multi_turn(num_conversations: int, num_turns: int, turn_len: int,
                     output_len: int) -> None:
    """ValueError naming the first ``--mt-*`` flag below 1."""
    check_counts((("--mt-num-conversations", num_conversations), ("--mt-num-turns", num_turns),
                  ("--mt-turn-len", turn_len), ("--mt-output-len", output_len)))


def multi_turn_requests(num_conversations: int, num_turns: int, turn_len: int,
                        output_len: int, seed: int, as_text: bool = False,
                        vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[BenchRequest]:
    """Conversations that resend their history: turn t of a conversation is its turn
    t - 1 prompt, an assistant reply of ``output_len`` tokens and a new user message of
    ``turn_len`` tokens (the reply is drawn here, not the server's own answer, so what a
    rank can reuse is the previous turn's prompt). Requests are ordered turn by turn
    (every conversation's turn 0, then every turn 1, ...), conversations shuffled within
    a turn, so a conversation's next turn usually arrives after its last one finished.
    """
    check_multi_turn(num_conversations, num_turns, turn_len, output_len)
    rng = np.random.default_rng([seed, _DATASET_STREAM])
    history = [[] for _ in range(num_conversations)]
    requests = []
    for turn in range(num_turns):
        for c in rng.permutation(num_conversations).tolist():
            if turn:
                history[c] += rng.integers(0, vocab_size, size=output_len).tolist()
            history[c] += rng.integers(0, vocab_size, size=turn_len).tolist()
            ids = list(history[c])
            requests.append(BenchRequest(prompt=ids_to_text(ids) if as_text else ids,
                                         prompt_len=len(ids), output_len=output_len))
    return requests
