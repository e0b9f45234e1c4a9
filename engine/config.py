"""Model configuration: what the engine needs to know about a checkpoint.

`ModelConfig` is built once from a Hugging Face `config.json` (Llama, Mistral without
sliding window, and Qwen2 families) and never changes. It imports no torch, so the API
process and scheduling code can read vocabulary and context sizes cheaply.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.tiny import TINY_HF_CONFIG, is_tiny_model_path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


class ModelLoadError(Exception):
    """A checkpoint folder cannot be loaded; the message names the file or key to fix."""


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling` / `rope_parameters`. Only "llama3" and "linear" change the
    frequencies; "default" is represented by `ModelConfig.rope_scaling = None`."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # Bias on q/k/v projections (Qwen2: always; Llama: `attention_bias`).
    attention_bias: bool = False
    # Bias on o_proj: Llama's `attention_bias` covers it too, Qwen2 has none.
    attention_out_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    rope_scaling: RopeScaling | None = None
    # The checkpoint's dtype; the runner may still choose float32 on CPU.
    dtype: str = "float32"
    model_type: str = "llama"
    architectures: tuple[str, ...] = ("LlamaForCausalLM",)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.dtype not in SUPPORTED_DTYPES:
            raise ModelLoadError(
                f"unsupported dtype {self.dtype!r}; expected one of {SUPPORTED_DTYPES}"
            )

    @property
    def context_len(self) -> int:
        return self.max_position_embeddings

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes one token occupies in the KV pool (k and v, all layers)."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    def with_extra_eos(self, eos_token_ids: list[int] | tuple[int, ...]) -> ModelConfig:
        """Merge eos ids from e.g. generation_config.json, keeping order, no duplicates."""
        merged = tuple(dict.fromkeys((*self.eos_token_ids, *eos_token_ids)))
        return dataclasses.replace(self, eos_token_ids=merged)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF `config.json` (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"config.json model_type={model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        _reject_unsupported_features(hf, model_type)
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden_size = int(hf["hidden_size"])
            rope_theta, rope_scaling = _parse_rope(hf)
            is_qwen2 = model_type == "qwen2"
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=num_heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden_size // num_heads),
                rope_theta=rope_theta,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=True if is_qwen2 else bool(hf.get("attention_bias", False)),
                attention_out_bias=False if is_qwen2 else bool(hf.get("attention_bias", False)),
                eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
                bos_token_id=hf.get("bos_token_id"),
                rope_scaling=rope_scaling,
                dtype=_parse_dtype(hf.get("dtype") or hf.get("torch_dtype")),
                model_type=model_type,
                architectures=tuple(hf.get("architectures") or ()),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json is missing required key {e.args[0]!r}") from None


def _reject_unsupported_features(hf: dict[str, Any], model_type: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("mlp_bias"):
        raise ModelLoadError("mlp_bias=true is not supported")
    # Sliding-window attention would need a different mask; refuse rather than be wrong.
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ModelLoadError("Qwen2 use_sliding_window=true is not supported")
    if model_type == "mistral" and hf.get("sliding_window") is not None:
        window = int(hf["sliding_window"])
        if window < int(hf.get("max_position_embeddings", 2048)):
            raise ModelLoadError(f"Mistral sliding_window={window} is not supported")


def _parse_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x `rope_theta` + `rope_scaling`.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("llama3", "linear"):
        raise ModelLoadError(f"rope type {rope_type!r} is not supported (default, linear, llama3)")
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    kwargs = {k: v for k, v in params.items() if k in fields}
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


def _parse_dtype(value: Any) -> str:
    if value is None:
        return "float32"
    name = str(value).removeprefix("torch.")
    if name not in SUPPORTED_DTYPES:
        raise ModelLoadError(f"config.json dtype {value!r} is not supported")
    return name


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def tiny_model_config() -> ModelConfig:
    """The built-in default model's config (``engine.tiny``)."""
    return ModelConfig.from_hf_dict(TINY_HF_CONFIG)


def load_model_config(model_path: str) -> ModelConfig:
    """Config for `tiny` or a checkpoint folder, with generation_config.json's eos ids
    merged in (Llama 3 instruct lists its end-of-turn ids only there). No torch."""
    if is_tiny_model_path(model_path):
        return tiny_model_config()
    folder = Path(model_path)
    if not folder.is_dir():
        raise ModelLoadError(f"model path {model_path!r} is neither 'tiny' nor a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path} not found")
    try:
        config = ModelConfig.from_hf_dict(json.loads(config_path.read_text(encoding="utf-8")))
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            gen = json.loads(gen_path.read_text(encoding="utf-8"))
            config = config.with_extra_eos(_as_id_tuple(gen.get("eos_token_id")))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"invalid JSON in {folder}: {e}") from e
    return config
