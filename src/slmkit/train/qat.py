"""Quantisation-aware training on GGUF block grids (LLM-QAT, Liu et al. 2023, arXiv:2305.17888).

During training every Linear of the decoder blocks computes with its fake-quantised
weight ``Q(w)`` (round-to-nearest on a :class:`~slmkit.compress.qgrid.Grid`, e.g.
the Q4_0 / Q4_1 block grids), while the optimizer updates the latent full-precision
``w``; gradients pass the rounding by the straight-through estimator
(Bengio et al. 2013): ``w_q = Q(w) + (w - stop_grad(w))``, so ``dL/dw = dL/dw_q``.
LLM-QAT trains this with a distillation loss on teacher-generated data; here it runs
through :func:`slmkit.train.distill.distill` with any loss of ``LOSSES``.

At the end :func:`finish_qat` puts the latent weights on the grid with the same RTN
rule (:func:`slmkit.compress.quantize.quantize`, method ``rtn``), so the saved model
holds exactly the weights the network was trained to compute with, and a GGUF export
on that grid is lossless.

The fake-quantised Linears keep their ``weight`` parameter (only the class changes),
so checkpoints, resume and ``save_pretrained`` see an ordinary model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.compress.qgrid import Grid, quantize_rtn
from slmkit.errors import ConfigError


def fake_quant(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """RTN ``w`` (out, in) onto ``grid`` with a straight-through gradient: value ``Q(w)``, gradient identity.

    The grid's own scale search is rerun each step (for k-quants, llama.cpp's sub-block
    scale/min search), so training sees exactly the rounding the export applies.
    """
    with torch.no_grad():
        wq = quantize_rtn(w.float(), grid).dequantize().to(w.dtype)
    return wq + (w - w.detach())  # STE: forward exactly Q(w) (the added term is 0), backward identity


def qat_grids(model, qat: str) -> dict[str, Grid]:
    """Each decoder Linear's grid (by HF weight name) for ``qat``: one GGUF type (Q4_0, Q4_K, ...) for
    all, or a llama.cpp file type (Q4_K_M, ...) whose per-tensor types ``llama-quantize`` would pick."""
    from slmkit.compress.qgrid import GGUF_TYPES as GGUF_GRIDS
    from slmkit.export.gguf_mix import FTYPES

    names = [f"{n}.weight" for n in _targets(model)]
    if qat in GGUF_GRIDS:  # one block type for every Linear (a file of that type keeps the embedding apart)
        return dict.fromkeys(names, Grid.for_gguf(qat))
    if qat in FTYPES:
        from slmkit.compress.quantize import gguf_grids

        grids = gguf_grids(model, qat, imatrix=True)
        return {n: grids[n] for n in names}
    raise ConfigError(f"unknown QAT grid {qat!r}",
                      f"use a GGUF type ({', '.join(GGUF_GRIDS)}) or a llama.cpp file type ({', '.join(FTYPES)})")


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses the fake-quantised weight (set by :func:`attach_fake_quant`)."""

    qat_grid: Grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant(self.weight, self.qat_grid), self.bias)


def _targets(model) -> dict[str, nn.Linear]:
    from slmkit.compress.calibrate import decoder_layers, linears

    out = {}
    for i, block in enumerate(decoder_layers(model)):
        out.update({f"model.layers.{i}.{n}": lin for n, lin in linears(block).items()})
    return out


def attach_fake_quant(model, grid: Grid | dict[str, Grid]) -> list[str]:
    """Make every decoder Linear compute with fake-quantised weights (in place); returns their names.

    ``grid``: one for all, or one per HF weight name (:func:`qat_grids`)."""
    targets = _targets(model)
    for name, lin in targets.items():
        if type(lin) is not nn.Linear and not isinstance(lin, FakeQuantLinear):
            raise ConfigError(f"{name} is a {type(lin).__name__}, not a plain Linear; cannot fake-quantise it")
        g = grid[f"{name}.weight"] if isinstance(grid, dict) else grid
        try:
            g.groups(lin.in_features)
            if g.group_size and lin.in_features % g.super_size:
                raise ConfigError(f"{g.gguf} needs input widths divisible by {g.super_size}, got {lin.in_features}")
        except ConfigError as err:
            raise ConfigError(f"{err.problem} ({name})", err.hint) from None
        lin.__class__ = FakeQuantLinear
        lin.qat_grid = g
    return list(targets)


def detach_fake_quant(model) -> None:
    """Turn fake-quantised Linears back into plain ones (weights unchanged: still the latent values)."""
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            m.__class__ = nn.Linear
            del m.qat_grid


def finish_qat(model, grid: Grid | dict[str, Grid]):
    """Detach fake quantisation and put the latent weights on their grids (RTN); returns the ``Quantized`` record."""
    from slmkit.compress.quantize import RTNConfig, quantize

    detach_fake_quant(model)
    if isinstance(grid, dict):
        return quantize(model, "rtn", RTNConfig(next(iter(grid.values()))), grids=grid)
    return quantize(model, "rtn", RTNConfig(grid))
