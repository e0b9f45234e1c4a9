"""The micro benchmarks' pure parts: the TTFT penalty's interval and verdict
(``bench.micro.pd``) and the clock-tick guard of CPU-time figures read from ``/proc``.
No server starts here."""

from __future__ import annotations

import pytest

from bench.stats import mean_ci95, t95


def test_the_interval_uses_students_t_at_every_size():
    assert t95(2) == pytest.approx(4.303)
    assert t95(29) == pytest.approx(2.045)
    assert t95(500) == 1.96
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
