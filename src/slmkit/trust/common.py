"""Shared pieces of the trust audit: metric records, data-set limits, chat rendering, fast scoring and generation.

Everything here talks to a :class:`~slmkit.backends.Backend`. Two speed-ups are
used when the backend offers them (a local model does: :mod:`slmkit.backends.hf_batch`;
any other backend goes through its own ``score`` / ``generate``):

* :func:`score` calls the backend's ``score_many`` (all continuations of one context
  scored from a single KV cache of the context, so a k-way multiple-choice item costs
  one context pass instead of k);
* :func:`generate` calls the backend's ``sample`` (prompts decoded in left-padded batches).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from slmkit.backends.base import Backend, Completion, GenParams, Prompt, TokenScores
from slmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: how a metric's value maps onto a 0-1 "trustworthiness" scale for the radar chart
GOODNESS = ("higher", "lower", "centered", "abs_lower")


@dataclass
class Metric:
    """One number of the audit, with what it was computed from.

    ``values`` holds one entry per example (a float for means, a tuple for
    composite statistics); ``stat`` names the function in :data:`slmkit.trust.stats.STATISTICS`
    that turns them into ``value``, so confidence intervals and comparisons can
    resample examples.
    """

    name: str
    value: float
    n: int
    description: str
    goodness: str = "higher"  #: "higher"/"lower" is better, "centered" (0.5 ideal), "abs_lower" (0 ideal, sign free)
    stat: str = "mean"
    binary: bool = False  #: per-example values are 0/1 (Wilson interval, McNemar test)
    headline: bool = True  #: counts toward the dimension score
    ci: tuple[float, float] | None = None
    values: list = field(default_factory=list, repr=False)
    item_ids: list = field(default_factory=list, repr=False)  #: aligns examples across models

    def __post_init__(self):
        if self.goodness not in GOODNESS:
            raise ValueError(f"goodness must be one of {GOODNESS}, got {self.goodness!r}")

    def score01(self) -> float | None:
        """The value on a 0 (worst) .. 1 (best) scale, or None when it is undefined."""
        v = self.value
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if self.goodness == "higher":
            return min(1.0, max(0.0, v))
        if self.goodness == "lower":
            return min(1.0, max(0.0, 1.0 - v))
        if self.goodness == "centered":
            return max(0.0, 1.0 - 2.0 * abs(v - 0.5))
        return max(0.0, 1.0 - abs(v))


@dataclass
class Example:
    """A failure (or notable output) shown in the report."""

    metric: str
    prompt: str
    output: str
    expected: str = ""


@dataclass
class GroupResult:
    """The metrics of one data set (or probe) within a dimension, e.g. ``fairness.crows_pairs``."""

    name: str
    source: str  #: data file(s) and paper
    metrics: dict[str, Metric] = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: Metric) -> Metric:
        self.metrics[metric.name] = metric
        return metric


def take(rows: Sequence, limit: int) -> list:
    """The first ``limit`` rows in file order (0 = all)."""
    if limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {limit}")
    return list(rows[:limit]) if limit else list(rows)


def take_split(parts: dict[str, Sequence], limit: int) -> dict[str, list]:
    """A data set stored as several parts (BBQ categories, AdvGLUE tasks): ``ceil(limit / parts)`` from each.

    So that ``--limit N`` draws about N examples from the whole set while every
    part is represented; 0 keeps everything.
    """
    if not limit:
        return {k: list(v) for k, v in parts.items()}
    each = max(1, math.ceil(limit / max(1, len(parts))))
    return {k: take(v, each) for k, v in parts.items()}


def need(row: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")


# ---------------------------------------------------------------- chat rendering


def has_chat(backend: Backend) -> bool:
    tok = getattr(backend, "tokenizer", None)
    return tok is None or bool(getattr(tok, "chat_template", None))


def require_chat(backend: Backend, what: str) -> None:
    """Raise a clear error when a probe needs a chat template the model lacks."""
    from slmkit.errors import UnsupportedModelError

    if not has_chat(backend):
        raise UnsupportedModelError(
            f"{what} needs a chat model, but {backend.name}'s tokenizer has no chat template",
            "audit an instruction-tuned model, or leave this dimension out with --dimensions",
        )


def chat_text(backend: Backend, messages: list[dict]) -> str:
    """The text that precedes the assistant's reply to ``messages`` (for scoring replies).

    Local models use their chat template; an HTTP backend (whose template is
    unknown) gets a plain ``User:`` / ``Assistant:`` transcript.
    """
    tok = getattr(backend, "tokenizer", None)
    if tok is not None:
        require_chat(backend, "this probe")
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


# ---------------------------------------------------------------- scoring


def is_local_backend(backend: Backend) -> bool:
    """Whether ``backend`` exposes its weights (``model``, ``tokenizer``) and batched local decoding (``sample``)."""
    return hasattr(backend, "model") and hasattr(backend, "tokenizer") and hasattr(backend, "sample")


def score(backend: Backend, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
    """``backend.score(texts, contexts)``, through the backend's batched ``score_many`` where it has one
    (a local model: a shared context read once into a KV cache, short pairs packed into batches)."""
    if not texts:
        return []
    many = getattr(backend, "score_many", None)
    if many is not None:
        return many(list(texts), None if contexts is None else list(contexts))
    return backend.score(list(texts), None if contexts is None else list(contexts))


def choice_loglikelihoods(backend: Backend, contexts: Sequence[str], choices: Sequence[Sequence[str]]) -> list[list[float]]:
    """Total log-likelihood of each choice as a continuation of its item's context."""
    texts, ctxs, owner = [], [], []
    for i, (ctx, ch) in enumerate(zip(contexts, choices)):
        for c in ch:
            texts.append(c)
            ctxs.append(ctx)
            owner.append(i)
    res = score(backend, texts, ctxs)
    out: list[list[float]] = [[] for _ in contexts]
    for i, s in zip(owner, res):
        out[i].append(s.total)
    return out


def argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


# ---------------------------------------------------------------- generation


def generate(
    backend: Backend, prompts: Sequence[Prompt], params: GenParams, samples: int = 1, batch_size: int = 32
) -> list[list[Completion]]:
    """``samples`` completions of every prompt (a list per prompt).

    Local models decode in left-padded batches of ``batch_size`` rows (prompts x samples;
    32 rows decode 2.7x more tokens/s than 8 on the default model, bf16, 2 CPU threads);
    other backends get one request
    per sample, with seeds ``seed + k`` so samples differ.
    """
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if not prompts:
        return []
    if not is_local_backend(backend):
        out = [[] for _ in prompts]
        for k in range(samples):
            p = params if params.seed is None else GenParams(**{**params.__dict__, "seed": params.seed + k})
            for i, c in enumerate(backend.generate(list(prompts), p)):
                out[i].append(c)
        return out
    return backend.sample(list(prompts), params, samples, batch_size)


def completions(backend: Backend, prompts: Sequence[Prompt], params: GenParams) -> list[str]:
    """One completion text per prompt."""
    return [c[0].text for c in generate(backend, prompts, params)]


def contains_any(text: str, needles: Sequence[str]) -> bool:
    low = text.lower()
    return any(n in low for n in needles)


Probe = Callable[..., GroupResult]


def metric(
    name: str,
    values: Sequence,
    description: str,
    *,
    goodness: str = "higher",
    stat: str = "mean",
    binary: bool = False,
    headline: bool = True,
    item_ids: Sequence | None = None,
    seed: int = 0,
) -> Metric:
    """A :class:`Metric` whose value and 95% interval are computed from per-example ``values``."""
    from slmkit.trust.stats import STATISTICS, interval

    vals = list(values)
    value = STATISTICS.get(stat)(vals) if vals else float("nan")
    ci = interval(vals, stat, binary, seed) if vals else None
    ids = list(item_ids) if item_ids is not None else list(range(len(vals)))
    return Metric(name, value, len(vals), description, goodness, stat, binary, headline, ci, vals, ids)
