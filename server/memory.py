"""How much memory a rank needs and how much it has, worked out without torch.

The API process plans every rank's KV pool before it spawns one (``server.placement``),
so it reads sizes from the model's ``config.json`` and memory from the system:

- weights: the parameter count that ``engine.model.CausalLM`` allocates for the
  config, times the dtype's bytes (float32 on CPU, the checkpoint's dtype on CUDA,
  as ``engine.device.resolve_dtype`` picks): the size in memory, whatever the file's
  format or quantization;
- host memory: ``MemAvailable`` of ``/proc/meminfo`` (the kernel's estimate of what
  can be allocated without swapping);
- GPU memory: free bytes per visible GPU, read by ``python -m engine.gpu_probe`` in a
  subprocess (torch sees the GPUs as the ranks will, ``CUDA_VISIBLE_DEVICES``
  applied, but must not be imported here).

``size_kv_pool`` is SGLang's sizing (``ModelRunner.profile_max_num_token``): of the
memory a rank may use, ``--mem-fraction-static`` is static (weights + KV pool), the rest
is left for activations; the KV pool gets the static part less the weights. SGLang
measures the weights after loading them; here they are computed from the config, which
is what lets a launch that cannot fit fail before anything starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from engine.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_PROBE_TIMEOUT_S = 180.0


class MemoryProbeError(RuntimeError):
    """The system's memory could not be read (the message says how to go on)."""


def weight_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """Bytes of the parameters ``CausalLM(config)`` holds (tied lm_head counted once)."""
    h, q, kv, inter = (config.hidden_size, config.q_size, config.kv_size,
                       config.intermediate_size)
    per_layer = (h * (q + 2 * kv) + q * h  # qkv_proj, o_proj
                 + h * 2 * inter + inter * h  # gate_up_proj, down_proj
                 + 2 * h)  # input and post-attention norms
    if config.attention_bias:
        per_layer += q + 2 * kv
    if config.attention_out_bias:
        per_layer += h
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return (config.num_hidden_layers * per_layer + embeddings + h) * dtype_bytes


def kv_dtype_bytes(config: ModelConfig, device_kind: str, override: str | None = None) -> int:
    """Bytes per element of weights and KV on ``device_kind`` ("cpu" or "cuda"), as
    ``engine.device.resolve_dtype`` picks: ``override`` (``--dtype``) wins."""
    return DTYPE_BYTES[override or ("float32" if device_kind == "cpu" else config.dtype)]


def size_kv_pool(static_bytes: int, weights: int, kv_bytes_per_token: int,
                 max_tokens: int | None = None) -> int:
    """KV tokens that fit in ``static_bytes`` after ``weights`` (0 or less: none),
    capped at ``max_tokens`` when given."""
    tokens = (static_bytes - weights) // kv_bytes_per_token
    return tokens if max_tokens is None else min(tokens, max_tokens)


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int:
    """The kernel's ``MemAvailable``; free physical pages where there is no /proc."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class GpuMemory:
    free_bytes: int
    total_bytes: int
    name: str = ""


def probe_gpus(timeout_s: float = GPU_PROBE_TIMEOUT_S) -> list[GpuMemory]:
    """Free and total memory of each GPU torch sees, in CUDA index order; empty when
    torch has no CUDA. Runs ``python -m engine.gpu_probe`` (its CUDA contexts end with it)."""
    cmd = [sys.executable, "-m", "engine.gpu_probe"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MemoryProbeError(f"cannot read the GPUs' memory ({exc}); use --device cpu "
                               "or fix the CUDA installation") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MemoryProbeError(f"cannot read the GPUs' memory (engine.gpu_probe exited with "
                               f"{done.returncode}: {last}); use --device cpu or fix the "
                               "CUDA installation")
    return [GpuMemory(g["free"], g["total"], g.get("name", "")) for g in json.loads(done.stdout)]


def format_bytes(n: float) -> str:
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"
