"""Distillation losses over teacher and student logits.

Every divergence is a pure function of two log-probability tensors over the
same support, ``(N, V)`` teacher ``log p`` and student ``log q``, returning one
value per token ``(N,)``. Everything stays in log space (``log_softmax``,
``logsumexp``) and is computed in float32 whatever the logits' dtype, so bf16
logits give the fp32 answer up to bf16 rounding of the inputs.

Divergences (P = teacher, Q = student):

* ``fkl``  forward KL, KL(P || Q): mode covering (Hinton et al. 2015, word-level KD).
* ``rkl``  reverse KL, KL(Q || P): mode seeking (MiniLLM, Gu et al. 2024).
* ``jsd``  generalised JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M),
  M = beta P + (1 - beta) Q (GKD, Agarwal et al. 2024, Eq. 1); beta = 0.5 is the
  symmetric Jensen-Shannon divergence.
* ``skl``  skew KL, KL(P || alpha P + (1 - alpha) Q) (DistiLLM, Ko et al. 2024).
* ``srkl`` skew reverse KL, KL(Q || alpha Q + (1 - alpha) P) (DistiLLM).
* ``tvd``  total variation, 1/2 sum |p - q|.
* ``ce``   plain cross-entropy on the data's next tokens (no teacher): the fine-tuning baseline.

Any divergence can be mixed with cross-entropy on the labels (``ce_weight``).
With a temperature ``T`` both distributions are ``softmax(z / T)`` and the
divergence is multiplied by ``T**2`` so gradient magnitudes stay comparable
across temperatures (Hinton et al. 2015, Sec. 2).

Top-k teacher logits (``top_k > 0``) keep, per token, only the teacher's k most
likely tokens; both distributions are coarse-grained onto those k tokens plus
one "everything else" bucket. That is an exact distribution over k + 1
outcomes, so every divergence stays well defined, non-negative and zero for
identical inputs (and, by the data-processing inequality, never exceeds the
full-vocabulary divergence).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slmkit.errors import ConfigError
from slmkit.registry import Registry

IGNORE_INDEX = -100

#: (teacher log p (N, V), student log q (N, V), config) -> per-token divergence (N,)
DivergenceFn = Callable[[torch.Tensor, torch.Tensor, "LossConfig"], torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """A registered loss: its per-token function, whether it needs the teacher at all, and its config class."""

    fn: DivergenceFn | None  #: None for pure cross-entropy
    uses_teacher: bool = True
    summary: str = ""
    config: type | None = None  #: a frozen subclass of LossConfig holding the loss's own knobs (None: LossConfig)


LOSSES: Registry[Divergence] = Registry("loss")


@dataclass(frozen=True)
class LossConfig:
    """Knobs of :func:`distill_loss`."""

    loss: str = "fkl"  #: a name in LOSSES: fkl, rkl, jsd, skl, srkl, tvd, ce
    temperature: float = 1.0  #: softmax temperature T (> 0); the divergence is scaled by T**2
    beta: float = 0.5  #: JSD interpolation beta in (0, 1) (GKD uses 0.1 / 0.5 / 0.9)
    alpha: float = 0.1  #: skew alpha in (0, 1) for skl / srkl (DistiLLM's default 0.1)
    ce_weight: float = 0.0  #: loss = (1 - w) * divergence + w * cross-entropy, w in [0, 1]
    top_k: int = 0  #: keep only the teacher's top-k tokens (+ a tail bucket); 0 = full vocabulary

    def __post_init__(self):
        own = LOSSES.get(self.loss).config  # unknown name -> ConfigError listing the known ones
        if own is not None and not isinstance(self, own):
            raise ConfigError(f"loss {self.loss!r} takes a {own.__name__} (its own knobs), got {type(self).__name__}",
                              "build it with slmkit.train.losses.loss_config")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.beta < 1:
            raise ConfigError(f"jsd beta must be in (0, 1), got {self.beta}", "beta -> 0 or 1 is fkl / rkl: use those")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"skew alpha must be in (0, 1), got {self.alpha}")
        if not 0 <= self.ce_weight <= 1:
            raise ConfigError(f"ce_weight must be in [0, 1], got {self.ce_weight}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def divergence(self) -> Divergence:
        return LOSSES.get(self.loss)

    @property
    def uses_teacher(self) -> bool:
        return self.divergence.uses_teacher and self.ce_weight < 1


def loss_config(settings: dict, options: dict | None = None, label: str = "options", own: str = "setting") -> LossConfig:
    """A :class:`LossConfig` from the shared ``settings`` (CLI flags or stage keys) and ``options``: any other
    field (e.g. a new loss's own knob), named ``label`` in errors; an option that is one of ``settings`` has
    its ``own`` flag or key."""
    options = dict(options or {})
    twice = sorted(set(options) & set(settings))
    if twice:
        raise ConfigError(f"{label} {', '.join(twice)}: has its own {own}")
    cls = LOSSES.get(settings.get("loss", "fkl")).config or LossConfig  # a loss's own config class, if it has one
    fields = {f.name for f in dataclasses.fields(cls)}
    stray = sorted(set(options) - fields)
    if stray:
        raise ConfigError(f"{label} {', '.join(stray)}: not a setting of the loss",
                          f"the loss takes: {', '.join(sorted(fields - set(settings)))}")
    return cls(**settings, **options)


# ---------------------------------------------------------------- divergences (pure)


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_v p_v (log p_v - log q_v) from log-probs; 0 log 0 = 0. (N, V) -> (N,)"""
    p = lp.exp()
    term = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return term.sum(-1)


def divergence(name: str, *aliases: str, summary: str,
               config: type | None = None) -> Callable[[DivergenceFn], DivergenceFn]:
    """Register a per-token divergence ``fn(lp, lq, cfg) -> (N,)`` under ``name`` as a :class:`Divergence`.

    A new loss is one such function (here or in a new module of this package) and a test; its own knobs, if any, are the fields of
    ``config``, a frozen dataclass subclassing :class:`LossConfig` (``cfg`` is then one of those), set
    with ``--loss-option KEY=VALUE`` or the distill stage's ``loss_options:``. ``--loss NAME`` and the
    stage's ``loss: NAME`` find it by name."""
    if config is not None and not (isinstance(config, type) and issubclass(config, LossConfig)):
        raise TypeError(f"loss {name!r}: config must be a dataclass subclassing LossConfig, got {config!r}")

    def deco(fn: DivergenceFn) -> DivergenceFn:
        LOSSES.register(name, *aliases)(Divergence(fn, True, summary, config))
        return fn

    return deco


def _log_mix(lp: torch.Tensor, lq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w P + (1 - w) Q), stably: logsumexp(log w + log p, log(1 - w) + log q)."""
    return torch.logaddexp(lp + math.log(w), lq + math.log1p(-w))


@divergence("fkl", "forward_kl", summary="forward KL(P || Q), mode covering")
def forward_kl(lp: torch.Tensor, lq: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    return _kl(lp, lq)  # KL(P || Q)


@divergence("rkl", "reverse_kl", summary="reverse KL(Q || P), mode seeking")
def reverse_kl(lp: torch.Tensor, lq: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    return _kl(lq, lp)  # KL(Q || P)


@divergence("jsd", summary="generalised JSD(beta) (GKD)")
def generalized_jsd(lp: torch.Tensor, lq: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    lm = _log_mix(lp, lq, cfg.beta)  # M = beta P + (1 - beta) Q
    return cfg.beta * _kl(lp, lm) + (1 - cfg.beta) * _kl(lq, lm)  # GKD Eq. (1)


@divergence("skl", "skew_kl", summary="skew KL(P || aP + (1-a)Q) (DistiLLM)")
def skew_kl(lp: torch.Tensor, lq: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    return _kl(lp, _log_mix(lp, lq, cfg.alpha))  # KL(P || aP + (1-a)Q) (DistiLLM skew KL)


@divergence("srkl", "skew_reverse_kl", summary="skew reverse KL(Q || aQ + (1-a)P) (DistiLLM)")
def skew_reverse_kl(lp: torch.Tensor, lq: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    return _kl(lq, _log_mix(lq, lp, cfg.alpha))  # KL(Q || aQ + (1-a)P) (DistiLLM skew reverse KL)


@divergence("tvd", "total_variation", summary="total variation distance")
def total_variation(lp: torch.Tensor, lq: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


LOSSES.add("ce", Divergence(None, False, "cross-entropy on the data's next tokens; no teacher"))


# ---------------------------------------------------------------- orchestration


def topk_buckets(lp: torch.Tensor, lq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-grain (N, V) log-probs onto the teacher's top-k tokens plus one tail bucket: (N, k + 1)."""
    k = min(k, lp.shape[-1])
    lp_k, idx = lp.topk(k, dim=-1)  # (N, k)
    lq_k = lq.gather(-1, idx)

    def tail(l_k: torch.Tensor) -> torch.Tensor:
        # log(1 - sum_k p) = log(-expm1(logsumexp(l_k))), floored so an all-in-top-k row stays finite
        rest = -torch.expm1(torch.logsumexp(l_k, -1, keepdim=True).clamp(max=0))
        return rest.clamp(min=torch.finfo(l_k.dtype).tiny).log()

    return torch.cat([lp_k, tail(lp_k)], -1), torch.cat([lq_k, tail(lq_k)], -1)


def token_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Per-token divergence (temperature-scaled by T**2) for (N, V) logits -> (N,), in float32."""
    fn = cfg.divergence.fn
    if fn is None:
        raise ConfigError(f"loss {cfg.loss!r} has no teacher divergence")
    t = cfg.temperature
    lp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    lq = F.log_softmax(student_logits.float() / t, dim=-1)
    if cfg.top_k:
        lp, lq = topk_buckets(lp, lq, cfg.top_k)
    return fn(lp, lq, cfg) * (t * t)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked mean over tokens of the configured loss, plus its parts for logging.

    ``student_logits`` / ``teacher_logits``: (B, T, V) already aligned so that
    position t predicts ``labels[:, t]`` (callers shift by one); ``labels``:
    (B, T) with ``IGNORE_INDEX`` where no loss is taken. ``teacher_logits`` may
    be None only for losses that do not use the teacher. Teacher and student
    vocabularies may differ in padding rows: both are cut to the smaller size.
    """
    mask = labels != IGNORE_INDEX  # (B, T)
    n = mask.sum()
    if n == 0:
        zero = student_logits.sum() * 0.0
        return zero, {"tokens": 0.0}
    s = student_logits[mask]  # (N, V)
    parts: dict[str, float] = {"tokens": float(n)}
    w = 1.0 if cfg.divergence.fn is None else cfg.ce_weight
    total = s.new_zeros((), dtype=torch.float32)
    if w > 0:
        ce = F.cross_entropy(s.float(), labels[mask])  # mean over the N tokens
        parts["ce"] = float(ce.detach())
        total = total + w * ce
    if w < 1:
        if teacher_logits is None:
            raise ConfigError(f"loss {cfg.loss!r} needs teacher logits")
        t = teacher_logits[mask]
        v = min(s.shape[-1], t.shape[-1])
        div = token_divergence(t[:, :v], s[:, :v], cfg).mean()
        parts[cfg.loss] = float(div.detach())
        total = total + (1 - w) * div
    return total, parts


# the package's modules: a loss registered with @divergence in a new module here is found by name
# (--loss NAME, a distill stage's loss: NAME) with no import line anywhere else
from slmkit.registry import import_package_modules  # noqa: E402

import_package_modules(__name__, __path__)
