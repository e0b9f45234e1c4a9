"""Build a `CausalLM` from `tiny` or a local HF checkpoint folder (safetensors only).

Folder layout accepted: config.json + model.safetensors, or + *.safetensors shards
listed in model.safetensors.index.json. HF parameter names map to ours by dropping the
`model.` prefix, except that q/k/v and gate/up projections are concatenated along the
output rows into our fused `qkv_proj` / `gate_up_proj` (see `engine.model`).
Every parameter must be covered exactly; anything missing is a `ModelLoadError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.config import ModelConfig, ModelLoadError, load_model_config
from engine.model import CausalLM
from engine.tiny import init_tiny_weights, is_tiny_model_path

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(
    model_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, CausalLM]:
    config = load_model_config(model_path)
    if is_tiny_model_path(model_path):
        model = empty_model(config, "cpu", torch.float32)
        init_tiny_weights(model)
        model = model.to(device=device, dtype=dtype)
        model.reset_rope()
        return config, model.requires_grad_(False)
    model = empty_model(config, device, dtype)
    load_hf_weights(model, _iter_safetensors(Path(model_path)))
    return config, model


def empty_model(config: ModelConfig, device: str, dtype: torch.dtype) -> CausalLM:
    """Allocate without running nn.Linear's random init (slow and pointless here)."""
    with torch.device("meta"):
        model = CausalLM(config).to(dtype=dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    model.reset_rope()
    return model.eval().requires_grad_(False)


def load_hf_weights(model: CausalLM, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into `model`; raise `ModelLoadError` on gaps or mismatches."""
    params = dict(model.named_parameters())
    expected = set(_expected_hf_names(model))
    seen: set[str] = set()
    with torch.no_grad():
        for hf_name, tensor in tensors:
            if hf_name.endswith(_IGNORED_SUFFIXES):
                continue
            if hf_name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # some tied checkpoints still ship a copy
            target = _map_name(model.config, hf_name)
            if target is None or target[0] not in params:
                raise ModelLoadError(f"checkpoint tensor {hf_name!r} has no place in the model")
            name, row = target
            dest = params[name].narrow(0, row, tensor.shape[0]) if row is not None else params[name]
            if dest.shape != tensor.shape:
                raise ModelLoadError(
                    f"{hf_name}: shape {tuple(tensor.shape)} does not match {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            seen.add(hf_name)
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors: {shown}")


def _map_name(config: ModelConfig, hf_name: str) -> tuple[str, int | None] | None:
    """Our parameter name and, for fused parameters, the first output row."""
    if hf_name == "lm_head.weight":
        return hf_name, None
    if not hf_name.startswith("model."):
        return None
    name = hf_name.removeprefix("model.")
    fused = {
        "self_attn.q_proj.": ("self_attn.qkv_proj.", 0),
        "self_attn.k_proj.": ("self_attn.qkv_proj.", config.q_size),
        "self_attn.v_proj.": ("self_attn.qkv_proj.", config.q_size + config.kv_size),
        "mlp.gate_proj.": ("mlp.gate_up_proj.", 0),
        "mlp.up_proj.": ("mlp.gate_up_proj.", config.intermediate_size),
    }
    for hf_part, (our_part, row) in fused.items():
        if hf_part in name:
            return name.replace(hf_part, our_part), row
    return name, None


def _expected_hf_names(model: CausalLM) -> Iterator[str]:
    for name, _ in model.named_parameters():  # tied lm_head is not listed twice
        if ".qkv_proj." in name:
            for part in ("q_proj", "k_proj", "v_proj"):
                yield "model." + name.replace("qkv_proj", part)
        elif ".gate_up_proj." in name:
            for part in ("gate_proj", "up_proj"):
                yield "model." + name.replace("gate_up_proj", part)
        elif name == "lm_head.weight":
            yield name
        else:
            yield "model." + name


def _safetensors_files(folder: Path) -> list[Path]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index_path} has no valid weight_map: {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise ModelLoadError(f"{path.name} is listed in {index_path.name} but missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {', '.join(other)}; convert to safetensors)" if other else ""
        raise ModelLoadError(f"no *.safetensors files in {folder}{hint}")
    return files


def _iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in _safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"cannot read {path}: {e}") from e
