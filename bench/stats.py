"""The one interval the benchmarks report: a 95% confidence interval of a mean.

With few samples (3 paired runs, 5 seeds) the normal's 1.96 understates the interval
badly (Student's t at 2 degrees of freedom is 4.30), so the t quantile is used whatever
the sample size: a table to 30 degrees of freedom, then the first terms of its
expansion around the normal's (within 0.001 of the exact quantile from 31 on).
"""

from __future__ import annotations

import math

# Student's t, two-sided 95%, by degrees of freedom 1-30.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(dof: int) -> float:
    """Student's t quantile of a two-sided 95% interval at ``dof`` (>= 1) degrees of freedom."""
    if dof < 1:
        raise ValueError(f"an interval needs at least 1 degree of freedom, got {dof}")
    if dof <= len(_T95):
        return _T95[dof - 1]
    z = 1.959964  # the normal's; Cornish-Fisher terms for t at dof degrees of freedom
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def mean_ci95(values: list[float]) -> list[float]:
    """The 95% confidence interval of the mean of ``values`` (at least two; Student's t)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval needs at least two values, got {n}")
    mean = sum(values) / n
    sem = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    half = t95(n - 1) * sem
    return [mean - half, mean + half]
