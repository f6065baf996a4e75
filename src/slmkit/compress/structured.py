"""Structured pruning that really shrinks the model: whole decoder blocks, KV groups, FFN channels.

Depth: remove whole decoder blocks, ranked by

* ``block_influence``: ShortGPT (Men et al. 2024, arXiv:2403.03853, Eq. 1):
  ``BI_i = 1 - E_t[cos(x_{i,t}, x_{i+1,t})]`` over the calibration tokens; the
  blocks that change their input least are removed (one shot);
* ``perplexity``: the calibration NLL of the model with that one block skipped
  (the "PPL" metric of Kim et al. 2024, Shortened LLaMA, arXiv:2402.02834); the
  blocks whose removal costs least are removed.

Width: remove attention heads and FFN channels, ranked by activation-based
importance as in Minitron (Muralidharan et al. 2024, arXiv:2407.14679, Sec. 2.2)
computed on calibration data: a structure's score is the L2 norm over tokens of
the activations it feeds into the output projection, weighted by the norm of its
output-projection columns (``||X_j||_2 * ||W_out[:, j]||_2``, summed over the
channels of a head; the Wanda criterion applied to whole structures). Heads are
removed in whole GQA groups (a KV head with all its query heads), so the GQA
ratio stays the same. The number of KV groups and FFN channels kept is the same
in every block (the HF config has one value of each), chosen to hit a target
fraction of parameters; which ones are kept is decided per block, block by
block on the already-pruned model's activations (the sequential loop of
:mod:`slmkit.compress.calibrate`).

Both return the same model object, edited in place, with an updated config
(``num_hidden_layers``; ``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``intermediate_size``), so ``save_pretrained`` writes a dense
smaller model that ``from_pretrained`` loads.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slmkit import progress
from slmkit.compress.calibrate import LinearStats, decoder_layers, sequential
from slmkit.compress.hessian import damped
from slmkit.compress.prune import pruner
from slmkit.errors import ConfigError, UnsupportedModelError
from slmkit.models.student import unique_parameters
from slmkit.registry import Registry

log = logging.getLogger(__name__)

BLOCK_SCORERS: Registry = Registry("block ranking method")


@dataclass(frozen=True)
class DepthConfig:
    keep_layers: int  #: decoder blocks kept (>= 1, < the model's blocks)
    method: str = "block_influence"  #: block ranking: block_influence | perplexity
    batch_size: int = 8  #: calibration sequences per forward pass

    def __post_init__(self):
        if not isinstance(self.keep_layers, int) or self.keep_layers < 1:
            raise ConfigError(f"keep_layers must be an integer >= 1, got {self.keep_layers!r}")
        if self.method not in BLOCK_SCORERS:
            BLOCK_SCORERS.get(self.method)  # raises with the known names
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class WidthConfig:
    ratio: float  #: fraction of the model's parameters kept (approximate), in (0, 1)
    heads: bool = True  #: prune attention heads (whole KV groups)
    mlp: bool = True  #: prune FFN channels
    multiple_of: int = 32  #: FFN width is rounded to a multiple of this (GGUF blocks are 32 wide)
    refit: bool = True  #: least-squares refit of o_proj / down_proj on the kept inputs (see refit_columns)
    damp: float = 0.01  #: refit: lambda = damp * mean(diag(H)) added to H[S, S]
    batch_size: int = 8  #: calibration sequences per forward pass

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or not 0.0 < float(self.ratio) < 1.0:
            raise ConfigError(f"width ratio (fraction of parameters kept) must be in (0, 1), got {self.ratio!r}")
        if not (self.heads or self.mlp):
            raise ConfigError("width pruning needs heads and/or mlp enabled")
        if self.multiple_of < 1:
            raise ConfigError(f"multiple_of must be >= 1, got {self.multiple_of}")
        if not 0.0 <= self.damp < 1.0:
            raise ConfigError(f"damp must be in [0, 1), got {self.damp}")


# --------------------------------------------------------------------------------------
# depth


@BLOCK_SCORERS.register("block_influence")
@torch.no_grad()
def block_influence(model, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``(L,)`` ShortGPT block influence ``1 - mean cos(input, output)`` of every block (higher = keep)."""
    L = len(decoder_layers(model))
    cos_sum = torch.zeros(L, dtype=torch.float64)
    count = torch.zeros(L, dtype=torch.float64)

    def on_block(i, inputs, outputs):
        for x, y in zip(inputs, outputs):
            c = F.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
            cos_sum[i] += c.double().sum()
            count[i] += c.numel()

    sequential(model, ids, lambda *a: None, batch_size=batch_size, collect=False, on_block=on_block)
    return (1 - cos_sum / count).float()


@torch.no_grad()
def _mean_nll(model, ids: torch.Tensor, batch_size: int) -> float:
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for b0 in range(0, ids.shape[0], batch_size):
        batch = ids[b0 : b0 + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        n += batch[:, 1:].numel()
    return total / max(n, 1)


@BLOCK_SCORERS.register("perplexity")
@torch.no_grad()
def perplexity_impact(model, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``(L,)`` calibration NLL with block ``i`` skipped, minus the full model's (higher = keep)."""
    layers = decoder_layers(model)
    n_layers = model.config.num_hidden_layers
    base = _mean_nll(model, ids, batch_size)
    scores = torch.zeros(len(layers))
    try:
        for i in range(len(layers)):
            model.model.layers = nn.ModuleList([b for j, b in enumerate(layers) if j != i])
            model.config.num_hidden_layers = len(layers) - 1
            scores[i] = _mean_nll(model, ids, batch_size) - base
            progress.step("blocks skipped in turn", i + 1, len(layers))
    finally:
        model.model.layers = layers
        model.config.num_hidden_layers = n_layers
    return scores


def remove_layers(model, drop: list[int]) -> nn.Module:
    """Remove decoder blocks ``drop`` in place; renumber the rest and update the config."""
    layers = decoder_layers(model)
    drop_set = set(drop)
    if not drop_set <= set(range(len(layers))):
        raise ConfigError(f"layers {sorted(drop_set)} are not all in 0..{len(layers) - 1}")
    kept = [b for i, b in enumerate(layers) if i not in drop_set]
    if not kept:
        raise ConfigError("cannot remove every decoder block")
    for new_idx, block in enumerate(kept):
        for m in block.modules():  # attention modules index the KV cache by layer_idx
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    model.model.layers = nn.ModuleList(kept)
    cfg = model.config
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == len(layers):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in drop_set]
    cfg.num_hidden_layers = len(kept)
    return model


def prune_depth(model, calib_ids: torch.Tensor, keep_layers: int, method: str = "block_influence", batch_size: int = 8):
    """Keep the ``keep_layers`` most important decoder blocks (ranked by ``method``). In place; returns the model."""
    return depth(model, calib_ids, DepthConfig(keep_layers, method, batch_size))


@pruner("depth", DepthConfig, calibration=True, help="remove whole decoder blocks (ShortGPT block influence)")
def depth(model, calib_ids: torch.Tensor, cfg: DepthConfig):
    """Depth pruning with a :class:`DepthConfig` (the registered pruner)."""
    L = len(decoder_layers(model))
    if cfg.keep_layers >= L:
        raise ConfigError(f"keep_layers must be below the model's {L} blocks, got {cfg.keep_layers}")
    scores = BLOCK_SCORERS.get(cfg.method)(model, calib_ids, cfg.batch_size)  # (L,)
    drop = sorted(scores.argsort()[: L - cfg.keep_layers].tolist())
    log.info("depth pruning by %s: removing blocks %s (scores %s)", cfg.method, drop, [round(float(s), 4) for s in scores])
    return remove_layers(model, drop)


# --------------------------------------------------------------------------------------
# width


def _block_parts(block: nn.Module):
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
    ok = attn is not None and mlp is not None and all(isinstance(getattr(attn, n, None), nn.Linear) for n in names[0])
    ok = ok and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names[1])
    if not ok:
        raise UnsupportedModelError(
            f"width pruning needs llama-style blocks (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj); got {type(block).__name__}"
        )
    return attn, mlp


@dataclass(frozen=True)
class WidthPlan:
    kv_heads: int  #: KV groups kept per block
    heads: int  #: query heads kept per block
    intermediate: int  #: FFN channels kept per block
    parameters: int  #: parameters of the pruned model


def width_plan(model, cfg: WidthConfig) -> WidthPlan:
    """How many KV groups and FFN channels every block keeps so the model has ~``ratio`` of its parameters."""
    c = model.config
    L, d = c.num_hidden_layers, c.hidden_size
    n_q, n_kv = c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or d // n_q
    inter = c.intermediate_size
    rep = n_q // n_kv
    attn, mlp = _block_parts(decoder_layers(model)[0])
    attn_bias = sum(getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj"))
    per_group = d * hd * (2 * rep + 2) + (hd * rep + 2 * hd if attn_bias else 0)  # q,o + k,v (+ biases)
    per_channel = 3 * d + (2 if mlp.gate_proj.bias is not None else 0)
    total = unique_parameters(model)
    fixed = total - L * (n_kv * per_group + inter * per_channel)
    target = cfg.ratio * total
    budget = (target - fixed) / L  # prunable parameters per block
    floor = (per_group if cfg.heads else n_kv * per_group) + (cfg.multiple_of if cfg.mlp else inter) * per_channel
    if budget < floor:
        lowest = (fixed + L * floor) / total
        raise ConfigError(f"width ratio {cfg.ratio} is below what width pruning can reach ({lowest:.3f} of the parameters)")
    if not cfg.mlp:
        kv = max(1, min(n_kv, math.floor((budget - inter * per_channel) / per_group)))
        ch = inter
    else:
        f = budget / (n_kv * per_group + inter * per_channel)  # uniform shrink factor
        kv = max(1, min(n_kv, round(n_kv * f))) if cfg.heads else n_kv
        ch = (budget - kv * per_group) / per_channel
        ch = int(max(cfg.multiple_of, min(inter, round(ch / cfg.multiple_of) * cfg.multiple_of)))
    params = fixed + L * (kv * per_group + ch * per_channel)
    return WidthPlan(kv_heads=kv, heads=kv * rep, intermediate=ch, parameters=int(params))


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.detach()[rows] if rows is not None else lin.bias.detach())
    return new


def head_group_scores(o_proj: nn.Linear, stats: LinearStats, n_kv: int, head_dim: int) -> torch.Tensor:
    """``(n_kv,)`` importance of each GQA group: sum over its channels of ``||X_j|| * ||W_o[:, j]||``."""
    chan = stats.sq_norm.clamp_min(0).sqrt() * o_proj.weight.detach().float().norm(dim=0)  # (n_q * hd,)
    return chan.reshape(n_kv, -1).sum(-1)  # query heads of group g are g*rep .. (g+1)*rep-1 (repeat_kv order)


def channel_scores(down_proj: nn.Linear, stats: LinearStats) -> torch.Tensor:
    """``(inter,)`` importance of each FFN channel: ``||X_j|| * ||W_down[:, j]||``."""
    return stats.sq_norm.clamp_min(0).sqrt() * down_proj.weight.detach().float().norm(dim=0)


def refit_columns(weight: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``(out, |S|)`` weights on the kept inputs ``S`` that best reproduce ``W x`` on the calibration inputs.

    Minimises ``||W X - W' X_S||_F`` with ``H = X X^T / n``:
    ``W' = W H[:, S] (H[S, S] + lambda I)^{-1}`` (the least-squares output
    compensation of structured OBS pruning, e.g. ZipLM, Kurtic et al. 2023,
    arXiv:2302.04089; FLAP/SlimGPT reconstruct the same way).
    """
    H = H.double()
    Hss = H[keep][:, keep]
    rhs = (weight.double() @ H[:, keep]).T  # (|S|, out)
    sol = torch.linalg.solve(damped(Hss, damp), rhs)  # (|S|, out)
    return sol.T.to(weight.dtype)


def _prune_block(
    block: nn.Module, stats: dict[str, LinearStats], plan: WidthPlan, n_kv: int, hd: int, cfg: WidthConfig
) -> None:
    attn, mlp = _block_parts(block)
    if plan.kv_heads < n_kv:
        g = head_group_scores(attn.o_proj, stats["self_attn.o_proj"], n_kv, hd)
        keep = g.topk(plan.kv_heads).indices.sort().values  # (kv,)
        rep = attn.q_proj.out_features // (n_kv * hd)
        kv_rows = (keep[:, None] * hd + torch.arange(hd)).reshape(-1)
        q_heads = (keep[:, None] * rep + torch.arange(rep)).reshape(-1)
        q_rows = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows)
        new_o = _slice_linear(attn.o_proj, cols=q_rows)
        if cfg.refit:
            new_o.weight.data.copy_(refit_columns(attn.o_proj.weight, stats["self_attn.o_proj"].H, q_rows, cfg.damp))
        attn.o_proj = new_o
    if plan.intermediate < mlp.down_proj.in_features:
        s = channel_scores(mlp.down_proj, stats["mlp.down_proj"])
        keep = s.topk(plan.intermediate).indices.sort().values
        mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=keep)
        mlp.up_proj = _slice_linear(mlp.up_proj, rows=keep)
        new_down = _slice_linear(mlp.down_proj, cols=keep)
        if cfg.refit:
            new_down.weight.data.copy_(refit_columns(mlp.down_proj.weight, stats["mlp.down_proj"].H, keep, cfg.damp))
        mlp.down_proj = new_down


def prune_width(model, calib_ids: torch.Tensor, ratio: float, batch_size: int = 8, refit: bool = True):
    """Prune KV groups and FFN channels to keep ~``ratio`` of the parameters. In place; returns the model."""
    return width(model, calib_ids, WidthConfig(ratio=ratio, batch_size=batch_size, refit=refit))


@pruner("width", WidthConfig, calibration=True, help="remove KV groups and FFN channels (Minitron)")
def width(model, calib_ids: torch.Tensor, cfg: WidthConfig):
    """Width pruning with a :class:`WidthConfig` (the registered pruner)."""
    for block in decoder_layers(model):
        _block_parts(block)
    c = model.config
    n_kv = c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    plan = width_plan(model, cfg)
    log.info("width pruning plan: %s", plan)

    def fn(i: int, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        _prune_block(block, stats, plan, n_kv, hd, cfg)

    sequential(
        model, calib_ids, fn, batch_size=cfg.batch_size, hessian=cfg.refit, only=("self_attn.o_proj", "mlp.down_proj")
    )
    c.head_dim = hd
    c.num_attention_heads = plan.heads
    c.num_key_value_heads = plan.kv_heads
    c.intermediate_size = plan.intermediate
    return model

