"""Cascade against random routing, with paired bootstrap intervals; confidences of a multiple-choice pick.

Routing curve: at escalation rate ``r`` the cascade sends the ``round(r * n)`` least confident
questions to the large model and answers the rest with the small one; random routing at the same
rate has the expected accuracy ``(1 - r) * acc_small + r * acc_large``. An oracle router (escalate
exactly the questions the small model gets wrong and the large one right, first) bounds what any
signal can reach at that rate. Intervals are percentile bootstrap over questions (Efron & Tibshirani
1993, Ch. 13), paired: each resample draws the questions once and recomputes every curve on it, so
the interval of ``cascade - random`` is the test of the signal.

Confidence of a multiple-choice pick (scored by log-likelihood, :mod:`slmkit.eval.tasks`), from the
option scores ``s_k`` (total log-likelihood divided by the option's length in characters, lm-eval's
``acc_norm``, or the total):

* ``margin``: ``s_(1) - s_(2)``, the best option's score minus the runner-up's (margin uncertainty,
  Scheffer et al. 2001, "Active hidden Markov models for information extraction", IDA);
* ``maxprob``: ``max_k softmax(s)_k``, the max option probability (the softmax-response baseline,
  Hendrycks & Gimpel 2017, arXiv:1610.02136, applied over the options).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slmkit.errors import ConfigError, DataError

NORMS = ("chars", "none")


@dataclass(frozen=True)
class CurveConfig:
    """Knobs of :func:`routing_curve`."""

    rates: tuple[float, ...] = tuple(i / 10 for i in range(11))  #: escalation rates, each in [0, 1]
    resamples: int = 1000  #: bootstrap resamples of the questions (0 = no intervals)
    level: float = 0.95  #: interval coverage, in (0, 1)
    keep_rate: float = 0.5  #: report the best share of the large model's accuracy kept at escalation <= this
    seed: int = 0

    def __post_init__(self):
        if not self.rates or any(not 0.0 <= r <= 1.0 for r in self.rates):
            raise ConfigError(f"escalation rates must be fractions in [0, 1], got {self.rates}")
        if self.resamples < 0:
            raise ConfigError(f"resamples must be >= 0, got {self.resamples}")
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"interval level must be in (0, 1), got {self.level}")
        if not 0.0 <= self.keep_rate <= 1.0:
            raise ConfigError(f"keep_rate must be in [0, 1], got {self.keep_rate}")


def option_scores(lls: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], norm: str = "chars") -> list[list[float]]:
    """Each option's score: total log-likelihood, divided by its length in characters when ``norm="chars"``."""
    if norm not in NORMS:
        raise ConfigError(f"option score norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if len(lls) != len(choices):
        raise DataError(f"{len(lls)} rows of option log-likelihoods for {len(choices)} questions")
    if norm == "none":
        return [list(map(float, ll)) for ll in lls]
    return [[v / max(1, len(c)) for v, c in zip(ll, chs)] for ll, chs in zip(lls, choices)]


def option_confidence(scores: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """``margin`` (top-1 minus top-2 score) and ``maxprob`` (max softmax over the options) of every question."""
    margin, maxprob = [], []
    for s in scores:
        if len(s) < 2:
            raise DataError(f"a multiple-choice confidence needs at least 2 options, got {len(s)}")
        a = np.sort(np.asarray(s, dtype=np.float64))[::-1]
        margin.append(float(a[0] - a[1]))  # s_(1) - s_(2)
        p = np.exp(a - a[0])
        maxprob.append(float(1.0 / p.sum()))  # max_k softmax(s)_k = 1 / sum_k exp(s_k - s_(1))
    return {"margin": margin, "maxprob": maxprob}


def _curves(conf: np.ndarray, small: np.ndarray, large: np.ndarray, ms: np.ndarray) -> dict[str, np.ndarray]:
    """Cascade, random and oracle accuracy at ``ms`` escalations, for each row of (B, n) resampled arrays."""
    n = conf.shape[1]
    order = np.argsort(conf, axis=1, kind="stable")  # least confident first
    s = np.take_along_axis(small, order, axis=1)
    lg = np.take_along_axis(large, order, axis=1)
    zero = np.zeros((conf.shape[0], 1))
    cs, cl = np.concatenate([zero, s.cumsum(1)], 1), np.concatenate([zero, lg.cumsum(1)], 1)  # (B, n + 1)
    acc_s, acc_l = cs[:, -1] / n, cl[:, -1] / n
    cascade = (cl[:, ms] + cs[:, -1:] - cs[:, ms]) / n  # escalated from the large model, the rest from the small
    random = (1 - ms / n) * acc_s[:, None] + (ms / n) * acc_l[:, None]
    gain = ((large - small) > 0).sum(1)  # questions only the large model gets right
    loss = ((small - large) > 0).sum(1)
    # the oracle escalates the gain questions first, then ties, then (when forced) the loss questions
    oracle = acc_s[:, None] + (np.minimum(ms[None], gain[:, None]) - np.maximum(0, ms[None] - (n - loss[:, None]))) / n
    return {"cascade": cascade, "random": random, "oracle": oracle, "acc_small": acc_s, "acc_large": acc_l}


def routing_curve(conf: Sequence[float], small_ok: Sequence[float], large_ok: Sequence[float], cfg: CurveConfig = CurveConfig()) -> dict:
    """Cascade vs random routing (and the oracle) at each of ``cfg.rates``, with paired bootstrap intervals.

    ``conf``: the small model's confidence per question (higher = keep); ``small_ok``/``large_ok``: 0/1
    correctness of each model. Returns ``rows`` (per rate: ``cascade``, ``random``, ``oracle``, ``diff`` =
    cascade - random, ``kept`` = cascade / acc_large, each point value with its ``*_ci``; ``separated``:
    the cascade's interval lies above random's), the two accuracies with intervals, and ``best_kept``:
    the most of the large model's accuracy kept at escalation <= ``cfg.keep_rate``.
    """
    c, s, lg = (np.asarray(x, dtype=np.float64) for x in (conf, small_ok, large_ok))
    n = len(c)
    if n == 0 or len(s) != n or len(lg) != n:
        raise DataError(f"routing needs one confidence and two outcomes per question, got {len(c)}, {len(s)}, {len(lg)}")
    if not np.isfinite(c).all():
        raise DataError("a confidence is not finite (NaN or infinite); every question needs a finite confidence")
    ms = np.array([round(r * n) for r in cfg.rates])
    point = _curves(c[None], s[None], lg[None], ms)
    boot = None
    if cfg.resamples:
        idx = np.random.default_rng(cfg.seed).integers(0, n, size=(cfg.resamples, n))  # (B, n): questions drawn once
        boot = _curves(c[idx], s[idx], lg[idx], ms)
    q = ((1 - cfg.level) / 2 * 100, (1 + cfg.level) / 2 * 100)

    def ci(values: np.ndarray) -> list[float] | None:
        return None if boot is None else [float(v) for v in np.nanpercentile(values, q, axis=0)]

    def kept(d: dict) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return d["cascade"] / d["acc_large"][:, None]

    rows = []
    for j, r in enumerate(cfg.rates):
        row = {"rate": float(r), "escalated": int(ms[j])}
        for name, fn in (("cascade", lambda d: d["cascade"]), ("random", lambda d: d["random"]), ("oracle", lambda d: d["oracle"]),
                         ("diff", lambda d: d["cascade"] - d["random"]), ("kept", kept)):
            row[name] = float(fn(point)[0, j])
            if name == "kept" and not np.isfinite(row[name]):
                row[name] = None  # the large model got nothing right: no share to keep (and NaN is not JSON)
                continue
            if boot is not None:
                row[f"{name}_ci"] = ci(fn(boot)[:, j])
        row["separated"] = None if boot is None else row["cascade_ci"][0] > row["random_ci"][1]
        rows.append(row)
    low = [row for row in rows if row["rate"] <= cfg.keep_rate + 1e-12]
    low = [row for row in low if row["kept"] is not None]
    best = max(low, key=lambda row: row["kept"]) if low else None
    inner = [row for row in rows if 0 < row["escalated"] < n]  # at 0 and n escalations every router is the same
    return {
        "n": n,
        "acc_small": float(point["acc_small"][0]), "acc_small_ci": ci(boot["acc_small"]) if boot else None,
        "acc_large": float(point["acc_large"][0]), "acc_large_ci": ci(boot["acc_large"]) if boot else None,
        "rows": rows,
        "best_kept": None if best is None else {"rate": best["rate"], "kept": best["kept"], "kept_ci": best.get("kept_ci")},
        "beats_random_everywhere": all(row["diff"] > 0 for row in inner),
        "separated_everywhere": None if boot is None else all(row["separated"] for row in inner),
        "diff_above_zero_everywhere": None if boot is None else all(row["diff_ci"][0] > 0 for row in inner),
        "resamples": cfg.resamples, "level": cfg.level,
    }
