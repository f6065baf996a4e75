"""The library entry points of compression, each called by both its CLI verb and its build stage.

One call does what both need after the model is loaded: calibrate (only when the method needs
it), apply the technique, write the manifest and save the artefact directory:

* :func:`quantize_to_dir` (``slmkit quantize``, the quantize stage) also places each weight on
  its grid (llama.cpp's per-tensor types for a GGUF file type) and, when asked, writes the GGUF
  file from the same codes; :func:`quantize_grid` is the one check of bits / group size /
  symmetry against a GGUF type, worded in the caller's names (CLI flags or recipe keys);
* :func:`prune_to_dir` (``slmkit prune``, the prune stage): any registered pruning method;
* :func:`lowrank_to_dir` (``slmkit lowrank``, the lowrank stage).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from slmkit.artefact import Manifest, save_model
from slmkit.compress.calibrate import CalibConfig, calibration_ids
from slmkit.compress.qgrid import Grid
from slmkit.compress.qstore import save_quantized
from slmkit.compress.quantize import QUANTIZERS, Quantized, gguf_grids, quantize
from slmkit.errors import ConfigError
from slmkit.models.student import unique_parameters

#: how :func:`quantize_grid` names its inputs in messages: recipe keys (default) or CLI flags
RECIPE_KEYS = {"gguf": "gguf", "bits": "bits", "group_size": "group_size", "asymmetric": "asymmetric"}
CLI_FLAGS = {"gguf": "--gguf", "bits": "--bits", "group_size": "--group-size", "asymmetric": "--asymmetric"}


def quantize_grid(bits: int | None, group_size: int | None, asymmetric: bool, gguf: str | None, *,
                  default_bits: int | None = None, default_group_size: int = 128,
                  names: Mapping[str, str] = RECIPE_KEYS) -> Grid:
    """The grid of a quantisation request: a GGUF type's own (``bits`` etc. may only repeat it), else a plain one.

    Without ``gguf``, ``bits`` falls back to ``default_bits`` (None: required) and ``group_size`` to
    ``default_group_size``. Raises ConfigError naming the caller's ``names`` for a wrong value.
    """
    if gguf is None:
        if bits is None and default_bits is None:
            raise ConfigError(f"{names['bits']} is required without {names['gguf']}",
                              f"pass {names['bits']} 4 (or 3, 5, 8), or {names['gguf']} Q4_K_M")
        return Grid(bits=default_bits if bits is None else bits,
                    group_size=default_group_size if group_size is None else group_size, symmetric=not asymmetric)
    from slmkit.export.gguf import TYPES
    from slmkit.export.gguf_mix import base_type

    if gguf not in TYPES or gguf in ("F32", "F16"):
        raise ConfigError(f"unknown {names['gguf']} type {gguf!r}",
                          f"use a llama.cpp file type: {', '.join(t for t in TYPES if t not in ('F32', 'F16'))}")
    grid = Grid.for_gguf(base_type(gguf))
    if bits not in (None, grid.bits) or group_size not in (None, grid.group_size) or (asymmetric and grid.symmetric):
        got = [f"{names['bits']} {bits}"] + ([f"{names['group_size']} {group_size}"] if group_size is not None else []) \
            + ([names["asymmetric"]] if asymmetric else [])
        raise ConfigError(
            f"{names['gguf']} {gguf} means {grid.bits}-bit {base_type(gguf)} blocks (groups of {grid.group_size}, "
            f"{'symmetric' if grid.symmetric else 'asymmetric'}); got {' '.join(got)}",
            f"use {names['bits']} {grid.bits} (or leave {names['bits']}, {names['group_size']} and "
            f"{names['asymmetric']} out)",
        )
    return grid


def quantize_config(method: str, grid: Grid, options: Mapping | None = None, *, damp: float | None = None,
                    act_order: bool | None = None, seed: int | None = None):
    """The registered config of ``method`` on ``grid``.

    ``damp``, ``act_order`` and ``seed`` (shared settings of the CLI and the stage) are taken when
    the method's class has them; every key of ``options`` must be one of its fields.
    """
    options = dict(options or {})
    cls = QUANTIZERS.get(method).config
    names = {f.name for f in dataclasses.fields(cls)}
    stray = sorted(set(options) - names)
    if stray:
        own = sorted(names - {"grid"})
        raise ConfigError(f"{', '.join(stray)} does not apply to quantizer {method}",
                          f"{method} takes: {', '.join(own)}" if own else f"{method} has no settings besides its grid")
    shared = {"damp": damp, "act_order": act_order, "seed": seed}
    clash = sorted(k for k in options if k == "grid" or shared.get(k) is not None)
    if clash:
        raise ConfigError(f"{', '.join(clash)}: set by the shared settings (bits, group size, gguf, damp, ...), not as options")
    return cls(grid=grid, **{k: v for k, v in {**shared, **options}.items() if k in names and v is not None})


@dataclass
class QuantizeOutcome:
    """What :func:`quantize_to_dir` wrote."""

    path: Path  #: the packed directory
    result: Quantized  #: the codes, by HF weight name
    calibration: CalibConfig | None  #: None when the method needs no calibration
    calibration_tokens: int
    gguf_report: object = None  #: the GGUF export's report (``export_gguf=True``)


def quantize_to_dir(model, tokenizer, method: str, cfg, output: str | Path, source: str, calib: CalibConfig,
                    gguf: str | None = None, export_gguf: bool = False, force: bool = False,
                    on_step: Callable[[int, int], None] | None = None) -> QuantizeOutcome:
    """Quantise ``model`` in place with ``method`` / ``cfg`` and save it packed at ``output``.

    ``calib`` is used only when the method needs calibration. With ``gguf`` (a llama.cpp file
    type) every weight, the token embedding included, lies on the grid llama-quantize gives it
    (with an importance matrix for calibrated methods), and ``export_gguf`` also writes
    ``output/model-<gguf>.gguf`` from the same codes, validated by reading it back.
    ``on_step(k, 2)`` is called after calibration and after quantisation.
    """
    q = QUANTIZERS.get(method)
    ccfg = calib if q.needs_calibration else None
    ids = calibration_ids(model, tokenizer, ccfg) if ccfg is not None else None
    if on_step is not None:
        on_step(1, 2)
    grids = gguf_grids(model, gguf, imatrix=q.needs_calibration) if gguf is not None else None
    result = quantize(model, method, cfg, ids, embeddings=gguf is not None, grids=grids, gguf=gguf)
    if on_step is not None:
        on_step(2, 2)
    if next(model.parameters()).device.type != "cpu":  # packing and GGUF export read the codes on the CPU
        model.cpu()
        result.tensors = {k: dataclasses.replace(qt, codes=qt.codes.cpu(), scales=qt.scales.cpu(),
                                                 mins=None if qt.mins is None else qt.mins.cpu())
                          for k, qt in result.tensors.items()}
    manifest = Manifest(source=source)
    manifest.add_stage("quantize", cfg, method=method, calibration=ccfg, seconds=round(result.seconds, 2),
                       tensors=len(result.tensors))
    reports = []

    def write_gguf(tmp: Path) -> None:
        from slmkit.export.gguf import export_gguf_validated

        rep = export_gguf_validated(model, tokenizer, tmp / f"model-{gguf}.gguf", gguf, result,
                                    imatrix=q.needs_calibration)
        manifest.add_stage("export", {"format": "gguf", "type": gguf}, file=f"model-{gguf}.gguf",
                           exact_tensors=rep.exact, tensors=rep.tensors)
        reports.append(rep)

    extra = write_gguf if export_gguf and gguf is not None else None
    path = save_quantized(model, tokenizer, result, output, manifest, extra=extra, force=force)
    return QuantizeOutcome(Path(path), result, ccfg, 0 if ids is None else int(ids.numel()),
                           reports[0] if reports else None)


@dataclass
class CompressOutcome:
    """What :func:`prune_to_dir` / :func:`lowrank_to_dir` wrote."""

    model: object  #: the compressed model (on the CPU), as saved
    path: Path
    parameters_before: int
    parameters: int
    calibration: CalibConfig | None  #: None when the method needs no calibration
    calibration_tokens: int
    seconds: float  #: the technique alone (no loading, calibration or saving)
    weight_sparsity: float | None = None  #: prune: fraction of exact zeros in the decoder Linears


def _apply_and_save(kind: str, run: Callable, needs_calibration: bool, model, tokenizer, cfg, output, manifest: Manifest,
                    calib: CalibConfig, force: bool, on_step, extra: Callable[[object], dict]) -> CompressOutcome:
    ccfg = calib if needs_calibration else None
    ids = calibration_ids(model, tokenizer, ccfg) if ccfg is not None else None
    if on_step is not None:
        on_step(1, 2)
    before = unique_parameters(model)
    t0 = time.perf_counter()
    model = run(model, ids, cfg)
    seconds = time.perf_counter() - t0
    if on_step is not None:
        on_step(2, 2)
    model.cpu()  # saved from the CPU, wherever it ran
    after = unique_parameters(model)
    more = extra(model)
    manifest.add_stage(kind, cfg, calibration=ccfg, seconds=round(seconds, 2), parameters_before=before,
                       parameters=after, **more)
    path = save_model(model, tokenizer, output, manifest, force=force)
    return CompressOutcome(model, Path(path), before, after, ccfg, 0 if ids is None else int(ids.numel()), seconds,
                           more.get("weight_sparsity"))


def prune_to_dir(model, tokenizer, method: str, cfg, output: str | Path, manifest: Manifest, calib: CalibConfig,
                 force: bool = False, on_step: Callable[[int, int], None] | None = None) -> CompressOutcome:
    """Prune ``model`` with the registered method ``method`` / ``cfg`` and save it at ``output``.

    ``calib`` is used only when the method needs calibration; ``manifest`` (the source and any stages
    before) gains this stage. ``on_step(k, 2)`` is called after calibration and after pruning.
    """
    from slmkit.compress.prune import PRUNERS, prune, weight_sparsity

    def run(m, ids, c):
        return prune(m, ids, method, c)

    return _apply_and_save("prune", run, PRUNERS.get(method).needs_calibration, model, tokenizer, cfg, output, manifest,
                           calib, force, on_step,
                           lambda m: {"method": method, "weight_sparsity": round(weight_sparsity(m), 6)})


def lowrank_to_dir(model, tokenizer, cfg, output: str | Path, manifest: Manifest, calib: CalibConfig,
                   force: bool = False, on_step: Callable[[int, int], None] | None = None) -> CompressOutcome:
    """Factorise ``model``'s Linears with ``cfg`` (:func:`slmkit.compress.lowrank.lowrank`) and save it at ``output``."""
    from slmkit.compress.lowrank import lowrank

    return _apply_and_save("lowrank", lowrank, cfg.needs_calibration, model, tokenizer, cfg, output, manifest, calib,
                           force, on_step, lambda m: {})
