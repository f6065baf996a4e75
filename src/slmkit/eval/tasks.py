"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness scores it.

For each item the backend scores every choice as a continuation of the
context. ``acc`` picks the choice with the highest total log-likelihood;
``acc_norm`` divides each by the choice's length in bytes first (the harness'
byte-length normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from slmkit.backends.base import Backend


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    gold: int  #: index of the correct choice


@dataclass
class MCResult:
    acc: float
    acc_norm: float
    n: int
    loglikelihoods: list[list[float]] = field(default_factory=list, repr=False)
    predictions: list[int] = field(default_factory=list, repr=False)


def loglikelihoods(backend: Backend, items: Sequence[MCItem]) -> list[list[float]]:
    """Total log-likelihood of every choice of every item (one batched ``score`` call)."""
    texts, ctxs, owner = [], [], []
    for i, item in enumerate(items):
        for c in item.choices:
            texts.append(c)
            ctxs.append(item.context)
            owner.append(i)
    scores = backend.score(texts, ctxs)
    out: list[list[float]] = [[] for _ in items]
    for i, s in zip(owner, scores):
        out[i].append(s.total)
    return out


def multiple_choice(backend: Backend, items: Sequence[MCItem]) -> MCResult:
    """``acc`` and ``acc_norm`` of ``backend`` on ``items``."""
    lls = loglikelihoods(backend, items)
    hits = hits_norm = 0
    preds = []
    for item, ll in zip(items, lls):
        pred = max(range(len(ll)), key=ll.__getitem__)
        norm = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(ll, item.choices)]
        pred_norm = max(range(len(norm)), key=norm.__getitem__)
        hits += pred == item.gold
        hits_norm += pred_norm == item.gold
        preds.append(pred)
    n = len(items)
    return MCResult(hits / n if n else float("nan"), hits_norm / n if n else float("nan"), n, lls, preds)
