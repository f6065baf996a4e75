"""Compression stages: prune (depth, width, unstructured), quantize (rtn, gptq, awq), lowrank.

Thin glue over :mod:`slmkit.compress`: load the student, take calibration ids
(from the teacher-generated data when the recipe has some, else sampled from
the model itself), call the technique, save the artefact into the stage
directory.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import ConfigError
from slmkit.pipeline.base import Context, StageResult, stage

log = logging.getLogger(__name__)


def _calib_source(ctx: Context, calib: str) -> str | None:
    """``auto``: a heldout stage's calibration split, else the generated data's text, else self-generated;
    ``self``; or a file."""
    if calib == "auto":
        if "text" in ctx.slots:
            return str(Path(ctx.slot("text")) / "calib.txt")
        if "data" in ctx.slots:
            from slmkit.pipeline.stages.data import data_paths

            return str(data_paths(ctx)[2])
        return None
    return None if calib == "self" else calib


def calibration(ctx: Context, model, tok, calib: str, samples: int, length: int):
    from slmkit.compress.calibrate import CalibConfig, calibration_ids

    cfg = CalibConfig(n_samples=samples, seq_len=length, seed=ctx.recipe.seed, source=_calib_source(ctx, calib))
    return calibration_ids(model, tok, cfg), cfg


def _check_calib(calib: str, samples: int, length: int) -> None:
    if calib not in ("auto", "self") and not Path(calib).is_file():
        raise ConfigError(f"calib file {calib} does not exist", "use calib: auto (generated data or self-generated), self, or a file")
    if samples < 1 or length < 2:
        raise ConfigError(f"calib_samples must be >= 1 and calib_len >= 2, got {samples}, {length}")


def _save(ctx: Context, model, tok, kind: str, cfg, **extra) -> str:
    from slmkit.artefact import Manifest, save_model

    manifest = Manifest(source=ctx.slots["model"])
    manifest.add_stage(kind, cfg, **extra)
    return ctx.rel(save_model(model, tok, ctx.work / "model", manifest))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


#: recipe keys of the prune stage that set a field of the method's config (``rank_by`` sets DepthConfig.method)
_PRUNE_KEYS = {"keep_layers": "keep_layers", "ratio": "ratio", "sparsity": "sparsity", "pattern": "pattern",
               "rank_by": "method"}


@dataclass(frozen=True)
class PruneConfig:
    method: str  #: a registered pruning method (slmkit.compress.prune.PRUNERS): depth, width, magnitude, wanda, sparsegpt
    keep_layers: int | None = None  #: depth: decoder blocks kept
    ratio: float | None = None  #: width: fraction of parameters kept, in (0, 1)
    sparsity: float | None = None  #: magnitude/wanda/sparsegpt: fraction of weights removed per row
    pattern: str | None = None  #: magnitude/wanda/sparsegpt: "N:M" semi-structured pattern
    rank_by: str = "block_influence"  #: depth: block ranking (block_influence | perplexity)
    options: dict = field(default_factory=dict)  #: more fields of the method's config (e.g. batch_size, blocksize, heads)
    calib: str = "auto"  #: calibration text: auto | self | a text/jsonl file
    calib_samples: int = 32  #: calibration sequences
    calib_len: int = 128  #: tokens per calibration sequence

    def __post_init__(self):
        _check_calib(self.calib, self.calib_samples, self.calib_len)
        self.method_config()

    def method_config(self):
        """The :mod:`slmkit.compress` config of ``method`` (validated there); the shared keys a method's
        config does not have are ignored, ``options`` must all apply."""
        from slmkit.compress.prune import pruner_config

        shared = {_PRUNE_KEYS[k]: getattr(self, k) for k in _PRUNE_KEYS}
        overlap = set(shared) & set(self.options)
        if overlap:
            raise ConfigError(f"options {', '.join(sorted(overlap))}: set them as the stage's own keys")
        labels = {**{v: f"key {k!r}" for k, v in _PRUNE_KEYS.items()}, **{k: f"options key {k!r}" for k in self.options}}
        return pruner_config(self.method, {**shared, **self.options}, labels=labels, ignore=frozenset(shared))


@stage("prune", PruneConfig, needs=("model",), makes=("model",))
def prune(ctx: Context, cfg: PruneConfig) -> StageResult:
    """Prune the student with :func:`slmkit.compress.prune.prune` (any registered method)."""
    from slmkit.compress.prune import needs_calibration, weight_sparsity
    from slmkit.compress.prune import prune as run

    model, tok = ctx.load("model")
    before = _params(model)
    mcfg = cfg.method_config()
    ids, ccfg = (calibration(ctx, model, tok, cfg.calib, cfg.calib_samples, cfg.calib_len)
                 if needs_calibration(cfg.method) else (None, None))
    ctx.progress(1, 2)
    model = run(model, ids, cfg.method, mcfg)
    ctx.progress(2, 2)
    after = _params(model)
    out = _save(ctx, model, tok, "prune", mcfg, method=cfg.method, calibration=ccfg)
    metrics = {"method": cfg.method, "parameters_before": before, "parameters": after, "parameter_ratio": after / before,
               "layers": model.config.num_hidden_layers, "calibration": dataclasses.asdict(ccfg) if ccfg else None,
               "weight_sparsity": weight_sparsity(model)}
    return StageResult(outputs={"model": out}, metrics=metrics)


@dataclass(frozen=True)
class QuantizeConfig:
    method: str  #: a registered quantizer (slmkit.compress.quantize.QUANTIZERS): rtn, imatrix, gptq, awq
    bits: int | None = None  #: code width: 3, 4, 5 or 8 (default: the gguf type's, else 4)
    group_size: int | None = None  #: input columns per scale, 0 = per-channel (default: the gguf type's, else 32)
    asymmetric: bool = False  #: w = d*q + m instead of w = d*q
    gguf: str | None = "Q4_0"  #: a llama.cpp file type (Q4_0, Q4_K_M, Q8_0, ...): every tensor on the block grid
    #: llama-quantize gives it, so `export` with the same type keeps the codes exactly (null = one plain grid)
    damp: float = 0.01  #: gptq: dampening (fraction of the mean Hessian diagonal)
    options: dict = field(default_factory=dict)  #: more fields of the method's config (e.g. act_order, seed)
    calib: str = "auto"  #: calibration text: auto | self | a text/jsonl file
    calib_samples: int = 32  #: calibration sequences
    calib_len: int = 128  #: tokens per calibration sequence

    def __post_init__(self):
        _check_calib(self.calib, self.calib_samples, self.calib_len)
        self.method_config()

    def grid(self):
        from slmkit.compress.entry import quantize_grid

        return quantize_grid(self.bits, self.group_size, self.asymmetric, self.gguf, default_bits=4, default_group_size=32)

    def method_config(self):
        from slmkit.compress.entry import quantize_config

        return quantize_config(self.method, self.grid(), self.options, damp=self.damp)


@stage("quantize", QuantizeConfig, needs=("model",), makes=("model",))
def quantize(ctx: Context, cfg: QuantizeConfig) -> StageResult:
    """Quantise the student's weights through :func:`slmkit.compress.entry.quantize_to_dir` (what `slmkit quantize` calls).

    With ``gguf`` set to a llama.cpp file type, each weight lies on the grid llama-quantize gives
    it in that type (with an importance matrix for the calibrated methods), the token embedding included.
    """
    from slmkit.compress.calibrate import CalibConfig
    from slmkit.compress.entry import quantize_to_dir
    from slmkit.compress.qstore import PACKED

    model, tok = ctx.load("model")
    mcfg = cfg.method_config()
    calib = CalibConfig(n_samples=cfg.calib_samples, seq_len=cfg.calib_len, seed=ctx.recipe.seed,
                        source=_calib_source(ctx, cfg.calib))
    res = quantize_to_dir(model, tok, cfg.method, mcfg, ctx.work / "model", source=ctx.slots["model"], calib=calib,
                          gguf=cfg.gguf, on_step=ctx.progress)
    grid = mcfg.grid
    return StageResult(
        outputs={"model": ctx.rel(res.path)},
        metrics={"method": cfg.method, "bits": grid.bits, "group_size": grid.group_size, "gguf_grid": cfg.gguf,
                 "quantized_tensors": len(res.result.tensors), "seconds": res.result.seconds,
                 "packed_bytes": (res.path / PACKED).stat().st_size,
                 "calibration": dataclasses.asdict(res.calibration) if res.calibration else None},
    )


@dataclass(frozen=True)
class LowRankStageConfig:
    ratio: float  #: fraction of parameters kept, in (0, 1) (required)
    method: str = "whiten"  #: plain | asvd | whiten
    calib: str = "auto"  #: calibration text: auto | self | a text/jsonl file
    calib_samples: int = 32
    calib_len: int = 128

    def __post_init__(self):
        _check_calib(self.calib, self.calib_samples, self.calib_len)
        self.method_config()

    def method_config(self):
        from slmkit.compress.lowrank import LowRankConfig

        return LowRankConfig(ratio=self.ratio, method=self.method)


@stage("lowrank", LowRankStageConfig, needs=("model",), makes=("model",))
def lowrank(ctx: Context, cfg: LowRankStageConfig) -> StageResult:
    """Factorise the student's Linears to keep ~ratio of the parameters (:func:`slmkit.compress.lowrank.lowrank`)."""
    from slmkit.compress.lowrank import lowrank as run

    model, tok = ctx.load("model")
    before = _params(model)
    mcfg = cfg.method_config()
    ids, ccfg = calibration(ctx, model, tok, cfg.calib, cfg.calib_samples, cfg.calib_len) if mcfg.needs_calibration else (None, None)
    ctx.progress(1, 2)
    model = run(model, ids, mcfg)
    ctx.progress(2, 2)
    out = _save(ctx, model, tok, "lowrank", mcfg, calibration=ccfg)
    after = _params(model)
    return StageResult(outputs={"model": out}, metrics={"method": cfg.method, "parameters_before": before, "parameters": after,
                                                        "parameter_ratio": after / before})
