"""bench.compare end to end on the zero-cost simulated profile: servers start and stop,
the table, the JSON keys and the plots come out."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import posix_ipc
import pytest

from bench.compare.run import (PROCESSES_PER_CORE, auto_time_scale, build_parser,
                           capacity_estimate, dispatch_probe, rank_processes, run_scenario,
                           saturating_capacity, steady_capacity, with_lockstep)
from bench.compare.report import headline, write_reports
from bench.compare.scenarios import Scenario, get_scenarios, server_flags
from server_helpers import child_pids, pid_gone, wait_group_gone, write_sim_profile
from shm.segment import list_segments, owner_pid


class _Bar:
    def set_postfix_str(self, _):
        pass

    def update(self, _):
        pass


def _args(tmp_path) -> argparse.Namespace:
    os.makedirs(tmp_path / "logs", exist_ok=True)
    # Steps stretched 2x (--sim-time-scale): the zero-cost profile's steps stay ~0 long,
    # but the flag, the servers' /server_info and the reports all see it.
    return argparse.Namespace(executor="sim", sim_profile="instant", sim_time_scale=2.0,
                              out=str(tmp_path), json=str(tmp_path / "summary.json"), seed=1,
                              quick=True)


def test_server_flags_follow_the_scenario():
    s = Scenario("prefill-heavy", ("total_tokens", "round_robin"), "round_robin", 64, 2, 1.0,
                 (1.0,), 4, pd=True, lockstep=True)
    flags = server_flags(s, "total_tokens", 8, "sim", "instant")
    assert flags[flags.index("--prefill-dp-size") + 1] == "8"
    assert flags[flags.index("--prefill-load-balance-method") + 1] == "total_tokens"
    assert "--sim-lockstep" in flags
    assert "--disable-radix-cache" in flags  # the same prompts at every rate: no reuse
    assert "--sim-lockstep" not in server_flags(s, "round_robin", 8, "real", "instant")
    assert "--sim-time-scale" not in flags
    stretched = server_flags(s, "total_tokens", 8, "sim", "instant", 4.0)
    assert stretched[stretched.index("--sim-time-scale") + 1] == "4"


def test_pd_flags_put_the_method_on_the_balanced_side():
    def methods(balanced):
        s = Scenario("x", ("total_tokens", "round_robin"), "round_robin", 64, 2, 1.0, (1.0,), 4,
                     pd=True, pd_balanced=balanced, pd_decode_share=1.0)
        flags = server_flags(s, "round_robin", 4, "sim", "instant")
        assert flags[flags.index("--decode-dp-size") + 1] == "4"
        return (flags[flags.index("--prefill-load-balance-method") + 1],
                flags[flags.index("--decode-load-balance-method") + 1])
    assert methods("prefill") == ("round_robin", "auto")
    assert methods("decode") == ("auto", "round_robin")
    assert methods("both") == ("round_robin", "round_robin")


def _waves() -> list[dict]:
    """Decode-bound: 8 slots, each request makes 100 tokens in 10 s after its first
    token; waves of 8 sent as the previous wave ends: 0.8 req/s while full."""
    chunks = [(0.0, 1)] + [(k / 10, 1) for k in range(1, 101)]
    return [{"success": True, "start_s": 10.0 * w, "ttft_s": 0.0, "latency_s": 10.0,
             "output_len": 101, "chunks": chunks} for w in range(4) for _ in range(8)]


def test_steady_capacity_leaves_out_ramp_and_drain():
    # 0.8 req/s however bursty the completions; the last wave (the drain) is left out.
    recs = _waves()
    assert abs(steady_capacity(recs) - 0.8) < 1e-9
    assert steady_capacity(recs, min_requests=20) is None  # too few: caller falls back
    # Prefill-bound shapes are left to completed / duration.
    assert steady_capacity([dict(r, output_len=5) for r in recs]) is None
    # Tokens count where they arrived: one more request, across the window's start
    # (sent at 5 s, done at 15 s), adds its 100 tokens if they came after 10 s and
    # none if they came before.
    across = {"success": True, "start_s": 5.0, "ttft_s": 0.0, "latency_s": 10.0, "output_len": 101}
    early = [(0.0, 1)] + [(k / 100, 1) for k in range(1, 101)]
    late = [(0.0, 1)] + [(9.0 + k / 100, 1) for k in range(1, 101)]
    assert abs(steady_capacity(recs + [dict(across, chunks=early)]) - 0.8) < 1e-9
    assert abs(steady_capacity(recs + [dict(across, chunks=late)]) - 0.85) < 1e-9
    # The capacity is never below the whole run's completion rate.
    assert saturating_capacity(0.6, steady_capacity(recs)) == steady_capacity(recs)
    assert saturating_capacity(10.73, 3.19) == 10.73
    assert saturating_capacity(0.6, None) == 0.6


def test_capacity_estimate_uses_the_decode_window_for_pd_only():
    """Where ranks also prefill, the decode-rich window overstates the rate (mixed:
    4.14 req/s against a queue building at 3.3); completed / duration stands there."""
    recs = _waves()
    figures = {"request_throughput": 0.6, "requests": recs}
    assert capacity_estimate(figures, pd=True) == (steady_capacity(recs), steady_capacity(recs))
    assert capacity_estimate(figures, pd=False) == (0.6, None)


def test_headline_gains_count_board_methods_only():
    """variable_length_*_gain is the best *board* method's: follow_bootstrap_room is a
    baseline, however its figures come out."""
    def run(ttft, tpot):
        return [{"fraction": 1.0, "mean_ttft_ms": ttft, "mean_tpot_ms": tpot}]
    r = {"scenario": "variable-length", "ranks": 4, "baseline": "round_robin",
         "fractions": [1.0], "methods": ["total_tokens", "follow_bootstrap_room", "round_robin"],
         "runs": {"total_tokens": run(80.0, 11.0), "follow_bootstrap_room": run(50.0, 5.0),
                  "round_robin": run(100.0, 10.0)}}
    out = headline([r], simulated=True)
    assert abs(out["variable_length_ttft_gain"] - 0.2) < 1e-9
    assert abs(out["variable_length_tpot_gain"] + 0.1) < 1e-9
    assert out["failed"] == {}  # no run had a failed request


def test_a_method_whose_requests_all_failed_scores_nothing_and_is_flagged():
    """No successful request: no figure (None), so no ratio and no gain, never the 0.0
    TTFT that read as a perfect ratio and a gain of 1; failures are counted per key."""
    from bench.client.backends import RequestResult
    from bench.client.metrics import summarize
    from bench.compare.report import failed_lines, scenario_table
    from bench.compare.run import KEEP

    def run(frac, ttft, tpot, failed=0):
        return {"fraction": frac, "request_rate": 2.0, "completed": 8, "failed": failed,
                "mean_ttft_ms": ttft, "mean_tpot_ms": tpot, "output_throughput": 50.0,
                "p99_ttft_ms": ttft}
    # What bench.compare keeps of a run whose 8 requests all failed (a 503 each).
    figures = summarize([RequestResult(prompt_len=8, error="HTTP 503", start_time=1.0 + i,
                                       latency=0.01) for i in range(8)], 8.0, 1.0)
    dead = {"fraction": 1.0, "request_rate": 2.0, **{k: figures.get(k) for k in KEEP}}
    prefill = {"scenario": "prefill-heavy", "ranks": 4, "baseline": "follow_bootstrap_room",
               "fractions": [0.8, 1.0], "methods": ["total_tokens", "follow_bootstrap_room"],
               "runs": {"total_tokens": [run(0.8, 500.0, 9.0, failed=2), dead],
                        "follow_bootstrap_room": [run(0.8, 1000.0, 9.0),
                                                  run(1.0, 1200.0, 9.0)]}}
    variable = {"scenario": "variable-length", "ranks": 4, "baseline": "round_robin",
                "fractions": [1.0], "methods": ["total_tokens", "round_robin"],
                "runs": {"total_tokens": [{**dead, "ttft_pass": dead}],
                         "round_robin": [{**run(1.0, 100.0, 10.0),
                                          "ttft_pass": run(1.0, 90.0, None)}]}}
    out = headline([prefill, variable], simulated=True)
    assert out["prefill_heavy_ttft_ratio_1_0"] is None
    assert out["variable_length_ttft_gain"] is None and out["variable_length_tpot_gain"] is None
    assert out["prefill_heavy_ttft_ratio_0_8"] == pytest.approx(0.5)  # kept, but flagged
    assert out["failed"] == {
        "prefill_heavy_ttft_ratio_0_8": {"total_tokens": 2, "follow_bootstrap_room": 0},
        "prefill_heavy_ttft_ratio_1_0": {"total_tokens": 8, "follow_bootstrap_room": 0},
        "variable_length_ttft_gain": {"total_tokens": 8, "round_robin": 0},  # the TTFT pass's
        "variable_length_tpot_gain": {"total_tokens": 8, "round_robin": 0}}
    lines = failed_lines(out)
    assert lines[0].startswith("prefill_heavy_ttft_ratio_0_8 0.500 (2 failed: total_tokens 2")
    assert lines[1].startswith("prefill_heavy_ttft_ratio_1_0 - (8 failed")
    table = scenario_table(prefill).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    at = head.index("failed total_tokens")
    assert [row[at] for row in rows] == ["2", "8"]
    assert [row[head.index("TTFT total_tokens")] for row in rows] == ["500", "-"]
    vl = scenario_table({**variable, "ttft_output_len": 1}).splitlines()
    assert "failed total_tokens (full/TTFT pass)" in vl[0] and "| 8/8 | 0/0 |" in vl[2]


def test_ttft_plot_shows_the_figures_the_table_uses():
    """With a TTFT pass (``ttft_output_len``) the plot's points are that pass's rates and
    mean TTFTs, as in the table and the headline, not the full-length pass's."""
    from bench.compare.report import ttft_points
    runs = [{"fraction": f, "request_rate": 10 * f, "mean_ttft_ms": 900.0,
             "ttft_pass": {"request_rate": 20 * f, "mean_ttft_ms": 50.0 * f}} for f in (0.5, 1.0)]
    result = {"methods": ["a"], "runs": {"a": runs}, "ttft_output_len": 1}
    assert ttft_points(result, "a") == ([10.0, 20.0], [25.0, 50.0])
    plain = {"methods": ["a"], "runs": {"a": [{k: v for k, v in r.items() if k != "ttft_pass"}
                                              for r in runs]}}
    assert ttft_points(plain, "a") == ([5.0, 10.0], [900.0, 900.0])


def test_the_summary_records_the_time_scale_used():
    from bench.compare.report import scenario_table, time_scales_used
    one = [{"scenario": "mixed", "ranks": 4, "sim_time_scale": 1.0},
           {"scenario": "mixed", "ranks": 64, "sim_time_scale": 1.0}]
    assert time_scales_used(one) == 1.0
    two = [one[0], {**one[1], "sim_time_scale": 8.0}]
    assert time_scales_used(two) == {"mixed@4": 1.0, "mixed@64": 8.0}
    table = scenario_table({"methods": ["a"], "baseline": "a", "fractions": [1.0],
                            "runs": {"a": [{"fraction": 1.0, "request_rate": 2.0}]}})
    assert "offered req/s" in table.splitlines()[0]


def test_default_scenarios_are_the_seeds_shapes():
    args = build_parser().parse_args([])
    assert args.scenarios == ["prefill-heavy", "variable-length", "decode-heavy"]
    assert build_parser().parse_args(["--scenarios", "mixed"]).scenarios == ["mixed"]
    assert args.lockstep == "scenario"


def test_a_bad_time_scale_stops_compare_before_any_server(tmp_path, capsys):
    from bench.compare.run import main
    for bad in ("0", "-2", "nan", "5000", "fast"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--sim-time-scale", bad, "--out", str(tmp_path / "never")])
        assert exit_info.value.code == 2
        assert "--sim-time-scale must be" in capsys.readouterr().err
    never = str(tmp_path / "never")
    for flags in (["--sim-time-scale", "4"], ["--sim-profile", "instant"], ["--lockstep", "on"]):
        with pytest.raises(SystemExit) as exit_info:  # --executor real would ignore them
            main(["--executor", "real", *flags, "--out", never])
        assert exit_info.value.code == 2
        assert f"{flags[0]} needs --executor sim" in capsys.readouterr().err
    for flags in (["--ranks", "5000"], ["--dispatch-ranks", "4", "5000"]):
        with pytest.raises(SystemExit) as exit_info:  # past the board's limit: before the run
            main([*flags, "--out", never])
        assert exit_info.value.code == 2 and f"argument {flags[0]}" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    assert build_parser().parse_args([]).sim_time_scale == "auto"
    assert build_parser().parse_args(["--sim-time-scale", "2.5"]).sim_time_scale == 2.5


def test_auto_time_scale_stretches_only_past_the_processes_a_core_keeps_on_time():
    vl, dh, ph = get_scenarios(["variable-length", "decode-heavy", "prefill-heavy"], quick=True)
    per_two_cores = 2 * PROCESSES_PER_CORE
    assert rank_processes(vl, 4) == 8 and auto_time_scale(vl, 4, cores=2) == 1.0  # --quick
    assert rank_processes(dh, 8) == 16 and auto_time_scale(dh, 8, cores=2) == 1.0
    assert auto_time_scale(dh, 64, cores=2) == 128 / per_two_cores
    assert rank_processes(ph, 64) == 80 and auto_time_scale(ph, 64, cores=2) == 5.0
    assert auto_time_scale(dh, 64, cores=64) == 1.0  # a host with a core per two ranks


def test_lockstep_override():
    seeds = get_scenarios(["variable-length", "prefill-heavy"], quick=False)
    assert [s.lockstep for s in with_lockstep(seeds, "scenario")] == [True, False]
    assert [s.lockstep for s in with_lockstep(seeds, "off")] == [False, False]
    assert [s.lockstep for s in with_lockstep(seeds, "on")] == [True, True]
    with pytest.raises(ValueError, match="scenario, on or off"):
        with_lockstep(seeds, "sometimes")


def test_compare_writes_table_json_and_plots(tmp_path):
    args = _args(tmp_path)
    scenarios = [
        Scenario("prefill-heavy", ("total_tokens", "follow_bootstrap_room"),
                 "follow_bootstrap_room", 48, 2, 1.0, (0.8, 1.0), 6, pd=True),
        Scenario("decode-heavy", ("total_requests", "round_robin"), "round_robin",
                 16, 6, 0.5, (1.0,), 6, lockstep=True, concurrency_per_rank=2),
        Scenario("variable-length", ("total_tokens", "round_robin"), "round_robin",
                 32, 8, 0.25, (1.0,), 6, pd=True, pd_balanced="both", pd_decode_share=1.0,
                 lockstep=True, ttft_output_len=1),
        Scenario("mixed", ("prefill_tokens", "round_robin"), "round_robin", 32, 6, 0.25, (1.0,), 6),
    ]
    results = [run_scenario(s, 2, args, _Bar()) for s in scenarios]
    report = write_reports(results, dispatch_probe([2, 4], calls=50), args, 1.0)

    assert "simulated" in report and "| 0.8 |" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["simulated"] is True and summary["seed"] == 1
    assert summary["sim_time_scale"] == 2.0 and "steps ran 2x slower" in report
    assert {r["sim_time_scale"] for r in summary["scenarios"]} == {2.0}
    log = (tmp_path / "logs" / "prefill_heavy_2_total_tokens.log").read_text()
    assert "--sim-time-scale 2" in log
    for key in ("prefill_heavy_ttft_ratio_0_8", "prefill_heavy_ttft_ratio_1_0",
                "decode_heavy_throughput_gain", "variable_length_ttft_gain",
                "variable_length_tpot_gain"):
        # A figure, not a direction: on the zero-cost profile TTFT and TPOT are the
        # machinery's jitter (sub-millisecond), so a gain can be anything, e.g. -1.4.
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert set(summary["mixed_gains"]) == {"prefill_tokens"}
    assert all(math.isfinite(g) for g in summary["mixed_gains"]["prefill_tokens"].values())
    mixed = summary["scenarios"][3]
    assert mixed["pd"] is False and mixed["runs"]["prefill_tokens"][0]["completed"] == 6
    assert set(summary["dispatch_probe_us"]) == {"2", "4"}
    run = summary["scenarios"][0]["runs"]["total_tokens"][0]
    assert run["completed"] == 6 and run["failed"] == 0
    assert summary["failed"] == {} and "failed total_tokens" in report
    assert summary["scenarios"][1]["lockstep"] is True
    vl = summary["scenarios"][2]
    assert vl["ttft_capacity_req_s"] > 0 and vl["decode_ranks"] == 2
    probe = vl["runs"]["round_robin"][0]["ttft_pass"]
    assert probe["completed"] == 6 and probe["failed"] == 0
    assert "second pass" in report
    for stem in ("prefill_heavy_2", "decode_heavy_2"):
        for kind in ("ttft", "load"):
            assert (tmp_path / f"{stem}_{kind}.png").stat().st_size > 1000
    assert (tmp_path / "report.md").exists() and (tmp_path / "timelines.json").exists()


def test_sigterm_stops_the_server_of_a_running_compare(tmp_path):
    """``timeout`` or a CI runner ends a benchmark with SIGTERM: the server it started
    (own session, 4 ranks) must stop with it and leave no segment behind."""
    cmd = [sys.executable, "-m", "bench.compare", "--quick", "--scenarios", "mixed",
           "--sim-profile", write_sim_profile(tmp_path / "slow.json", step_s=0.05,
                                            context_len=8192),
           "--out", str(tmp_path / "out")]
    before = set(list_segments())

    def orphaned() -> list[str]:
        return [s for s in set(list_segments()) - before
                if (pid := owner_pid(s)) is not None and pid_gone(pid)]

    bench = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    server = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and bench.poll() is None:
            servers = child_pids(bench.pid)
            if servers and len(child_pids(servers[0])) >= 4:  # its ranks are up
                server = servers[0]
                break
            time.sleep(0.2)
        assert server is not None, "bench.compare did not start its server in 120 s"
        time.sleep(1.0)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(60) == 128 + signal.SIGTERM
        assert wait_group_gone(server, timeout_s=10) == []
        assert orphaned() == []
    finally:
        for pgid in (bench.pid, server):
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        bench.wait(10)
        if server is not None:
            wait_group_gone(server, timeout_s=10)
        for name in orphaned():  # what a killed server left
            posix_ipc.unlink_shared_memory(name)


def test_cache_headline_ratios_come_from_the_named_runs():
    from bench.compare.cache_summary import LOAD, SATURATED, SMG, headline

    def run(frac, ttft, p99, thr, hit, mom=1.0):
        return {"fraction": frac, "mean_ttft_ms": ttft, "p99_ttft_ms": p99,
                "request_throughput": thr, "cache_hit_rate": hit, "max_over_mean_requests": mom}
    shared = {"scenario": "shared-prefix", "kv_tokens_per_rank": 52600, "runs": {
        "round_robin": [run(LOAD, 1000, 3000, 2.0, 0.2), run(SATURATED, 0, 0, 3.0, 0.2)],
        "cache_aware": [run(LOAD, 150, 900, 2.0, 0.8), run(SATURATED, 0, 0, 4.5, 0.8)],
        "total_tokens": [run(LOAD, 800, 1800, 2.0, 0.3)],
        SMG: [run(LOAD, 300, 2000, 2.0, 0.7)]}}
    hot = {"scenario": "hot-prefix", "runs": {"cache_aware": [run(LOAD, 1, 1, 1, 0.9, 1.2)]}}
    zipf = {"scenario": "zipf-prefix", "runs": {
        "round_robin": [run(LOAD, 800, 2000, 2.0, 0.3)],
        "cache_aware": [run(LOAD, 200, 1000, 2.0, 0.8, 1.1)],
        "total_tokens": [run(LOAD, 900, 4000, 2.0, 0.3)],
        SMG: [run(LOAD, 250, 1500, 2.0, 0.7)]}}
    h = headline([shared, hot, zipf])
    assert h["shared_prefix_ttft_ratio_rr"] == pytest.approx(0.15)
    assert h["shared_prefix_ttft_ratio_smg"] == pytest.approx(0.5)
    assert h["shared_prefix_throughput_gain"] == pytest.approx(0.5)
    assert h["shared_prefix_p99_ratio_tt"] == pytest.approx(0.5)
    assert h["hot_prefix_max_over_mean"] == 1.2
    assert (h["zipf_prefix_ttft_ratio_rr"], h["zipf_prefix_ttft_ratio_smg"],
            h["zipf_prefix_p99_ratio_tt"], h["zipf_prefix_max_over_mean"]) == pytest.approx(
        (0.25, 0.8, 0.25, 1.1))
    assert h["no_reuse_ttft_ratio_tt"] is None  # not run
    assert h["cache_hit_rate"]["shared-prefix"]["cache_aware"] == 0.8
    assert h["kv_tokens_per_rank"]["shared-prefix"] == 52600


def test_cache_headline_repeats_give_paired_means_and_intervals():
    """With --repeats, each key is the mean of the per-repeat ratios (run k of one method
    against run k of the other: the same prompts), with a Student's t interval."""
    from bench.compare.cache_summary import LOAD, SATURATED, SMG, headline
    from bench.stats import mean_ci95

    def run(frac, ttft, hit=0.5, mom=1.0, thr=1.0):
        return {"fraction": frac, "mean_ttft_ms": ttft, "p99_ttft_ms": ttft, "cache_hit_rate": hit,
                "request_throughput": thr, "max_over_mean_requests": mom}
    shared = {"scenario": "shared-prefix", "runs": {
        "round_robin": [run(LOAD, 1000), run(LOAD, 500), run(LOAD, 800), run(SATURATED, 0, thr=2)],
        "cache_aware": [run(LOAD, 300, 0.7), run(LOAD, 200, 0.9), run(LOAD, 400, 0.8),
                        run(SATURATED, 0, thr=3)],
        SMG: [run(LOAD, 600), run(LOAD, 400), run(LOAD, 500)]}}
    hot = {"scenario": "hot-prefix", "runs": {"cache_aware": [run(LOAD, 1, mom=1.2),
                                                               run(LOAD, 1, mom=1.4)]}}
    h = headline([shared, hot])
    assert h["per_repeat"]["shared_prefix_ttft_ratio_rr"] == pytest.approx([0.3, 0.4, 0.5])
    assert h["shared_prefix_ttft_ratio_rr"] == pytest.approx(0.4)
    lo, hi = h["ci95"]["shared_prefix_ttft_ratio_rr"]
    # sd 0.1 over 3 runs: 0.4 +- 4.303 * 0.1 / sqrt(3)
    assert (lo, hi) == pytest.approx((0.4 - 0.24844, 0.4 + 0.24844), abs=1e-4)
    assert h["shared_prefix_ttft_ratio_smg"] == pytest.approx((0.5 + 0.5 + 0.8) / 3)
    assert h["hot_prefix_max_over_mean"] == pytest.approx(1.3)
    assert h["shared_prefix_throughput_gain"] == pytest.approx(0.5)  # one saturated run
    assert "shared_prefix_throughput_gain" not in h["ci95"]
    assert h["cache_hit_rate"]["shared-prefix"]["cache_aware"] == pytest.approx(0.8)
    assert mean_ci95([2.0, 2.0]) == [2.0, 2.0]


def test_cache_saturated_repeats_pair_by_order():
    """--saturated-repeats N: the throughput gain is the mean of N paired ratios (saturated
    run k of one method against run k of round robin), with an interval; --repeats 0 with
    it leaves the 0.9x keys empty; both 0 is refused."""
    from bench.compare.cache import main
    from bench.compare.cache_summary import SATURATED, headline

    def sat(thr):
        return {"fraction": SATURATED, "mean_ttft_ms": 1.0, "p99_ttft_ms": 1.0,
                "request_throughput": thr}
    shared = {"scenario": "shared-prefix", "runs": {
        "round_robin": [sat(4.0), sat(5.0)], "cache_aware": [sat(8.0), sat(7.5)]}}
    h = headline([shared])
    assert h["per_repeat"]["shared_prefix_throughput_gain"] == pytest.approx([1.0, 0.5])
    assert h["shared_prefix_throughput_gain"] == pytest.approx(0.75)
    assert h["shared_prefix_ttft_ratio_rr"] is None  # no 0.9x run
    with pytest.raises(SystemExit):
        main(["--repeats", "0", "--saturated-repeats", "0"])


def test_cache_repeats_without_a_figure_are_counted_and_failures_flagged():
    """A repeat whose run had no successful request has no figure: the pair is dropped and
    said so (not a silently smaller n), and failed requests are named per key and side."""
    from bench.compare.cache_summary import LOAD, SATURATED, describe, flag_lines, headline

    def run(ttft, failed=0, mom=1.0):
        return {"fraction": LOAD, "mean_ttft_ms": ttft, "p99_ttft_ms": ttft,
                "request_throughput": 1.0 if ttft else 0.0, "failed": failed,
                "max_over_mean_requests": mom if ttft else None}
    shared = {"scenario": "shared-prefix", "runs": {
        "round_robin": [run(1000), run(500), run(800, failed=1)],
        "cache_aware": [run(300), run(None, failed=64), run(400)]}}
    hot = {"scenario": "hot-prefix", "runs": {"cache_aware": [run(1, mom=1.2), run(None, 64)]}}
    h = headline([shared, hot])
    assert h["shared_prefix_ttft_ratio_rr"] == pytest.approx((0.3 + 0.5) / 2)
    assert h["per_repeat"]["shared_prefix_ttft_ratio_rr"] == pytest.approx([0.3, 0.5])
    assert h["hot_prefix_max_over_mean"] == 1.2
    assert h["dropped_pairs"] == {"shared_prefix_ttft_ratio_rr": {"dropped": 1, "of": 3},
                                  "hot_prefix_max_over_mean": {"dropped": 1, "of": 2}}
    assert h["failed"] == {"shared_prefix_ttft_ratio_rr": {"cache_aware": 64, "round_robin": 1},
                           "hot_prefix_max_over_mean": {"cache_aware": 64}}
    lines = flag_lines(h)
    assert lines[0] == ("shared_prefix_ttft_ratio_rr 0.400 (65 failed: cache_aware 64, "
                        "round_robin 1; over the successful requests only)")
    assert ("shared_prefix_ttft_ratio_rr 0.400: 1 of 3 repeat(s) dropped for a missing figure"
            in lines[2])
    assert describe(run(None, failed=64)).endswith("0.00 req/s completed, hit -, 64 failed")
    assert describe(run(300)).endswith(", 0 failed")
    # A saturated run that completed nothing has a throughput, 0: a gain of -1 that
    # counts, not a repeat dropped (which would flatter the method).
    sat = [{"fraction": SATURATED, "request_throughput": t, "failed": 0 if t else 64}
           for t in (8.0, 8.0, 0.0)]
    base = [{"fraction": SATURATED, "request_throughput": 4.0, "failed": 0}] * 3
    gain = headline([{"scenario": "shared-prefix", "runs": {"round_robin": base,
                                                            "cache_aware": sat}}])
    assert gain["shared_prefix_throughput_gain"] == pytest.approx((1 + 1 - 1) / 3)
    assert "shared_prefix_throughput_gain" not in gain["dropped_pairs"]
    # Every repeat with figures and no failure: nothing flagged.
    clean = headline([{"scenario": "shared-prefix", "runs": {
        "round_robin": [run(1000)], "cache_aware": [run(300)]}}])
    assert (clean["failed"], clean["dropped_pairs"], flag_lines(clean)) == ({}, {}, [])


def test_cache_scenarios_fit_the_pool_and_the_server_they_run_on():
    from bench.compare.cache import REAL_DIVISOR, SCENARIOS, server_flags

    shared = SCENARIOS["shared-prefix"]
    # The profile's pool gives the documented shape: 16 groups of 2,048 tokens per rank.
    assert shared.fitted(52_600).dataset["gsp_num_groups"] == 16
    real = shared.shortened(REAL_DIVISOR)
    assert real.dataset["gsp_system_prompt_len"] == 2048 // REAL_DIVISOR
    # A rank's share of the system prompts stays the same fraction of its pool.
    fitted = real.fitted(32_768)
    assert fitted.dataset["gsp_num_groups"] == round(16 * 2048 / 52_600 * 32_768 / (2048 // REAL_DIVISOR))
    assert fitted.fitted(32_768, 5, 16).dataset | {} == {
        **fitted.dataset, "gsp_num_groups": 5, "gsp_prompts_per_group": 16}
    assert SCENARIOS["no-reuse"].fitted(1000) is SCENARIOS["no-reuse"]
    assert SCENARIOS["multi-turn"].shortened(4).dataset["mt_turn_len"] == 128
    cfg = fitted.config(2, "http://x", 1.0, 1)
    assert cfg.gsp_num_groups == 2 * fitted.dataset["gsp_num_groups"] and cfg.text_prompts
    # zipf-prefix: the shared-prefix shape, groups drawn as SGLang's client draws them.
    zipf = SCENARIOS["zipf-prefix"].fitted(52_600).config(4, "http://x", 1.0, 1)
    assert (zipf.gsp_group_distribution, zipf.gsp_zipf_alpha, zipf.gsp_num_groups,
            zipf.gsp_hot_share) == ("zipf", 1.0, 64, 0)

    flags = server_flags("cache_aware", 4, "p", "real", "tiny", pd=True)
    assert flags[:4] == ["--executor", "real", "--model-path", "tiny"]
    assert flags[flags.index("--prefill-load-balance-method") + 1] == "cache_aware"
    assert flags[flags.index("--decode-dp-size") + 1] == "4"
    flags = server_flags("smg", 2, "p")
    assert flags[flags.index("--load-balance-method") + 1] == "round_robin"
    assert "--sim-profile" in flags and "--disaggregation-mode" not in flags


def test_cache_compare_shares_caches_on_every_server_and_refuses_bad_flags(capsys):
    from bench.compare.cache import main, server_flags

    assert "--enable-cross-rank-prefix-cache" in server_flags("smg", 2, "p", cross_rank=True)
    assert "--enable-cross-rank-prefix-cache" not in server_flags("cache_aware", 2, "p")
    flags = server_flags("cache_aware", 2, "p", pd=True, cross_rank=True)  # prefill ranks share
    assert "--enable-cross-rank-prefix-cache" in flags and "--disaggregation-mode" in flags
    for argv in (["--request-rate", "0"], ["--request-rate", "inf"]):
        with pytest.raises(SystemExit):
            main(argv)
    assert "--request-rate" in capsys.readouterr().err


def test_the_cache_bound_sits_between_the_alone_costs_and_their_queue():
    """bench.models.cache_bound: a group's first request is a miss; with more ranks than
    misses nothing queues, so the bound is the no-queueing floor; with one rank every
    miss waits for the ones before, and the bound can only grow."""
    from bench.models.cache_bound import bound, prefill_s
    from sim.executor import load_profile

    profile = load_profile("seed-qwen3-235b-dp4")
    wide = bound(profile, 4, 4.656, 1, 52_600)
    assert wide["misses"] == 64 and wide["requests"] == 256
    assert wide["mean_ttft_bound_ms"] >= wide["mean_ttft_no_queueing_ms"]
    alone_hit = profile.base_s + prefill_s(profile, 128, 2048)
    assert wide["mean_ttft_no_queueing_ms"] >= 1e3 * alone_hit
    # As many ranks as misses: each starts base_s after it arrives, no queue.
    many = bound(profile, 64, 4.656, 1, 52_600)
    assert many["miss_queueing_ms_of_mean"] == pytest.approx(0.0, abs=0.05)
    # Saturating rate: every miss released at once queues ranks-wide.
    burst = bound(profile, 4, 1e6, 1, 52_600)
    assert burst["miss_queueing_ms_of_mean"] > 1000
