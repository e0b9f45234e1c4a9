"""Convert a Llama-family GGUF file into the checkpoint folder the engine loads.

The `gguf` package reads the file and dequantizes every tensor to float32; this module
only maps names and metadata. The folder it writes is what `engine.loader`,
`engine.config` and `engine.tokenizer` read for any Hugging Face checkpoint:

    config.json            from the `llama.*` metadata (tied embeddings: no `output`)
    model.safetensors      float32, HF names (model.layers.N.self_attn.q_proj.weight ...)
    tokenizer.json         a byte-level BPE built from `tokenizer.ggml.{tokens,merges}`
    tokenizer_config.json  bos/eos/pad token text
    chat_template.jinja    `tokenizer.chat_template`, when the file has one

llama.cpp's converter permutes the rows of q and k so its rope rotates adjacent pairs;
our rope (HF's) rotates halves, so `unpermute_rope_rows` undoes it, as transformers'
GGUF loader does. Conversion is done once (`engine.model_source` caches the folder);
it imports no torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ModelLoadError

# GGUF tensor name (after blk.N.) -> HF name (after model.layers.N.).
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Llama 3's split (llama.cpp pre-tokenizer "llama-bpe"), ahead of a regex-free ByteLevel.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                   r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Write the checkpoint folder for `gguf_path` into `out_dir` (created)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {e}") from e
    meta = {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}
    hf_config = gguf_hf_config(meta, {t.name for t in reader.tensors})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(reader, hf_config, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    tokenizer_json, tokenizer_config = gguf_tokenizer_files(meta)
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2),
                                               encoding="utf-8")
    if isinstance(meta.get("tokenizer.chat_template"), str):
        (out / "chat_template.jinja").write_text(meta["tokenizer.chat_template"], encoding="utf-8")


def gguf_hf_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """A transformers-style config.json dict from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (only llama)")
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError("GGUF rope_freqs (Llama 3.1 rope scaling) is not supported")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata llama.{key} is missing")
        return value

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens") or ()
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": int(meta.get("llama.vocab_size") or len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "head_dim": int(get("attention.key_length", hidden // num_heads)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ModelLoadError(f"GGUF rope scaling {scaling!r} is not supported (linear)")
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": float(get("rope.scaling.factor"))}
    for key, hf_key in (("eos_token_id", "eos_token_id"), ("bos_token_id", "bos_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{key}"])
    return config


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: within each head, rows were reordered from
    [first half, second half] to interleaved pairs."""
    head_dim = weight.shape[0] // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no place in a Llama model")


def _write_weights(reader: Any, config: dict[str, Any], path: Path) -> None:
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        # GGUF lists dimensions fastest-first; numpy (and HF) want them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weight)
    save_file(tensors, str(path), metadata={"format": "pt"})


def gguf_tokenizer_files(meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json dict) for a byte-level BPE GGUF vocab."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported (only gpt2 "
                             "byte-level BPE)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    # ByteLevel's own regex is GPT-2's; llama-bpe (Llama 3) splits with its own first.
    if pre in ("default", "gpt2", "smollm"):
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre == "smollm":  # SmolLM splits every digit on its own first
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    elif pre == "llama-bpe":
        steps = [pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        raise ModelLoadError(f"GGUF pre-tokenizer {pre!r} is not supported "
                             "(default, gpt2, smollm, llama-bpe)")
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == TOKEN_TYPE_USER_DEFINED])
    config: dict[str, Any] = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token"))}
    # GGUF's names: bos_token_id, eos_token_id, padding_token_id, unknown_token_id.
    for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[f"{key}_token"] = tokens[int(token_id)]
    if config["add_bos_token"] and "bos_token" in config:
        from tokenizers import processors
        bos = config["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokens.index(bos))])
    return backend.to_str(), config
