"""bench.compare.pool: bench.compare runs of several seeds pooled into one table."""

from __future__ import annotations

import json

import pytest

from bench.compare.pool import PoolError, main, pool, report


def summary(tt_ttft: float, room_ttft: float, completed: int = 10) -> dict:
    def run(ttft, tpot=20.0):
        return {"fraction": 1.0, "request_rate": 3.0, "completed": completed,
                "mean_ttft_ms": ttft, "mean_tpot_ms": tpot, "output_throughput": 12.0}
    return {"scenarios": [{
        "scenario": "prefill-heavy", "ranks": 4, "baseline": "follow_bootstrap_room",
        "methods": ["total_tokens", "follow_bootstrap_room"], "fractions": [1.0],
        "input_len": 3500, "output_len": 5, "range_ratio": 1.0, "pd": True,
        "pd_balanced": "prefill", "decode_ranks": 1, "lockstep": False,
        "ttft_output_len": None, "max_concurrency": None, "prompts": completed,
        "simulated": True,
        "runs": {"total_tokens": [run(tt_ttft)], "follow_bootstrap_room": [run(room_ttft)]}}]}


def test_pooled_mean_is_over_every_request():
    # run 1: 10 requests, 1,000 vs 4,000 ms; run 2: 30 requests, 2,000 vs 3,000 ms
    pooled = pool([summary(1000, 4000, 10), summary(2000, 3000, 30)])
    tt = pooled[0]["runs"]["total_tokens"][0]
    assert tt["completed"] == 40 and tt["pooled_runs"] == 2
    assert tt["mean_ttft_ms"] == pytest.approx((1000 * 10 + 2000 * 30) / 40)
    text, out = report(pooled, ["a", "b"])
    assert out["prefill_heavy_ttft_ratio_1_0"] == pytest.approx(1750 / 3250)
    assert pooled[0]["spread"]["total_tokens@1"] == pytest.approx([0.25, 2000 / 3000])
    assert "2 runs, 40 prompts" in text and "simulated" in text


def test_a_ttft_pass_is_pooled_and_read_for_ttft():
    """variable-length measures TTFT on a second pass (SGLang PR #20435's way): its figures,
    not the full pass's, make the pooled TTFT."""
    runs = []
    for ttft in (100.0, 300.0):
        s = summary(9999, 9999)
        r = s["scenarios"][0]
        r.update(scenario="variable-length", baseline="round_robin", ttft_output_len=1,
                 methods=["total_tokens", "round_robin"])
        r["runs"] = {"total_tokens": r["runs"]["total_tokens"],
                     "round_robin": [dict(r["runs"]["follow_bootstrap_room"][0])]}
        r["runs"]["total_tokens"][0]["ttft_pass"] = {"completed": 10, "mean_ttft_ms": ttft}
        r["runs"]["round_robin"][0]["ttft_pass"] = {"completed": 10, "mean_ttft_ms": 400.0}
        runs.append(s)
    _, out = report(pool(runs), ["a", "b"])
    assert out["variable_length_ttft_gain"] == pytest.approx(0.5)


def test_runs_of_different_shapes_are_refused():
    other = summary(1000, 2000)
    other["scenarios"][0]["input_len"] = 4096
    with pytest.raises(PoolError, match="differ in input_len"):
        pool([summary(1000, 2000), other])
    # Steps slowed down another way, or another accelerator: not one sample either.
    other = summary(1000, 2000)
    other["scenarios"][0]["sim_time_scale"] = 8.0
    with pytest.raises(PoolError, match="differ in sim_time_scale"):
        pool([summary(1000, 2000), other])
    other = {**summary(1000, 2000), "executor": "sim", "sim_profile": "tiny-cpu"}
    with pytest.raises(PoolError, match="differ in executor, sim_profile"):
        pool([summary(1000, 2000), other])


def test_cli_reads_folders_and_reports_bad_input(tmp_path, capsys):
    for i, (a, b) in enumerate([(1000, 4000), (2000, 3000)]):
        (tmp_path / f"run{i}").mkdir()
        (tmp_path / f"run{i}" / "summary.json").write_text(json.dumps(summary(a, b)))
    out = tmp_path / "pooled.json"
    assert main([str(tmp_path / "run0"), str(tmp_path / "run1"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["prefill_heavy_ttft_ratio_1_0"] == pytest.approx(3 / 7)
    assert main([str(tmp_path / "missing")]) == 2
    assert "not a bench.compare summary" in capsys.readouterr().err


def test_the_same_run_or_seed_is_not_pooled_twice(tmp_path, capsys):
    for i, seed in enumerate((1, 1, 2)):
        (tmp_path / f"run{i}").mkdir()
        (tmp_path / f"run{i}" / "summary.json").write_text(
            json.dumps({**summary(1000, 2000), "seed": seed}))
    run0 = str(tmp_path / "run0")
    assert main([run0, run0]) == 2
    assert "are the same run" in capsys.readouterr().err
    assert main([run0, str(tmp_path / "run0" / "summary.json")]) == 2  # a folder and its file
    assert "are the same run" in capsys.readouterr().err
    assert main([run0, str(tmp_path / "run1")]) == 2
    assert "with --seed 1" in capsys.readouterr().err
    assert main([run0, str(tmp_path / "run2")]) == 0
    other = {**summary(1000, 2000), "seed": 1}  # seed 1 too, but another rank count
    other["scenarios"][0]["ranks"] = 8
    (tmp_path / "run3.json").write_text(json.dumps(other))
    assert main([run0, str(tmp_path / "run3.json")]) == 0  # never pooled together


def test_pooled_ratios_come_with_an_interval():
    pooled = pool([summary(1000, 4000), summary(2000, 4000), summary(3000, 4000)])
    lo, hi = pooled[0]["ci95"]["total_tokens@1"]  # 0.5 +- 4.303 * 0.25 / sqrt(3)
    assert (lo, hi) == pytest.approx((0.5 - 0.6211, 0.5 + 0.6211), abs=1e-3)
    text, _ = report(pooled, ["a", "b", "c"])
    assert "95% interval" in text and "offered req/s" in text


def test_a_run_with_no_successful_request_is_named_not_dropped_silently(tmp_path, capsys):
    """Its figures are missing, so the pooled mean stands on the other runs: a warning
    names it, the failures are summed, and the per-run ratios say one was left out."""
    ok, dead = summary(1000, 4000), summary(9999, 4000)
    tt = dead["scenarios"][0]["runs"]["total_tokens"][0]
    tt.update(completed=0, failed=10, mean_ttft_ms=None, mean_tpot_ms=None)
    ok["scenarios"][0]["runs"]["total_tokens"][0]["failed"] = 2
    pooled = pool([ok, dead, summary(2000, 4000)], ["a", "b", "c"])
    run = pooled[0]["runs"]["total_tokens"][0]
    assert (run["completed"], run["failed"]) == (20, 12)
    assert run["mean_ttft_ms"] == pytest.approx(1500)  # runs a and c only
    assert pooled[0]["empty_runs"] == [{"source": "b", "method": "total_tokens",
                                        "fraction": 1.0, "part": "run", "failed": 10}]
    assert pooled[0]["spread_dropped"] == {"total_tokens@1": 1}
    text, out = report(pooled, ["a", "b", "c"])
    assert ("warning: b: total_tokens at 1x (run) had no successful request (10 failed)"
            in text)
    assert "total_tokens@1 0.25-0.50; " in text and "(1 run(s) without a mean TTFT left out)" in text
    assert out["failed"] == {"prefill_heavy_ttft_ratio_1_0": {"total_tokens": 12,
                                                              "follow_bootstrap_room": 0}}
    assert "prefill_heavy_ttft_ratio_1_0 0.375 (12 failed" in text
    # Runs with no failure: nothing flagged, nothing warned.
    text, out = report(pool([summary(1000, 4000), summary(2000, 4000)]), ["a", "b"])
    assert out["failed"] == {} and "warning" not in text and "left out" not in text
