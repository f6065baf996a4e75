"""The audit suite: a registry of the five dimensions, running a selection, and comparing two models.

Each dimension is a function ``(backend, AuditConfig, AuditContext) -> list[GroupResult]``
registered in :data:`DIMENSIONS`. A dimension's *score* (the radar chart's axis,
0 = worst, 1 = best) is the mean of its headline metrics mapped onto 0..1 by
:meth:`~slmkit.trust.common.Metric.score01` (accuracies as they are, rates of bad
behaviour as 1 - rate, CrowS-Pairs and membership AUROC as 1 - 2|v - 0.5|, bias
scores as 1 - |s|); it summarises, the per-metric tables are the result.

Comparing two audits (:func:`compare`) pairs metrics by dimension, group and
name; when both were computed on the same examples, 0/1 metrics are tested with
McNemar's exact test and others with a paired bootstrap, else with an unpaired
bootstrap (:mod:`slmkit.trust.stats`). ``significant`` means p < 0.05 for that
metric alone (no correction for the number of metrics).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from slmkit.backends.base import Backend
from slmkit.errors import ConfigError
from slmkit.registry import Registry
from slmkit.trust.common import GroupResult, Metric
from slmkit.trust.fairness import FairnessConfig, fairness
from slmkit.trust.privacy import PrivacyConfig, privacy
from slmkit.trust.reliability import ReliabilityConfig, reliability
from slmkit.trust.robustness import RobustnessConfig, robustness
from slmkit.trust.safety import SafetyConfig, ToxicityClassifier, safety, train_toxicity_classifier
from slmkit.trust.stats import STATISTICS, mcnemar, paired_bootstrap_p, unpaired_bootstrap_p

log = logging.getLogger(__name__)

DIMENSION_NAMES = ("robustness", "privacy", "reliability", "safety", "fairness")


@dataclass(frozen=True)
class AuditConfig:
    """What to audit and how much; generation lengths are per probe (see each dimension's config)."""

    dimensions: tuple[str, ...] = DIMENSION_NAMES
    limit: int = 0  #: first N examples of each data set (0 = all)
    seed: int = 0
    data_dir: str | None = None  #: folder holding truthfulqa/, bbq/, ... (default: $SLMKIT_DATA or ../shared/data)
    advglue_shots: int = 0  #: AdvGLUE demonstrations per prompt
    toxicity_samples: int = 2  #: continuations per RealToxicityPrompts prompt
    toxicity_tokens: int = 20
    refusal_tokens: int = 32
    email_tokens: int = 16
    pii_tokens: int = 24
    memorisation: bool = True  #: fine-tune a copy with canaries (local models only)
    canary_candidates: int = 1000  #: random PINs each canary is ranked among
    sycophancy: bool = True

    def __post_init__(self):
        if isinstance(self.dimensions, str):
            object.__setattr__(self, "dimensions", tuple(d.strip() for d in self.dimensions.split(",") if d.strip()))
        if not self.dimensions:
            raise ConfigError("no dimension selected", f"choose from {', '.join(DIMENSION_NAMES)}")
        for d in self.dimensions:
            DIMENSIONS.get(d)  # unknown name -> ConfigError with near matches
        if self.limit < 0:
            raise ConfigError(f"limit must be >= 0 (0 = all), got {self.limit}")


@dataclass
class AuditContext:
    """State shared by the audits of one run (e.g. two models in --compare): the toxicity classifier."""

    data_dir: str | None = None
    seed: int = 0
    _clf: ToxicityClassifier | None = None

    def toxicity_classifier(self) -> ToxicityClassifier:
        if self._clf is None:
            self._clf = train_toxicity_classifier(self.data_dir, seed=self.seed)
        return self._clf


DimensionFn = Callable[[Backend, AuditConfig, AuditContext], list[GroupResult]]
DIMENSIONS: Registry[DimensionFn] = Registry("trust dimension")


@DIMENSIONS.register("robustness")
def _robustness(b: Backend, cfg: AuditConfig, ctx: AuditContext) -> list[GroupResult]:
    return robustness(b, RobustnessConfig(limit=cfg.limit, shots=cfg.advglue_shots, seed=cfg.seed), cfg.data_dir)


@DIMENSIONS.register("privacy")
def _privacy(b: Backend, cfg: AuditConfig, ctx: AuditContext) -> list[GroupResult]:
    pc = PrivacyConfig(limit=cfg.limit, email_tokens=cfg.email_tokens, pii_tokens=cfg.pii_tokens,
                       memorisation=cfg.memorisation, candidates=cfg.canary_candidates, seed=cfg.seed)
    return privacy(b, pc, cfg.data_dir)


@DIMENSIONS.register("reliability")
def _reliability(b: Backend, cfg: AuditConfig, ctx: AuditContext) -> list[GroupResult]:
    return reliability(b, ReliabilityConfig(limit=cfg.limit, sycophancy=cfg.sycophancy), cfg.data_dir)


@DIMENSIONS.register("safety")
def _safety(b: Backend, cfg: AuditConfig, ctx: AuditContext) -> list[GroupResult]:
    sc = SafetyConfig(limit=cfg.limit, samples=cfg.toxicity_samples, toxicity_tokens=cfg.toxicity_tokens,
                      refusal_tokens=cfg.refusal_tokens, seed=cfg.seed)
    return safety(b, sc, cfg.data_dir, clf=ctx.toxicity_classifier())


@DIMENSIONS.register("fairness")
def _fairness(b: Backend, cfg: AuditConfig, ctx: AuditContext) -> list[GroupResult]:
    return fairness(b, FairnessConfig(limit=cfg.limit), cfg.data_dir)


@dataclass
class DimensionResult:
    name: str
    groups: list[GroupResult]
    seconds: float
    cpu_seconds: float = 0.0  #: process CPU time (user + system), less disturbed by other load than wall time

    @property
    def score(self) -> float | None:
        """Mean 0..1 goodness of the headline metrics (None when there are none)."""
        vals = [s for g in self.groups for m in g.metrics.values() if m.headline for s in [m.score01()] if s is not None]
        return sum(vals) / len(vals) if vals else None

    def metric(self, group: str, name: str) -> Metric | None:
        for g in self.groups:
            if g.name == group:
                return g.metrics.get(name)
        return None


@dataclass
class AuditResult:
    model: str
    config: AuditConfig
    dimensions: dict[str, DimensionResult] = field(default_factory=dict)
    seconds: float = 0.0

    def scores(self) -> dict[str, float | None]:
        return {d: r.score for d, r in self.dimensions.items()}

    def to_json(self) -> dict:
        """``{"model", "limit", ..., <dimension>: {"score", <group>: {<metric>: value, "n": {...}, "ci95": {...}}}}``."""
        out: dict = {"model": self.model, "limit": self.config.limit, "seconds": round(self.seconds, 1),
                     "config": asdict(self.config), "scores": self.scores()}
        for d, r in self.dimensions.items():
            dim: dict = {"score": r.score, "seconds": round(r.seconds, 1), "cpu_seconds": round(r.cpu_seconds, 1)}
            for g in r.groups:
                grp: dict = {m.name: _num(m.value) for m in g.metrics.values()}
                grp["n"] = {m.name: m.n for m in g.metrics.values()}
                grp["ci95"] = {m.name: None if m.ci is None else [_num(m.ci[0]), _num(m.ci[1])] for m in g.metrics.values()}
                grp["source"] = g.source
                if g.notes:
                    grp["notes"] = list(g.notes)
                grp["examples"] = [asdict(e) for e in g.examples]
                dim[g.name] = grp
            out[d] = dim
        return out


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def audit(backend: Backend, cfg: AuditConfig, ctx: AuditContext | None = None,
          progress: Callable[[str], None] | None = None) -> AuditResult:
    """Run the selected dimensions of ``cfg`` against ``backend``."""
    ctx = ctx or AuditContext(cfg.data_dir, cfg.seed)
    res = AuditResult(backend.name, cfg)
    t_all = time.perf_counter()
    for d in cfg.dimensions:
        if progress:
            progress(d)
        t0, c0 = time.perf_counter(), time.process_time()
        groups = DIMENSIONS.get(d)(backend, cfg, ctx)
        res.dimensions[d] = DimensionResult(d, groups, time.perf_counter() - t0, time.process_time() - c0)
        log.info("%s: %s done in %.1f s (%.1f CPU s)", backend.name, d, res.dimensions[d].seconds,
                 res.dimensions[d].cpu_seconds)
    res.seconds = time.perf_counter() - t_all
    return res


# ---------------------------------------------------------------- comparison


@dataclass
class Difference:
    dimension: str
    group: str
    metric: str
    a: float | None
    b: float | None
    diff: float | None  #: b - a
    p_value: float | None
    test: str
    significant: bool
    better: str | None  #: "a", "b" or None (by the metric's direction; None when not significant)


def metric_difference(ma: Metric, mb: Metric, seed: int = 0) -> tuple[float, str]:
    """(p-value, test name) for the difference between two computations of the same metric."""
    stat = STATISTICS.get(ma.stat)
    paired = ma.item_ids == mb.item_ids and len(ma.values) == len(mb.values)
    if paired and ma.binary and mb.binary and ma.stat == "mean":
        return mcnemar([int(v) for v in ma.values], [int(v) for v in mb.values]), "McNemar exact"
    if paired:
        return paired_bootstrap_p(ma.values, mb.values, stat, seed=seed), "paired bootstrap"
    return unpaired_bootstrap_p(ma.values, mb.values, stat, seed=seed), "bootstrap"


def compare(a: AuditResult, b: AuditResult, alpha: float = 0.05) -> list[Difference]:
    """Every metric present in both audits, with ``b - a`` and its significance."""
    out = []
    for d, ra in a.dimensions.items():
        rb = b.dimensions.get(d)
        if rb is None:
            continue
        for g in ra.groups:
            for name, ma in g.metrics.items():
                mb = rb.metric(g.name, name)
                if mb is None:
                    continue
                va, vb = _num(ma.value), _num(mb.value)
                diff = None if va is None or vb is None else vb - va
                if len(ma.values) < 2 or len(mb.values) < 2 or diff is None:
                    p, test = None, "n too small"
                else:
                    p, test = metric_difference(ma, mb, seed=a.config.seed)
                    p = _num(p)
                sig = p is not None and p < alpha
                better = None
                if sig and diff:
                    sa, sb = ma.score01(), mb.score01()
                    better = None if sa is None or sb is None or sa == sb else ("b" if sb > sa else "a")
                out.append(Difference(d, g.name, name, va, vb, diff, p, test, sig, better))
    return out


def parse_dimensions(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"robustness,fairness"`` -> a validated tuple (unknown names raise with near matches)."""
    if text is None or text == "" or text == "all":
        return DIMENSION_NAMES
    parts = text.split(",") if isinstance(text, str) else list(text)
    dims = tuple(p.strip() for p in parts if p.strip())
    for d in dims:
        DIMENSIONS.get(d)
    return dims
