"""The one interval the benchmarks report: a 95% confidence interval of a mean.

With few samples (3 paired runs, 5 seeds) the normal's 1.96 understates the interval
badly (Student's t at 2 degrees of freedom is 4.30), so the t quantile is used whatever
the sample size; from 30 samples on the normal's is within 4% of it.
"""

from __future__ import annotations

import math

# Student's t, two-sided 95%, by degrees of freedom 1-30; 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(dof: int) -> float:
    """Student's t quantile of a two-sided 95% interval at ``dof`` (>= 1) degrees of freedom."""
    if dof < 1:
        raise ValueError(f"an interval needs at least 1 degree of freedom, got {dof}")
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


def mean_ci95(values: list[float]) -> list[float]:
    """The 95% confidence interval of the mean of ``values`` (at least two; Student's t)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval needs at least two values, got {n}")
    mean = sum(values) / n
    sem = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    half = t95(n - 1) * sem
    return [mean - half, mean + half]
