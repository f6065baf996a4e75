"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978).

Salient input channels (large mean |x|) are protected by scaling them up before
quantisation and folding the inverse scale into the operation that produces
them: ``y = W x = (W diag(s)) (diag(s)^-1 x)`` (Sec. 3.2, Eq. 4). Per group of
Linears that read the same tensor, the exponent ``alpha`` of
``s = s_X ** alpha`` is searched on a grid in [0, 1) (Eq. 5) to minimise the
output error; then, as in the reference implementation, each group's clipping
range is shrunk where that lowers the output error.

Differences from the reference code, stated: the output error is measured per
Linear through the calibration second moment ``H = X^T X / n`` as
``tr(dW H dW^T)`` (the exact squared output error of the Linear), not through a
forward pass of the whole attention/MLP module; clipping ignores cross-group terms
(as the reference does). Scales fold into the preceding RMSNorm
(``input_layernorm`` -> q/k/v, ``post_attention_layernorm`` -> gate/up), into
``up_proj`` rows for ``down_proj``, and into ``v_proj`` rows for ``o_proj`` when
their shapes match (not under grouped-query attention). Codes lie on the
:class:`~slmkit.compress.qgrid.Grid`, so a GGUF-typed grid exports them unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from slmkit.compress.qgrid import Grid, QTensor, quantize_rtn
from slmkit.compress.qmethods import quantizer
from slmkit.errors import ConfigError

log = logging.getLogger(__name__)

#: (module producing the input, Linears reading it) inside a llama decoder block
FOLDS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # attention logits are sensitive; the reference skips them


@dataclass(frozen=True)
class AWQConfig:
    """AWQ's knobs."""

    grid: Grid = Grid()  #: bits, group size, symmetry, GGUF type
    n_grid: int = 20  #: alpha candidates i / n_grid, i = 0..n_grid-1
    clip: bool = True  #: search a clipping ratio per (row, group)
    max_shrink: float = 0.5  #: smallest clipping ratio is 1 - max_shrink
    clip_steps: int = 10  #: clipping ratios tried
    seed: int = 0  #: seeds the calibration statistics' subsampling

    def __post_init__(self):
        if not isinstance(self.grid, Grid):
            raise ConfigError(f"AWQConfig.grid must be a Grid, got {type(self.grid).__name__}")
        if self.n_grid < 1:
            raise ConfigError(f"AWQ n_grid must be >= 1, got {self.n_grid}")
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.clip_steps < 1:
            raise ConfigError(f"AWQ clip_steps must be >= 1, got {self.clip_steps}")


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr(dW H dW^T)``: mean squared output error of a Linear over inputs with ``H = E[x x^T]``."""
    D = Wq - W  # (out, in)
    return ((D @ H) * D).sum()


def search_scale(weights: list[torch.Tensor], H: torch.Tensor, act: torch.Tensor, grid: Grid | list[Grid],
                 n_grid: int) -> torch.Tensor:
    """The per-input-channel scale ``s`` (in,) minimising the summed output error of ``weights``
    (``grid``: one for all, or one per weight)."""
    grids = grid if isinstance(grid, list) else [grid] * len(weights)
    sx = act.float().clamp_min(1e-4)  # (in,)  s_X: mean |x| per channel
    best, best_s = None, torch.ones_like(sx)
    for i in range(n_grid):
        alpha = i / n_grid
        s = sx.pow(alpha)  # s = s_X ** alpha (Eq. 5)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(output_error(W, quantize_rtn(W * s, g).dequantize() / s, H) for W, g in zip(weights, grids))
        if best is None or err < best:
            best, best_s = err, s
    return best_s


def search_clip(W: torch.Tensor, H: torch.Tensor, grid: Grid, max_shrink: float, steps: int) -> torch.Tensor:
    """Per-(row, group) clipping ratio (out, G) minimising each group's own output error."""
    out, cols = W.shape
    g = grid.width(cols)
    G = cols // g
    Hb = torch.stack([H[k * g : (k + 1) * g, k * g : (k + 1) * g] for k in range(G)])  # (G, g, g)
    Wb = W.float().reshape(out, G, g)
    best_err = torch.full((out, G), float("inf"))
    best = torch.ones(out, G)
    for i in range(steps):
        r = 1.0 - max_shrink * i / steps
        ratio = torch.full((out, G), r)
        D = quantize_rtn(W, grid, ratio).dequantize().reshape(out, G, g) - Wb  # (out, G, g)
        err = torch.einsum("ogi,gij,ogj->og", D, Hb, D)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, ratio, best)
    return best


def _scale_producer(prev: nn.Module, s: torch.Tensor) -> None:
    """Divide the output channels of ``prev`` (RMSNorm weight or Linear rows) by ``s``."""
    if isinstance(prev, nn.Linear):
        prev.weight.data.div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    else:
        prev.weight.data.div_(s.to(prev.weight.dtype))


def awq_block(block: nn.Module, stats: dict, cfg: AWQConfig, names: dict[str, str], grid_of=None) -> dict[str, QTensor]:
    """AWQ one decoder block in place; ``names`` maps block-relative Linear names to HF weight names,
    ``grid_of(hf name)`` gives each weight's grid (default ``cfg.grid``).

    On GGUF grids the final rounding also weights each input column by its mean squared activation
    (``diag H``, llama.cpp's imatrix scale search: make_qx_quants / make_qkx3_quants, which already
    search each block's range); the clip search is for the plain grids only.
    """
    def grid(n: str) -> Grid:
        return grid_of(names[n]) if grid_of else cfg.grid

    mods = dict(block.named_modules())
    H = {n: stats[n].H for n in names}
    # 1. search every fold group's scale on the original weights (as the reference does), then fold
    plans = []
    for prev_name, lin_names in FOLDS:
        prev = mods.get(prev_name)
        lins = [mods.get(n) for n in lin_names]
        if prev is None or any(m is None or n not in names for m, n in zip(lins, lin_names)):
            continue
        if not hasattr(prev, "weight") or prev.weight.shape[0] != lins[0].weight.shape[1]:
            continue  # e.g. v_proj -> o_proj under grouped-query attention
        st = stats[lin_names[0]]
        s = search_scale([m.weight.float() for m in lins], st.H, st.abs_mean, [grid(n) for n in lin_names], cfg.n_grid)
        plans.append((prev, lin_names, s))
    for prev, lin_names, s in plans:
        _scale_producer(prev, s)
        for n in lin_names:
            mods[n].weight.data.mul_(s[None, :].to(mods[n].weight.dtype))
            H[n] = H[n] / (s[:, None] * s[None, :])  # inputs are now x / s
    # 2. clip and quantise every Linear on the grid
    out = {}
    for n, full in names.items():
        W = mods[n].weight.float()
        g = grid(n)
        clip = importance = None
        if g.gguf is not None:
            importance = H[n].diagonal().clamp_min(0)
        if cfg.clip and n not in NO_CLIP and g.gguf is None:  # GGUF grids: llama.cpp's weighted scale search instead
            clip = search_clip(W, H[n], g, cfg.max_shrink, cfg.clip_steps)
        qt = quantize_rtn(W, g, clip, importance=importance)
        mods[n].weight.data.copy_(qt.dequantize().to(mods[n].weight.dtype))
        out[full] = qt
    return out


@quantizer("awq", AWQConfig, calibration=True, help="AWQ: activation-aware scaling (Lin et al. 2023)")
def awq_model(model, ids: torch.Tensor, cfg: AWQConfig, names: list[str], grid_of=None) -> dict[str, QTensor]:
    """AWQ-quantise the Linears ``names`` (HF weight names) of ``model`` in place, block by block."""
    from slmkit.compress.calibrate import sequential

    wanted = set(names)
    out: dict[str, QTensor] = {}

    def step(i: int, block, stats) -> None:
        mine = {n: f"model.layers.{i}.{n}.weight" for n in stats if f"model.layers.{i}.{n}.weight" in wanted}
        out.update(awq_block(block, stats, cfg, mine, grid_of))
        log.info("AWQ: block %d done", i)

    sequential(model, ids, step, seed=cfg.seed)
    return out
