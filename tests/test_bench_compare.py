"""bench.compare end to end on the zero-cost simulated profile: servers start and stop,
the table, the JSON keys and the plots come out."""

from __future__ import annotations

import argparse
import json
import os

from bench.compare import dispatch_probe, run_scenario
from bench.compare_report import write_reports
from bench.scenarios import Scenario, server_flags


class _Bar:
    def set_postfix_str(self, _):
        pass

    def update(self, _):
        pass


def _args(tmp_path) -> argparse.Namespace:
    os.makedirs(tmp_path / "logs", exist_ok=True)
    return argparse.Namespace(executor="sim", sim_profile="instant", out=str(tmp_path),
                              json=str(tmp_path / "summary.json"), seed=1, quick=True)


def test_server_flags_follow_the_scenario():
    s = Scenario("prefill-heavy", ("total_tokens", "round_robin"), "round_robin", 64, 2, 1.0,
                 (1.0,), 4, pd=True, lockstep=True)
    flags = server_flags(s, "total_tokens", 8, "sim", "instant")
    assert flags[flags.index("--prefill-dp-size") + 1] == "8"
    assert flags[flags.index("--prefill-load-balance-method") + 1] == "total_tokens"
    assert "--sim-lockstep" in flags
    assert "--sim-lockstep" not in server_flags(s, "round_robin", 8, "real", "instant")


def test_compare_writes_table_json_and_plots(tmp_path):
    args = _args(tmp_path)
    scenarios = [
        Scenario("prefill-heavy", ("total_tokens", "follow_bootstrap_room"),
                 "follow_bootstrap_room", 48, 2, 1.0, (0.8, 1.0), 6, pd=True),
        Scenario("decode-heavy", ("total_requests", "round_robin"), "round_robin",
                 16, 6, 0.5, (1.0,), 6, lockstep=True, concurrency_per_rank=2),
    ]
    results = [run_scenario(s, 2, args, _Bar()) for s in scenarios]
    report = write_reports(results, dispatch_probe([2, 4], calls=50), args, 1.0)

    assert "simulated" in report and "| 0.8 |" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["simulated"] is True
    for key in ("prefill_heavy_ttft_ratio_0_8", "prefill_heavy_ttft_ratio_1_0",
                "decode_heavy_throughput_gain"):
        assert summary[key] is not None and summary[key] > -1, key
    assert set(summary["dispatch_probe_us"]) == {"2", "4"}
    run = summary["scenarios"][0]["runs"]["total_tokens"][0]
    assert run["completed"] == 6 and run["failed"] == 0
    assert summary["scenarios"][1]["lockstep"] is True
    for stem in ("prefill_heavy_2", "decode_heavy_2"):
        for kind in ("ttft", "load"):
            assert (tmp_path / f"{stem}_{kind}.png").stat().st_size > 1000
    assert (tmp_path / "report.md").exists() and (tmp_path / "timelines.json").exists()
