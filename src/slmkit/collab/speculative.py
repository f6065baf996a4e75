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
  (:class:`~slmkit.collab.drafters.FastDrafter`, :mod:`slmkit.runtime.generate`); the target still verifies in full
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

Engines and caches: a llama target on CPU verifies on slmkit's fast path
(:mod:`slmkit.runtime.generate`; one :func:`~slmkit.runtime.generate.forward` scores the k+1
positions at once, weights shared with the transformers model, fp32 or bf16), other targets through
their transformers forward with a ``DynamicCache``. The drafts (:mod:`slmkit.collab.drafters`)
keep their own caches. After a rejection every cache is rolled back to the accepted prefix (the
fast path's ``FullCache.rewind`` moves its fill mark; ``DynamicCache.crop`` drops the tail).

Draft length: :mod:`slmkit.collab.draftlen` chooses the source (draft model or prompt lookup) and
k each step from measured costs and running acceptance, k = 0 (plain decoding) when drafting does
not pay. Its estimates carry over from one call to the next with the same draft object and target
(``SpecConfig.remember``), so a poor draft's first try is paid once per draft, not once per prompt.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slmkit.collab.draftlen import REMEMBER_STEPS, DraftController
from slmkit.collab.drafters import DRAFT_WEIGHTS, as_drafter, lookup_draft
from slmkit.collab.lm import (  # noqa: F401  (CachedLM, check_same_tokenizer, ...: importable from here as before)
    CachedLM,
    FastLM,
    check_same_tokenizer,
    check_same_vocab,
    model_device,
    token_probs,
)
from slmkit.errors import ConfigError, UnsupportedModelError
from slmkit.runtime.decoding import draw

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecConfig:
    """Knobs of speculative decoding."""

    max_new_tokens: int = 128  #: tokens to generate at most
    k: int = 4  #: draft length when not adaptive (tokens)
    first_k: int = 1  #: adaptive: draft length of the first step, which measures the draft's cost and acceptance (short: a poor draft's first try costs little)
    k_max: int = 12  #: longest draft the adaptive rule may choose (tokens)
    adaptive: bool = True  #: choose source and k (0 = plain decoding) each step from measured costs and acceptance (else k stays fixed)
    temperature: float = 0.0  #: 0 = greedy; > 0 samples with the exact rejection rule
    top_p: float = 1.0  #: nucleus mass applied to both target and draft distributions, in (0, 1]
    cost_ratio: float | None = None  #: fixed draft-token cost / target step cost; None = measured while decoding
    verify_cost: float = 0.03  #: extra target cost per additional verified token (fraction of one step): fixed with cost_ratio, else the prior, which the fitted slope is shrunk towards until draftlen.PRIOR_PASSES multi-token passes were timed
    decay: float = 0.9  #: forgetting factor of the running acceptance estimate, in (0, 1]
    prior_acceptance: float = 0.6  #: acceptance rate assumed before any draft was checked
    ngram_max: int = 3  #: prompt lookup: longest n-gram matched
    ngram_min: int = 1  #: prompt lookup: shortest n-gram matched
    eos_token_ids: tuple[int, ...] = ()  #: generation stops after emitting one of these
    probe_every: int = 32  #: plain steps before re-trying a draft that did not pay (doubles after each failed probe; scaled by 2 (1 - rate) for a draft whose expected rate is above 0.5)
    probe_max: int = 128  #: longest gap between such probes (plain steps)
    fast_target: bool | None = None  #: verify on slmkit's fast path (llama on CPU; transformers' fp32 logits up to fp32 rounding: multi-token passes use kernels/f32.c); None = speculate does when it can, autoregressive does not
    draft_weights: str = "int4"  #: a draft given as a model drafts on slmkit's fast path with these weights ("int4", "int8", "native") where it can, or with transformers' forward ("hf"); the output never depends on it
    remember: bool = True  #: start from the controller's estimates of the last call (of at least draftlen.REMEMBER_STEPS steps) with the same draft object, target, draft_weights and target engine (a poor draft is tried once per draft, not per prompt)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.k <= self.k_max:
            raise ConfigError(f"k must be in [0, k_max={self.k_max}], got {self.k}")
        if not 1 <= self.first_k <= self.k_max:
            raise ConfigError(f"first_k must be in [1, k_max={self.k_max}], got {self.first_k}")
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
        if not 1 <= self.probe_every <= self.probe_max:
            raise ConfigError(f"need 1 <= probe_every <= probe_max, got {self.probe_every}, {self.probe_max}")
        if self.draft_weights not in DRAFT_WEIGHTS:
            raise ConfigError(f"draft_weights must be one of {', '.join(DRAFT_WEIGHTS)}, got {self.draft_weights!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))


@dataclass
class SpecOutput:
    """What a speculative (or plain) decoding run produced."""

    tokens: list[int]  #: generated token ids (prompt excluded; a final EOS included)
    drafted: int = 0  #: draft tokens proposed
    accepted: int = 0  #: draft tokens the target accepted
    target_calls: int = 0  #: target forward passes (the first also reads the prompt: no separate prefill)
    draft_calls: int = 0  #: draft forward passes (prefill included)
    draft_lengths: list[int] = field(default_factory=list)  #: k chosen at each step (0: a plain target step)
    lookup_drafted: int = 0  #: of ``drafted``, tokens drafted by prompt lookup
    lookup_accepted: int = 0  #: of ``accepted``, prompt-lookup tokens accepted
    finish_reason: str = "length"  #: "stop" (EOS) or "length"
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------- pure rules


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
        return n, draw(p[k], gen)
    x = int(draft[n])
    if q is None:
        residual = p[n].clone()
        residual[x] = 0.0  # max(0, p - onehot(x)) = p with x removed
    else:
        residual = (p[n] - q[n]).clamp_min(0.0)  # p'(x) = norm(max(0, p(x) - q(x)))
    total = residual.sum()
    if not total > 0:  # p == q on the support: a rejection had probability 0 (round-off); fall back to p
        residual, total = p[n], p[n].sum()
    return n, draw(residual / total, gen)


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
    return draw(token_probs(logits, cfg.temperature, cfg.top_p), gen)


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


def _target_lm(target, cfg: SpecConfig, capacity: int, default: bool):
    """The target's engine: the fast path when ``cfg.fast_target`` (None: ``default``) and it can, else transformers."""
    from slmkit.runtime.generate import supports

    want = default if cfg.fast_target is None else cfg.fast_target
    can = supports(target) and model_device(target).type == "cpu"
    if cfg.fast_target and not can:
        raise UnsupportedModelError("fast_target verifies on slmkit's fast path, which runs the architectures slmkit.runtime.arch describes, on CPU only",
                                    "leave fast_target unset")
    return FastLM(target, capacity) if want and can else CachedLM(target)


@torch.inference_mode()
def autoregressive(target, ids, cfg: SpecConfig, gen: torch.Generator | None = None) -> SpecOutput:
    """The target alone, one token per forward pass, with the same cache and sampling code
    as :func:`speculate` (the baseline its speed-up is measured against). It runs transformers'
    forward unless ``cfg.fast_target`` is True (then slmkit's fast path, the engine speculate verifies on)."""
    t0 = time.perf_counter()
    ctx = as_ids(ids)
    lm = _target_lm(target, cfg, ctx.shape[0] + cfg.max_new_tokens + 1, default=False)
    dev = model_device(target) if isinstance(lm, CachedLM) else torch.device("cpu")
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


@torch.inference_mode()
def hf_generate(target, ids, cfg: SpecConfig, seed: int = 0) -> SpecOutput:
    """The target alone through transformers' own ``generate`` (the plain baseline users know), same
    stopping and sampling settings (temperature, top-p, no top-k); its seconds include the whole call."""
    ctx = as_ids(ids).to(model_device(target))[None]
    kw = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if cfg.temperature == 0 else \
        {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
    eos = list(cfg.eos_token_ids)
    if cfg.temperature > 0:
        torch.manual_seed(seed)  # generate draws from the global generator
    t0 = time.perf_counter()
    res = target.generate(ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=cfg.max_new_tokens,
                          min_new_tokens=0, eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0, **kw)
    out = SpecOutput(tokens=res[0, ctx.shape[1]:].tolist(), target_calls=len(res[0]) - ctx.shape[1])
    out.seconds = time.perf_counter() - t0
    return finish_output(out, cfg)


@torch.inference_mode()
def speculate(
    target, draft, ids, cfg: SpecConfig, gen: torch.Generator | None = None,
    on_tokens: Callable[[list[int]], bool | None] | None = None,
) -> SpecOutput:
    """Generate up to ``cfg.max_new_tokens`` tokens after ``ids`` with ``target``, drafted by ``draft``.

    ``on_tokens(tokens)``, if given, receives each verified chunk (the accepted drafts
    plus the target's next token, cut after an EOS) as soon as it is accepted, for
    streaming; when it returns True, decoding stops there (``finish_reason`` "stop").

    ``draft`` is a causal LM sharing the target's vocabulary, a drafter from :mod:`slmkit.collab.drafters`
    (e.g. a :class:`~slmkit.collab.drafters.ModelDrafter` with a reduced vocabulary or a
    :class:`~slmkit.collab.drafters.FastDrafter`), ``"int4"``/``"int8"`` (the target's own quantised copy on
    the fast path, with prompt lookup when the context repeats), or ``"lookup"`` (or None) for prompt lookup
    alone. ``gen`` drives every random draw (sampling only). Greedy output equals :func:`autoregressive` on
    the target; sampled output is distributed as the target's (see the module docstring).
    """
    t0 = time.perf_counter()
    ctx = as_ids(ids)
    drafter = as_drafter(draft, target, cfg.draft_weights)
    tgt = _target_lm(target, cfg, ctx.shape[0] + cfg.max_new_tokens + cfg.k_max + 1, default=True)
    dev = model_device(target) if isinstance(tgt, CachedLM) else torch.device("cpu")
    ctl = DraftController(cfg, drafter.has_model, drafter.lookup)
    engines = (cfg.draft_weights, isinstance(tgt, FastLM))  # the measured costs are these engines' costs
    if cfg.remember:
        _recall(ctl, draft, target, engines)
    out = SpecOutput(tokens=[])
    eos = set(cfg.eos_token_ids)
    # no separate prefill: the first pass reads the prompt with the first step's drafts (a plain first step would
    # otherwise cost one more target pass)
    while len(out.tokens) < cfg.max_new_tokens:
        room = cfg.max_new_tokens - len(out.tokens) - 1  # drafts beyond this could never be emitted
        look = lookup_draft(ctx, min(cfg.k_max, room), cfg.ngram_max, cfg.ngram_min) if drafter.lookup and room > 0 else ctx[:0]
        seen = getattr(drafter, "seen", None) if drafter.has_model else None
        unseen = max(0, ctx.shape[0] - 1 - seen) if seen is not None else 0  # what the model draft must read first
        source, k = ctl.choose(room, look.shape[0], unseen)
        t = time.perf_counter()
        if source == "lookup":
            d_toks, q = look[:k], None
        elif k > 0:
            catch_up = getattr(drafter, "catch_up", None)  # optional: drafters written before it still work
            if catch_up is not None:  # timed apart: a cost of switching to the model, not of each draft token
                catch_up(ctx)
                ctl.caught_up(unseen, time.perf_counter() - t)
                t = time.perf_counter()
            d_toks, q = drafter.propose(ctx, k, cfg, gen)
        else:
            d_toks, q = ctx[:0], None
        kd = d_toks.shape[0]
        ctl.drafted(source, kd, time.perf_counter() - t)
        # verification: one target pass over the unseen context tail plus the drafts
        t = time.perf_counter()
        feed = torch.cat([ctx[tgt.n :], d_toks]).to(dev)
        logits = tgt.feed(feed, kd + 1).cpu()  # (kd+1, V): position i predicts the token after draft i
        if cfg.temperature == 0:
            n_acc, nxt = greedy_accept(logits.argmax(-1), d_toks)
        else:
            n_acc, nxt = rejection_accept(token_probs(logits, cfg.temperature, cfg.top_p), q, d_toks, gen)
        if feed.shape[0] == kd + 1:  # the first pass also reads the prompt: not a verification's cost
            ctl.verified(feed.shape[0], time.perf_counter() - t)
        new = [*d_toks[:n_acc].tolist(), nxt]
        base = ctx.shape[0]
        tgt.crop(base + n_acc)  # roll back: the rejected drafts' keys and values are forgotten
        drafter.keep(base + n_acc)
        ctx = torch.cat([ctx, torch.tensor(new, dtype=torch.long)])
        out.tokens.extend(new)
        out.drafted += kd
        out.accepted += n_acc
        out.draft_lengths.append(kd)
        if kd:
            ctl.accepted(source, n_acc, kd)
        if source == "lookup":
            out.lookup_drafted += kd
            out.lookup_accepted += n_acc
        if look.numel() and (source != "lookup" or not kd):
            ctl.shadow(look.tolist(), new)
        if on_tokens is not None:
            cut = next((i + 1 for i, x in enumerate(new) if x in eos), len(new))
            if on_tokens(new[:cut]):
                out.finish_reason = "stop"
                break
        if eos.intersection(new):
            break
    out.target_calls = tgt.calls
    out.draft_calls = drafter.calls
    out.seconds = time.perf_counter() - t0
    if cfg.remember and len(out.draft_lengths) >= REMEMBER_STEPS:
        _keep(ctl, draft, target, engines)
    return finish_output(out, cfg)


#: the controller of the last call per draft object: draft -> (weak reference to the target, engines, DraftController)
_controllers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rememberable(draft) -> bool:
    """A draft object the controller's estimates can be kept for: not made afresh per call (a string, None), hashable
    and weakly referenceable (the keys of ``_controllers``)."""
    if draft is None or isinstance(draft, str):
        return False
    try:
        hash(draft), weakref.ref(draft)
    except TypeError:
        return False
    return True


def _recall(ctl: DraftController, draft, target, engines: tuple) -> None:
    """Start ``ctl`` from the last call's estimates with the same ``draft`` object, ``target`` and ``engines``
    (``(cfg.draft_weights, verifies on the fast path)``: seconds timed on one engine misprice another), if any."""
    hit = _controllers.get(draft) if _rememberable(draft) else None
    if hit is not None and hit[0]() is target and hit[1] == engines:
        ctl.carry_over(hit[2])


def _keep(ctl: DraftController, draft, target, engines: tuple) -> None:
    if _rememberable(draft):
        _controllers[draft] = (weakref.ref(target), engines, ctl)


def speedup(baseline: SpecOutput, fast: SpecOutput) -> float:
    """Throughput ratio (tokens/s of ``fast`` over tokens/s of ``baseline``)."""
    if not baseline.tokens or not fast.tokens or baseline.seconds <= 0 or fast.seconds <= 0:
        return math.nan
    return fast.tokens_per_s / baseline.tokens_per_s
