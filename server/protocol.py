"""Request bodies: SGLang's ``/generate`` and OpenAI's completions and chat, as msgspec.

Decoding rules, the same for every route (``decode_body``):
- the body must be a JSON object; unknown top-level keys are accepted and ignored
  (gateways add ``model``, ``log_metrics``, ``lora_path`` ...);
- a key whose value is ``null`` means "not given" and takes the default;
- wrong types are a 400 naming the path (``$.sampling_params.max_new_tokens``);
- JSON nested deeper than the decoder's limit (about 1,000 levels) is a 400, not a
  ``RecursionError``; integer ranges are checked later, in ``server.bounds``.
OpenAI fields this server does not implement (tools, response formats, ...) are declared
so that giving one is a 400 naming it (``OpenAISampling.unsupported_field``), never a
silent 200. ``sampling_params`` is stricter (``to_sampling_params``): an unknown key is a 400 that
lists the valid ones, because a misspelt parameter silently ignored gives output the
client did not ask for.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from engine.sampling import SamplingParams
from server.errors import BadRequest

T = TypeVar("T")
SAMPLING_KEYS = frozenset(SamplingParams.__struct_fields__)


class GenerateRequest(msgspec.Struct, kw_only=True):
    """SGLang ``POST /generate``: one prompt or a batch (lists)."""

    text: str | list[str] | None = None
    input_ids: list[Any] | None = None  # list[int] or list[list[int]], checked later
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: int | list[int] | None = None
    bootstrap_room: int | list[int] | None = None
    routed_dp_rank: int | list[int] | None = None
    data_parallel_rank: int | list[int] | None = None  # older name of routed_dp_rank
    disagg_prefill_dp_rank: int | list[int] | None = None
    # Not implemented (SGLang's multimodal, LoRA, session, hidden-state and custom
    # sampling inputs): any value but null or the harmless one is a 400 naming it.
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    input_embeds: Any = None
    lora_path: Any = None
    lora_id: Any = None
    session_params: Any = None
    custom_logit_processor: Any = None
    return_hidden_states: Any = None
    token_ids_logprob: Any = None
    priority: Any = None

    def unsupported_field(self) -> str | None:
        return first_asked(self, GENERATE_UNSUPPORTED, batch=True)


GENERATE_UNSUPPORTED: dict[str, tuple] = {
    "image_data": ("", []), "video_data": ("", []), "audio_data": ("", []),
    "input_embeds": ([],), "lora_path": ("",), "lora_id": ("",), "session_params": ({},),
    "custom_logit_processor": ("",), "return_hidden_states": (False,),
    "token_ids_logprob": ([],), "priority": (0,),
}

# SGLang sampling_params keys not implemented, with the values that ask for nothing.
SAMPLING_UNSUPPORTED: dict[str, tuple] = {
    # What a fast tokenizer's decode does anyway (SGLang's default).
    "spaces_between_special_tokens": (True,),
}


def first_asked(body: msgspec.Struct, unsupported: dict[str, tuple],
                batch: bool = False) -> str | None:
    """The first of ``unsupported`` that ``body`` gives a value asking for something:
    not null, not a harmless value (with ``batch``, nor a list of those: one per prompt)."""
    for name, harmless in unsupported.items():
        value = getattr(body, name)
        items = value if batch and isinstance(value, list) else [value]
        if any(v is not None and not any(type(v) is type(h) and v == h for h in harmless)
               for v in items):
            return name
    return None


class AbortRequest(msgspec.Struct, kw_only=True):
    """SGLang ``POST /abort_request``: end one request by its ``rid``, or all of them."""

    rid: str = ""
    abort_all: bool = False
    abort_message: str | None = None  # what the aborted requests' finish reasons say


# OpenAI fields not implemented, with the values that ask for nothing (accepted).
UNSUPPORTED: dict[str, tuple] = {
    "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
    "functions": ([],), "function_call": ("none",), "parallel_tool_calls": (False,),
    "audio": (), "modalities": (["text"],), "prediction": (), "web_search_options": (),
    "reasoning_effort": (), "store": (False,),
    # SGLang's extras on the OpenAI routes
    "regex": (), "json_schema": (), "ebnf": (), "stop_regex": (), "lora_path": (),
    "return_hidden_states": (False,), "custom_logit_processor": (), "custom_params": (),
    "session_params": (), "return_token_ids": (False,),
    "return_cached_tokens_details": (False,), "priority": (0,), "cache_salt": (),
    # vLLM's extras (the openai SDK's extra_body)
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
    "structured_outputs": (), "allowed_token_ids": (), "bad_words": ([],),
    "prompt_logprobs": (), "truncate_prompt_tokens": (), "use_beam_search": (False,),
    "return_tokens_as_token_ids": (False,), "logits_processors": ([],),
    # What a fast tokenizer's decode does anyway (as on /generate)
    "spaces_between_special_tokens": (True,),
}


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool | None = None  # vLLM's: usage in every chunk (not implemented)


class OpenAISampling(msgspec.Struct, kw_only=True):
    """Fields shared by completions and chat (OpenAI names, plus SGLang's extras)."""

    model: str | None = None
    # Completions default max_tokens to 16 (OpenAI's), chat to None (the context left);
    # max_completion_tokens is chat's newer name, which completions take too.
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    user: str | None = None
    rid: str | None = None
    # Routing keys a gateway adds here as on /generate: smg and sglang-router send the PD
    # keys on the OpenAI routes too, a list (one per prompt) when ``prompt`` is a list.
    routed_dp_rank: int | list[int] | None = None
    data_parallel_rank: int | list[int] | None = None
    disagg_prefill_dp_rank: int | list[int] | None = None
    bootstrap_room: int | list[int] | None = None
    logit_bias: dict[str, float] | None = None
    # Not implemented: any value but the harmless one (UNSUPPORTED) is a 400.
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    store: Any = None
    regex: Any = None
    json_schema: Any = None
    ebnf: Any = None
    stop_regex: Any = None
    lora_path: Any = None
    return_hidden_states: Any = None
    custom_logit_processor: Any = None
    custom_params: Any = None
    session_params: Any = None
    return_token_ids: Any = None
    return_cached_tokens_details: Any = None
    priority: Any = None
    cache_salt: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    prompt_logprobs: Any = None
    truncate_prompt_tokens: Any = None
    use_beam_search: Any = None
    return_tokens_as_token_ids: Any = None
    logits_processors: Any = None
    spaces_between_special_tokens: Any = None
    # vLLM's: the text ends with the matched stop string (server.request_flow)
    include_stop_str_in_output: bool = False
    # vLLM's: whether the tokenizer adds its special tokens (BOS) to the prompt; None:
    # yes for a completion, and the model's choice for a chat (server.prompts)
    add_special_tokens: bool | None = None

    def unsupported_field(self) -> str | None:
        """The first unimplemented field given a value that changes the answer."""
        if self.stream_options is not None and not self.stream:
            return "stream_options without stream: true"
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            return "stream_options.continuous_usage_stats"
        return first_asked(self, self._unsupported())

    def _unsupported(self) -> dict[str, tuple]:
        return UNSUPPORTED

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return to_struct(SamplingParams, dict(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            min_new_tokens=self.min_tokens, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty,
            skip_special_tokens=self.skip_special_tokens, no_stop_trim=self.no_stop_trim,
            sampling_seed=self.seed, logit_bias=self.logit_bias or None))

    def param_names(self) -> dict[str, str]:
        """This request's names of the ``SamplingParams`` fields OpenAI calls otherwise,
        for error messages (``server.bounds.check_request``)."""
        given = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return {"max_new_tokens": given, "min_new_tokens": "min_tokens"}

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens``."""
        given = self.max_completion_tokens
        return given if given is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(OpenAISampling, kw_only=True):
    """OpenAI ``POST /v1/completions``. ``prompt``: str, [str], [int] or [[int]]."""

    prompt: str | list[Any]
    max_tokens: int = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: Any = None
    best_of: Any = None
    top_logprobs: Any = None  # chat's name; completions take logprobs: N

    def _unsupported(self) -> dict[str, tuple]:
        return {**UNSUPPORTED, "suffix": ("",), "best_of": (1,), "top_logprobs": (0,)}


CHAT_ROLES = ("system", "developer", "user", "assistant")


class ChatMessage(msgspec.Struct, kw_only=True):
    """One chat message: a role of ``CHAT_ROLES`` (tool messages need tools, which this
    server does not implement) and text content, a string or a list of text parts;
    ``check_messages`` turns anything else into a 400 naming it."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: Any = None


def check_messages(messages: list[ChatMessage]) -> None:
    """400 naming the field for what the chat template cannot render faithfully: an
    unknown role, missing content, a part that is not text (images, audio, files are
    not supported: dropping them would answer a question nobody asked)."""
    if not messages:
        raise BadRequest("messages is empty")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role not in CHAT_ROLES:
            raise BadRequest(f"{where}.role must be one of {', '.join(CHAT_ROLES)}; "
                             f"got {m.role!r}")
        if m.tool_calls:
            raise BadRequest(f"{where}.tool_calls is not supported by this server")
        if m.content is None:
            raise BadRequest(f"{where}.content is required")
        if isinstance(m.content, str):
            continue
        for j, part in enumerate(m.content):
            kind = part.get("type")
            if kind != "text":
                raise BadRequest(f"{where}.content[{j}].type must be 'text' (this server "
                                 f"serves text only); got {kind!r}")
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}.content[{j}].text must be a string")


class ChatCompletionRequest(OpenAISampling, kw_only=True):
    """OpenAI ``POST /v1/chat/completions``. ``max_completion_tokens`` (newer, what
    sglang-router sends) and ``max_tokens`` (older, what smg sends) mean the same;
    neither means "up to the context length"."""

    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    # Extra variables for the chat template (SGLang's and vLLM's; e.g. enable_thinking).
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: false renders the messages without the assistant turn's opening.
    add_generation_prompt: bool = True
    continue_final_message: Any = None
    echo: Any = None
    chat_template: Any = None
    documents: Any = None

    def _unsupported(self) -> dict[str, tuple]:
        return {**UNSUPPORTED, "continue_final_message": (False,), "echo": (False,),
                "chat_template": (), "documents": ([],)}


def routed_rank_of(body: GenerateRequest | OpenAISampling):
    """``routed_dp_rank``, or its older name ``data_parallel_rank``; both given and
    different is a 400 (which one the client meant is not ours to guess)."""
    new, old = body.routed_dp_rank, body.data_parallel_rank
    if new is not None and old is not None and new != old:
        raise BadRequest(f"routed_dp_rank ({new!r}) and data_parallel_rank, its older name "
                         f"({old!r}), disagree; give one")
    return new if new is not None else old


def decode_body(body: bytes, kind: type[T]) -> T:
    """Parse a JSON object body into ``kind`` (rules in the module docstring)."""
    try:
        data = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return to_struct(kind, data)


def to_struct(kind: type[T], data: dict) -> T:
    try:
        return msgspec.convert({k: v for k, v in data.items() if v is not None}, kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None


def to_sampling_params(data: dict[str, Any] | None) -> SamplingParams:
    """SGLang ``sampling_params`` -> ``SamplingParams``; unknown keys are a 400."""
    data = {k: v for k, v in (data or {}).items() if v is not None}  # null: not given
    for name, harmless in SAMPLING_UNSUPPORTED.items():
        if name in data:
            value = data.pop(name)
            if not any(type(value) is type(h) and value == h for h in harmless):
                raise BadRequest(f"sampling_params.{name}: {value!r} is not supported by "
                                 "this server")
    unknown = sorted(set(data) - SAMPLING_KEYS)
    if unknown:
        raise BadRequest(f"unknown sampling_params key(s) {unknown}; valid keys: "
                         f"{', '.join(sorted(SAMPLING_KEYS))}")
    try:
        return msgspec.convert({k: v for k, v in data.items() if v is not None}, SamplingParams)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid sampling_params: {exc}") from None
    except RecursionError:
        raise BadRequest("sampling_params is nested too deeply") from None
