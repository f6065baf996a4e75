"""Weight quantization: RTN, GPTQ and AWQ behind one registry.

Each method is a function plus a frozen config registered in :data:`QUANTIZERS`:

* ``rtn``: round-to-nearest on a :class:`~slmkit.compress.qgrid.Grid` (per-channel
  or per-group, symmetric or asymmetric) — the baseline every paper compares to;
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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slmkit.compress.awq import AWQConfig, awq_model
from slmkit.compress.gptq import GPTQConfig, gptq_model
from slmkit.compress.qgrid import Grid, QTensor, quantize_rtn
from slmkit.errors import ConfigError, UnsupportedModelError
from slmkit.registry import Registry

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
class Quantizer:
    """A registered method: ``run(model, ids, cfg, names) -> {hf weight name: QTensor}`` and its config class."""

    run: Callable
    config: type
    needs_calibration: bool


QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


@dataclass
class Quantized:
    """What :func:`quantize` did: the codes of every quantised weight, by HF name."""

    method: str
    grid: Grid
    tensors: dict[str, QTensor] = field(default_factory=dict)
    config: object = None  #: the method's config (None when read back from disk)
    seconds: float = 0.0


def rtn_model(model, ids, cfg: RTNConfig, names: list[str]) -> dict[str, QTensor]:
    """Round every weight in ``names`` to the nearest grid point, in place."""
    params = dict(model.named_parameters())
    out = {}
    with torch.no_grad():
        for name in names:
            p = params[name]
            qt = quantize_rtn(p.float(), cfg.grid)
            p.data.copy_(qt.dequantize().to(p.dtype))
            out[name] = qt
    return out


QUANTIZERS.add("rtn", Quantizer(rtn_model, RTNConfig, False))
QUANTIZERS.add("gptq", Quantizer(gptq_model, GPTQConfig, True))
QUANTIZERS.add("awq", Quantizer(awq_model, AWQConfig, True))


def target_names(model) -> list[str]:
    """HF weight names of the Linears inside the decoder blocks (``model.layers.<i>.<path>.weight``)."""
    from slmkit.compress.calibrate import decoder_layers, linears

    names = []
    for i, block in enumerate(decoder_layers(model)):
        names += [f"model.layers.{i}.{n}.weight" for n in linears(block)]
    return names


def check_shapes(model, names: list[str], grid: Grid) -> None:
    """Raise ConfigError before anything changes when ``grid`` cannot hold some weight."""
    params = dict(model.named_parameters())
    for name in names:
        p = params[name]
        if p.dim() != 2:
            raise UnsupportedModelError(f"{name} is not a matrix (shape {tuple(p.shape)}); cannot quantise it")
        try:
            grid.groups(p.shape[1])
        except ConfigError as err:
            raise ConfigError(f"{err.problem} ({name}, shape {tuple(p.shape)})", err.hint) from None


def quantize(
    model,
    method: str,
    cfg,
    ids: torch.Tensor | None = None,
    embeddings: bool = False,
) -> Quantized:
    """Quantise ``model``'s decoder Linears in place with ``method`` (``rtn`` | ``gptq`` | ``awq``).

    ``ids`` (N, T) calibration token ids are needed by gptq and awq
    (:func:`slmkit.compress.calibrate.calibration_ids`). ``embeddings=True`` also
    rounds the token embedding (RTN, same grid), so that every matrix of a GGUF
    export carries exactly the in-memory weights. All shapes are checked before
    any weight changes.
    """
    q = QUANTIZERS.get(method)
    if not isinstance(cfg, q.config):
        raise ConfigError(f"{method} takes a {q.config.__name__}, got {type(cfg).__name__}")
    if q.needs_calibration and (ids is None or ids.dim() != 2 or ids.numel() == 0):
        raise ConfigError(f"{method} needs calibration token ids of shape (N, T)", "pass ids from calibration_ids()")
    names = target_names(model)
    if isinstance(model.get_input_embeddings(), nn.Embedding) and embeddings:
        check_shapes(model, [EMBEDDING], cfg.grid)
    check_shapes(model, names, cfg.grid)
    t0 = time.perf_counter()
    tensors = q.run(model, ids, cfg, names)
    if embeddings:
        tensors.update(rtn_model(model, None, RTNConfig(cfg.grid), [EMBEDDING]))
    missing = set(names) - set(tensors)
    if missing:
        raise RuntimeError(f"{method} left {len(missing)} weights unquantised, e.g. {sorted(missing)[0]}")
    return Quantized(method, cfg.grid, tensors, cfg, time.perf_counter() - t0)
