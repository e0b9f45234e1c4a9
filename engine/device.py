"""Device and dtype choices, resolved once at start-up of a scheduler process."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(device: str) -> str:
    """`auto` -> "cuda" when a GPU is visible, else "cpu"; "cpu"/"cuda"/"cuda:N" checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} requested but CUDA is not available")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        return device
    raise DeviceError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")


def resolve_dtype(device: str, checkpoint_dtype: str, override: str | None = None) -> torch.dtype:
    """float32 on CPU (bf16/fp16 matmuls are slow or missing there); the checkpoint's
    dtype on CUDA; `override` ("float32", "bfloat16", "float16") wins."""
    name = override or ("float32" if device == "cpu" else checkpoint_dtype)
    return getattr(torch, name)


def configure_worker_threads(device: str, num_threads: int = 1) -> None:
    """Call once in each scheduler process. On CPU several ranks share the cores: one
    torch thread each avoids oversubscription, which costs far more than it gains. On
    CUDA the rank's GPU becomes the current device, so nothing lands on cuda:0 by default
    (a CUDA context there would take memory from the rank placed on it)."""
    if device == "cpu":
        torch.set_num_threads(num_threads)
    elif device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
