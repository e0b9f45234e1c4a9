"""The benchmarks' command lines refuse what a run cannot use before the run: an
argparse error (exit code 2) naming the flag, no server started, no traceback.

Every case here parses arguments only, or stops in ``main`` before anything starts.
"""

from __future__ import annotations

import argparse
import os

import pytest

from bench.cli import (MAX_BOARD_DISPATCHERS, MAX_BOARD_RANKS, dispatcher_count, http_url,
                       log_folder, model_path, non_negative_float, non_negative_int,
                       open_unit_fraction, positive_float, positive_int, rank_count,
                       sim_profile, tcp_port, unit_fraction, writable_file)
from server_helpers import free_port, write_sim_profile

MISSING_FOLDER = "/nonexistent-dpserve-folder/x.json"


def _refused(call, capsys) -> str:
    """``call()`` ends in an argparse error; its message."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---- the shared types ------------------------------------------------------------------------
def test_positive_int():
    assert positive_int("3") == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)


@pytest.mark.parametrize("kind,good,bad", [
    (non_negative_int, {"0": 0, "7": 7}, ("-1", "x", "1.5")),
    (positive_float, {"0.5": 0.5, "3": 3.0}, ("0", "-1", "inf", "nan", "x")),
    (non_negative_float, {"0": 0.0, "2.5": 2.5}, ("-0.1", "inf", "nan")),
    (unit_fraction, {"0": 0.0, "1": 1.0}, ("-0.1", "1.5", "nan")),
    (open_unit_fraction, {"0.5": 0.5, "1": 1.0}, ("0", "7", "nan")),
    (rank_count, {"1": 1, str(MAX_BOARD_RANKS): MAX_BOARD_RANKS},
     ("0", "-2", str(MAX_BOARD_RANKS + 1))),
    (dispatcher_count, {"1": 1}, ("0", str(MAX_BOARD_DISPATCHERS + 1))),
    (tcp_port, {"1": 1, "65535": 65535}, ("0", "-3", "70000", "http")),
    (http_url, {"http://127.0.0.1:30000": "http://127.0.0.1:30000"},
     ("notaurl", "ftp://x", "http://", "http://h:70000")),
])
def test_shared_types(kind, good, bad):
    for text, value in good.items():
        assert kind(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


def test_board_limits_are_the_boards_own():
    """The limits ``rank_count`` and ``dispatcher_count`` check are those
    ``LoadBoard.create`` refuses beyond (checked before any segment is made)."""
    from shm.board import LoadBoard
    with pytest.raises(ValueError, match="num_ranks"):
        LoadBoard.create(MAX_BOARD_RANKS + 1, launch_id="limits")
    with pytest.raises(ValueError, match="num_dispatchers"):
        LoadBoard.create(1, MAX_BOARD_DISPATCHERS + 1, launch_id="limits")


def test_model_path_is_checked_without_fetching(tmp_path):
    (tmp_path / "m.gguf").write_text("")
    (tmp_path / "m.txt").write_text("")
    for good in ("tiny", str(tmp_path), str(tmp_path / "m.gguf"), "owner/name"):
        assert model_path(good) == good
    for bad in ("/nonexistent", str(tmp_path / "m.txt"), "./missing", "a/b/c"):
        with pytest.raises(argparse.ArgumentTypeError):
            model_path(bad)


def test_writable_file_is_checked_without_creating_it(tmp_path):
    new = tmp_path / "figures.json"
    assert writable_file(str(new)) == str(new) and not new.exists()
    new.write_text("{}")
    assert writable_file(str(new)) == str(new)
    for bad, why in ((MISSING_FOLDER, "does not exist"), (str(tmp_path), "is a folder"),
                     ("", "expected a file path")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            writable_file(bad)


def test_log_folder_is_made_and_checked_before_the_run(tmp_path):
    new = tmp_path / "a" / "logs"
    assert log_folder(str(new)) == str(new) and new.is_dir()
    a_file = tmp_path / "f.txt"
    a_file.write_text("")
    for bad, why in ((str(a_file), "is a file"), (str(a_file / "sub"), "cannot make"),
                     ("", "expected a folder path")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            log_folder(bad)


def test_calibrate_checks_its_profile_path_before_timing(tmp_path, capsys):
    from bench.models.calibrate import main
    with pytest.raises(SystemExit) as exc:  # a folder: refused at once, nothing timed
        main(["--out", str(tmp_path), "--repeats", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr()
    assert "argument --out" in err.err and "timing" not in err.out


def test_sim_profile_is_a_known_name_or_a_profile_file(tmp_path):
    assert sim_profile("instant") == "instant"
    path = write_sim_profile(tmp_path / "mine.json")
    assert sim_profile(path) == path
    with pytest.raises(argparse.ArgumentTypeError, match="known: .*instant"):
        sim_profile("nope")
    with pytest.raises(argparse.ArgumentTypeError):
        sim_profile(str(tmp_path / "missing.json"))


# ---- bench.client.serving --------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--request-rate", "0"], "--request-rate must be > 0"),
    (["--request-rate", "-2"], "--request-rate must be > 0"),
    (["--request-rate", "nan"], "--request-rate must be > 0"),
    (["--max-concurrency", "-1"], "--max-concurrency must be >= 1, or 0"),
    (["--random-input-len", "0"], "--random-input-len must be >= 1"),
    (["--random-output-len", "0"], "--random-output-len must be >= 1"),
    (["--random-range-ratio", "2"], "--random-range-ratio must be in [0, 1]"),
    (["--random-range-ratio", "-0.5"], "--random-range-ratio must be in [0, 1]"),
    (["--dataset-name", "multi-turn", "--mt-num-turns", "0"], "--mt-num-turns must be >= 1"),
    (["--dataset-name", "multi-turn", "--mt-turn-len", "0"], "--mt-turn-len must be >= 1"),
    (["--dataset-name", "generated-shared-prefix", "--gsp-hot-share", "1"],
     "--gsp-hot-share must be in [0, 1)"),
    (["--dataset-name", "generated-shared-prefix", "--gsp-hot-share", "0.5",
      "--gsp-num-turns", "2"], "--gsp-hot-share needs --gsp-num-turns 1"),
    (["--warmup-requests", "-1"], "--warmup-requests must be >= 0"),
    (["--output-file", MISSING_FOLDER], "argument --output-file: folder"),
    (["--request-timeout-s", "inf"], "--request-timeout-s must be a finite number"),
    (["--port", "70000"], "argument --port: must be a port in [1, 65535]"),
    (["--port", "-3"], "argument --port"),
    (["--base-url", "notaurl"], "argument --base-url: expected an http:// or https:// URL"),
])
def test_serving_refuses_values_a_run_cannot_use(flags, message, capsys):
    from bench.client.serving import parse_config
    assert message in _refused(lambda: parse_config(flags), capsys)


def test_serving_keeps_sglangs_valid_values():
    from bench.client.serving import describe_run, parse_config
    cfg = parse_config(["--request-rate", "inf", "--random-range-ratio", "1",
                        "--num-prompts", "1", "--random-input-len", "1"])
    assert cfg.request_rate == float("inf") and cfg.random_range_ratio == 1.0
    assert parse_config(["--random-range-ratio", "0"]).random_range_ratio == 0.0
    # SGLang's bench_serving reads --max-concurrency 0 as no cap, and prints "not set".
    assert describe_run(parse_config(["--max-concurrency", "0"])).endswith("not set")
    # The ranges of one dataset do not apply to another's run.
    assert parse_config(["--dataset-name", "multi-turn", "--num-prompts", "0"]).num_prompts == 0


def test_serving_describes_and_records_a_multi_turn_run():
    from bench.client.serving import describe_run, parse_config, settings
    cfg = parse_config(["--dataset-name", "multi-turn", "--mt-num-conversations", "2",
                        "--mt-num-turns", "2", "--mt-turn-len", "64", "--mt-output-len", "8"])
    line = describe_run(cfg)
    assert "multi-turn: 2 conversations x 2 turns (4 requests)" in line
    assert "1000 prompts" not in line and "input <=" not in line
    row = settings(cfg)
    assert row["mt_num_conversations"] == 2 and row["mt_num_turns"] == 2
    assert "num_prompts" not in row and "random_input_len" not in row


def test_serving_checks_the_output_file_before_any_request(tmp_path, capsys):
    """Nothing listens on the port: a run would fail its warm-up (exit code 1); the
    output file is refused before that."""
    from bench.client.serving import main
    argv = ["--port", str(free_port()), "--num-prompts", "1", "--disable-tqdm"]
    err = _refused(lambda: main([*argv, "--output-file", MISSING_FOLDER]), capsys)
    assert "argument --output-file" in err and "warm-up" not in err


# ---- bench.compare, bench.compare.cache, bench.compare.scale ---------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--ranks", "0"], "argument --ranks: must be in [1, 4096]"),
    (["--ranks", "4", "-2"], "argument --ranks: must be in [1, 4096]"),
    (["--sim-profile", "nope"], "unknown simulation profile 'nope'"),
])
@pytest.mark.parametrize("module", ["bench.compare.run", "bench.compare.cache"])
def test_compare_refuses_bad_flags_before_any_server(module, flags, message, tmp_path, capsys):
    import importlib
    main = importlib.import_module(module).main
    out = tmp_path / "out"
    assert message in _refused(lambda: main([*flags, "--out", str(out)]), capsys)
    assert not out.exists()


@pytest.mark.parametrize("module", ["bench.compare.run", "bench.compare.cache"])
def test_compare_checks_json_before_any_server(module, tmp_path, capsys):
    import importlib
    main = importlib.import_module(module).main
    err = _refused(lambda: main(["--json", MISSING_FOLDER, "--out", str(tmp_path)]), capsys)
    assert "argument --json: folder" in err
    assert list((tmp_path / "logs").iterdir()) == []  # made, and no server's log in it


def test_compare_refuses_an_out_folder_it_cannot_make(tmp_path, capsys):
    from bench.compare.run import main
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert "argument --out" in _refused(lambda: main(["--out", str(a_file / "x")]), capsys)


def test_compare_json_may_go_in_the_out_folder_it_makes(tmp_path):
    from bench.cli import out_folder
    from bench.compare.run import build_parser
    parser = build_parser()
    out = tmp_path / "fresh"
    args = parser.parse_args(["--out", str(out), "--json", str(out / "summary.json")])
    assert out_folder(parser, args, "summary.json") == str(out / "summary.json")
    assert (out / "logs").is_dir()
    args = parser.parse_args(["--out", str(out)])
    assert out_folder(parser, args, "summary.json") == os.path.join(str(out), "summary.json")


def test_cache_compare_refuses_an_unknown_method(tmp_path, capsys):
    from bench.compare.cache import METHODS, main
    assert set(METHODS) == {"round_robin", "cache_aware", "total_tokens", "prefill_tokens", "smg"}
    for bad in ("bogus", "cache-aware"):
        err = _refused(lambda: main(["--methods", "cache_aware", bad, "--out",
                                     str(tmp_path)]), capsys)
        assert "argument --methods: invalid choice" in err and all(m in err for m in METHODS)
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("flags,message", [
    (["--gsp-prompts-per-group", "-1"], "argument --gsp-prompts-per-group: must be >= 1"),
    (["--gsp-prompts-per-group", "0"], "argument --gsp-prompts-per-group: must be >= 1"),
    (["--gsp-groups-per-rank", "0"], "argument --gsp-groups-per-rank: must be >= 1"),
    (["--gsp-groups-per-rank", "-3"], "argument --gsp-groups-per-rank: must be >= 1"),
    (["--repeats", "-1"], "argument --repeats: must be >= 0"),
    (["--ranks", "5000"], "argument --ranks: must be in [1, 4096]"),
    (["--executor", "real", "--model-path", "/nonexistent"], "argument --model-path"),
    (["--executor", "real", "--sim-profile", "instant"], "--sim-profile needs --executor sim"),
    (["--model-path", "tiny"], "--model-path needs --executor real"),
    (["--repeats", "0", "--request-rate", "2"], "--request-rate sets the rate"),
    (["--scenarios", "multi-turn", "no-reuse", "--gsp-groups-per-rank", "2"],
     "--gsp-groups-per-rank shapes the shared-prefix scenarios"),
])
def test_cache_compare_refuses_flags_it_cannot_use_or_would_ignore(flags, message, tmp_path,
                                                                   capsys):
    from bench.compare.cache import main
    out = tmp_path / "out"
    assert message in _refused(lambda: main([*flags, "--out", str(out)]), capsys)
    assert not out.exists()


def test_cache_compare_prints_a_missing_figure_as_a_dash():
    from bench.compare.cache_summary import describe
    line = describe({"fraction": 0.9, "mean_ttft_ms": 120.4, "p99_ttft_ms": 300.0,
                     "mean_ttft_hit_ms": None, "mean_ttft_miss_ms": 1372.0,
                     "request_throughput": 2.5, "cache_hit_rate": 0.0})
    assert "hits -, misses 1372" in line and "2.50 req/s" in line


def test_scale_refuses_bad_counts_and_json(tmp_path, capsys):
    from bench.compare.scale import main
    out = str(tmp_path / "out")
    for flags in (["--ranks", "0"], ["--num-prompts", "0"], ["--max-concurrency", "0"],
                  ["--json", MISSING_FOLDER]):
        assert flags[0] in _refused(lambda: main([*flags, "--out", out]), capsys)


# ---- the micro benchmarks and the others that write --json -----------------------------------
@pytest.mark.parametrize("module,flags", [
    ("bench.micro.prefix_cache", ["--rounds", "0"]),
    ("bench.micro.pd", ["--pairs", "0"]),
    ("bench.micro.pd", ["--requests", "0"]),
])
def test_micro_counts_must_be_positive(module, flags, capsys):
    import importlib
    parser = importlib.import_module(module).build_parser()
    assert f"argument {flags[0]}: must be >= 1" in _refused(lambda: parser.parse_args(flags),
                                                            capsys)


@pytest.mark.parametrize("module", ["bench.micro.prefix_cache", "bench.micro.pd"])
def test_micro_json_is_checked_when_parsed(module, capsys):
    import importlib
    parser = importlib.import_module(module).build_parser()
    assert "argument --json: folder" in _refused(
        lambda: parser.parse_args(["--json", MISSING_FOLDER]), capsys)


@pytest.mark.parametrize("module,extra", [
    ("bench.micro.board", ["--skip-baselines"]),
    ("bench.compare.balance", []),
    ("bench.compare.pool", ["some-summary.json"]),
    ("bench.models.lockstep_model", []),
])
def test_json_is_checked_before_the_run(module, extra, capsys):
    import importlib
    main = importlib.import_module(module).main
    assert "argument --json: folder" in _refused(
        lambda: main([*extra, "--json", MISSING_FOLDER]), capsys)


@pytest.mark.parametrize("module,flags", [
    ("bench.micro.engine", ["--rounds", "0"]),
    ("bench.micro.engine", ["--prompt-len", "0"]),
    ("bench.micro.engine", ["--device", "bogus"]),
    ("bench.cuda_check", ["--mem-fraction-static", "7"]),
    ("bench.cuda_check", ["--timeout-s", "-1"]),
    ("bench.micro.prefix_cache", ["--model-path", "/nonexistent"]),
    ("bench.micro.keepalive", ["--jitter-s", "-1"]),  # its own check, after parsing
])
def test_the_other_tools_refuse_bad_values_at_parse_time(module, flags, capsys):
    import importlib
    tool = importlib.import_module(module)
    call = (lambda: tool.build_parser().parse_args(flags)) if hasattr(tool, "build_parser") \
        else (lambda: tool.parse_args(flags)) if module.endswith("keepalive") \
        else (lambda: tool.main(flags))
    assert flags[0] in _refused(call, capsys)
