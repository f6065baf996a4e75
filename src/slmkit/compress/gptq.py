"""GPTQ: accurate post-training quantization for generative transformers.

Frantar, Ashkboos, Hoefler & Alistarh 2022, arXiv:2210.17323. Each Linear's
weight ``W`` (out, in) is quantised one input column at a time; the error of a
column is spread over the columns not yet quantised through the inverse Hessian
``H^-1`` of the layer's reconstruction loss ``||X W^T - X W_hat^T||^2`` with
``H = X^T X`` (Alg. 1). Options follow the paper and its reference code:

* ``damp``: ``H += damp * mean(diag H) * I`` before inverting (Sec. 4, "Cholesky reformulation");
* lazy batch updates: columns are processed in blocks of ``block_size``; inside a
  block the update is applied column by column, to the rest of ``W`` once per block (Sec. 4, step 2);
* ``act_order``: columns in order of decreasing ``diag H`` (the "act-order" heuristic of the reference code);
* groups: one scale per ``group_size`` consecutive input columns. Without act-order a group's
  scale is fitted to the *updated* weights when its first column is reached (as in the paper);
  with act-order the scales are fitted to the original weights up front ("static groups"),
  so that groups stay contiguous in the input dimension, as GGUF blocks need.
* k-quant grids (GGUF Q4_K, Q5_K, Q6_K): the sub-block scales and mins and the super-block
  scales are part of the grid. They are fitted per super-block of 256 columns (when its first
  column is reached, or up front with act-order) by llama.cpp's importance-weighted search
  (:func:`~slmkit.compress.qgrid.fit_params`, the search ``llama-quantize --imatrix`` runs) with
  the Hessian's diagonal as the importance; GPTQ then chooses every code against those scales,
  compensating each column's error. Every GGUF grid's fit uses ``diag H`` as the importance this
  way (``importance=False``: the plain search); other grids keep the paper's max-based scales.

Codes are chosen on the :class:`~slmkit.compress.qgrid.Grid` (fp16 scales included),
so a GGUF-typed grid exports these codes unchanged. :func:`gptq_quantize` is pure;
:func:`gptq_model` hooks it into the sequential calibration loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slmkit.compress.hessian import inverse_hessian_factor, mask_dead_inputs
from slmkit.compress.kquant import row_sigma2
from slmkit.compress.qgrid import Grid, QTensor, codes_for, fit_params
from slmkit.compress.qmethods import quantizer
from slmkit.errors import ConfigError



@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's knobs."""

    grid: Grid = Grid()  #: bits, group size, symmetry, GGUF type
    damp: float = 0.01  #: dampening, as a fraction of the mean Hessian diagonal
    act_order: bool = True  #: quantise columns in order of decreasing activation energy (diag H)
    block_size: int = 128  #: columns per lazy batch update
    seed: int = 0  #: seeds the calibration statistics' subsampling
    importance: bool = True  #: on GGUF grids, fit scales by llama.cpp's search weighted by diag H (imatrix)

    def __post_init__(self):
        if not isinstance(self.grid, Grid):
            raise ConfigError(f"GPTQConfig.grid must be a Grid, got {type(self.grid).__name__}")
        if not 0 < self.damp < 1:
            raise ConfigError(f"GPTQ damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ConfigError(f"GPTQ block_size must be >= 1, got {self.block_size}")


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig, grid: Grid | None = None) -> QTensor:
    """GPTQ codes for ``W`` (out, in) given ``H`` (in, in) ~ X^T X on ``grid`` (default ``cfg.grid``);
    does not modify its inputs."""
    grid = grid or cfg.grid
    out, cols = W.shape
    ngroups = grid.groups(cols)
    g = grid.width(cols)
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    mask_dead_inputs(H, W)
    importance = H.diagonal().clone() if cfg.importance and grid.gguf is not None else None

    static = cfg.act_order or grid.group_size == 0
    unit = grid.super_size if grid.group_size else cols  # columns fitted together (a super-block for k-quants)
    per_unit = max(unit // g, 1)  # groups per fitted unit
    scales = torch.zeros(out, ngroups)
    mins = None if grid.symmetric else torch.zeros(out, ngroups)
    aux_parts: list[dict] = []
    sigma2 = None if static or importance is None or grid.kquant else row_sigma2(W)
    if static:  # fit every group's scale to the original weights
        s, m, aux = fit_params(W, grid, importance=importance)
        scales.copy_(s)
        if mins is not None:
            mins.copy_(m)
        aux_parts.append(aux)
    perm = torch.argsort(H.diagonal(), descending=True) if cfg.act_order else torch.arange(cols)
    W = W[:, perm]
    H = H[perm][:, perm]
    # (in, in) upper: row i holds H^-1 updates for column i
    U = inverse_hessian_factor(H, cfg.damp, "GPTQ: the calibration Hessian").float()
    Q = torch.zeros(out, cols, dtype=torch.int8)
    group_of = perm // g  # (in,) original group of each permuted column

    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        W1 = W[:, i1:i2].clone()  # (out, b)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            grp = int(group_of[c])
            if not static and perm[c] % unit == 0:  # first column of a unit: fit its scales now
                cur = W1[:, j : j + unit] if j + unit <= i2 - i1 else torch.cat([W1[:, j:], W[:, i2:]], 1)[:, :unit]
                imp = None if importance is None else importance[perm[c] : perm[c] + unit]
                # legacy types weight by the whole row's mean square (llama.cpp), not the slice's
                s, m, aux = fit_params(cur, grid, importance=imp, row_sigma2=sigma2)  # (out, per_unit)
                scales[:, grp : grp + per_unit] = s
                if mins is not None:
                    mins[:, grp : grp + per_unit] = m
                aux_parts.append(aux)
            w = W1[:, j]  # (out,)
            d = scales[:, grp]
            mn = None if mins is None else mins[:, grp]
            q = codes_for(w, d, mn, grid)
            Q[:, c] = q.to(torch.int8)
            wq = q * d if mn is None else q * d + mn
            err = (w - wq) / U1[j, j]  # (out,)  Alg. 1: E = (W - Q) / [H^-1]_jj
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]  # update the rest of the block
            E1[:, j] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update of the remaining columns
    inv = torch.argsort(perm)
    aux = None
    if aux_parts and aux_parts[0] is not None:  # per-unit encoder parameters, in column order
        aux = {k: torch.cat([a[k] for a in aux_parts], 1) if aux_parts[0][k].dim() > 1 else aux_parts[0][k]
               for k in aux_parts[0]}
    dt = torch.float32 if grid.kquant else torch.float16  # k-quants keep the exact fp32 products d*sc
    return QTensor(Q[:, inv].contiguous(), scales.to(dt), None if mins is None else mins.to(dt), grid, aux=aux)


@quantizer("gptq", GPTQConfig, calibration=True, help="GPTQ: Hessian-aware rounding (Frantar et al. 2022)")
def gptq_model(model, ids: torch.Tensor, cfg: GPTQConfig, names: list[str], grid_of=None) -> dict[str, QTensor]:
    """Quantise the Linears ``names`` (HF weight names) of ``model`` in place with GPTQ, block by block.

    ``grid_of(name)`` gives each weight's grid (default: ``cfg.grid`` for all). The weights become
    their fake-quantised values; the returned codes reproduce them exactly.
    """
    from slmkit.compress.calibrate import round_sequentially

    def codes(full: str, lin, st) -> QTensor:
        return gptq_quantize(lin.weight, st.H, cfg, grid_of(full) if grid_of else None)

    return round_sequentially(model, ids, names, codes, seed=cfg.seed, label="GPTQ")
