"""Where each rank runs and how large its KV pool is, decided once before any rank starts.

Devices, as SGLang places them: rank j of a launch runs on
``cuda:(base_gpu_id + j * gpu_id_step)``, j counting the launch's ranks in order: the
mixed ranks; in pd mode the prefill ranks, then the decode ranks, so with a step of at
least 1 no GPU holds both roles. An index past the visible GPUs is refused unless
``--allow-gpu-sharing``, which wraps indices around them. ``--device auto`` means cuda
when torch sees a GPU, else cpu; ``cuda:N`` means cuda with ``--base-gpu-id N``.

KV pools (``server.memory`` has the arithmetic): each rank may use a share of memory,
``--mem-fraction-static`` of
- on CUDA, its GPU's free memory at launch, split between the ranks on that GPU;
- on CPU, the host's available RAM, split between all ranks (they share it);
its pool gets that share less its weights (on CPU at most ``CPU_POOL_CONTEXTS`` full
contexts: a CPU forward pass serves few requests at once, and RAM the pool does not need
stays with the host). ``--max-total-tokens`` sets every pool's size instead, and must
fit in the same share. A rank whose pool cannot hold one full context (or the size
asked) refuses the whole launch with ``LaunchError``: one line that says what to
change; nothing has been started.

The API process must not import torch: GPUs are counted from ``CUDA_VISIBLE_DEVICES``
and ``/proc``/``/dev`` (a CPU-only host never runs the probe), then confirmed and
measured by ``python -m engine.gpu_probe`` in a subprocess.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.config import ModelLoadError, load_model_config
from scheduler.roles import DisaggregationMode, Role
from server.args import DTYPE_ALIASES, ServerArgs
from server.memory import (GpuMemory, MemoryProbeError, format_bytes, host_available_bytes,
                           kv_dtype_bytes, probe_gpus, size_kv_pool, weight_bytes)

logger = logging.getLogger(__name__)

CPU_POOL_CONTEXTS = 16
DEFAULT_MEM_FRACTION = {"cuda": 0.88, "cpu": 0.5}  # SGLang's for one GPU; SGLang-JAX's CPU
_CUDA_DEVICE = re.compile(r"cuda(?::(\d+))?")


class LaunchError(RuntimeError):
    """The ranks cannot be placed or do not fit; the message says what to change."""


@dataclass(frozen=True)
class RankPlan:
    device: str  # "cpu", "cuda:N"; the --device flag as given with --executor sim
    max_total_tokens: int | None  # None only with --executor sim (its profile decides)


@dataclass(frozen=True)
class LaunchPlan:
    ranks: dict[Role, tuple[RankPlan, ...]]  # role -> its ranks in dp_rank order

    def summary(self) -> str:
        return "; ".join(f"{role}: " + ", ".join(f"{p.device} ({p.max_total_tokens} KV tokens)"
                                                   for p in plans)
                         for role, plans in self.ranks.items())


def launch_roles(args: ServerArgs) -> list[tuple[Role, int]]:
    """The rank groups one launch starts, in placement order, with their sizes."""
    if args.disaggregation_mode == DisaggregationMode.PD:
        return [(Role.PREFILL, args.prefill_dp_size or args.dp_size),
                (Role.DECODE, args.decode_dp_size or args.dp_size)]
    return [(args.role, args.dp_size)]


def gpu_indices(num_ranks: int, base_gpu_id: int, gpu_id_step: int, num_gpus: int,
                allow_sharing: bool) -> list[int]:
    """The CUDA index of each rank, or ``LaunchError`` if one lies past the visible GPUs
    (unless sharing is allowed: then indices wrap around them)."""
    if base_gpu_id >= num_gpus:
        raise LaunchError(f"--base-gpu-id {base_gpu_id}: only {num_gpus} GPU(s) visible "
                          f"(cuda:0..cuda:{num_gpus - 1})")
    wanted = [base_gpu_id + j * gpu_id_step for j in range(num_ranks)]
    if wanted[-1] < num_gpus:
        return wanted
    if allow_sharing:
        return [index % num_gpus for index in wanted]
    raise LaunchError(
        f"{num_ranks} rank(s) from --base-gpu-id {base_gpu_id} with --gpu-id-step "
        f"{gpu_id_step} need cuda:{wanted[-1]}, but {num_gpus} GPU(s) are visible: use "
        f"fewer ranks or a smaller step, or --allow-gpu-sharing to put several ranks on a GPU")


def visible_gpu_count(environ=os.environ, root: Path = Path("/")) -> int:
    """NVIDIA GPUs this process could use, without torch: the driver's list (or device
    nodes), narrowed by ``CUDA_VISIBLE_DEVICES`` as CUDA reads it (up to the first
    invalid entry). A hint only: ``engine.gpu_probe`` has the final word."""
    gpus_dir = root / "proc/driver/nvidia/gpus"
    try:
        physical = len(list(gpus_dir.iterdir()))
    except OSError:
        physical = len([p for p in (root / "dev").glob("nvidia*") if p.name[6:].isdigit()])
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical
    entries = 0
    for entry in visible.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        entries += 1
    return min(entries, physical)


def plan_launch(args: ServerArgs, gpus: Callable[[], list[GpuMemory]] = probe_gpus,
                host_bytes: Callable[[], int] = host_available_bytes,
                gpu_count: Callable[[], int] = visible_gpu_count) -> LaunchPlan:
    """Every rank's device and KV pool size; ``LaunchError`` if they cannot be placed or
    do not fit. ``args`` are resolved (``server.args.resolve_args``)."""
    roles = launch_roles(args)
    if args.executor == "sim":  # no torch, no memory: the profile is the accelerator
        return LaunchPlan({role: (RankPlan(args.device, args.max_total_tokens),) * n
                           for role, n in roles})
    kind, base_gpu_id, gpu_memory = _resolve_device(args, gpus, gpu_count)
    if kind == "cuda" and any(role == Role.PREFILL for role, _ in roles):
        # engine.kv_transfer: decode ranks map a prefill rank's pool from shared memory.
        raise LaunchError("PD prefill ranks on CUDA need a CUDA IPC KV hand-off, which this "
                          "build does not have: run PD with --device cpu")
    by_role = place_ranks(roles, kind, base_gpu_id, args.gpu_id_step, len(gpu_memory),
                          args.allow_gpu_sharing)
    devices = [d for role, _ in roles for d in by_role[role]]
    tokens = iter(plan_kv_pools(args, kind, devices, gpu_memory, host_bytes))
    return LaunchPlan({role: tuple(RankPlan(d, next(tokens)) for d in by_role[role])
                       for role, _ in roles})


def place_ranks(roles: list[tuple[str, int]], kind: str, base_gpu_id: int = 0,
                gpu_id_step: int = 1, num_gpus: int = 0,
                allow_sharing: bool = False) -> dict[str, list[str]]:
    """Each group's devices: ``roles`` in placement order (``launch_roles``), numbered
    on as one sequence, so a pd launch's decode ranks follow its prefill ranks."""
    num_ranks = sum(n for _, n in roles)
    if kind == "cuda":
        devices = [f"cuda:{i}" for i in gpu_indices(num_ranks, base_gpu_id, gpu_id_step,
                                                    num_gpus, allow_sharing)]
    else:
        devices = ["cpu"] * num_ranks
    out, start = {}, 0
    for role, n in roles:
        out[role] = devices[start:start + n]
        start += n
    return out


def _resolve_device(args: ServerArgs, gpus, gpu_count) -> tuple[str, int, list[GpuMemory]]:
    """("cpu" | "cuda", base GPU id, GPU memory) for the --device flag."""
    device = args.device
    match = _CUDA_DEVICE.fullmatch(device)
    if device not in ("auto", "cpu") and match is None:
        raise LaunchError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    base_gpu_id = args.base_gpu_id
    if match is not None and match.group(1) is not None:
        if args.base_gpu_id != 0:
            raise LaunchError(f"--device {device} and --base-gpu-id {args.base_gpu_id} both "
                              "name the first GPU: give one of them")
        base_gpu_id = int(match.group(1))
    memory: list[GpuMemory] = []
    if match is not None or (device == "auto" and gpu_count() > 0):
        try:
            memory = gpus()
        except MemoryProbeError as exc:
            raise LaunchError(str(exc)) from None
        if match is not None and not memory:
            raise LaunchError(f"--device {device}: torch sees no CUDA device (a CPU-only "
                              "torch, or no driver); use --device cpu")
        if not memory:
            logger.warning("GPUs are present but torch cannot use them: running on cpu")
    if memory:
        return "cuda", base_gpu_id, memory
    if args.base_gpu_id != 0 or args.gpu_id_step != 1:
        raise LaunchError("--base-gpu-id and --gpu-id-step place ranks on GPUs, and this "
                          "launch runs on cpu")
    return "cpu", 0, memory


def plan_kv_pools(args: ServerArgs, kind: str, devices: list[str], gpu_memory: list[GpuMemory],
                  host_bytes: Callable[[], int]) -> list[int]:
    """Each rank's KV pool size in tokens (see the module docstring), or ``LaunchError``."""
    try:
        config = load_model_config(args.model_path)
    except ModelLoadError as exc:
        raise LaunchError(f"--model-path: {exc}") from None
    context_len = args.context_length or config.context_len
    dtype_bytes = kv_dtype_bytes(config, kind, DTYPE_ALIASES.get(args.dtype, args.dtype)
                                 if args.dtype != "auto" else None)
    weights = weight_bytes(config, dtype_bytes)
    per_token = config.kv_bytes_per_token(dtype_bytes)
    fraction = args.mem_fraction_static or DEFAULT_MEM_FRACTION[kind]
    shares = _memory_shares(kind, devices, gpu_memory, host_bytes, fraction)
    cap = args.max_total_tokens or (CPU_POOL_CONTEXTS * context_len if kind == "cpu" else None)
    need = args.max_total_tokens or context_len
    tokens = []
    for device, (share, source, per_unit, unit) in zip(devices, shares):
        fit = size_kv_pool(share, weights, per_token)
        if fit < need:
            raise LaunchError(_does_not_fit(args, len(devices), device, share, source, weights,
                                            per_token, need, fit, per_unit, unit))
        tokens.append(fit if cap is None else min(fit, cap))
    return tokens


def _memory_shares(kind, devices, gpu_memory, host_bytes, fraction):
    """Per rank: (bytes it may use, where they come from, static bytes of the whole
    device or host, and what that whole is called in advice)."""
    if kind == "cpu":
        total = int(fraction * host_bytes())
        source = (f"--mem-fraction-static {fraction:g} of {format_bytes(total / fraction)} "
                  f"available RAM, split between {len(devices)} rank(s)")
        return [(total // len(devices), source, total, "host")] * len(devices)
    on_gpu = Counter(devices)
    shares = []
    for device in devices:
        total = int(fraction * gpu_memory[int(device.split(":")[1])].free_bytes)
        source = (f"--mem-fraction-static {fraction:g} of {format_bytes(total / fraction)} "
                  f"free on {device}" + (f", split between {on_gpu[device]} ranks"
                                         if on_gpu[device] > 1 else ""))
        shares.append((total // on_gpu[device], source, total, "GPU"))
    return shares


def _does_not_fit(args, num_ranks, device, share, source, weights, per_token, need, fit,
                  per_unit, unit) -> str:
    rank_need = weights + need * per_token
    what = (f"--max-total-tokens {need}" if args.max_total_tokens
            else f"one {need}-token context")
    head = (f"the ranks do not fit in memory: a rank on {device} needs "
            f"{format_bytes(rank_need)} ({format_bytes(weights)} of weights + "
            f"{format_bytes(need * per_token)} of KV for {what}) and gets "
            f"{format_bytes(share)} ({source})")
    fits = per_unit // rank_need
    advice = []
    if args.max_total_tokens and fit >= 1:
        advice.append(f"--max-total-tokens {fit} or less")
    if fits >= 1 and fits < num_ranks:
        ranks_flag = ("--prefill-dp-size + --decode-dp-size" if args.disaggregation_mode == DisaggregationMode.PD
                      else "--dp-size")
        advice.append(f"at most {fits} rank(s) per {unit} ({ranks_flag})")
    if not args.max_total_tokens:
        advice.append("a smaller --context-length")
    fraction = args.mem_fraction_static or DEFAULT_MEM_FRACTION["cpu" if device == "cpu" else "cuda"]
    if fraction < 1:
        advice.append("a larger --mem-fraction-static")
    if not advice:
        advice.append("a smaller model, or a machine with more memory")
    return head + ": use " + ", or ".join(advice)
