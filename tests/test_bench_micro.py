"""The micro benchmarks' pure parts: the TTFT penalty's interval and verdict
(``bench.micro.pd``) and the clock-tick guard of CPU-time figures read from ``/proc``.
No server starts here."""

from __future__ import annotations

import pytest

from bench.stats import mean_ci95, t95


def test_the_interval_uses_students_t_at_every_size():
    assert t95(2) == pytest.approx(4.303)
    assert t95(29) == pytest.approx(2.045)
    # Past the table: Student's quantiles (31: 2.0395, 60: 2.0003, 500: 1.9647), not 1.96.
    for dof, exact in [(31, 2.0395), (60, 2.0003), (500, 1.9647)]:
        assert t95(dof) == pytest.approx(exact, abs=5e-4)
    lo, hi = mean_ci95([1.0, 2.0, 3.0])  # sd 1 over 3: 2 +- 4.303 / sqrt(3)
    assert (lo, hi) == pytest.approx((2 - 2.4843, 2 + 2.4843), abs=1e-4)
    with pytest.raises(ValueError):
        mean_ci95([1.0])


def test_pd_penalty_interval_and_verdict():
    from bench.micro.pd import penalty_figures, penalty_verdict
    # Three pairs, mean 0.5 ms, sd 0.5 ms: Student's t (4.30) gives +-1.24 ms, the
    # normal's 1.96 would give +-0.57 ms and call the 1 ms target met.
    figures = penalty_figures([0.0, 0.0005, 0.001])
    assert figures["bootstrap_ttft_penalty_ms"] == pytest.approx(0.5)
    assert figures["penalty_ci95_ms"] == pytest.approx(4.303 * 0.5 / 3 ** 0.5, rel=1e-3)
    assert penalty_verdict(figures) == "undecided"
    assert penalty_verdict(penalty_figures([0.0001, 0.0002] * 20)) == "met"
    assert penalty_verdict(penalty_figures([0.005, 0.006] * 20)) == "missed"


def test_pd_needs_two_pairs(capsys):
    from bench.micro.pd import build_parser
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--pairs", "1"])
    assert exc.value.code == 2 and "argument --pairs: must be >= 2" in capsys.readouterr().err


def test_a_cpu_figure_needs_enough_clock_ticks():
    from bench.micro.http_stack import MIN_CPU_TICKS, too_few_ticks
    assert too_few_ticks(MIN_CPU_TICKS, 3000, "API CPU") is None
    line = too_few_ticks(5, 100, "API CPU")
    assert "not printed" in line and "5 CPU tick(s)" in line
    assert "about 1200 requests" in line  # 100 x 50 / 5, plus a fifth for spread
    assert "more than 500 requests" in too_few_ticks(0, 10, "API CPU", min_ticks=50)


def test_api_servers_leaves_out_figures_on_too_few_ticks():
    from bench.micro.api_servers import medians
    rounds = [{"rate": 100.0, "api_cpu_us": 500.0, "api_cores": 0.5, "rank_cores": 0.3,
               "client_cores": 0.2, "machine_cores": 2.11, "api_ticks": 5,
               "rank_ticks": 300, "machine_ticks": 3}]
    med, notes = medians(rounds, 100)
    assert med["api_cpu_us"] is None and med["api_cores"] is None
    assert med["machine_cores"] is None and med["rank_cores"] == 0.3
    assert len(notes) == 2


@pytest.mark.parametrize("module", ["bench.micro.http_stack", "bench.micro.pick_share",
                                    "bench.micro.api_servers"])
def test_cpu_benchmarks_check_warmup_and_take_sglangs_names(module, capsys):
    import importlib
    parser = importlib.import_module(module).build_parser()
    for flags in (["--warmup", "-1"], ["--warmup-requests", "x"], ["--num-prompts", "0"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(flags)
        assert exc.value.code == 2 and "argument --" in capsys.readouterr().err
    args = parser.parse_args(["--num-prompts", "7", "--max-concurrency", "3",
                              "--warmup-requests", "0"])
    assert (args.requests, args.concurrency, args.warmup) == (7, 3, 0)
    assert parser.parse_args(["--requests", "9"]).requests == 9  # the old spelling stays
    if module != "bench.micro.http_stack":
        with pytest.raises(SystemExit):
            parser.parse_args(["--dp-size", "0"])


def test_board_table_aligns_long_names(capsys):
    from bench.micro.board import print_figures
    print_figures({"pick_bump_us_n8": 1.0, "cache_aware_pick_us_n64_p4096_miss": 12.0})
    lines = capsys.readouterr().out.splitlines()
    ends = {line.index(".") for line in lines[1:]}  # every value's decimal point in one column
    assert len(ends) == 1


def test_balance_refuses_values_that_break_the_trace(capsys):
    from bench.compare.balance import main
    for flags in (["--ranks", "0"], ["--ranks", "-2"], ["--dispatchers", "0"], ["--rate", "-1"],
                  ["--burst-every", "0"], ["--steps", "0"], ["--ticks-per-step", "0"],
                  ["--rate", "0", "--burst", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(flags)
        assert exc.value.code == 2 and flags[-2] in capsys.readouterr().err


def test_scale_with_one_rank_count_claims_no_ratio(capsys):
    from bench.compare.scale import print_table, summarize
    rows = [{"ranks": 2, "method": "total_requests", "dispatch_cpu_us": 5.0, "dispatch_us": 9.0,
             "mean_ttft_ms": 1.0, "mean_e2e_ms": 2.0, "request_throughput": 3.0, "failed": 0}]
    summary = summarize(rows, [2])
    assert not any("ratio" in k for k in summary)
    print_table(summary)
    assert "n/a" in capsys.readouterr().out
