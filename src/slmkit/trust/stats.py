"""Confidence intervals and significance tests for audit metrics.

* Wilson score interval for proportions (Wilson 1927): for ``k`` successes in
  ``n`` trials, centre ``(p + z^2/2n) / (1 + z^2/n)`` and half-width
  ``z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)``.
* Percentile bootstrap (Efron & Tibshirani 1993) for everything else: resample
  examples with replacement, recompute the statistic, take the 2.5/97.5 percentiles.
* Comparing two models on the same examples: McNemar's exact test (binomial on
  the discordant pairs) and Newcombe's (1998) interval of the difference for 0/1 outcomes, a paired bootstrap of the difference
  otherwise (two-sided p = 2 min(P(d <= 0), P(d >= 0))).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from slmkit.registry import Registry

#: statistic name -> function(list of per-example values) -> float
STATISTICS: Registry[Callable[[Sequence], float]] = Registry("statistic")

Z95 = 1.959963984540054


@STATISTICS.register("mean")
def mean(values: Sequence) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


@STATISTICS.register("auroc")
def auroc(values: Sequence[tuple[float, int]]) -> float:
    """Area under the ROC curve of (score, label) pairs: P(score of a 1 > score of a 0), ties count 1/2.

    The Mann-Whitney U statistic divided by ``n1 * n0`` (Hanley & McNeil 1982).
    """
    pos = np.array([s for s, y in values if y == 1], dtype=float)
    neg = np.array([s for s, y in values if y == 0], dtype=float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks over ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # the bounds are exactly 0 at k = 0 and 1 at k = n (centre - half is a rounding error there)
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def newcombe_paired(both: int, only_a: int, only_b: int, neither: int, z: float = Z95) -> tuple[float, float]:
    """Interval of the difference of two paired proportions, ``p_a - p_b = (only_a - only_b) / n``.

    Newcombe (1998), "Improved confidence intervals for the difference between binomial proportions
    based on paired data", Statist. Med. 17:2635-2650, method 10 (as worked in Altman et al. 2000,
    "Statistics with Confidence", ch. 6): from the Wilson intervals (l_a, u_a), (l_b, u_b) of the two
    proportions and the correlation phi of the 2x2 table (its numerator AD - BC reduced by n/2 when
    positive, floored at 0):
    lower = d - sqrt((p_a - l_a)^2 - 2 phi (p_a - l_a)(u_b - p_b) + (u_b - p_b)^2),
    upper = d + sqrt((p_b - l_b)^2 - 2 phi (p_b - l_b)(u_a - p_a) + (u_a - p_a)^2).
    """
    n = both + only_a + only_b + neither
    if n == 0:
        return (float("nan"), float("nan"))
    ka, kb = both + only_a, both + only_b
    pa, pb = ka / n, kb / n
    la, ua = wilson(ka, n, z)
    lb, ub = wilson(kb, n, z)
    marg = ka * (n - ka) * kb * (n - kb)
    phi = 0.0
    if marg > 0:
        num = both * neither - only_a * only_b
        num = max(num - n / 2, 0.0) if num > 0 else num
        phi = num / math.sqrt(marg)
    d = pa - pb
    lo = d - math.sqrt(max(0.0, (pa - la) ** 2 - 2 * phi * (pa - la) * (ub - pb) + (ub - pb) ** 2))
    hi = d + math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    return (max(-1.0, lo), min(1.0, hi))


def bootstrap_ci(values: Sequence, stat: Callable[[Sequence], float], n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over examples."""
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    vals = list(values)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = stat([vals[i] for i in idx])
        if not math.isnan(v):
            boots.append(v)
    if not boots:
        return (float("nan"), float("nan"))
    return (float(np.percentile(boots, 100 * alpha / 2)), float(np.percentile(boots, 100 * (1 - alpha / 2))))


def interval(values: Sequence, stat_name: str, binary: bool, seed: int = 0) -> tuple[float, float]:
    """Wilson for 0/1 means, bootstrap otherwise."""
    if binary and stat_name == "mean":
        return wilson(int(round(sum(values))), len(values))
    return bootstrap_ci(values, STATISTICS.get(stat_name), seed=seed)


def mcnemar(a: Sequence[int], b: Sequence[int]) -> float:
    """Exact two-sided McNemar p-value for paired 0/1 outcomes."""
    n01 = sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
    n10 = sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return float(min(1.0, 2 * tail))


def _bootstrap_p(diff: Callable[[], float], n_boot: int) -> float:
    """Two-sided p-value ``2 min(P(d <= 0), P(d >= 0))`` (at least ``1/n``, at most 1) over ``n_boot`` draws of
    ``diff()``, a resampled difference of the statistic; NaN draws are dropped (NaN if all are)."""
    diffs = [d for d in (diff() for _ in range(n_boot)) if not math.isnan(d)]
    if not diffs:
        return float("nan")
    d = np.array(diffs)
    return float(min(1.0, max(2 * min((d <= 0).mean(), (d >= 0).mean()), 1.0 / len(d))))


def paired_bootstrap_p(a: Sequence, b: Sequence, stat: Callable[[Sequence], float], n_boot: int = 1000,
                       seed: int = 0) -> float:
    """Two-sided p-value that ``stat(b) - stat(a)`` differs from 0, resampling paired examples."""
    n = len(a)
    if n == 0 or n != len(b):
        return float("nan")
    rng = np.random.default_rng(seed)
    a, b = list(a), list(b)

    def diff() -> float:
        idx = rng.integers(0, n, n)
        return stat([b[i] for i in idx]) - stat([a[i] for i in idx])

    return _bootstrap_p(diff, n_boot)


def unpaired_bootstrap_p(a: Sequence, b: Sequence, stat: Callable[[Sequence], float], n_boot: int = 1000,
                         seed: int = 0) -> float:
    """Two-sided p-value for a difference of ``stat`` between independent samples."""
    if not len(a) or not len(b):
        return float("nan")
    rng = np.random.default_rng(seed)
    a, b = list(a), list(b)

    def diff() -> float:
        ia, ib = rng.integers(0, len(a), len(a)), rng.integers(0, len(b), len(b))
        return stat([b[i] for i in ib]) - stat([a[i] for i in ia])

    return _bootstrap_p(diff, n_boot)
