"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness scores it.

For each item the backend scores every choice as a continuation of the context
(``delimiter + choice``, lm-eval's ``target_delimiter``). ``acc`` picks the
choice with the highest total log-likelihood; ``acc_norm`` divides each by the
choice's length in characters first (lm_eval/api/task.py,
``ConfigurableTask.process_results``: ``completion_len = len(choice)``, the
delimiter not counted). An item may have several right choices (lm-eval's
multiple targets, e.g. BBQ's "unknown" phrasings); the pick must be one of them.

Each accuracy comes with its 95% Wilson score interval (Wilson 1927), and
:func:`paired_difference` compares two models on the same items: the difference
of accuracies with Newcombe's paired interval and McNemar's exact test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from slmkit.backends.base import Backend


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    gold: int | tuple[int, ...]  #: index of the correct choice (several: any of them is right)
    delimiter: str = ""  #: put between the context and every choice (lm-eval's target_delimiter, usually " ")

    @property
    def golds(self) -> tuple[int, ...]:
        return self.gold if isinstance(self.gold, tuple) else (self.gold,)

    @property
    def continuations(self) -> tuple[str, ...]:
        return tuple(self.delimiter + c for c in self.choices)


@dataclass
class MCResult:
    acc: float
    acc_norm: float
    n: int
    loglikelihoods: list[list[float]] = field(default_factory=list, repr=False)
    predictions: list[int] = field(default_factory=list, repr=False)
    correct: list[int] = field(default_factory=list, repr=False)  #: 1 where ``acc`` counts the item right
    correct_norm: list[int] = field(default_factory=list, repr=False)  #: the same for ``acc_norm``

    @property
    def ci95(self) -> tuple[float, float]:
        """95% Wilson interval of ``acc``."""
        from slmkit.trust.stats import wilson

        return wilson(sum(self.correct), self.n)

    @property
    def ci95_norm(self) -> tuple[float, float]:
        from slmkit.trust.stats import wilson

        return wilson(sum(self.correct_norm), self.n)


def loglikelihoods(backend: Backend, items: Sequence[MCItem], prefix: str = "") -> list[list[float]]:
    """Total log-likelihood of every choice of every item.

    A backend with ``score_choices`` (:class:`~slmkit.backends.hf.HFBackend`) runs each context once and
    shares it among the choices, and ``prefix`` (the start every context shares, a few-shot primer) once
    for all items; any other backend gets one batched ``score`` call of every ``context + continuation``.
    """
    score_choices = getattr(backend, "score_choices", None)
    if score_choices is not None:
        return score_choices([it.context for it in items], [it.continuations for it in items], prefix)
    texts, ctxs, owner = [], [], []
    for i, item in enumerate(items):
        for c in item.continuations:
            texts.append(c)
            ctxs.append(item.context)
            owner.append(i)
    scores = backend.score(texts, ctxs)
    out: list[list[float]] = [[] for _ in items]
    for i, s in zip(owner, scores):
        out[i].append(s.total)
    return out


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)  # the first of equal maxima, as numpy.argmax


def multiple_choice(backend: Backend, items: Sequence[MCItem], prefix: str = "") -> MCResult:
    """``acc`` and ``acc_norm`` of ``backend`` on ``items`` (``prefix``: see :func:`loglikelihoods`)."""
    lls = loglikelihoods(backend, items, prefix)
    preds, correct, correct_norm = [], [], []
    for item, ll in zip(items, lls):
        pred = _argmax(ll)
        pred_norm = _argmax([v / max(1, len(c)) for v, c in zip(ll, item.choices)])
        preds.append(pred)
        correct.append(int(pred in item.golds))
        correct_norm.append(int(pred_norm in item.golds))
    n = len(items)
    acc = sum(correct) / n if n else float("nan")
    acc_norm = sum(correct_norm) / n if n else float("nan")
    return MCResult(acc, acc_norm, n, lls, preds, correct, correct_norm)


def chance(items: Sequence[MCItem]) -> float:
    """Expected accuracy of a uniform random pick."""
    return sum(len(it.golds) / len(it.choices) for it in items) / len(items) if items else float("nan")


def paired_difference(a: Sequence[int], b: Sequence[int]) -> dict:
    """Accuracy of ``a`` minus that of ``b`` on the same items (0/1 outcomes), with its 95% interval
    (Newcombe 1998, Statist. Med. 17:2635, method 10; :func:`slmkit.trust.stats.newcombe_paired`) and the
    exact McNemar p-value (:func:`slmkit.trust.stats.mcnemar`). ``discordant``: items only ``a`` got right,
    items only ``b`` got right."""
    from slmkit.trust.stats import mcnemar, newcombe_paired

    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} and {len(b)}")
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = len(a)
    lo, hi = newcombe_paired(both, only_a, only_b, n - both - only_a - only_b)
    return {"diff": (only_a - only_b) / n if n else float("nan"), "ci95": [lo, hi], "p_value": mcnemar(a, b),
            "discordant": [only_a, only_b], "n": n}
