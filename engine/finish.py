"""Has a request finished? A pure function over plain data, for the scheduler.

Finish reasons use SGLang's shapes:
    {"type": "length", "length": N}
    {"type": "stop", "matched": <token id or stop string>}
(`{"type": "abort", ...}` is the scheduler's, not decided here.)

Order of checks after each new token, as SGLang does: nothing before `min_new_tokens`
tokens; then the length limit; then the last token against `stop_token_ids` and (unless
`ignore_eos`) the eos ids; then stop strings in the decoded text.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from engine.sampling import SamplingParams

FinishReason = dict[str, object]


def check_finish(
    params: SamplingParams,
    output_ids: Sequence[int],
    eos_token_ids: Collection[int],
    output_text: str = "",
    num_new_chars: int | None = None,
) -> FinishReason | None:
    """`output_ids`: all generated ids so far, the newest last. `output_text`: their
    decoded text (needed only for stop strings). `num_new_chars`: how much of the text
    is new since the last check; only that tail (plus the longest stop string) is
    searched, so checking every step stays O(new text). None searches everything."""
    num_out = len(output_ids)
    if num_out < params.min_new_tokens:
        return None
    if num_out >= params.max_new_tokens:
        return {"type": "length", "length": num_out}
    if num_out == 0:
        return None
    last = output_ids[-1]
    if params.stop_token_ids and last in params.stop_token_ids:
        return {"type": "stop", "matched": last}
    if not params.ignore_eos and last in eos_token_ids:
        return {"type": "stop", "matched": last}
    matched = find_stop_str(output_text, params.stop_strs, num_new_chars)
    if matched is not None:
        return {"type": "stop", "matched": matched}
    return None


def find_stop_str(
    text: str, stop_strs: Sequence[str], num_new_chars: int | None = None
) -> str | None:
    """The first stop string (in `stop_strs` order) that occurs in the searched tail."""
    if not stop_strs or not text:
        return None
    start = 0
    if num_new_chars is not None:
        longest = max(len(s) for s in stop_strs)
        start = max(0, len(text) - num_new_chars - longest + 1)
    tail = text[start:]
    for stop in stop_strs:
        if stop in tail:
            return stop
    return None


def trim_stop_str(text: str, matched: str) -> str:
    """The output text without the matched stop string and anything after it
    (SGLang's default unless `no_stop_trim`)."""
    index = text.find(matched)
    return text if index < 0 else text[:index]
