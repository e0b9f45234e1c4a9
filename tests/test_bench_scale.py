"""bench.compare.scale end to end on the zero-cost simulated profile: a server per rank count
starts and stops, every request completes, and the front door's timing comes back."""

from __future__ import annotations

import json

from bench.compare.scale import main


def test_scale_reports_front_door_cost_per_rank_count(tmp_path, capsys):
    out = tmp_path / "scale"
    assert main(["--ranks", "1", "3", "--methods", "total_requests", "--num-prompts", "12",
                 "--max-concurrency", "4", "--input-len", "32", "--out", str(out)]) == 0
    summary = json.loads((out / "scale.json").read_text())
    assert summary["simulated"] is True
    rows = summary["rows"]
    assert [r["ranks"] for r in rows] == [1, 3]
    for r in rows:
        assert r["completed"] == 12 and r["failed"] == 0
        assert r["dispatched"] >= 12  # the run's requests plus the warm-up
        assert 0 < r["dispatch_cpu_us"] <= r["dispatch_us"] * 1.5
        assert sum(r["requests_per_dp_rank"].values()) >= 12
    ratio = summary["dispatch_ratio_3_vs_1_total_requests"]
    assert ratio == rows[1]["dispatch_cpu_us"] / rows[0]["dispatch_cpu_us"]
    assert "dispatch_ratio_3_vs_1_total_requests" in capsys.readouterr().out


def test_a_run_without_figures_prints_dashes_and_its_failures(capsys):
    from bench.compare.scale import print_table
    row = {"method": "total_tokens", "ranks": 4, "dispatch_cpu_us": 3.0, "dispatch_us": 5.0,
           "mean_ttft_ms": None, "mean_e2e_ms": None, "request_throughput": 0.0, "failed": 12}
    print_table({"rows": [row]})
    line = capsys.readouterr().out.splitlines()[2].split()
    assert line == ["total_tokens", "4", "3.0", "5.0", "-", "-", "0.0", "12"]
