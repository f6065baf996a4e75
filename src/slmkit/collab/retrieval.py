"""Retrieval filter: the small model drops irrelevant passages before the large model reads them.

Each passage gets a relevance score from the small model, a yes/no judgement read off its
next-token distribution: ``log p("Yes") - log p("No")`` after a prompt asking whether the
passage helps answer the question (the pointwise relevance prompt of Liang et al. 2022,
HELM's MS MARCO scenario, and of Sun et al. 2023 "Is ChatGPT good at search?").
Passages scoring below ``threshold`` are dropped, but at least ``min_keep`` are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from slmkit.backends.base import Backend
from slmkit.errors import ConfigError


@dataclass(frozen=True)
class FilterConfig:
    threshold: float = 0.0  #: keep passages with log p(Yes) - log p(No) >= threshold (nats)
    min_keep: int = 1  #: always keep this many top-scoring passages
    max_passage_chars: int = 1500  #: passages are cut to this length for scoring

    def __post_init__(self):
        if self.min_keep < 0:
            raise ConfigError(f"min_keep must be >= 0, got {self.min_keep}")
        if self.max_passage_chars < 1:
            raise ConfigError(f"max_passage_chars must be >= 1, got {self.max_passage_chars}")


def relevance_prompt(backend: Backend, question: str, passage: str) -> str:
    ask = f"Passage: {passage}\n\nQuestion: {question}\nDoes the passage contain the answer to the question? Answer Yes or No."
    tok = getattr(backend, "tokenizer", None)
    if tok is not None and getattr(tok, "chat_template", None):
        from slmkit.backends.text import render_prompt

        return render_prompt(tok, [{"role": "user", "content": ask}])
    return ask + "\nAnswer:"


def relevance_scores(small: Backend, question: str, passages: Sequence[str], cfg: FilterConfig = FilterConfig()) -> list[float]:
    """``log p(Yes) - log p(No)`` of each passage (higher = more relevant)."""
    ctxs = [relevance_prompt(small, question, p[: cfg.max_passage_chars]) for p in passages]
    yes = small.score(["Yes"] * len(ctxs), ctxs)
    no = small.score(["No"] * len(ctxs), ctxs)
    return [y.total - n.total for y, n in zip(yes, no)]


def filter_passages(small: Backend, question: str, passages: Sequence[str], cfg: FilterConfig = FilterConfig()) -> tuple[list[int], list[float]]:
    """Indices of the passages to keep (in their original order) and every passage's score."""
    scores = relevance_scores(small, question, passages, cfg)
    top = sorted(range(len(passages)), key=lambda i: -scores[i])[: cfg.min_keep]
    keep = sorted(set(top) | {i for i, s in enumerate(scores) if s >= cfg.threshold})
    return keep, scores
