"""Speculative decoding: a small draft proposes, the large target verifies in one pass.

References
----------
* Leviathan, Kalman, Matias 2023, "Fast Inference from Transformers via Speculative
  Decoding" (arXiv:2211.17192): the acceptance rule (Algorithm 1) and the expected
  speed-up as a function of the acceptance rate (Eq. 1, Theorem 3.8).
* Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative
  Sampling" (arXiv:2302.01318): the same modified rejection sampling.
* Saxena 2023, "Prompt Lookup Decoding": drafting by copying the continuation of the
  most recent earlier occurrence of the last n-gram; no draft model.
* Self-speculation with a quantised draft (e.g. Zhao et al. 2024, "QSpec", arXiv:2410.11305;
  Tiwari et al. 2025, "QuantSpec", arXiv:2502.10424): the draft is the target itself with
  4-bit weights, so it agrees with the target on most tokens while reading a fraction of its
  bytes. Here ``draft="int4"`` drafts with the target's int4 copy on slmkit's fast path
  (:class:`FastDrafter`, :mod:`slmkit.runtime.generate`); the target still verifies in full
  precision, so the output is the target's.
* Zhao et al. 2025, "FR-Spec: Accelerating Large-Vocabulary Language Models via
  Frequency-Ranked Speculative Sampling" (arXiv:2502.14856): the draft scores only a
  subset of frequent tokens, which cuts its LM-head cost (a large share of a small
  model's compute); the verification, hence the output, is unchanged.

Exactness
---------
Greedy (temperature 0): every emitted token is the argmax of the target's logits at
its position, so the output equals the target decoding alone, token for token. In
fp32 the verification pass (k+1 positions in one forward) and plain one-token decoding
agree to ~1e-6, far below any realistic gap between the top two logits; the tests
check identity on tiny models and on the default model. In bf16 the two paths round
differently (the matmuls reduce in another order), so a near-tied argmax may flip:
``--dtype bf16`` guarantees that each token is the argmax of the target's bf16 logits
*as computed in the verification pass* (a valid greedy decode of the bf16 target),
not bit-identity with bf16 decoding one token at a time.

Sampling (temperature > 0): draft token ``x ~ q`` is accepted with probability
``min(1, p(x)/q(x))``; on rejection the token is drawn from ``norm(max(0, p - q))``.
Each emitted token is then distributed exactly as ``p``, the target's distribution
after temperature and top-p. Prompt-lookup drafts are deterministic (``q`` is a point
mass), which the same rule covers.

Caches: the target keeps a transformers ``DynamicCache``, a model draft the same (a
:class:`FastDrafter` its fast-path KV cache); after a rejection the caches are cropped back
to the accepted prefix.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from slmkit.errors import ConfigError, UnsupportedModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecConfig:
    """Knobs of speculative decoding."""

    max_new_tokens: int = 128  #: tokens to generate at most
    k: int = 4  #: draft length of the first step (tokens)
    k_max: int = 12  #: longest draft the adaptive rule may choose (tokens)
    adaptive: bool = True  #: choose k each step from the running acceptance rate (else k stays fixed)
    temperature: float = 0.0  #: 0 = greedy; > 0 samples with the exact rejection rule
    top_p: float = 1.0  #: nucleus mass applied to both target and draft distributions, in (0, 1]
    cost_ratio: float | None = None  #: draft step cost / target step cost; None = parameter-count ratio
    verify_cost: float = 0.03  #: extra target cost per additional verified token (fraction of one step)
    decay: float = 0.9  #: forgetting factor of the running acceptance estimate, in (0, 1]
    prior_acceptance: float = 0.6  #: acceptance rate assumed before any draft was checked
    ngram_max: int = 3  #: prompt lookup: longest n-gram matched
    ngram_min: int = 1  #: prompt lookup: shortest n-gram matched
    eos_token_ids: tuple[int, ...] = ()  #: generation stops after emitting one of these
    fast_target: bool = False  #: verify through slmkit's fast path (llama targets; same logits as transformers' forward in fp32)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.k <= self.k_max:
            raise ConfigError(f"k must be in [0, k_max={self.k_max}], got {self.k}")
        if self.k_max < 1 or self.k_max > 64:
            raise ConfigError(f"k_max must be in [1, 64], got {self.k_max}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cost_ratio is not None and not 0 <= self.cost_ratio < 1:
            raise ConfigError(f"cost_ratio must be in [0, 1) (a draft slower than the target cannot help), got {self.cost_ratio}")
        if not 0 < self.decay <= 1:
            raise ConfigError(f"decay must be in (0, 1], got {self.decay}")
        if not 0 < self.prior_acceptance < 1:
            raise ConfigError(f"prior_acceptance must be in (0, 1), got {self.prior_acceptance}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))


@dataclass
class SpecOutput:
    """What a speculative (or plain) decoding run produced."""

    tokens: list[int]  #: generated token ids (prompt excluded; a final EOS included)
    drafted: int = 0  #: draft tokens proposed
    accepted: int = 0  #: draft tokens the target accepted
    target_calls: int = 0  #: target forward passes (prefill included)
    draft_calls: int = 0  #: draft forward passes (prefill included)
    draft_lengths: list[int] = field(default_factory=list)  #: k chosen at each step
    finish_reason: str = "length"  #: "stop" (EOS) or "length"
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------- pure rules


def token_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution of ``logits`` (..., V) after temperature and nucleus (top-p) filtering."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return out / out.sum(-1, keepdim=True)


def greedy_accept(target_argmax: torch.Tensor, draft: torch.Tensor) -> tuple[int, int]:
    """Greedy verification: accept the longest prefix of ``draft`` (k,) that matches
    ``target_argmax`` (k+1,); the next token is the target's argmax right after it.
    Returns ``(n_accepted, next_token)``."""
    k = draft.shape[0]
    mismatch = (target_argmax[:k] != draft).nonzero()
    n = int(mismatch[0, 0]) if mismatch.numel() else k
    return n, int(target_argmax[n])


def rejection_accept(
    p: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor, gen: torch.Generator | None
) -> tuple[int, int]:
    """Modified rejection sampling (Leviathan et al. 2023, Algorithm 1).

    ``p`` (k+1, V): target distributions at the k draft positions and one past them.
    ``q`` (k, V): draft distributions the draft tokens were sampled from; ``None``
    means deterministic drafts (a point mass on each draft token, as prompt lookup).
    ``draft`` (k,): the draft tokens. Returns ``(n_accepted, next_token)`` where
    ``next_token`` is the resampled token after a rejection, or a bonus token drawn
    from ``p[k]`` when every draft token was accepted.
    """
    k = draft.shape[0]
    if k:
        rows = torch.arange(k)
        p_x = p[rows, draft]  # (k,)
        q_x = torch.ones_like(p_x) if q is None else q[rows, draft]
        u = torch.rand(k, generator=gen)
        # accept x_i if u_i <= p(x_i) / q(x_i)  (Algorithm 1, step "r_i < p/q"); written without division
        ok = u * q_x <= p_x
        bad = (~ok).nonzero()
        n = int(bad[0, 0]) if bad.numel() else k
    else:
        n = 0
    if n == k:
        return n, int(torch.multinomial(p[k], 1, generator=gen))
    x = int(draft[n])
    if q is None:
        residual = p[n].clone()
        residual[x] = 0.0  # max(0, p - onehot(x)) = p with x removed
    else:
        residual = (p[n] - q[n]).clamp_min(0.0)  # p'(x) = norm(max(0, p(x) - q(x)))
    total = residual.sum()
    if not total > 0:  # p == q on the support: a rejection had probability 0 (round-off); fall back to p
        residual, total = p[n], p[n].sum()
    return n, int(torch.multinomial(residual / total, 1, generator=gen))


def expected_tokens_per_cost(alpha: float, k: int, cost_ratio: float, verify_cost: float) -> float:
    """Expected emitted tokens per unit of target-step time for draft length ``k``.

    Leviathan et al. 2023, Eq. 1: E[tokens] = (1 - alpha^(k+1)) / (1 - alpha); one step costs
    ``k * c`` draft time plus one verification, which we model as ``1 + verify_cost * k``.
    """
    tokens = float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * cost_ratio + 1 + verify_cost * k)


def choose_draft_length(alpha: float, cost_ratio: float, verify_cost: float, k_max: int) -> int:
    """The k in [1, k_max] that maximises :func:`expected_tokens_per_cost`."""
    return max(range(1, k_max + 1), key=lambda k: expected_tokens_per_cost(alpha, k, cost_ratio, verify_cost))


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


# --------------------------------------------------------------------------- cached models


class CachedLM:
    """A causal LM plus its KV cache; ``n`` is how many context tokens the cache holds."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.n = 0
        self.calls = 0

    def feed(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Run ``ids`` (T,) after the cached context; logits (keep, V) of the last ``keep`` positions."""
        out = self.model(input_ids=ids[None], cache=self.cache, use_cache=True, logits_to_keep=keep)
        self.cache = out.cache
        self.n += ids.shape[0]
        self.calls += 1
        return out.logits[0]

    def feed_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Like :meth:`feed` but returns the last position's final hidden state (H,), no LM head."""
        out = self.model.base_model(input_ids=ids[None], cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.n += ids.shape[0]
        self.calls += 1
        return out.last_hidden_state[0, -1]

    def crop(self, n: int) -> None:
        """Forget every cached token past the first ``n``."""
        if n < self.n:
            self.cache.crop(n - self.n)  # transformers 5: a negative value removes that many tokens
            self.n = n


class _FastLM:
    """The target on slmkit's fast path (weights shared with the transformers model): same interface as :class:`CachedLM`."""

    def __init__(self, model, capacity: int):
        from slmkit.runtime import generate as G

        dt = next(model.parameters()).dtype
        self.G = G
        self.fm = G.build(model, G.FastConfig(dtype="bf16" if dt == torch.bfloat16 else "fp32"))
        self.cache = self.fm.new_cache("full", context=min(self.fm.max_positions, capacity))
        self.n = 0
        self.calls = 0

    def feed(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        out = self.G.forward(self.fm, [self.G.Segment(ids.cpu(), self.cache, all_logits=keep > 1)])[0]
        self.n += ids.shape[0]
        self.calls += 1
        return out[-keep:] if keep > 1 else out[None]

    def crop(self, n: int) -> None:
        if n < self.n:
            self.cache.rewind(n)
            self.n = n


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_same_vocab(target, draft) -> None:
    """Speculative decoding compares token ids, so both models must share one vocabulary."""
    vt, vd = _vocab_size(target), _vocab_size(draft)
    if vt != vd:
        raise UnsupportedModelError(
            f"the draft's vocabulary ({vd} tokens) differs from the target's ({vt}); speculative decoding "
            "needs both models to use the same tokenizer",
            "use a draft from the same family (a pruned or distilled copy), or --draft lookup",
        )


def check_same_tokenizer(tok_a, tok_b, what: str = "these models") -> None:
    """Raise :class:`UnsupportedModelError` unless both tokenizers map the same strings to the same ids."""
    if tok_a is tok_b:
        return
    if len(tok_a) != len(tok_b) or tok_a.get_vocab() != tok_b.get_vocab():
        raise UnsupportedModelError(
            f"{what} need one shared tokenizer, but the two tokenizers differ "
            f"({len(tok_a)} vs {len(tok_b)} tokens{'' if len(tok_a) != len(tok_b) else ', different ids'})",
            "pick models of the same family (e.g. a pruned or distilled copy of the large one)",
        )


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
    import copy

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


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def as_ids(ids) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise ConfigError(f"speculative decoding takes one sequence, got a batch of {t.shape[0]}")
        t = t[0]
    if t.numel() == 0:
        raise ConfigError("the prompt is empty: pass at least one token (e.g. the BOS token)")
    return t.cpu()


# --------------------------------------------------------------------------- decoding loops


def _pick(logits: torch.Tensor, cfg: SpecConfig, gen: torch.Generator | None) -> int:
    if cfg.temperature == 0:
        return int(logits.argmax(-1))
    return int(torch.multinomial(token_probs(logits, cfg.temperature, cfg.top_p), 1, generator=gen))


def finish_output(out: SpecOutput, cfg: SpecConfig) -> SpecOutput:
    """Cut at the first EOS and at max_new_tokens."""
    eos = set(cfg.eos_token_ids)
    for i, t in enumerate(out.tokens):
        if t in eos:
            out.tokens = out.tokens[: i + 1]
            out.finish_reason = "stop"
            return out
    out.tokens = out.tokens[: cfg.max_new_tokens]
    return out


@torch.inference_mode()
def autoregressive(target, ids, cfg: SpecConfig, gen: torch.Generator | None = None) -> SpecOutput:
    """The target alone, one token per forward pass, with the same cache and sampling code
    as :func:`speculate` (the baseline its speed-up is measured against)."""
    t0 = time.perf_counter()
    ctx = as_ids(ids)
    dev = model_device(target)
    lm = CachedLM(target)
    out = SpecOutput(tokens=[])
    eos = set(cfg.eos_token_ids)
    nxt = ctx.to(dev)
    while len(out.tokens) < cfg.max_new_tokens:
        tok = _pick(lm.feed(nxt, 1)[-1], cfg, gen)
        out.tokens.append(tok)
        if tok in eos:
            break
        nxt = torch.tensor([tok], device=dev)
    out.target_calls = lm.calls
    out.seconds = time.perf_counter() - t0
    return finish_output(out, cfg)


def _draft_tokens(next_logits: Callable[[torch.Tensor], torch.Tensor], unseen: torch.Tensor, k: int, cfg: SpecConfig, gen,
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
            t = int(torch.multinomial(q, 1, generator=gen))
            if vocab is not None:
                q = torch.zeros(n_full).index_copy_(0, vocab, q)
            qs.append(q)
        if vocab is not None:
            t = int(vocab[t])
        toks.append(t)
        feed = torch.tensor([t], device=dev)
    return torch.tensor(toks, dtype=torch.long), (torch.stack(qs) if qs else None)


class Drafter(Protocol):
    """Proposes draft tokens after a context; ``q`` is None for deterministic drafts."""

    calls: int

    def propose(self, ctx: torch.Tensor, k: int, cfg: SpecConfig, gen) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def keep(self, n: int) -> None:
        """Only the first ``n`` tokens of the last context are still valid."""
        ...


class ModelDrafter:
    """Drafts with a small causal LM that shares the target's vocabulary.

    ``vocab`` (optional, 1-D ids): the draft scores only these tokens (FR-Spec); its
    distribution ``q`` is zero elsewhere, which the rejection rule handles exactly.
    :func:`frequent_vocab` builds one. Needs a plain linear LM head (no logit soft-capping).
    """

    def __init__(self, model, vocab: torch.Tensor | None = None):
        self.lm = CachedLM(model)
        self.dev = model_device(model)
        self.model = model
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

    def propose(self, ctx: torch.Tensor, k: int, cfg: SpecConfig, gen):
        n_full = self.n_full if self.vocab is not None else None
        return _draft_tokens(self._next_logits, ctx[self.lm.n :], k, cfg, gen, self.dev, self.vocab, n_full)

    def keep(self, n: int) -> None:
        self.lm.crop(n)


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
    target while agreeing with it on most tokens.
    """

    def __init__(self, fm):
        self.fm = fm
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

        self.calls += 1
        return G.forward(self.fm, [G.Segment(feed, self.cache)])[0]

    def propose(self, ctx: torch.Tensor, k: int, cfg: SpecConfig, gen):
        self._ensure(ctx.shape[0] + k)
        return _draft_tokens(self._next_logits, ctx[self.cache.seen :], k, cfg, gen)

    def keep(self, n: int) -> None:
        if self.cache is not None:
            self.cache.rewind(n)


def quantised_draft(target, weights: str = "int4") -> FastDrafter:
    """The target's own copy with ``weights`` ("int4" or "int8") on the fast path, as a draft (llama models)."""
    from slmkit.runtime import generate as G

    if weights not in ("int4", "int8"):
        raise ConfigError(f"a quantised draft is int4 or int8, got {weights!r}")
    if not G.supports(target):
        raise UnsupportedModelError(
            f"--draft {weights} drafts with the target on slmkit's fast path, which runs llama-architecture models only",
            "give a draft model, 'layers:N' or 'lookup'",
        )
    return FastDrafter(G.build(target, G.FastConfig(weights=weights)))


def resolve_draft(spec: str, target, target_tok, dtype: str = "fp32", what: str = "the draft"):
    """A draft named on the command line (``slmkit speculate --draft``, ``slmkit serve SMALL --mode speculative``).

    ``"lookup"``, ``"int4"``/``"int8"`` (the target's own quantised copy), ``"layers:N"`` (its first N
    blocks), or a MODEL spec, whose tokenizer is compared with the target's before its weights load.
    A quantised llama FILE.gguf or packed quantised DIR drafts on the fast path with its own codes
    (:func:`slmkit.runtime.gguffast.build_gguf`) where slmkit's kernel library runs.
    """
    if spec == "lookup":
        return "lookup"
    if spec in ("int4", "int8"):
        return quantised_draft(target, spec)
    if spec.startswith("layers:"):
        n = spec.split(":", 1)[1]
        try:
            return layer_draft(target, int(n))
        except ValueError:
            raise ConfigError(f"{what} layers:N needs an integer N, got {spec!r}") from None
    from slmkit.models import load
    from slmkit.models.load import load_tokenizer

    check_same_tokenizer(target_tok, load_tokenizer(spec), f"{what} and the target")
    model = load(spec, dtype=dtype)[0]
    from slmkit.runtime import generate as G
    from slmkit.runtime.gguffast import build_gguf, file_codes

    path = file_codes(spec, None, require_fast=False)  # the draft's numerics never change the output: its own codes when it can
    if path is not None and G.supports(model):
        return FastDrafter(build_gguf(path, model=model))
    return model


class LookupDrafter:
    """Prompt-lookup drafting: no model, copies continuations of earlier n-grams."""

    calls = 0

    def propose(self, ctx: torch.Tensor, k: int, cfg: SpecConfig, gen):
        return lookup_draft(ctx, k, cfg.ngram_max, cfg.ngram_min), None

    def keep(self, n: int) -> None:
        pass


@torch.inference_mode()
def speculate(
    target, draft, ids, cfg: SpecConfig, gen: torch.Generator | None = None,
    on_tokens: Callable[[list[int]], bool | None] | None = None,
) -> SpecOutput:
    """Generate up to ``cfg.max_new_tokens`` tokens after ``ids`` with ``target``, drafted by ``draft``.

    ``on_tokens(tokens)``, if given, receives each verified chunk (the accepted drafts
    plus the target's next token, cut after an EOS) as soon as it is accepted, for
    streaming; when it returns True, decoding stops there (``finish_reason`` "stop").

    ``draft`` is a causal LM sharing the target's vocabulary, a :class:`ModelDrafter`
    (e.g. with a reduced vocabulary), a :class:`FastDrafter`, ``"int4"``/``"int8"`` (the target's
    own quantised copy on the fast path), or ``"lookup"`` (or None) for prompt-lookup drafting. ``gen`` drives every random draw (sampling only).
    Greedy output equals :func:`autoregressive` on the target; sampled output is
    distributed as the target's (see the module docstring).
    """
    t0 = time.perf_counter()
    ctx = as_ids(ids)
    if draft is None or (isinstance(draft, str) and draft == "lookup"):
        drafter: Drafter = LookupDrafter()
        c = 0.0 if cfg.cost_ratio is None else cfg.cost_ratio
    elif isinstance(draft, str) and draft in ("int4", "int8"):
        drafter = quantised_draft(target, draft)
        c = _fast_cost(drafter.fm, target, cfg)
    elif isinstance(draft, str):
        raise ConfigError(f"draft must be a model, 'lookup', 'int4' or 'int8', got {draft!r}")
    elif isinstance(draft, FastDrafter):
        if draft.fm.vocab != _vocab_size(target):
            raise ConfigError(f"the draft's vocabulary ({draft.fm.vocab}) differs from the target's ({_vocab_size(target)})")
        drafter, c = FastDrafter(draft.fm), _fast_cost(draft.fm, target, cfg)  # fresh cache for this call
    elif isinstance(draft, ModelDrafter):
        check_same_vocab(target, draft.model)
        drafter = ModelDrafter(draft.model, draft.vocab)  # fresh cache for this call
        n_draft = _param_count(draft.model)
        if draft.vocab is not None:  # the LM head now scores only |vocab| rows
            w = draft.model.get_output_embeddings().weight
            n_draft -= (w.shape[0] - draft.vocab.numel()) * w.shape[1]
        c = cfg.cost_ratio if cfg.cost_ratio is not None else min(0.95, max(0.01, n_draft / _param_count(target)))
    else:
        check_same_vocab(target, draft)
        drafter = ModelDrafter(draft)
        c = cfg.cost_ratio if cfg.cost_ratio is not None else min(0.95, _param_count(draft) / _param_count(target))
    dev = model_device(target)
    if cfg.fast_target:
        from slmkit.runtime.generate import supports

        if not supports(target):
            raise UnsupportedModelError("fast_target verifies on slmkit's fast path, which runs llama-architecture models only",
                                        "leave fast_target off")
        tgt = _FastLM(target, ctx.shape[0] + cfg.max_new_tokens + cfg.k_max + 1)
    else:
        tgt = CachedLM(target)
    out = SpecOutput(tokens=[])
    eos = set(cfg.eos_token_ids)
    # running acceptance estimate: accepted / Bernoulli trials seen, with exponential forgetting
    acc_sum, trial_sum = 2 * cfg.prior_acceptance, 2.0
    k = cfg.k
    n_prompt = ctx.shape[0]
    if n_prompt > 1:  # prefill all but the last token; the last is fed with the first draft
        tgt.feed(ctx[:-1].to(dev), 1)
    while len(out.tokens) < cfg.max_new_tokens:
        remaining = cfg.max_new_tokens - len(out.tokens)
        k_step = min(k, remaining - 1)
        d_toks, q = drafter.propose(ctx, k_step, cfg, gen) if k_step > 0 else (ctx[:0], None)
        kd = d_toks.shape[0]
        # verification: one target pass over the unseen context tail plus the drafts
        feed = torch.cat([ctx[tgt.n :], d_toks]).to(dev)
        logits = tgt.feed(feed, kd + 1).cpu()  # (kd+1, V): position i predicts the token after draft i
        if cfg.temperature == 0:
            n_acc, nxt = greedy_accept(logits.argmax(-1), d_toks)
        else:
            p = token_probs(logits, cfg.temperature, cfg.top_p)
            n_acc, nxt = rejection_accept(p, q, d_toks, gen)
        new = [*d_toks[:n_acc].tolist(), nxt]
        base = ctx.shape[0]
        tgt.crop(base + n_acc)  # drop the rejected drafts' keys and values
        drafter.keep(base + n_acc)
        ctx = torch.cat([ctx, torch.tensor(new, dtype=torch.long)])
        out.tokens.extend(new)
        out.drafted += kd
        out.accepted += n_acc
        out.draft_lengths.append(kd)
        if on_tokens is not None:
            cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            if on_tokens(new[:cut]):
                out.finish_reason = "stop"
                break
        if kd:
            acc_sum = cfg.decay * acc_sum + n_acc
            trial_sum = cfg.decay * trial_sum + n_acc + (1 if n_acc < kd else 0)
        if cfg.adaptive:
            alpha = min(0.99, max(0.01, acc_sum / trial_sum))
            k = choose_draft_length(alpha, c, cfg.verify_cost, cfg.k_max)
        if eos.intersection(new):
            break
    out.target_calls = tgt.calls
    out.draft_calls = drafter.calls
    out.seconds = time.perf_counter() - t0
    return finish_output(out, cfg)


def _fast_cost(fm, target, cfg: SpecConfig) -> float:
    """Draft/target cost ratio of a fast-path draft: decoding is memory-bound, so bytes of weights read per token."""
    if cfg.cost_ratio is not None:
        return cfg.cost_ratio
    tbytes = sum(p.numel() * p.element_size() for p in target.parameters())
    return min(0.95, max(0.01, fm.weight_bytes_per_token() / tbytes))


def speedup(baseline: SpecOutput, fast: SpecOutput) -> float:
    """Throughput ratio (tokens/s of ``fast`` over tokens/s of ``baseline``)."""
    if not baseline.tokens or not fast.tokens or baseline.seconds <= 0 or fast.seconds <= 0:
        return math.nan
    return fast.tokens_per_s / baseline.tokens_per_s
