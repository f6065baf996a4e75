"""Unstructured and N:M pruning of the Linear layers in the decoder blocks.

* magnitude: drop the smallest ``|W_ij|`` of each output row.
* Wanda: Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"
  (arXiv:2306.11695): score ``S_ij = |W_ij| * ||X_j||_2`` compared within each
  output row (Eq. 1 and Sec. 3 "comparison group"), no weight update.
* SparseGPT: Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot" (arXiv:2301.00774): OBS reconstruction with the
  inverse Hessian ``(X X^T + lambda I)^{-1}``, column by column, lazy batched
  updates over blocks of ``blocksize`` columns (Alg. 1), adaptive mask selection
  per block.

A sparsity ``s`` in (0, 1) removes exactly ``round(s * in_features)`` weights
from every output row (for SparseGPT the quota is split across column blocks so
the per-row total is still exact). A pattern ``"N:M"`` keeps ``N`` weights in
every ``M`` consecutive input weights of a row (2:4, 4:8, as NVIDIA's sparse
tensor cores run). Embeddings and the LM head are not pruned. All pruners edit
the model in place and return it; the weights stay dense tensors with zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slmkit.compress.calibrate import LinearStats, decoder_layers, linears, sequential
from slmkit.compress.hessian import inverse_hessian_factor, mask_dead_inputs
from slmkit.errors import ConfigError
from slmkit.registry import Registry

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PruneMethod:
    """A registered pruner: ``run(model, calib_ids, cfg) -> model`` (in place), its config class, whether it
    needs calibration ids, and a one-line help."""

    run: Callable[..., nn.Module]
    config: type
    needs_calibration: bool
    help: str = ""


PRUNERS: Registry[PruneMethod] = Registry("pruning method")


def pruner(name: str, config: type, *, calibration: bool, help: str = ""):
    """Register the decorated ``fn(model, calib_ids, cfg)`` as pruning method ``name`` with its ``config`` class.

    The CLI verb, the build stage and :func:`prune` find it by name; nothing else is edited.
    """
    def deco(fn):
        PRUNERS.add(name, PruneMethod(fn, config, calibration, help))
        return fn

    return deco


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)`` (keep N of every M); None stays None."""
    if pattern is None:
        return None
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        raise ConfigError(f"N:M pattern must look like 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise ConfigError(f"impossible N:M pattern {pattern!r}: need 0 < N < M (keep N of every M weights)", "e.g. 2:4 or 4:8")
    return n, m


def _resolve_sparsity(cfg) -> None:
    """Fill a config's ``sparsity=None`` (0.5, or 1 - N/M with a pattern), then validate it."""
    nm = parse_pattern(cfg.pattern)
    if cfg.sparsity is None:
        object.__setattr__(cfg, "sparsity", 0.5 if nm is None else 1 - nm[0] / nm[1])
    _check_sparsity(cfg.sparsity, cfg.pattern)


def _check_sparsity(sparsity: float, pattern: str | None) -> None:
    nm = parse_pattern(pattern)
    if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise ConfigError(f"sparsity must be in (0, 1), got {sparsity!r}")
    if nm is not None and abs(float(sparsity) - (1 - nm[0] / nm[1])) > 1e-9:
        raise ConfigError(
            f"sparsity {sparsity} contradicts pattern {pattern} (which removes {1 - nm[0] / nm[1]:g})",
            "pass only one of --sparsity and --pattern",
        )


@dataclass(frozen=True)
class MagnitudeConfig:
    sparsity: float | None = None  #: fraction removed per output row, in (0, 1); None: 0.5, or 1 - N/M
    pattern: str | None = None  #: "N:M" semi-structured pattern (then sparsity must be 1 - N/M)

    def __post_init__(self):
        _resolve_sparsity(self)


@dataclass(frozen=True)
class WandaConfig:
    sparsity: float | None = None  #: fraction removed per output row, in (0, 1); None: 0.5, or 1 - N/M
    pattern: str | None = None  #: "N:M" pattern
    batch_size: int = 8  #: calibration sequences per forward pass

    def __post_init__(self):
        _resolve_sparsity(self)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class SparseGPTConfig:
    sparsity: float | None = None  #: fraction removed per output row, in (0, 1); None: 0.5, or 1 - N/M
    pattern: str | None = None  #: "N:M" pattern
    blocksize: int = 128  #: columns per lazy-update block (Alg. 1, B)
    damp: float = 0.01  #: lambda = damp * mean(diag(H)) added to the Hessian diagonal
    batch_size: int = 8  #: calibration sequences per forward pass

    def __post_init__(self):
        _resolve_sparsity(self)
        if self.blocksize < 1:
            raise ConfigError(f"blocksize must be >= 1, got {self.blocksize}")
        if not 0.0 <= self.damp < 1.0:
            raise ConfigError(f"damp must be in [0, 1), got {self.damp}")
        nm = parse_pattern(self.pattern)
        if nm is not None and self.blocksize % nm[1]:
            raise ConfigError(f"blocksize {self.blocksize} must be a multiple of M={nm[1]}")


# --------------------------------------------------------------------------------------
# pure tensor functions


def _check_nm(weight: torch.Tensor, nm: tuple[int, int], name: str = "layer") -> None:
    if weight.shape[1] % nm[1]:
        raise ConfigError(
            f"N:M pattern {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}; {name} has {weight.shape[1]}"
        )


def mask_from_scores(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean mask (True = pruned) of the lowest scores: per row, or per group of M for N:M.

    ``scores`` is ``(out, in)``. Unstructured: exactly ``round(sparsity * in)`` per row.
    """
    out_f, in_f = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        _check_nm(scores, nm)
        groups = scores.reshape(out_f, in_f // m, m)  # (out, in/M, M)
        idx = groups.topk(m - n, dim=-1, largest=False).indices
        return mask.reshape(out_f, in_f // m, m).scatter_(-1, idx, True).reshape(out_f, in_f)
    k = int(round(sparsity * in_f))
    if k:
        idx = scores.topk(k, dim=1, largest=False).indices  # (out, k)
        mask.scatter_(1, idx, True)
    return mask


def magnitude_prune(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """``weight`` with its smallest-magnitude entries zeroed (a new tensor)."""
    mask = mask_from_scores(weight.abs().float(), sparsity, nm)
    return weight.masked_fill(mask, 0)


def wanda_prune(
    weight: torch.Tensor, sq_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Wanda: zero the lowest ``|W_ij| * ||X_j||_2`` of each row (Sun et al. 2023, Eq. 1)."""
    scores = weight.abs().float() * sq_norm.float().clamp_min(0).sqrt()[None, :]  # (out, in)
    mask = mask_from_scores(scores, sparsity, nm)
    return weight.masked_fill(mask, 0)


def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1) for one ``(out, in)`` weight; returns a new tensor.

    ``H`` is ``(in, in)``, proportional to ``X X^T``. The pruning error of column
    ``j``, ``(w_j - 0) / [H^-1]_jj``, is spread over the remaining columns with
    the row ``[H^-1]_{j, j:}`` of the Cholesky factor (the OBS update, Eq. 3).
    """
    W = weight.detach().double().clone()  # (out, in)
    out_f, in_f = W.shape
    if nm is not None:
        _check_nm(W, nm)
    H = H.double().clone()
    mask_dead_inputs(H, W)  # inputs that never fire: prune them for free
    Hinv = inverse_hessian_factor(H, damp, "SparseGPT: the calibration Hessian")  # (in, in) upper
    k_total = int(round(sparsity * in_f))
    pruned_so_far = 0
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()  # (out, B)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()  # (B,)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            # per-row quota of this block, so each row ends with exactly k_total zeros
            quota = int(round(sparsity * i2)) - pruned_so_far if i2 < in_f else k_total - pruned_so_far
            pruned_so_far += quota
            if quota > 0:
                score = W1.square() / d.square()[None, :]  # OBS saliency w^2 / [H^-1]_jj^2 (Eq. 7)
                mask1.scatter_(1, score.topk(quota, dim=1, largest=False).indices, True)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i : i + m].square() / d[i : i + m].square()[None, :]  # (out, M)
                mask1.scatter_(1, i + score.topk(m - n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]  # (out,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # OBS update of the later columns
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batched update (Alg. 1, line 13)
    return W.to(weight.dtype)


# --------------------------------------------------------------------------------------
# model-level pruners


def _decoder_linears(model) -> dict[str, nn.Linear]:
    out = {}
    for i, block in enumerate(decoder_layers(model)):
        for name, lin in linears(block).items():
            out[f"model.layers.{i}.{name}"] = lin
    return out


def _check_model_nm(model, pattern: str | None) -> tuple[int, int] | None:
    nm = parse_pattern(pattern)
    if nm is not None:
        for name, lin in _decoder_linears(model).items():
            _check_nm(lin.weight, nm, name)
    return nm


@pruner("magnitude", MagnitudeConfig, calibration=False, help="drop the smallest |W| per output row")
def magnitude(model, calib_ids: torch.Tensor | None = None, cfg: MagnitudeConfig = MagnitudeConfig()):
    """Magnitude pruning of every decoder Linear, per output row (no calibration). In place."""
    nm = _check_model_nm(model, cfg.pattern)
    with torch.no_grad():
        for lin in _decoder_linears(model).values():
            lin.weight.copy_(magnitude_prune(lin.weight, cfg.sparsity, nm))
    return model


@pruner("wanda", WandaConfig, calibration=True, help="Wanda: |W| * ||X|| per output row (Sun et al. 2023)")
def wanda(model, calib_ids: torch.Tensor, cfg: WandaConfig = WandaConfig()):
    """Wanda, block by block on the already-pruned model's activations. In place."""
    nm = _check_model_nm(model, cfg.pattern)

    def fn(i: int, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        for name, lin in linears(block).items():
            lin.weight.copy_(wanda_prune(lin.weight, stats[name].sq_norm, cfg.sparsity, nm))

    sequential(model, calib_ids, fn, batch_size=cfg.batch_size, hessian=False)
    return model


@pruner("sparsegpt", SparseGPTConfig, calibration=True, help="SparseGPT: OBS reconstruction (Frantar & Alistarh 2023)")
def sparsegpt(model, calib_ids: torch.Tensor, cfg: SparseGPTConfig = SparseGPTConfig()):
    """SparseGPT, block by block (each block calibrated on the pruned blocks' outputs). In place."""
    nm = _check_model_nm(model, cfg.pattern)

    def fn(i: int, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        for name, lin in linears(block).items():
            new = sparsegpt_prune(lin.weight, stats[name].H, cfg.sparsity, nm, cfg.blocksize, cfg.damp)
            lin.weight.copy_(new)

    sequential(model, calib_ids, fn, batch_size=cfg.batch_size)
    return model


def needs_calibration(method: str) -> bool:
    """Whether the registered pruning method ``method`` needs calibration ids."""
    return PRUNERS.get(method).needs_calibration


def pruner_config(method: str, given: dict, labels: dict | None = None, ignore: frozenset = frozenset()):
    """The config of pruning method ``method`` from ``given`` field values (None: not given, the default).

    A given field the config does not have is an error naming its ``labels`` entry (a CLI flag or
    recipe key), unless it is in ``ignore``; a required field left out is an error too.
    """
    import dataclasses

    cls = PRUNERS.get(method).config
    labels = labels or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = {k: v for k, v in given.items() if v is not None and (k in fields or k not in ignore)}
    stray = [labels.get(k, k) for k in given if k not in fields]
    if stray:
        raise ConfigError(f"{', '.join(stray)} does not apply to method {method}")
    missing = [labels.get(n, n) for n, f in fields.items() if n not in given
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"method {method} needs {', '.join(missing)}")
    return cls(**given)


def weight_sparsity(model) -> float:
    """Fraction of exact zeros over the decoder Linear weights."""
    zeros = total = 0
    for lin in _decoder_linears(model).values():
        zeros += int((lin.weight == 0).sum())
        total += lin.weight.numel()
    return zeros / max(total, 1)


def prune(model, calib_ids: torch.Tensor | None, method: str, cfg) -> nn.Module:
    """Run the registered pruner ``method`` with its config ``cfg`` (in place; returns the model)."""
    p = PRUNERS.get(method)
    if not isinstance(cfg, p.config):
        raise ConfigError(f"{method} takes a {p.config.__name__}, got {type(cfg).__name__}")
    if calib_ids is None and p.needs_calibration:
        raise ConfigError(f"{method} needs calibration ids (see slmkit.compress.calibration_ids)")
    return p.run(model, calib_ids, cfg)
