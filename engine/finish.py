"""Has a request finished? A pure function over plain data, for the scheduler.

Finish reasons are types, one class per kind, each built by its constructor:
    FinishLength(length)            {"type": "length", "length": N}
    FinishStop(matched)             {"type": "stop", "matched": <token id or stop string>}
    FinishAbort(message, status)    {"type": "abort", "message": ..., ["status_code": ...]}
(status ``ABORT_REQUESTED``: asked for through ``/abort_request``, not a failure; the API
drops the status before its client sees the reason)
(an abort is the scheduler's or the API's, never decided by `check_finish`). A finish
reason's value is its wire form, SGLang's JSON object on the right: it is a read-only
dict (not a Struct: value and wire form are one, so it equals the JSON a client reads),
and crosses the rank's pipe and the HTTP API as it is. The receiving side turns
the plain dict it decodes back into its type with `finish_from_json`; consumers test the
type (`isinstance(reason, FinishAbort)`), never the keys.

Order of checks after each new token, as SGLang does: nothing before `min_new_tokens`
tokens; then the length limit; then the last token against `stop_token_ids` and (unless
`ignore_eos`) the eos ids; then stop strings in the decoded text.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from engine.sampling import SamplingParams


class FinishReason(dict):
    """Why a request ended; a read-only dict holding its wire form (``to_json``)."""

    __slots__ = ()
    KIND = ""

    def to_json(self) -> dict:
        """The wire form as a plain dict (SGLang's ``meta_info.finish_reason``)."""
        return dict(self)

    def __reduce__(self):  # copy and pickle rebuild through the one parser
        return finish_from_json, (dict(self),)

    def _read_only(self, *args, **kwargs):
        raise TypeError("a finish reason is read-only: build a new one")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only


class FinishLength(FinishReason):
    """The length limit (``max_new_tokens``) was reached after ``length`` tokens."""

    __slots__ = ()
    KIND = "length"

    def __init__(self, length: int):
        super().__init__(type=self.KIND, length=length)

    @property
    def length(self) -> int:
        return self["length"]


class FinishStop(FinishReason):
    """A stop token (an int: eos or ``stop_token_ids``) or a stop string matched."""

    __slots__ = ()
    KIND = "stop"

    def __init__(self, matched: int | str):
        super().__init__(type=self.KIND, matched=matched)

    @property
    def matched(self) -> int | str:
        return self["matched"]


# The status of an abort a client asked for (``/abort_request``): the request ends with
# what it has so far, as SGLang's do, where any other abort is an HTTP error.
ABORT_REQUESTED = 200


class FinishAbort(FinishReason):
    """Ended without finishing: by its rank (``status_code`` says whose fault, as
    SGLang's ``FINISH_ABORT``: see ``scheduler.messages.ReqOutput``) or by the API
    (the echo of its own abort: no status)."""

    __slots__ = ()
    KIND = "abort"

    def __init__(self, message: str, status_code: int | None = None):
        fields: dict = {"type": self.KIND, "message": message}
        if status_code is not None:
            fields["status_code"] = status_code
        super().__init__(fields)

    @property
    def message(self) -> str:
        return self["message"]

    @property
    def status_code(self) -> int | None:
        return self.get("status_code")


def finish_from_json(obj: dict | None) -> FinishReason | None:
    """The typed finish reason of a wire form (None stays None; a typed one is kept)."""
    if obj is None or isinstance(obj, FinishReason):
        return obj
    kind = obj.get("type")
    if kind == FinishLength.KIND:
        return FinishLength(obj["length"])
    if kind == FinishStop.KIND:
        return FinishStop(obj["matched"])
    if kind == FinishAbort.KIND:
        return FinishAbort(obj.get("message", ""), obj.get("status_code"))
    raise ValueError(f"unknown finish reason {obj!r}")


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
        return FinishLength(num_out)
    if num_out == 0:
        return None
    last = output_ids[-1]
    if params.stop_token_ids and last in params.stop_token_ids:
        return FinishStop(last)
    if not params.ignore_eos and last in eos_token_ids:
        return FinishStop(last)
    matched = find_stop_str(output_text, params.stop_strs, num_new_chars)
    if matched is not None:
        return FinishStop(matched)
    return None


class StopStringSearch:
    """One request's ``check_finish`` with stop strings, fed one new token at a time.

    It searches the text the client gets (the API trims there and holds back what may
    begin a stop string, ``server.request_flow``, so the two agree on where a stop is),
    and where ``skip_special_tokens`` leaves special tokens out of that text, the text
    with them too: a stop string may spell one (``<|im_end|>`` for a model whose EOS is
    another token), as SGLang matches it. ``tokenizer``: ``engine.tokenizer.Tokenizer``.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool) -> None:
        self._text = tokenizer.incremental_decoder(skip_special_tokens)
        self._special = tokenizer.incremental_decoder(False) if skip_special_tokens else None

    @property
    def text(self) -> str:
        """The output's text so far, as the client gets it."""
        return self._text.text

    def check(self, params: SamplingParams, output_ids: Sequence[int],
              eos_token_ids: Collection[int]) -> FinishReason | None:
        """``check_finish`` after the newest of ``output_ids`` (each id passed once)."""
        last = output_ids[-1:]
        new_chars = len(self._text.step(last))
        reason = check_finish(params, output_ids, eos_token_ids, self._text.text, new_chars)
        if self._special is not None:
            new_special = len(self._special.step(last))
            if reason is None and len(output_ids) >= params.min_new_tokens:
                matched = find_stop_str(self._special.text, params.stop_strs, new_special)
                reason = FinishStop(matched) if matched is not None else None
        return reason


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


def trim_stop_str(text: str, matched: str, start: int = 0, keep_stop: bool = False) -> str:
    """The output text without the matched stop string and anything after it
    (SGLang's default unless `no_stop_trim`; with ``keep_stop``, up to the end of the
    stop string: vLLM's `include_stop_str_in_output`). The match is the first occurrence
    from ``start``, where the search began: with `min_new_tokens`, occurrences in the text
    of the tokens before the minimum were never checked (and may have been streamed)."""
    index = text.find(matched, start)
    if index < 0:
        return text
    return text[:index + len(matched)] if keep_stop else text[:index]
