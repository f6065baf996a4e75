"""The trust audit stage: teacher and student on the five dimensions (:mod:`slmkit.trust`).

Runs each selected dimension on the shared evaluation data that is available;
a dimension whose data is missing is skipped and listed (``skipped``), so a
recipe still builds without ``../shared/data`` (the report then has no trust section).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from slmkit.errors import ConfigError, DataError
from slmkit.pipeline.base import Context, StageResult, stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditStageConfig:
    dimensions: tuple[str, ...] = ("robustness", "privacy", "reliability", "safety", "fairness")  #: which dimensions
    limit: int = 16  #: first N examples of each data set (0 = all)
    compare_teacher: bool = True  #: audit the teacher too (for the radar and the significance tests)
    memorisation: bool = False  #: privacy: fine-tune a copy with canaries (slow)
    sycophancy: bool = False  #: reliability: sycophancy probe (doubles the generations)
    data_dir: str | None = None  #: folder holding truthfulqa/, bbq/, ... (default: $SLMKIT_DATA or ../shared/data)
    options: dict = field(default_factory=dict)  #: any other field of AuditConfig (e.g. toxicity_samples, advglue_shots)

    def __post_init__(self):
        if self.limit < 0:
            raise ConfigError(f"limit must be >= 0 (0 = all), got {self.limit}")
        self.audit_config(0)

    def audit_config(self, seed: int):
        from slmkit.pipeline.typed import library_config
        from slmkit.trust import AuditConfig

        given = {"dimensions": self.dimensions, "limit": self.limit, "seed": seed, "data_dir": self.data_dir,
                 "memorisation": self.memorisation, "sycophancy": self.sycophancy}
        return library_config(AuditConfig, given, self.options)


def _flat(dim_json: dict) -> dict:
    """``{group.metric: value}`` of one dimension's JSON (numbers only)."""
    out = {}
    for group, body in dim_json.items():
        if isinstance(body, dict):
            for k, v in body.items():
                if k not in ("n", "ci95", "source", "notes", "examples") and (isinstance(v, (int, float)) or v is None):
                    out[f"{group}.{k}"] = v
    return out


@stage("audit", AuditStageConfig, needs=("teacher", "model"))
def audit(ctx: Context, cfg: AuditStageConfig) -> StageResult:
    """Audit the student (and the teacher) on robustness, privacy, reliability, safety and fairness."""
    from slmkit.backends import HFBackend
    from slmkit.trust import AuditContext, compare
    from slmkit.trust import audit as run

    acfg = cfg.audit_config(ctx.recipe.seed)
    actx = AuditContext(cfg.data_dir, ctx.recipe.seed)
    who = {"student": ctx.load("model")}
    if cfg.compare_teacher:
        who = {"teacher": ctx.teacher(), **who}
    steps = len(who) * len(cfg.dimensions)
    results, skipped, done = {}, {}, 0
    for role, (model, tok) in who.items():
        backend = HFBackend(model, tok, name=role)
        merged = None
        for d in cfg.dimensions:
            ctx.progress(done, steps)
            try:
                r = run(backend, replace(acfg, dimensions=(d,)), actx)
            except DataError as err:
                skipped[d] = err.problem
                log.warning("audit: %s skipped (%s)", d, err.problem)
            else:
                if merged is None:
                    merged = r
                else:
                    merged.dimensions.update(r.dimensions)
                    merged.seconds += r.seconds
            done += 1
        if merged is not None:
            results[role] = merged
    ctx.progress(steps, steps)
    if not results:  # no evaluation data here at all: the build goes on, the report says why there is no audit
        log.warning("audit: no trust dimension has its data here (set SLMKIT_DATA): %s", skipped)
        return StageResult(metrics={"scores": {}, "dimensions": {}, "skipped": skipped, "limit": cfg.limit})
    scores = {role: {d: s for d, s in r.scores().items() if s is not None} for role, r in results.items()}
    dims = {role: {d: _flat(body) for d, body in r.to_json().items() if d in r.dimensions} for role, r in results.items()}
    metrics = {"scores": scores, "dimensions": dims, "skipped": skipped, "limit": cfg.limit,
               "seconds": {role: r.seconds for role, r in results.items()}}
    if "teacher" in results and "student" in results:
        metrics["differences"] = [vars(x) for x in compare(results["teacher"], results["student"])
                                  if getattr(x, "significant", False)]
    return StageResult(metrics=metrics)
