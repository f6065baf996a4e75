"""Drafts for speculative decoding (:mod:`slmkit.collab.speculative`): who proposes the tokens the target verifies.

* :class:`ModelDrafter`: a small causal LM sharing the target's vocabulary (transformers forward, its own
  KV cache), optionally scoring only a frequent-token subset (FR-Spec: Zhao et al. 2025, arXiv:2502.14856;
  :func:`frequent_vocab`); :func:`layer_draft` makes one from the target's first N blocks.
* :class:`FastDrafter`: a model on slmkit's fast path, above all the target's own int4 copy
  (:func:`quantised_draft`; self-speculation with a quantised draft, e.g. Zhao et al. 2024 "QSpec",
  arXiv:2410.11305): one fused C call per draft token. A draft model given to ``speculate`` runs here too
  (:func:`model_draft`, int4 by default: ``SpecConfig.draft_weights``) where the fast path runs it, since a
  transformers step of a small model costs several fused int4 steps and the draft's numerics never change
  the output.
* :class:`LookupDrafter` and :func:`lookup_draft`: prompt lookup (Saxena 2023, "Prompt Lookup Decoding"):
  copy what followed the most recent earlier occurrence of the context's last n-gram; no model.

A model drafter built with ``lookup=True`` drafts from prompt lookup whenever the controller
(:mod:`slmkit.collab.draftlen`) expects that to pay (the context repeats) and from the model otherwise.
:func:`resolve_draft` turns a command-line ``--draft`` value into one of these: a draft kind of
:data:`DRAFT_KINDS` (a draft made from the target itself: ``lookup``, ``int4``, ``int8``, ``layers:N``,
registered beside its maker with :func:`draft_kind`) or a MODEL spec.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from slmkit.collab.lm import CachedLM, check_same_tokenizer, check_same_vocab, model_device, token_probs
from slmkit.errors import ConfigError, UnsupportedModelError
from slmkit.registry import Registry
from slmkit.runtime.decoding import draw

if TYPE_CHECKING:
    from slmkit.collab.speculative import SpecConfig


def lookup_draft(context: torch.Tensor, k: int, ngram_max: int = 3, ngram_min: int = 1) -> torch.Tensor:
    """Prompt-lookup drafting: the (up to) ``k`` tokens that followed the most recent
    earlier occurrence of the context's last n-gram, longest n first; empty if none."""
    L = context.shape[0]
    for n in range(min(ngram_max, L - 1), ngram_min - 1, -1):
        tail = context[L - n :]
        windows = context[: L - 1].unfold(0, n, 1)  # (L-n, n): windows ending before the last token
        hits = (windows == tail).all(dim=1).nonzero()
        if hits.numel():
            start = int(hits[-1, 0]) + n
            cont = context[start : start + k]
            if cont.numel():
                return cont
    return context[:0]


def draft_tokens(next_logits: Callable[[torch.Tensor], torch.Tensor], unseen: torch.Tensor, k: int, cfg: SpecConfig, gen,
                 dev: torch.device | str = "cpu", vocab: torch.Tensor | None = None, n_full: int | None = None):
    """k draft tokens, fed one by one after the ``unseen`` context tail: (tokens (k,), q (k, V) or None when greedy).

    ``next_logits(feed)`` runs the draft on ``feed`` and returns the next token's scores; with ``vocab``
    they cover only those ids (FR-Spec), and ``q`` is spread back to the full ``n_full`` vocabulary.
    """
    toks: list[int] = []
    qs: list[torch.Tensor] = []
    feed = unseen.to(dev)
    for _ in range(k):
        logits = next_logits(feed)
        if cfg.temperature == 0:
            t = int(logits.max(-1).indices)  # = argmax (first maximum), faster on CPU
        else:
            q = token_probs(logits, cfg.temperature, cfg.top_p).cpu()
            t = draw(q, gen)
            if vocab is not None:
                q = torch.zeros(n_full).index_copy_(0, vocab, q)
            qs.append(q)
        if vocab is not None:
            t = int(vocab[t])
        toks.append(t)
        feed = torch.tensor([t], device=dev)
    return torch.tensor(toks, dtype=torch.long), (torch.stack(qs) if qs else None)


class Drafter(Protocol):
    """Proposes draft tokens after a context; ``q`` is None for deterministic drafts.

    ``has_model``: it drafts with a model (``propose``); ``lookup``: prompt lookup may draft too.
    """

    calls: int
    has_model: bool
    lookup: bool
    #: optional: how many tokens of the context the draft has read (the controller prices the catch-up before a
    #: draft; a drafter without it is priced as if it had read everything)
    seen: int

    def catch_up(self, ctx: torch.Tensor) -> None:
        """Feed the context not seen yet, all but its last token (the prompt; plain steps' tokens), so that the
        loop times :meth:`propose` as drafting alone (a no-op for drafts without a model; optional: the loop
        skips it for a drafter that lacks it)."""
        ...

    def propose(self, ctx: torch.Tensor, k: int, cfg: SpecConfig, gen) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def keep(self, n: int) -> None:
        """Only the first ``n`` tokens of the last context are still valid."""
        ...

    def fresh(self) -> Drafter:
        """The same draft with empty caches (weights shared), for a new sequence."""
        ...


class ModelDrafter:
    """Drafts with a small causal LM that shares the target's vocabulary.

    ``vocab`` (optional, 1-D ids): the draft scores only these tokens (FR-Spec); its
    distribution ``q`` is zero elsewhere, which the rejection rule handles exactly.
    :func:`frequent_vocab` builds one. Needs a plain linear LM head (no logit soft-capping).
    """

    has_model = True

    def __init__(self, model, vocab: torch.Tensor | None = None, lookup: bool = False):
        self.lm = CachedLM(model)
        self.dev = model_device(model)
        self.model = model
        self.lookup = lookup
        self.vocab = None if vocab is None else torch.as_tensor(vocab, dtype=torch.long).unique()
        if self.vocab is not None:
            w = model.get_output_embeddings().weight
            self.head = w.detach()[self.vocab.to(w.device)]  # (V', H)
            self.n_full = w.shape[0]

    def _next_logits(self, feed: torch.Tensor) -> torch.Tensor:
        if self.vocab is None:
            return self.lm.feed(feed, 1)[-1]
        return F.linear(self.lm.feed_hidden(feed), self.head)  # (V',) scores of the frequent tokens

    @property
    def calls(self) -> int:
        return self.lm.calls

    @property
    def seen(self) -> int:
        return self.lm.n

    def catch_up(self, ctx: torch.Tensor) -> None:
        tail = ctx[self.lm.n : -1]
        if tail.shape[0]:
            self.lm.feed(tail.to(self.dev), 1)

    def propose(self, ctx: torch.Tensor, k: int, cfg: SpecConfig, gen):
        n_full = self.n_full if self.vocab is not None else None
        return draft_tokens(self._next_logits, ctx[self.lm.n :], k, cfg, gen, self.dev, self.vocab, n_full)

    def keep(self, n: int) -> None:
        self.lm.crop(n)

    def fresh(self) -> ModelDrafter:
        return ModelDrafter(self.model, self.vocab, self.lookup)


def frequent_vocab(tokenizer, size: int, texts: list[str] | None = None) -> torch.Tensor:
    """The ``size`` most frequent token ids, plus every special token.

    With ``texts`` the ranking is by counts in them (FR-Spec); without, by id, which for
    BPE tokenizers follows merge order, itself a frequency ranking of the tokenizer's corpus.
    """
    n = len(tokenizer)
    if not 1 <= size <= n:
        raise ConfigError(f"draft vocabulary size must be in [1, {n}], got {size}")
    if texts:
        counts = torch.zeros(n)
        for t in texts:
            ids = torch.tensor(tokenizer(t, add_special_tokens=False).input_ids, dtype=torch.long)
            counts.index_add_(0, ids, torch.ones(ids.shape[0]))
        top = counts.argsort(descending=True, stable=True)[:size]
    else:
        top = torch.arange(size)
    special = torch.tensor(tokenizer.all_special_ids, dtype=torch.long)
    return torch.cat([top, special]).unique()


class FastDrafter:
    """Drafts with a model on slmkit's fast path (:func:`slmkit.runtime.generate.build`).

    The use it exists for: the target's own int4 copy (:func:`quantised_draft`), whose one-token
    steps run through slmkit's fused q4 kernel at several times the speed of the full-precision
    target while agreeing with it on most tokens. A short unseen context tail (the last accepted
    draft and the target's next token) is fed one token at a time, so it also takes the fused step.
    """

    has_model = True
    #: unseen tails up to this many tokens go through one-token (fused) steps, longer ones as one segment
    single_steps = 3

    def __init__(self, fm, lookup: bool = False):
        self.fm = fm
        self.lookup = lookup
        self.cache = None
        self.calls = 0

    def _ensure(self, need: int) -> None:
        if self.cache is None or need > self.cache.capacity:
            cap = min(self.fm.max_positions, max(1024, 2 * need))
            if need > cap:
                raise ConfigError(f"sequence of {need} tokens exceeds the draft's context of {self.fm.max_positions}")
            self.cache = self.fm.new_cache("full", context=cap)  # a new buffer: the context is fed again

    def _next_logits(self, feed: torch.Tensor) -> torch.Tensor:
        from slmkit.runtime import generate as G

        if 1 < feed.shape[0] <= self.single_steps and self.fm.fused is not None:
            for t in feed[:-1]:
                G.forward(self.fm, [G.Segment(t[None], self.cache)])
                self.calls += 1
            feed = feed[-1:]
        self.calls += 1
        return G.forward(self.fm, [G.Segment(feed, self.cache)])[0]

    @property
    def seen(self) -> int:
        return 0 if self.cache is None else self.cache.seen

    def catch_up(self, ctx: torch.Tensor) -> None:
        self._ensure(ctx.shape[0] + 1)
        tail = ctx[self.cache.seen : -1]
        if tail.shape[0]:
            self._next_logits(tail)

    def propose(self, ctx: torch.Tensor, k: int, cfg: SpecConfig, gen):
        self._ensure(ctx.shape[0] + k)
        return draft_tokens(self._next_logits, ctx[self.cache.seen :], k, cfg, gen)

    def keep(self, n: int) -> None:
        if self.cache is not None:
            self.cache.rewind(n)

    def fresh(self) -> FastDrafter:
        return FastDrafter(self.fm, self.lookup)


class LookupDrafter:
    """Prompt-lookup drafting only: no model (the speculative loop calls :func:`lookup_draft`)."""

    calls = 0
    has_model = False
    lookup = True

    def catch_up(self, ctx: torch.Tensor) -> None:
        pass

    def propose(self, ctx: torch.Tensor, k: int, cfg: SpecConfig, gen):
        return lookup_draft(ctx, k, cfg.ngram_max, cfg.ngram_min), None

    def keep(self, n: int) -> None:
        pass

    def fresh(self) -> LookupDrafter:
        return self


def quantised_draft(target, weights: str = "int4", lookup: bool = False) -> FastDrafter:
    """The target's own copy with ``weights`` ("int4" or "int8") on the fast path, as a draft (architectures slmkit.runtime.arch describes).

    ``lookup=True``: prompt lookup drafts instead whenever the context repeats (see the module docstring).
    """
    from slmkit.runtime import generate as G

    if weights not in ("int4", "int8"):
        raise ConfigError(f"a quantised draft is int4 or int8, got {weights!r}")
    if not G.supports(target):
        raise UnsupportedModelError(
            f"--draft {weights} drafts with the target on slmkit's fast path, which does not describe a {target.config.model_type!r} model",
            "give a draft model, 'layers:N' or 'lookup'",
        )
    return FastDrafter(G.build(target, G.FastConfig(weights=weights)), lookup=lookup)


#: draft models already on the fast path: model -> (weight stamp, weights, FastModel)
_fast_drafts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: how a draft model may run: on slmkit's fast path with these weights, or "hf" (transformers' forward)
DRAFT_WEIGHTS = ("int4", "int8", "native", "hf")


@dataclass(frozen=True, eq=False)
class DraftModel:
    """A draft model that also drafts by prompt lookup when ``lookup``: :func:`as_drafter` runs it as
    :func:`model_draft` says with ``SpecConfig.draft_weights`` (a bare model is the same with ``lookup=False``)."""

    model: Any
    lookup: bool = False


def model_draft(model, lookup: bool = False, weights: str = "int4"):
    """A draft model as a drafter: on slmkit's fast path with ``weights`` ("int4", "int8" or "native") where that
    runs it (an architecture :mod:`slmkit.runtime.arch` describes, on the CPU), else with transformers' forward
    (:class:`ModelDrafter`, also for ``weights="hf"``).

    The draft's numerics never change the output (the target verifies every token), and a fused int4 step of a
    small model costs a fraction of a transformers step, which is what decides whether drafting pays (a poor
    draft's tries cost less, a good draft's tokens more often pay). The fast copy is built once per model and
    rebuilt when its weights change (parameter storage or version counter).
    """
    from slmkit.runtime import generate as G

    if weights not in DRAFT_WEIGHTS:
        raise ConfigError(f"draft weights must be one of {', '.join(DRAFT_WEIGHTS)}, got {weights!r}")
    if weights == "hf" or not G.supports(model) or model_device(model).type != "cpu":
        return ModelDrafter(model, lookup=lookup)
    stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
    hit = _fast_drafts.get(model)
    if hit is None or hit[0] != stamp or hit[1] != weights:
        hit = (stamp, weights, G.build(model, G.FastConfig(weights=weights)))
        _fast_drafts[model] = hit
    return FastDrafter(hit[2], lookup=lookup)


def layer_draft(model, n_layers: int):
    """A draft made of the target's first ``n_layers`` decoder blocks (plus its embeddings,
    final norm and head), sharing their weights: no extra memory, no training.

    The target is left untouched (its module dicts are copied, not shared). Works for
    transformers decoders that keep their blocks in ``model.model.layers``.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__} keeps no decoder blocks in model.layers; use a draft model")
    if not 1 <= n_layers < len(layers):
        raise ConfigError(f"a layer draft needs 1 <= layers < {len(layers)} (the target's depth), got {n_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = n_layers
    for attr in ("layer_types",):  # per-layer lists must match the new depth
        if isinstance(getattr(config, attr, None), list):
            setattr(config, attr, getattr(config, attr)[:n_layers])
    new_inner = copy.copy(inner)
    new_inner.__dict__["_modules"] = dict(inner._modules)  # copy.copy would share the module dict
    new_inner.__dict__["_modules"]["layers"] = torch.nn.ModuleList(list(layers[:n_layers]))
    new_inner.config = config
    draft = copy.copy(model)
    draft.__dict__["_modules"] = dict(model._modules)
    draft.__dict__["_modules"]["model"] = new_inner
    draft.config = config
    return draft


@dataclass(frozen=True)
class DraftKind:
    """A draft made from the target itself, named on the command line (``--draft``) or in a recipe (``draft:``)."""

    make: Callable[[Any, str, bool | None], Any]  #: (target, the argument after ``NAME:``, lookup) -> a draft speculate takes
    summary: str  #: what the draft is; ``{target}``: the target's role ("target", "teacher"), ``{arg}``: the argument


#: draft kinds by name; ``NAME:N`` is a kind written with an argument (``layers:3``)
DRAFT_KINDS: Registry[DraftKind] = Registry("draft kind")


def draft_kind(name: str, *, summary: str):
    """Register ``make(target, arg, lookup)`` as draft kind ``name`` (``"NAME:N"``: written ``NAME:<arg>``).

    ``lookup``: also draft by prompt lookup when the context repeats (None: the kind's default)."""
    def deco(make: Callable[[Any, str, bool | None], Any]):
        DRAFT_KINDS.add(name, DraftKind(make, summary))
        return make

    return deco


def find_draft_kind(spec: str) -> tuple[DraftKind, str] | None:
    """(the draft kind ``spec`` names, its argument) or None when ``spec`` names no kind (a MODEL spec).

    A kind ``NAME:N`` takes a positive integer: ``NAME:x`` is an error naming it."""
    head, sep, arg = spec.partition(":")
    key = f"{head}:N" if sep else spec
    if key not in DRAFT_KINDS:
        return None
    if sep and not (arg.isdecimal() and arg.isascii() and int(arg) > 0):
        raise ConfigError(f"{key} needs a positive integer N, got {spec!r}")
    return DRAFT_KINDS.get(key), arg


@draft_kind("lookup", summary="prompt lookup (n-grams of the prompt; no draft model)")
def lookup_kind(target, arg: str, lookup: bool | None):
    return "lookup"


@draft_kind("int4", summary="the {target}'s own int4 copy on slmkit's fast path")
def int4_kind(target, arg: str, lookup: bool | None):
    return quantised_draft(target, "int4", lookup=lookup is not False)


@draft_kind("int8", summary="the {target}'s own int8 copy on slmkit's fast path")
def int8_kind(target, arg: str, lookup: bool | None):
    return quantised_draft(target, "int8", lookup=lookup is not False)


@draft_kind("layers:N", summary="the {target}'s first {arg} decoder blocks")
def layers_kind(target, arg: str, lookup: bool | None):
    model = layer_draft(target, int(arg))
    return DraftModel(model, lookup=True) if lookup else model


def resolve_draft(spec: str, target, target_tok, dtype: str = "fp32", what: str = "the draft", lookup: bool | None = None):
    """A draft named on the command line (``slmkit speculate --draft``, ``slmkit serve SMALL --mode speculative``).

    A draft kind of :data:`DRAFT_KINDS`: ``"lookup"``, ``"int4"``/``"int8"`` (the target's own quantised copy),
    ``"layers:N"`` (its first N blocks); or a MODEL spec, whose tokenizer is compared with the target's before
    its weights load. A quantised llama FILE.gguf or packed quantised DIR drafts on the fast path with its own
    codes (:func:`slmkit.runtime.gguffast.build_gguf`) where slmkit's kernel library runs.
    ``lookup``: also draft by prompt lookup when the context repeats; None = on for int4/int8, off otherwise.
    """
    try:
        found = find_draft_kind(spec)
        if found is not None:
            return found[0].make(target, found[1], lookup)
    except ConfigError as err:
        raise ConfigError(f"{what}: {err.problem}", err.hint) from None
    from slmkit.models import load
    from slmkit.models.load import load_tokenizer

    check_same_tokenizer(target_tok, load_tokenizer(spec), f"{what} and the target")
    model = load(spec, dtype=dtype)[0]
    from slmkit.runtime import generate as G
    from slmkit.runtime.gguffast import build_gguf, file_codes

    path = file_codes(spec, None, require_fast=False)  # the draft's numerics never change the output: its own codes when it can
    if path is not None and G.supports(model):
        return FastDrafter(build_gguf(path, model=model), lookup=bool(lookup))
    return DraftModel(model, lookup=True) if lookup else model


def as_drafter(draft, target, weights: str = "int4") -> Drafter:
    """A fresh :class:`Drafter` for one sequence from what :func:`~slmkit.collab.speculative.speculate` accepts.

    ``draft``: a causal LM sharing the target's vocabulary or a :class:`DraftModel` (run as :func:`model_draft` says
    with ``weights``), a drafter object, a draft kind of :data:`DRAFT_KINDS` (``"int4"``/``"int8"``: the target's own quantised copy,
    ``"layers:N"``: its first N blocks, each with prompt lookup), or ``"lookup"``/None (prompt lookup alone).
    """
    if draft is None or (isinstance(draft, str) and draft == "lookup"):
        return LookupDrafter()
    if isinstance(draft, str):
        found = find_draft_kind(draft)
        if found is None:
            raise ConfigError(f"draft must be a model or a draft kind ({' | '.join(DRAFT_KINDS.names())}), got {draft!r}")
        return as_drafter(found[0].make(target, found[1], True), target, weights)
    if isinstance(draft, FastDrafter):
        vt = int(target.get_output_embeddings().weight.shape[0])
        if draft.fm.vocab != vt:
            raise ConfigError(f"the draft's vocabulary ({draft.fm.vocab}) differs from the target's ({vt})")
        return draft.fresh()
    if isinstance(draft, ModelDrafter):
        check_same_vocab(target, draft.model)
        return draft.fresh()
    if isinstance(draft, DraftModel):
        check_same_vocab(target, draft.model)
        return model_draft(draft.model, draft.lookup, weights)
    if hasattr(draft, "propose") and hasattr(draft, "fresh"):  # any other Drafter
        return draft.fresh()
    check_same_vocab(target, draft)
    return model_draft(draft, weights=weights)
