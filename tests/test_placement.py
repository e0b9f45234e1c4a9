"""Rank placement and KV sizing (server.placement, server.memory): the rank-to-device
mapping with a faked GPU count, memory-sized pools, refused launches as one line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from engine.config import load_model_config
from server.args import parse_args, resolve_args
from server.memory import GpuMemory, host_available_bytes, weight_bytes
from server.placement import (CPU_POOL_CONTEXTS, LaunchError, gpu_indices, launch_roles,
                              place_ranks, plan_launch, visible_gpu_count)
from server.ranks import scheduler_configs
from tests.server_helpers import REPO, free_port, wait_group_gone
from shm.segment import NAME_PREFIX, list_segments

GiB = 2**30
TINY = load_model_config("tiny")
TINY_CTX = TINY.context_len
TINY_WEIGHTS_F32 = weight_bytes(TINY, 4)
TINY_KV_F32 = TINY.kv_bytes_per_token(4)


def args_of(*argv: str):
    return resolve_args(parse_args(["--random-seed", "1", "--model-path", "tiny", *argv]))


def plan(*argv: str, num_gpus: int = 0, free: int = 80 * GiB, host: int = 64 * GiB):
    """plan_launch with ``num_gpus`` fake GPUs of ``free`` bytes each and ``host`` RAM."""
    gpus = [GpuMemory(free, free + GiB, "fake")] * num_gpus
    return plan_launch(args_of(*argv), gpus=lambda: gpus, host_bytes=lambda: host,
                       gpu_count=lambda: num_gpus)


def devices(p, role="mixed"):
    return [r.device for r in p.ranks[role]]


# ---- rank -> device ------------------------------------------------------------------------
def test_gpu_indices_base_and_step():
    assert gpu_indices(4, 0, 1, 8, False) == [0, 1, 2, 3]
    assert gpu_indices(3, 2, 2, 8, False) == [2, 4, 6]
    assert gpu_indices(3, 1, 3, 8, False) == [1, 4, 7]


def test_gpu_indices_refuse_oversubscription_unless_sharing_is_allowed():
    with pytest.raises(LaunchError, match="need cuda:8.*--allow-gpu-sharing"):
        gpu_indices(3, 4, 2, 8, False)
    assert gpu_indices(3, 4, 2, 8, True) == [4, 6, 0]
    assert gpu_indices(4, 0, 1, 1, True) == [0, 0, 0, 0]
    with pytest.raises(LaunchError, match="--base-gpu-id 2: only 2 GPU"):
        gpu_indices(1, 2, 1, 2, True)


def test_plain_launch_places_rank_i_on_base_plus_i_times_step():
    assert devices(plan("--dp-size", "4", num_gpus=8)) == [f"cuda:{i}" for i in range(4)]
    assert devices(plan("--dp-size", "3", "--base-gpu-id", "1", "--gpu-id-step", "2",
                        num_gpus=8)) == ["cuda:1", "cuda:3", "cuda:5"]
    # cuda:N is cuda from GPU N; naming the first GPU twice is refused.
    assert devices(plan("--dp-size", "2", "--device", "cuda:6", num_gpus=8)) == ["cuda:6", "cuda:7"]
    with pytest.raises(LaunchError, match="give one of them"):
        plan("--device", "cuda:1", "--base-gpu-id", "1", num_gpus=8)


def test_pd_launch_puts_prefill_and_decode_ranks_on_distinct_gpus():
    roles = [("prefill", 2), ("decode", 3)]
    assert place_ranks(roles, "cuda", num_gpus=8) == {
        "prefill": ["cuda:0", "cuda:1"], "decode": ["cuda:2", "cuda:3", "cuda:4"]}
    assert place_ranks([("prefill", 2), ("decode", 2)], "cuda", 1, 2, num_gpus=8) == {
        "prefill": ["cuda:1", "cuda:3"], "decode": ["cuda:5", "cuda:7"]}
    assert launch_roles(args_of("--disaggregation-mode", "pd", "--prefill-dp-size", "2",
                                "--decode-dp-size", "3")) == roles
    with pytest.raises(LaunchError, match="--allow-gpu-sharing"):
        place_ranks([("prefill", 1), ("decode", 1)], "cuda", num_gpus=1)
    assert place_ranks([("prefill", 1), ("decode", 1)], "cuda", num_gpus=1,
                       allow_sharing=True) == {"prefill": ["cuda:0"], "decode": ["cuda:0"]}
    assert place_ranks(roles, "cpu") == {"prefill": ["cpu"] * 2, "decode": ["cpu"] * 3}
    # The KV hand-off between PD ranks is shared memory, CPU only: refused before start.
    with pytest.raises(LaunchError, match="CUDA IPC"):
        plan("--disaggregation-mode", "pd", "--dp-size", "1", num_gpus=2)


def test_rank_configs_carry_their_own_device_and_pool():
    p = plan("--dp-size", "3", "--base-gpu-id", "2", num_gpus=8)
    cfgs = scheduler_configs(args_of("--dp-size", "3"), "b", plan=p)
    assert [c.device for c in cfgs] == ["cuda:2", "cuda:3", "cuda:4"]
    assert [c.max_total_tokens for c in cfgs] == [r.max_total_tokens for r in p.ranks["mixed"]]
    pd = args_of("--disaggregation-mode", "pd", "--prefill-dp-size", "2", "--decode-dp-size", "1")
    cfgs = scheduler_configs(pd, "b", role="decode", dp_size=1)  # planned from the args
    assert [c.device for c in cfgs] == ["cpu"] and cfgs[0].max_total_tokens >= TINY_CTX


def test_more_ranks_than_gpus_is_refused_unless_sharing_is_allowed():
    with pytest.raises(LaunchError, match="2 GPU\\(s\\) are visible.*--allow-gpu-sharing"):
        plan("--dp-size", "3", num_gpus=2)
    assert devices(plan("--dp-size", "3", "--allow-gpu-sharing", num_gpus=2)) == [
        "cuda:0", "cuda:1", "cuda:0"]


def test_auto_is_cpu_without_gpus_and_gpu_flags_then_refused():
    assert devices(plan("--dp-size", "2")) == ["cpu", "cpu"]
    assert devices(plan("--dp-size", "2", num_gpus=2)) == ["cuda:0", "cuda:1"]
    assert devices(plan("--device", "cpu", num_gpus=2)) == ["cpu"]
    with pytest.raises(LaunchError, match="runs on cpu"):
        plan("--base-gpu-id", "1")
    with pytest.raises(LaunchError, match="torch sees no CUDA device"):
        plan("--device", "cuda")


def test_sim_executor_is_not_placed():
    p = plan("--dp-size", "64", "--executor", "sim", num_gpus=1)
    assert devices(p) == ["auto"] * 64 and {r.max_total_tokens for r in p.ranks["mixed"]} == {None}


def test_visible_gpu_count_reads_the_driver_and_cuda_visible_devices(tmp_path):
    gpus = tmp_path / "proc/driver/nvidia/gpus"
    gpus.mkdir(parents=True)
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (gpus / bus).mkdir()
    assert visible_gpu_count({}, tmp_path) == 3
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": "2,0"}, tmp_path) == 2
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": ""}, tmp_path) == 0
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": "1,-1,0"}, tmp_path) == 1
    bare = tmp_path / "bare"
    (bare / "dev").mkdir(parents=True)
    for node in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (bare / "dev" / node).touch()
    assert visible_gpu_count({}, bare) == 2
    assert visible_gpu_count({}, tmp_path / "nothing") == 0


# ---- KV sized from memory ------------------------------------------------------------------
def test_weight_bytes_match_the_model_torch_builds():
    torch = pytest.importorskip("torch")
    from engine.loader import empty_model
    for config in (TINY, dataclasses.replace(TINY, tie_word_embeddings=True),
                   dataclasses.replace(TINY, attention_bias=True, attention_out_bias=True)):
        model = empty_model(config, "cpu", torch.bfloat16)
        assert weight_bytes(config, 2) == sum(p.numel() * p.element_size()
                                              for p in model.parameters())


def test_cuda_pool_is_the_fraction_of_free_memory_after_the_weights():
    free = 10 * GiB
    weights = weight_bytes(TINY, 4)  # tiny is float32 on CUDA too
    p = plan("--dp-size", "2", "--mem-fraction-static", "0.5", num_gpus=2, free=free)
    expected = (int(0.5 * free) - weights) // TINY_KV_F32
    assert [r.max_total_tokens for r in p.ranks["mixed"]] == [expected, expected]
    # Two ranks sharing one GPU split its static share.
    p = plan("--dp-size", "2", "--mem-fraction-static", "0.5", "--allow-gpu-sharing",
             num_gpus=1, free=free)
    shared = (int(0.5 * free) // 2 - weights) // TINY_KV_F32
    assert [r.max_total_tokens for r in p.ranks["mixed"]] == [shared, shared]
    # Default fraction: SGLang's 0.88.
    p = plan(num_gpus=1, free=free)
    assert p.ranks["mixed"][0].max_total_tokens == (int(0.88 * free) - weights) // TINY_KV_F32


def test_cpu_pool_is_a_share_of_available_ram_capped_at_full_contexts():
    roomy = plan("--dp-size", "2", host=64 * GiB)
    assert [r.max_total_tokens for r in roomy.ranks["mixed"]] == [CPU_POOL_CONTEXTS * TINY_CTX] * 2
    host = 200 * 2**20  # 0.5 of it split by 4 ranks: 25 MiB each
    p = plan("--dp-size", "4", host=host)
    expected = (int(0.5 * host) // 4 - TINY_WEIGHTS_F32) // TINY_KV_F32
    assert TINY_CTX <= expected < CPU_POOL_CONTEXTS * TINY_CTX
    assert [r.max_total_tokens for r in p.ranks["mixed"]] == [expected] * 4
    # --max-total-tokens overrides the size, within the same share.
    p = plan("--dp-size", "4", "--max-total-tokens", "3000", host=host)
    assert [r.max_total_tokens for r in p.ranks["mixed"]] == [3000] * 4


def test_ranks_that_do_not_fit_are_refused_with_what_to_change():
    need = TINY_WEIGHTS_F32 + TINY_CTX * TINY_KV_F32
    host = 6 * need  # 0.5 of it: 3 ranks fit
    assert len(plan("--dp-size", "3", host=host).ranks["mixed"]) == 3
    with pytest.raises(LaunchError) as exc:
        plan("--dp-size", "4", host=host)
    message = str(exc.value)
    assert "\n" not in message and "at most 3 rank(s) per host (--dp-size)" in message
    assert "--mem-fraction-static" in message and "--context-length" in message
    with pytest.raises(LaunchError, match="--prefill-dp-size \\+ --decode-dp-size"):
        plan("--disaggregation-mode", "pd", "--dp-size", "2", host=host)
    with pytest.raises(LaunchError, match="--max-total-tokens 4000000000 needs|"
                                          "KV for --max-total-tokens 4000000000"):
        plan("--max-total-tokens", "4000000000")
    with pytest.raises(LaunchError, match="on cuda:0.*at most 1 rank\\(s\\) per GPU"):
        plan("--dp-size", "2", "--allow-gpu-sharing", num_gpus=1,
             free=int(1.5 * need / 0.88))


# ---- the refusal through a real server -----------------------------------------------------
def _refused_launch(*flags: str) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--port", str(free_port()),
                             "--model-path", "tiny", *flags], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
    assert out == ""
    assert wait_group_gone(proc.pid) == []  # no rank, no helper left
    assert list_segments(NAME_PREFIX) == []  # nothing created
    return proc.returncode, err


@pytest.mark.slow
def test_huge_max_total_tokens_ends_with_one_line():
    code, err = _refused_launch("--max-total-tokens", "4000000000")
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err
    assert len(lines) == 1 and " ERROR " in lines[0], err
    assert "--max-total-tokens" in lines[0] and "or less" in lines[0]


@pytest.mark.slow
def test_dp_size_that_does_not_fit_ends_with_one_line():
    need = TINY_WEIGHTS_F32 + TINY_CTX * TINY_KV_F32
    # One rank's need is 1.5x the static share: 2 ranks get 0.75x each (RAM may drift a
    # little between here and the server, far less than that margin).
    fraction = 1.5 * need / host_available_bytes()
    code, err = _refused_launch("--dp-size", "2", "--mem-fraction-static", f"{fraction:.9f}")
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err
    assert len(lines) == 1 and " ERROR " in lines[0], err
    assert "do not fit" in lines[0] and "at most 1 rank(s) per host (--dp-size)" in lines[0]


# ---- on CUDA -------------------------------------------------------------------------------
def _num_cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.cuda
@pytest.mark.skipif(_num_cuda_devices() == 0, reason="needs CUDA")
def test_ranks_run_on_their_planned_gpus(tmp_path):
    import httpx
    from tests.server_helpers import ServerProcess
    sharing = _num_cuda_devices() < 2
    flags = ["--model-path", "tiny", "--device", "cuda", "--dp-size", "2",
             "--mem-fraction-static", "0.3"] + (["--allow-gpu-sharing"] if sharing else [])
    with ServerProcess(*flags, log_path=tmp_path / "cuda.log") as s:
        info = httpx.get(s.url + "/server_info", timeout=10).json()
        assert [r["device"] for r in info["ranks"]] == (
            ["cuda:0", "cuda:0"] if sharing else ["cuda:0", "cuda:1"])
        texts = {httpx.post(s.url + "/generate", timeout=60, json={
            "text": "Hello", "routed_dp_rank": r,
            "sampling_params": {"temperature": 0, "max_new_tokens": 8}}).json()["text"]
            for r in (0, 1)}
        assert len(texts) == 1


def test_placement_flags_are_validated():
    from server.args import InvalidServerArgs
    for argv in (["--gpu-id-step", "0"], ["--base-gpu-id", "-1"],
                 ["--mem-fraction-static", "0"], ["--mem-fraction-static", "1.5"]):
        with pytest.raises(InvalidServerArgs, match=argv[0]):
            args_of(*argv)
    with pytest.raises(LaunchError, match="expected auto, cpu, cuda or cuda:N"):
        plan("--device", "tpu")


def test_dtype_flag_sizes_weights_and_kv():
    """--dtype float16 halves what a float32 token and weight take, so the pool doubles
    (less the smaller weights)."""
    free = 10 * GiB
    half = plan("--mem-fraction-static", "0.5", "--dtype", "half", num_gpus=1, free=free)
    weights = weight_bytes(TINY, 2)
    assert half.ranks["mixed"][0].max_total_tokens == (int(0.5 * free) - weights) // (TINY_KV_F32 // 2)
