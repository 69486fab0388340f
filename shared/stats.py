"""Standard errors both stages report: of a ratio of sums over independent units (rows, samples), and of a mean."""

from __future__ import annotations

import math

import numpy as np


def ratio_se(num, den) -> float:
    """Standard error of the ratio estimate Σ num / Σ den over independent units (delta method): e.g. nats per
    token from each row's nats and tokens. NaN with fewer than two units."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    n = num.size
    if n < 2 or den.sum() == 0:
        return float("nan")
    r = num.sum() / den.sum()
    return float(math.sqrt(((num - r * den) ** 2).sum() / (n * (n - 1))) / den.mean())


def mean_se(x) -> tuple[float, float]:
    """(mean, standard error of the mean) of independent values; the error is NaN with fewer than two."""
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
