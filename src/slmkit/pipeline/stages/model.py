"""Model stages on the foundation: choose the student, export it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slmkit.errors import ConfigError
from slmkit.pipeline.base import Context, StageResult, stage

log = logging.getLogger(__name__)


def dir_bytes(path: str | Path) -> int:
    """Bytes of a model on disk: a file's size, or the weights (and everything else) in a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return 0


@dataclass(frozen=True)
class StudentConfig:
    source: str = "teacher"  #: "teacher" (start from a copy of the teacher) or a model spec to start from


@stage("student", StudentConfig, makes=("model",))
def student(ctx: Context, cfg: StudentConfig) -> StageResult:
    """Name the starting student: the teacher itself or another model (no weights are copied)."""
    from slmkit.models import describe, load_config

    spec = ctx.slots["teacher"] if cfg.source == "teacher" else cfg.source
    facts = describe(load_config(ctx.resolve(spec)))
    return StageResult(outputs={"model": spec}, metrics={"parameters": facts.parameters, "source": spec})


@dataclass(frozen=True)
class ExportConfig:
    format: Literal["gguf", "safetensors"]  #: file format (required)
    type: Literal["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"] = "Q4_0"  #: GGUF tensor type (ignored for safetensors)

    def __post_init__(self):
        if self.format == "safetensors" and self.type not in ("F32", "Q4_0"):
            raise ConfigError("type applies to GGUF only", "drop `type:` or use `format: gguf`")


def _gguf_roundtrip_error(model, path: Path) -> float:
    """Largest relative error of any 2-D weight after writing and reading the GGUF back."""
    import torch

    from slmkit.export.gguf import read_gguf_weights

    back = read_gguf_weights(path, model.config)
    state = model.state_dict()
    worst = 0.0
    for name, w in back.items():
        ref = state.get(name)
        if ref is None or ref.ndim != 2:
            continue
        ref = ref.float()
        err = (w - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        worst = max(worst, err)
    return float(worst) if back else float("nan")


@stage("export", ExportConfig, needs=("model",), makes=("gguf",))
def export(ctx: Context, cfg: ExportConfig) -> StageResult:
    """Export the student as GGUF (validated by reading it back) or as a safetensors directory."""
    from slmkit.artefact import Manifest, save_model
    from slmkit.export.gguf import export_gguf
    from slmkit.models.load import check_gguf

    model, tok = ctx.load("model")
    if cfg.format == "safetensors":
        man = Manifest(source=ctx.slots["model"])
        man.add_stage("export", cfg)
        dest = save_model(model, tok, ctx.work / "model", man)
        return StageResult(outputs={}, metrics={"format": "safetensors", "bytes": dir_bytes(dest), "path": ctx.rel(dest)})
    path = export_gguf(model, tok, ctx.work / "model.gguf", cfg.type)
    check_gguf(path)
    err = _gguf_roundtrip_error(model, path)
    log.info("export: %s (%s), max relative weight error after read-back %.4g", path, cfg.type, err)
    return StageResult(
        outputs={"gguf": ctx.rel(path)},
        metrics={"format": "gguf", "type": cfg.type, "bytes": path.stat().st_size, "max_rel_weight_error": err},
    )
