"""Shared pieces of the trust audit: metric records, data-set limits, chat rendering, fast scoring and generation.

Everything here talks to a :class:`~slmkit.backends.Backend`. Two speed-ups are
used when the backend is a local :class:`~slmkit.backends.HFBackend` (any other
backend goes through its own ``score`` / ``generate``):

* :func:`score` scores all continuations of one context from a single KV cache of
  the context (same tokenisation as ``HFBackend.score``: the context's tokens are
  those of ``context`` with trailing whitespace moved onto the continuation), so a
  k-way multiple-choice item costs one context pass instead of k;
* :func:`generate` decodes prompts in left-padded batches (``HFBackend.generate``
  decodes one prompt at a time).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
    return hasattr(backend, "model") and hasattr(backend, "tokenizer") and hasattr(backend, "_encode_pair")


def score(backend: Backend, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[TokenScores]:
    """``backend.score(texts, contexts)``, batched for speed on local models.

    On a local model every (context, text) pair is encoded exactly as ``backend.score``
    encodes it, then scored one of two ways, which give the same numbers up to rounding:
    pairs whose context is long and shared by several texts read the context once into
    a KV cache and score the texts against copies of it; all other pairs (short or no
    context) are scored as whole sequences packed into batches of about
    :data:`PACK_TOKENS` tokens. On CPU a forward pass of a few tokens costs about as
    much as one of ~70 (reading the weights dominates), so packing many short items into
    one pass beats two small passes per item.
    """
    if not texts:
        return []
    if not is_local_backend(backend):
        return backend.score(list(texts), None if contexts is None else list(contexts))
    if contexts is None:
        contexts = [None] * len(texts)
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    packed: list[tuple[int, list[int], int]] = []
    for i, (t, c) in enumerate(zip(texts, contexts)):
        ids, start = backend._encode_pair(c or None, t)
        groups.setdefault(tuple(ids[:start]), []).append((i, ids[start:]))
    out: list[TokenScores | None] = [None] * len(texts)
    shared = {}
    for prefix, members in groups.items():
        # the cache pays off when re-reading the prefix for every member costs more than one extra pass
        if len(prefix) >= SHARE_MIN_PREFIX and (len(members) - 1) * len(prefix) > SHARE_MIN_TOKENS:
            shared[prefix] = members
        else:
            packed += [(i, list(prefix) + cont, len(prefix)) for i, cont in members]
    for i, res in _score_packed(backend, packed):
        out[i] = res
    for i, res in _score_shared_context(backend, shared):
        out[i] = res
    return out  # type: ignore[return-value]


#: token budget (batch x padded length) of one packed scoring pass
PACK_TOKENS = 2048
#: share a context's KV cache only when it saves re-reading more than this many tokens
SHARE_MIN_TOKENS = 128
#: ... and only for contexts of at least this many tokens
SHARE_MIN_PREFIX = 32


def _token_scores(tok, logits: torch.Tensor, ids: list[int]) -> TokenScores:
    """Scores of ``ids`` from the logits (T, V) of the positions predicting them."""
    tgt = torch.tensor(ids, device=logits.device)
    rows = logits.float()
    lp = rows.gather(-1, tgt[:, None])[:, 0] - rows.logsumexp(-1)
    return TokenScores(tok.convert_ids_to_tokens(ids), lp.tolist(), (rows.argmax(-1) == tgt).tolist())


@torch.inference_mode()
def _score_packed(backend, items: list[tuple[int, list[int], int]]):
    """Yield (index, scores) for (index, ids, start) items, longest first, in right-padded batches."""
    model, tok = backend.model, backend.tokenizer
    pad = tok.pad_token_id or 0
    items = sorted(items, key=lambda it: -len(it[1]))
    b = 0
    while b < len(items):
        L = len(items[b][1])
        n = max(1, PACK_TOKENS // L)
        chunk = items[b : b + n]
        b += n
        inp = torch.full((len(chunk), L), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for j, (_, ids, _) in enumerate(chunk):
            inp[j, : len(ids)] = torch.tensor(ids)
            mask[j, : len(ids)] = 1
        logits = model(input_ids=inp.to(backend.device), attention_mask=mask.to(backend.device)).logits
        for j, (i, ids, start) in enumerate(chunk):
            yield i, _token_scores(tok, logits[j, start - 1 : len(ids) - 1], ids[start:])


@torch.inference_mode()
def _score_shared_context(backend, groups: dict[tuple[int, ...], list[tuple[int, list[int]]]]):
    """Yield (index, scores): each group's context read once into a KV cache, its texts batched against copies."""
    model, tok = backend.model, backend.tokenizer
    pad = tok.pad_token_id or 0
    dev = backend.device
    for prefix, members in groups.items():
        pre = torch.tensor([prefix], device=dev)
        res = model(input_ids=pre, use_cache=True, logits_to_keep=1)
        first = res.logits[0, -1:]  # (1, V): predicts each continuation's first token
        longest = max(len(ids) for _, ids in members)
        step = max(1, backend.batch_size, PACK_TOKENS // 8 // max(1, longest))
        for b in range(0, len(members), step):
            chunk = members[b : b + step]
            L = max(len(ids) for _, ids in chunk)
            B = len(chunk)
            inp = torch.full((B, L), pad, dtype=torch.long)
            mask = torch.zeros((B, len(prefix) + L), dtype=torch.long)
            mask[:, : len(prefix)] = 1
            for j, (_, ids) in enumerate(chunk):
                inp[j, : len(ids)] = torch.tensor(ids)
                mask[j, len(prefix) : len(prefix) + len(ids)] = 1
            logits = None
            if L > 1:
                cache = copy.deepcopy(res.cache)
                cache.batch_repeat_interleave(B)
                logits = model(input_ids=inp[:, :-1].to(dev), attention_mask=mask[:, :-1].to(dev), cache=cache).logits
            for j, (i, ids) in enumerate(chunk):
                rows = first if len(ids) == 1 else torch.cat([first, logits[j, : len(ids) - 1]])
                yield i, _token_scores(tok, rows, ids)


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
    return _generate_batched(backend, prompts, params, samples, batch_size)


@torch.inference_mode()
def _generate_batched(backend, prompts, params: GenParams, samples: int, batch_size: int) -> list[list[Completion]]:
    from slmkit.backends.hf import token_id_list, truncate_at_stop, render_prompt

    model, tok = backend.model, backend.tokenizer
    encoded = []
    for p in prompts:
        ids = tok(render_prompt(tok, p), add_special_tokens=isinstance(p, str)).input_ids
        if not ids:
            pid = backend._prefix_id()
            ids = [pid if pid is not None else 0]
        encoded.append(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = set(token_id_list(model.generation_config.eos_token_id) + token_id_list(tok.eos_token_id))
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    per_batch = max(1, batch_size // samples)
    out: list[list[Completion]] = [[] for _ in prompts]
    gen = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
    for b in range(0, len(order), per_batch):
        idx = order[b : b + per_batch]
        L = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), L), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, L - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[j, L - len(encoded[i]) :] = 1
        kw = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad, do_sample=params.temperature > 0)
        if params.temperature > 0:
            kw.update(temperature=params.temperature, top_p=params.top_p, top_k=0, num_return_sequences=samples)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            seqs = model.generate(ids.to(backend.device), attention_mask=mask.to(backend.device), **kw)
        reps = samples if params.temperature > 0 else 1
        for j, i in enumerate(idx):
            for k in range(samples):
                row = seqs[j * reps + (k if reps > 1 else 0), L:].tolist()
                n = len(row)
                cut = next((t for t, x in enumerate(row) if x in eos), None)
                if cut is not None:
                    body, n, reason = row[:cut], cut + 1, "stop"
                else:
                    body, reason = row, "length"
                text, hit = truncate_at_stop(tok.decode(body, skip_special_tokens=True), params.stop)
                out[i].append(Completion(text, n, "stop" if hit else reason))
    return out


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
