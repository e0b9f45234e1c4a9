"""SGLang's launch flags: accepted with their meaning, or refused in one line (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.args import (ServerArgs, build_parser, parse_args, resolve_args)
from tests.server_helpers import REPO

BOOTSTRAP_ENV = "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT"
WAITING_ENV = "SGLANG_DISAGGREGATION_WAITING_TIMEOUT"
NO_MODEL = ["--model-path", "/nonexistent"]


def test_deployment_script_flags_are_accepted_with_their_meaning():
    args = resolve_args(parse_args([
        "--enable-metrics", "--tp-size", "1", "--trust-remote-code", "--dtype", "half",
        "--log-requests", "--api-key", "k", "--decode-log-interval", "5",
        "--enable-dp-attention", "--data-parallel-size", "2", "--tensor-parallel-size", "1"]))
    assert (args.dp_size, args.tp_size, args.dtype) == (2, 1, "float16")
    assert args.log_requests and args.enable_metrics and args.trust_remote_code
    assert args.decode_log_interval == 5 and args.api_key == "k"
    assert args.enable_dp_attention and not args.sim_lockstep  # real model: nothing to lock
    assert resolve_args(parse_args(["--dtype", "float"])).dtype == "float32"
    sim = resolve_args(parse_args(["--executor", "sim", "--sim-profile", "instant",
                                   "--enable-dp-attention", "--dp-size", "2"]))
    assert sim.sim_lockstep  # DP attention with expert parallelism steps the ranks together
    pd = resolve_args(parse_args(["--disaggregation-mode", "pd",
                                  "--disaggregation-transfer-backend", "mooncake"]))
    assert pd.disaggregation_transfer_backend == "mooncake"  # the same shared-memory transfer


def test_dtype_reaches_every_rank():
    from server.ranks import scheduler_configs
    args = resolve_args(parse_args(["--dtype", "bfloat16", "--dp-size", "2",
                                    "--decode-log-interval", "3"]))
    cfgs = scheduler_configs(args, "board")
    assert [(c.dtype, c.decode_log_interval) for c in cfgs] == [("bfloat16", 3)] * 2


def test_disable_radix_cache_reaches_every_rank_but_is_off_by_default():
    from server.ranks import scheduler_configs
    assert not any(c.disable_radix_cache
                   for c in scheduler_configs(resolve_args(parse_args(["--dp-size", "2"])), "b"))
    args = resolve_args(parse_args(["--disable-radix-cache", "--dp-size", "2"]))
    assert [c.disable_radix_cache for c in scheduler_configs(args, "board")] == [True, True]


def test_pd_timeouts_come_from_sglang_environment_unless_given(monkeypatch):
    monkeypatch.setenv(BOOTSTRAP_ENV, "12.5")
    monkeypatch.setenv(WAITING_ENV, "7")
    decode = ["--disaggregation-mode", "decode"]
    args = parse_args(decode)
    assert (args.disaggregation_bootstrap_timeout, args.disaggregation_waiting_timeout) == (12.5, 7.0)
    args = parse_args([*decode, "--disaggregation-bootstrap-timeout", "3"])
    assert (args.disaggregation_bootstrap_timeout, args.disaggregation_waiting_timeout) == (3.0, 7.0)
    # A plain server has no rooms: it reads neither variable (nor does SGLang's), so a
    # PD deployment's environment does not stop it from starting.
    assert resolve_args(parse_args([])).disaggregation_bootstrap_timeout == 300.0
    monkeypatch.delenv(BOOTSTRAP_ENV)
    monkeypatch.delenv(WAITING_ENV)
    assert parse_args([]) == ServerArgs()  # 300 s each, SGLang's defaults


def test_help_groups_the_flags_and_states_each_default_once():
    text = build_parser().format_help()
    for title in ("HTTP server and operations:", "model:", "load balancing",
                  "prefill/decode disaggregation:", "simulated accelerator"):
        assert title in text
    # simulation knobs live in their own section, after the serving flags
    assert text.index("--sim-profile") > text.index("simulated accelerator")
    assert text.index("--dp-size") < text.index("simulated accelerator")
    for entry in text.split("\n  --")[1:]:
        assert entry.count("default:") <= 1, entry
    assert "--data-parallel-size" in text and "--tensor-parallel-size" in text
    assert "$SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT" in text


def _serve(*flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.serve", *flags], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("flags, env, names", [
    (["--tp-size", "2"], None, "--tp-size 2"),
    (["--tensor-parallel-size", "4"], None, "--tp-size 4"),
    (["--load-balance-method", "bogus"], None, "--load-balance-method"),
    (["--disaggregation-mode", "prefill", "--dp-size", "2", "--prefill-dp-size", "3"], None,
     "--prefill-dp-size 3 contradicts --dp-size 2"),
    (["--prefill-load-balance-method", "total_tokens"], None, "--prefill-load-balance-method"),
    (["--dtype", "float8"], None, "--dtype"),
    (["--decode-log-interval", "0"], None, "--decode-log-interval"),
    (["--disaggregation-transfer-backend", "ascend"], None, "--disaggregation-transfer-backend"),
    (["--disaggregation-mode", "decode"], {BOOTSTRAP_ENV: "soon"}, BOOTSTRAP_ENV),
    # Flags a plain server would ignore; the model cannot load, so that a server that
    # ignored them would stop at once rather than start.
    (["--sim-profile", "/nonexistent.json", *NO_MODEL], None, "--sim-profile needs --executor sim"),
    (["--disaggregation-bootstrap-port", "9999", *NO_MODEL], None,
     "--disaggregation-bootstrap-port 9999: --disaggregation-mode null runs no"),
    (["--disaggregation-mode", "pd", "--disaggregation-bootstrap-port", "9999", *NO_MODEL],
     None, "--disaggregation-bootstrap-port 9999: --disaggregation-mode pd runs both"),
])
def test_each_bad_flag_is_one_clear_line(flags, env, names):
    done = _serve(*flags, env=env)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2, lines
    assert len(lines) == 1 and names in lines[0], lines
    assert "mixed-load-balance-method" not in lines[0]
    assert "shortest_queue" not in lines[0] and "minimum_tokens" not in lines[0]


def test_dtype_sets_the_weights_and_kv_dtype_of_the_real_model():
    import torch

    from engine.executor import ModelExecutor
    from scheduler.config import SchedulerConfig
    sizes = {}
    for dtype, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        cfg = SchedulerConfig(dp_rank=0, board_name="unused", device="cpu", dtype=dtype,
                              max_total_tokens=1024)
        executor = ModelExecutor.from_config(cfg)
        assert executor.runner.kv_pool.kv_buffer.dtype == expected
        assert next(executor.runner.model.parameters()).dtype == expected
        sizes[dtype] = executor.memory_bytes()
    assert sizes["bfloat16"][0] * 2 == sizes["float32"][0]  # weights
    assert sizes["bfloat16"][1] * 2 == sizes["float32"][1]  # KV pool
