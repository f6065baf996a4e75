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


def _calib_config(ctx: Context, calib: str, samples: int, length: int):
    """The calibration settings of a stage (used only when its method needs calibration)."""
    from slmkit.compress.calibrate import CalibConfig

    return CalibConfig(n_samples=samples, seq_len=length, seed=ctx.recipe.seed, source=_calib_source(ctx, calib))


def _check_calib(calib: str, samples: int, length: int) -> None:
    if calib not in ("auto", "self") and not Path(calib).is_file():
        raise ConfigError(f"calib file {calib} does not exist", "use calib: auto (generated data or self-generated), self, or a file")
    if samples < 1 or length < 2:
        raise ConfigError(f"calib_samples must be >= 1 and calib_len >= 2, got {samples}, {length}")


def _manifest(ctx: Context):
    from slmkit.artefact import Manifest

    return Manifest(source=ctx.slots["model"])


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
    """Prune the student through :func:`slmkit.compress.entry.prune_to_dir` (what `slmkit prune` calls)."""
    from slmkit.compress.entry import prune_to_dir

    model, tok = ctx.load("model")
    res = prune_to_dir(model, tok, cfg.method, cfg.method_config(), ctx.work / "model", _manifest(ctx),
                       _calib_config(ctx, cfg.calib, cfg.calib_samples, cfg.calib_len), on_step=ctx.progress)
    metrics = {"method": cfg.method, "parameters_before": res.parameters_before, "parameters": res.parameters,
               "parameter_ratio": res.parameters / res.parameters_before, "layers": res.model.config.num_hidden_layers,
               "calibration": dataclasses.asdict(res.calibration) if res.calibration else None,
               "weight_sparsity": res.weight_sparsity}
    return StageResult(outputs={"model": ctx.rel(res.path)}, metrics=metrics)


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
    from slmkit.compress.entry import quantize_to_dir
    from slmkit.compress.qstore import PACKED

    model, tok = ctx.load("model")
    mcfg = cfg.method_config()
    res = quantize_to_dir(model, tok, cfg.method, mcfg, ctx.work / "model", source=ctx.slots["model"],
                          calib=_calib_config(ctx, cfg.calib, cfg.calib_samples, cfg.calib_len),
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
    method: str = "whiten"  #: a registered factorisation (slmkit.compress.lowrank.FACTORISERS): plain | asvd | whiten
    options: dict = field(default_factory=dict)  #: any other field of the method's config (LowRankConfig or its own
    #: subclass, @factoriser(config=...)), e.g. alpha, damp, batch_size
    calib: str = "auto"  #: calibration text: auto | self | a text/jsonl file
    calib_samples: int = 32
    calib_len: int = 128

    def __post_init__(self):
        _check_calib(self.calib, self.calib_samples, self.calib_len)
        self.method_config()

    def method_config(self):
        from slmkit.compress.lowrank import config_class
        from slmkit.pipeline.typed import library_config

        return library_config(config_class(self.method), {"ratio": self.ratio, "method": self.method}, self.options)


@stage("lowrank", LowRankStageConfig, needs=("model",), makes=("model",))
def lowrank(ctx: Context, cfg: LowRankStageConfig) -> StageResult:
    """Factorise the student's Linears through :func:`slmkit.compress.entry.lowrank_to_dir` (what `slmkit lowrank` calls)."""
    from slmkit.compress.entry import lowrank_to_dir

    model, tok = ctx.load("model")
    res = lowrank_to_dir(model, tok, cfg.method_config(), ctx.work / "model", _manifest(ctx),
                         _calib_config(ctx, cfg.calib, cfg.calib_samples, cfg.calib_len), on_step=ctx.progress)
    return StageResult(outputs={"model": ctx.rel(res.path)},
                       metrics={"method": cfg.method, "parameters_before": res.parameters_before,
                                "parameters": res.parameters, "parameter_ratio": res.parameters / res.parameters_before})
