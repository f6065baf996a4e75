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
    """Bytes of a model's weights on disk: a file's size, or a directory's top-level weight files."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.suffix in (".safetensors", ".gguf", ".bin"))
    return 0


@dataclass(frozen=True)
class StudentConfig:
    source: str = "teacher"  #: "teacher" (start from a copy of the teacher) or a model spec to start from

    def __post_init__(self):
        if self.source != "teacher":
            from slmkit.models import resolve

            resolve(self.source)  # a path that does not exist fails here, before anything runs


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
    type: str = "Q4_0"  #: GGUF: F32, F16 or a llama.cpp file type (Q8_0, Q4_0, Q4_K_M, Q5_K_M, ...)

    def __post_init__(self):
        from slmkit.export.gguf import TYPES

        if self.format == "safetensors" and self.type != "Q4_0":
            raise ConfigError("type applies to GGUF only", "drop `type:` or use `format: gguf`")
        if self.type not in TYPES:
            raise ConfigError(f"unknown GGUF type {self.type!r}", f"use one of {', '.join(TYPES)}")


@stage("export", ExportConfig, needs=("model",), makes=("gguf",))
def export(ctx: Context, cfg: ExportConfig) -> StageResult:
    """Export the student as GGUF or safetensors, validated by reading it back (:mod:`slmkit.export`).

    A student quantised on a GGUF grid by a ``quantize`` stage keeps its codes
    exactly when exported with the same type.
    """
    from slmkit.compress.qstore import is_quantized_dir, load_quantized
    from slmkit.export.gguf import export_gguf_validated
    from slmkit.export.safetensors import export_safetensors
    from slmkit.models import load_tokenizer

    src = ctx.slot("model")
    quantized = None
    if Path(src).is_dir() and is_quantized_dir(src):
        model, quantized = load_quantized(src)
        tok = load_tokenizer(src)
        model.config.name_or_path = ctx.recipe.name
    else:
        model, tok = ctx.load("model")
    if cfg.format == "safetensors":
        from slmkit.artefact import Manifest

        manifest = (Manifest.read(src) if Path(src).is_dir() else None) or Manifest(source=ctx.slots["model"])
        rep = export_safetensors(model, tok, ctx.work / "model", manifest)
        return StageResult(outputs={}, metrics={"format": "safetensors", **_report(rep)})
    from slmkit.compress.quantize import QUANTIZERS

    # calibrated codes lie on the types llama.cpp picks with an importance matrix
    calibrated = quantized is not None and quantized.method in QUANTIZERS and QUANTIZERS.get(quantized.method).needs_calibration
    rep = export_gguf_validated(model, tok, ctx.work / "model.gguf", cfg.type, quantized, imatrix=calibrated)
    log.info("export: %s", rep)
    return StageResult(outputs={"gguf": ctx.rel(ctx.work / "model.gguf")},
                       metrics={"format": "gguf", "type": cfg.type, "codes_kept_exactly": quantized is not None, **_report(rep)})


def _report(rep) -> dict:
    return {k: v for k, v in vars(rep).items() if isinstance(v, (int, float, str, bool)) or v is None}
