"""Weight quantization: RTN, GPTQ and AWQ behind one registry.

Each method is a function plus a frozen config registered in :data:`QUANTIZERS`:

* ``rtn``: round-to-nearest on a :class:`~slmkit.compress.qgrid.Grid` (per-channel
  or per-group, symmetric or asymmetric) — the baseline every paper compares to; on a GGUF
  grid it is what ``llama-quantize`` does without an importance matrix;
* ``imatrix``: the same rounding with llama.cpp's importance-weighted scale search, the
  importance being each input column's mean squared activation on the calibration tokens
  (what ``llama-imatrix`` collects and ``llama-quantize --imatrix`` uses): the no-Hessian baseline;
* ``gptq``: :mod:`slmkit.compress.gptq` (Frantar et al. 2022, arXiv:2210.17323);
* ``awq``: :mod:`slmkit.compress.awq` (Lin et al. 2023, arXiv:2306.00978).

:func:`quantize` mutates the model in place: every Linear of the decoder blocks
(and, with ``embeddings=True``, the token embedding, by RTN) is replaced by its
fake-quantised weight, the value a runtime computes from the stored codes. It
returns a :class:`Quantized` record holding those codes, which
:func:`slmkit.compress.qstore.save_quantized` stores packed and
:func:`slmkit.export.gguf.export_gguf` writes unchanged into GGUF blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from slmkit import progress
from slmkit.compress.qgrid import GGUF_TYPES, Grid, QTensor, quantize_rtn
from slmkit.compress.qmethods import QUANTIZERS, Quantizer, quantizer  # noqa: F401 (QUANTIZERS, Quantizer re-exported)
from slmkit.errors import ConfigError, UnsupportedModelError

log = logging.getLogger(__name__)

EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest: only the grid."""

    grid: Grid = Grid()  #: bits, group size, symmetry, GGUF type

    def __post_init__(self):
        if not isinstance(self.grid, Grid):
            raise ConfigError(f"RTNConfig.grid must be a Grid, got {type(self.grid).__name__}")


@dataclass(frozen=True)
class IMatrixConfig:
    """Round-to-nearest with importance-weighted scales (llama.cpp's imatrix quantisation)."""

    grid: Grid = Grid()  #: bits, group size, symmetry, GGUF type
    seed: int = 0  #: seeds the calibration statistics' subsampling

    def __post_init__(self):
        if not isinstance(self.grid, Grid):
            raise ConfigError(f"IMatrixConfig.grid must be a Grid, got {type(self.grid).__name__}")


@dataclass
class Quantized:
    """What :func:`quantize` did: the codes of every quantised weight, by HF name."""

    method: str
    grid: Grid
    tensors: dict[str, QTensor] = field(default_factory=dict)
    config: object = None  #: the method's config (None when read back from disk)
    seconds: float = 0.0
    gguf: str | None = None  #: the llama.cpp file type (mix) whose per-tensor grids the codes lie on


def gguf_grids(model, ftype: str, imatrix: bool = False, **overrides) -> dict[str, Grid]:
    """Each quantised weight's grid (by HF name) in llama.cpp's file type ``ftype`` (Q4_0, Q4_K_M, ...).

    The types are the ones ``llama-quantize`` picks for this model (:mod:`slmkit.export.gguf_mix`);
    ``imatrix`` matters because llama.cpp picks some types differently when given an importance
    matrix. ``overrides`` (``embedding_type``, ``output_type``, ``pure``) are llama-quantize's options.
    """
    from slmkit.export.gguf_mix import hf_tensor_types

    types = hf_tensor_types(model.config, ftype, imatrix=imatrix, **overrides)
    out = {}
    for name, t in types.items():
        if t in ("F32", "F16", "BF16"):
            continue
        if t not in GGUF_TYPES:
            raise UnsupportedModelError(f"{ftype}: {name} would be {t}, which slmkit cannot write",
                                        "choose another --gguf type")
        out[name] = Grid.for_gguf(t)
    return out


@quantizer("rtn", RTNConfig, calibration=False, help="round to nearest (llama-quantize without an imatrix)")
def rtn_model(model, ids, cfg: RTNConfig, names: list[str], grid_of=None) -> dict[str, QTensor]:
    """Round every weight in ``names`` to the nearest point of its grid, in place."""
    params = dict(model.named_parameters())
    out = {}
    with torch.no_grad():
        for k, name in enumerate(names):
            p = params[name]
            qt = quantize_rtn(p.float(), grid_of(name) if grid_of else cfg.grid)
            p.data.copy_(qt.dequantize().to(p.dtype))
            out[name] = qt
            progress.step("weights", k + 1, len(names))
    return out


@quantizer("imatrix", IMatrixConfig, calibration=True, help="importance-weighted rounding (llama.cpp imatrix)")
def imatrix_model(model, ids, cfg: IMatrixConfig, names: list[str], grid_of=None) -> dict[str, QTensor]:
    """Round every Linear in ``names`` with scales weighted by its inputs' mean squared activation, in place.

    The statistics are collected block by block on the calibration ids (each block sees the outputs of
    the blocks before it, already quantised), as GPTQ's are, without the Hessian.
    """
    from slmkit.compress.calibrate import round_sequentially

    def codes(full: str, lin, st) -> QTensor:
        return quantize_rtn(lin.weight.float(), grid_of(full) if grid_of else cfg.grid,
                            importance=st.sq_norm / max(st.n, 1))

    return round_sequentially(model, ids, names, codes, seed=cfg.seed, hessian=False, label="imatrix")


def target_names(model) -> list[str]:
    """HF weight names of the Linears inside the decoder blocks (``model.layers.<i>.<path>.weight``)."""
    from slmkit.compress.calibrate import decoder_layers, linears

    names = []
    for i, block in enumerate(decoder_layers(model)):
        names += [f"model.layers.{i}.{n}.weight" for n in linears(block)]
    return names


def check_shapes(model, names: list[str], grid: Grid, grid_of=None) -> None:
    """Raise ConfigError before anything changes when a weight's grid cannot hold it."""
    params = dict(model.named_parameters())
    for name in names:
        p = params[name]
        if p.dim() != 2:
            raise UnsupportedModelError(f"{name} is not a matrix (shape {tuple(p.shape)}); cannot quantise it")
        g = grid_of(name) if grid_of else grid
        try:
            g.groups(p.shape[1])
            if g.group_size and p.shape[1] % g.super_size:
                raise ConfigError(f"{g.gguf or 'the grid'} needs input widths divisible by {g.super_size}, "
                                  f"got {p.shape[1]}", "use a type with 32-wide blocks (e.g. Q5_0) for this weight")
        except ConfigError as err:
            raise ConfigError(f"{err.problem} ({name}, shape {tuple(p.shape)})", err.hint) from None


def quantize(
    model,
    method: str,
    cfg,
    ids: torch.Tensor | None = None,
    embeddings: bool = False,
    grids: dict[str, Grid] | None = None,
    gguf: str | None = None,
) -> Quantized:
    """Quantise ``model``'s decoder Linears in place with ``method`` (a name in :data:`QUANTIZERS`).

    ``ids`` (N, T) calibration token ids are needed by the calibrated methods
    (:func:`slmkit.compress.calibrate.calibration_ids`). ``embeddings=True`` also
    rounds the token embedding (and an untied output head) by RTN, so that every
    matrix of a GGUF export carries exactly the in-memory weights. ``grids`` gives
    weights their own grids (``cfg.grid`` for the others): :func:`gguf_grids` for a
    llama.cpp file type, then also pass its name as ``gguf``. All shapes are checked
    before any weight changes.
    """
    q = QUANTIZERS.get(method)
    if not isinstance(cfg, q.config):
        raise ConfigError(f"{method} takes a {q.config.__name__}, got {type(cfg).__name__}")
    if q.needs_calibration and (ids is None or ids.dim() != 2 or ids.numel() == 0):
        raise ConfigError(f"{method} needs calibration token ids of shape (N, T)", "pass ids from calibration_ids()")
    grids = dict(grids or {})

    def grid_of(name: str) -> Grid:
        return grids.get(name, cfg.grid)

    names = target_names(model)
    extra = []
    if embeddings and isinstance(model.get_input_embeddings(), nn.Embedding):
        extra.append(EMBEDDING)
        tied = getattr(model.config, "tie_word_embeddings", False)
        if not tied and "lm_head.weight" in dict(model.named_parameters()):
            extra.append("lm_head.weight")
    check_shapes(model, extra + names, cfg.grid, grid_of)
    t0 = time.perf_counter()
    tensors = q.run(model, ids, cfg, names, grid_of)
    if extra:
        tensors.update(rtn_model(model, None, RTNConfig(cfg.grid), extra, grid_of))
    missing = set(names) - set(tensors)
    if missing:
        raise RuntimeError(f"{method} left {len(missing)} weights unquantised, e.g. {sorted(missing)[0]}")
    return Quantized(method, cfg.grid, tensors, cfg, time.perf_counter() - t0, gguf=gguf)
