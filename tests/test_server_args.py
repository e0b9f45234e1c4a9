"""Server arguments: SGLang flag names and defaults from the dataclass, resolved once."""

from __future__ import annotations

import dataclasses
import os

import pytest

from server.args import (InvalidServerArgs, ServerArgs, build_parser, parse_args,
                         resolve_args)


def test_cli_defaults_come_from_the_dataclass():
    assert parse_args([]) == ServerArgs()
    flags = {a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    for f in dataclasses.fields(ServerArgs):
        assert "--" + f.name.replace("_", "-") in flags


def test_sglang_flag_names_parse():
    args = parse_args(["--host", "0.0.0.0", "--port", "31000", "--model-path", "tiny",
                       "--dp-size", "4", "--load-balance-method", "total_tokens",
                       "--max-running-requests", "8", "--max-total-tokens", "4096",
                       "--chunked-prefill-size", "256", "--device", "cpu", "--log-level", "warning",
                       "--context-length", "1024", "--disaggregation-mode", "null"])
    assert (args.dp_size, args.port, args.max_running_requests, args.context_length) == (4, 31000, 8, 1024)
    assert args.load_balance_method == "total_tokens" and args.device == "cpu"
    with pytest.raises(SystemExit):
        parse_args(["--log-level", "loud"])


def test_resolve_fills_auto_values_once():
    args = resolve_args(ServerArgs(model_path="tiny"))
    assert args.load_balance_method == "cache_aware"  # auto for mixed ranks with the cache
    assert resolve_args(ServerArgs(model_path="tiny", disable_radix_cache=True)) \
        .load_balance_method == "prefill_tokens"  # and without it
    assert args.served_model_name == "tiny" and args.context_length == 2048
    assert os.path.isfile(os.path.join(args.tokenizer_path, "tokenizer.json"))
    assert resolve_args(args) == args
    assert resolve_args(ServerArgs(model_path="tiny", load_balance_method="shortest_queue")).load_balance_method \
        == "total_requests"


@pytest.mark.parametrize("bad", [
    {"dp_size": 0}, {"port": 70000}, {"load_balance_method": "fastest"},
    {"model_path": "/nonexistent"}, {"context_length": 10**6}, {"max_total_tokens": 0},
    {"disaggregation_mode": "pd", "prefill_dp_size": 0}, {"max_queued_requests": -1},
    {"disaggregation_mode": "pd", "prefill_load_balance_method": "fastest"},
    {"disaggregation_mode": "decode", "disaggregation_bootstrap_timeout": 0},
    {"stale_after_s": 0.01},
    {"timeout_keep_alive": 0}, {"timeout_keep_alive": float("nan")},
    {"timeout_keep_alive": float("inf")}, {"random_seed": -1}, {"random_seed": 2**63},
    {"timeout_request_read": 0}, {"timeout_request_read": float("nan")},
    {"max_request_body_bytes": 0}, {"limit_concurrency": 0},
    {"api_key": "two words"}, {"api_key": "clé"},
])
def test_invalid_args_name_the_flag(bad):
    with pytest.raises(InvalidServerArgs, match="--"):
        resolve_args(ServerArgs(**{"model_path": "tiny", **bad}))


def test_each_rank_draws_from_its_own_seed():
    from server.ranks import scheduler_configs
    drawn = {resolve_args(ServerArgs(model_path="tiny")).random_seed for _ in range(8)}
    assert None not in drawn and len(drawn) > 1  # unset: a random seed per launch
    args = resolve_args(ServerArgs(model_path="tiny", dp_size=3, random_seed=7))
    assert [c.random_seed for c in scheduler_configs(args, "board")] == [7, 8, 9]
    pd = resolve_args(ServerArgs(model_path="tiny", disaggregation_mode="pd", prefill_dp_size=2, decode_dp_size=2,
                                 random_seed=7))
    assert [c.random_seed for c in scheduler_configs(pd, "b", role="prefill", dp_size=2)] == [7, 8]
    assert [c.random_seed for c in scheduler_configs(pd, "b", role="decode", dp_size=2)] == [9, 10]


def test_sim_lockstep_needs_sim_and_sim_context_comes_from_profile():
    with pytest.raises(InvalidServerArgs, match="--sim-lockstep"):
        resolve_args(ServerArgs(model_path="tiny", sim_lockstep=True))
    args = resolve_args(parse_args(["--model-path", "tiny", "--executor", "sim", "--sim-profile", "seed-qwen3-235b-dp4",
                                    "--sim-lockstep"]))
    assert args.sim_lockstep and args.context_length == 32768  # not the tiny model's 2048
    with pytest.raises(InvalidServerArgs, match="--sim-profile"):
        resolve_args(ServerArgs(model_path="tiny", executor="sim", sim_profile="no-such-profile"))


@pytest.mark.parametrize("flag, value", [
    ("sim_profile", "/nonexistent.json"), ("sim_lockstep", True), ("sim_time_scale", 2.0)])
def test_sim_flags_need_the_sim_executor(flag, value):
    with pytest.raises(InvalidServerArgs, match=f"--{flag.replace('_', '-')} needs --executor sim"):
        resolve_args(ServerArgs(model_path="tiny", **{flag: value}))


@pytest.mark.parametrize("flag, value", [
    ("disaggregation_bootstrap_timeout", 5.0), ("disaggregation_waiting_timeout", 5.0),
    ("disaggregation_bootstrap_port", 9999), ("disaggregation_transfer_backend", "nixl")])
def test_pd_flags_are_refused_by_a_plain_server_at_their_default_accepted(flag, value):
    with pytest.raises(InvalidServerArgs, match=f"--{flag.replace('_', '-')} {value}: "
                                                "--disaggregation-mode null runs no"):
        resolve_args(ServerArgs(model_path="tiny", **{flag: value}))
    default = getattr(ServerArgs(), flag)
    assert getattr(resolve_args(ServerArgs(model_path="tiny", **{flag: default})), flag) == default
    for mode in ("pd", "prefill", "decode"):
        if mode == "pd" and flag == "disaggregation_bootstrap_port":  # the pair's, not pd's
            with pytest.raises(InvalidServerArgs, match="--disaggregation-mode pd runs both"):
                resolve_args(ServerArgs(model_path="tiny", disaggregation_mode=mode,
                                        **{flag: value}))
            continue
        assert getattr(resolve_args(ServerArgs(model_path="tiny", disaggregation_mode=mode,
                                               **{flag: value})), flag) == value


def test_sim_lockstep_segment_reaches_every_rank_config():
    from server.ranks import scheduler_configs
    args = resolve_args(ServerArgs(model_path="tiny", executor="sim", sim_profile="instant", sim_lockstep=True,
                                   dp_size=3))
    cfgs = scheduler_configs(args, "board", sim_lockstep_name="lockstep-x")
    assert [c.sim_lockstep_name for c in cfgs] == ["lockstep-x"] * 3


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), 1001.0])
def test_sim_time_scale_must_be_a_positive_bounded_factor(scale):
    with pytest.raises(InvalidServerArgs, match="--sim-time-scale"):
        resolve_args(ServerArgs(model_path="tiny", executor="sim", sim_profile="instant", sim_time_scale=scale))


def test_sim_time_scale_needs_sim_stretches_staleness_and_reaches_every_rank():
    from server.ranks import scheduler_configs
    with pytest.raises(InvalidServerArgs, match="--sim-time-scale needs --executor sim"):
        resolve_args(ServerArgs(model_path="tiny", sim_time_scale=2.0))
    args = resolve_args(parse_args(["--model-path", "tiny", "--executor", "sim", "--sim-profile", "instant",
                                    "--dp-size", "2", "--sim-time-scale", "4",
                                    "--stale-after-s", "3"]))
    # A forward pass lasts 4x its modelled time, so may the silence between heartbeats.
    assert args.stale_ns == 12 * 10**9
    assert ServerArgs(stale_after_s=3).stale_ns == 3 * 10**9
    pd = resolve_args(parse_args(["--model-path", "tiny", "--executor", "sim", "--sim-profile", "instant",
                                  "--disaggregation-mode", "pd", "--sim-time-scale", "2.5",
                                  "--disaggregation-bootstrap-timeout", "4",
                                  "--disaggregation-waiting-timeout", "6"]))
    assert pd.wall_s(pd.disaggregation_bootstrap_timeout) == 10.0
    assert ServerArgs(disaggregation_bootstrap_timeout=4).wall_s(4) == 4.0  # real model
    assert [c.sim_time_scale for c in scheduler_configs(args, "board")] == [4.0, 4.0]


def test_api_key_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("DPSERVE_API_KEY", "from-env")
    assert resolve_args(ServerArgs(model_path="tiny")).api_key == "from-env"
    assert resolve_args(ServerArgs(model_path="tiny", api_key="from-flag")).api_key == "from-flag"
    monkeypatch.delenv("DPSERVE_API_KEY")
    assert resolve_args(ServerArgs(model_path="tiny")).api_key is None


def test_connection_limit_defaults_below_the_open_file_limit():
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    accept_rounds = 2 * max(16, min(2048, soft // 8))
    assert resolve_args(ServerArgs(model_path="tiny", dp_size=2)).limit_concurrency == soft - 64 - 8 * 2 - accept_rounds
    pd = resolve_args(ServerArgs(model_path="tiny", disaggregation_mode="pd", prefill_dp_size=2, decode_dp_size=3))
    assert pd.limit_concurrency == soft - 64 - 8 * 5 - accept_rounds
    assert resolve_args(ServerArgs(model_path="tiny", limit_concurrency=7)).limit_concurrency == 7


def test_cache_aware_needs_the_prefix_cache():
    assert resolve_args(ServerArgs(model_path="tiny", load_balance_method="cache_aware")
                        ).load_balance_method == "cache_aware"
    with pytest.raises(InvalidServerArgs, match="--load-balance-method.*--disable-radix-cache"):
        resolve_args(ServerArgs(model_path="tiny", load_balance_method="cache_aware",
                                disable_radix_cache=True))
