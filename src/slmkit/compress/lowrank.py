"""Low-rank factorisation of the decoder's Linear layers to a target parameter ratio.

Each ``nn.Linear`` ``W`` (out, in) becomes :class:`LowRankLinear`, two Linears
``up @ down`` with ``down`` (r, in) and ``up`` (out, r), which saves parameters
when ``r (in + out) < in * out``. Three ways to pick the factors:

* ``plain``: truncated SVD of ``W`` (Eckart-Young: best rank-r in weight space).
* ``asvd``: ASVD (Yuan et al. 2023, arXiv:2312.05821, Sec. 3.2): SVD of ``W S``
  with ``S = diag(mean|x_j|^alpha)``, then ``W ~ U_r Sigma_r V_r^T S^{-1}``.
* ``whiten`` (default): SVD-LLM's truncation-aware whitening (Wang et al. 2024,
  arXiv:2403.07378, Sec. 3.1): with ``H = X X^T / n = L L^T`` (Cholesky), SVD of
  ``W L`` and ``W ~ U_r Sigma_r V_r^T L^{-1}``. Because
  ``||(W - W') X||_F^2 = n ||(W - W') L||_F^2``, this is the exact minimiser of the
  layer's output error on the calibration inputs among rank-r matrices.

The activation-aware methods run block by block on the already-factorised
model's activations (the sequential loop of :mod:`slmkit.compress.calibrate`).

Every layer keeps the same fraction of its parameters, chosen so the whole
model keeps ``ratio`` of its parameters (embeddings and norms are not
factorised). How a factorised model is stored and loaded: ``save_pretrained``
writes the two factors of each layer as ``<layer>.down.weight`` and
``<layer>.up.weight`` and ``config.json`` gets a field ``slmkit_lowrank``
mapping each factorised layer's name to its rank. :func:`slmkit.models.load`
sees that field, builds the model from its config, swaps those Linears for
:class:`LowRankLinear` of the recorded ranks (:func:`load_lowrank`) and loads
the weights, so the artefact on disk really is smaller. (Plain
``transformers.from_pretrained`` does not know the field and would not load the
factors: use slmkit's loader.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slmkit import progress
from slmkit.compress.calibrate import LinearStats, decoder_layers, linears, sequential
from slmkit.compress.hessian import damped_cholesky
from slmkit.errors import ConfigError, CorruptModelError
from slmkit.models.readers import Reader
from slmkit.models.student import unique_parameters
from slmkit.registry import Registry

log = logging.getLogger(__name__)

CONFIG_KEY = "slmkit_lowrank"

Factoriser = Callable[[torch.Tensor, LinearStats | None, int, "LowRankConfig"], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LowRankMethod:
    """A registered factorisation ``run(W, stats, rank, cfg) -> (up, down)``, the calibration statistics it
    needs and its config class."""

    run: Factoriser
    needs_calibration: bool
    config: type | None = None  #: a frozen subclass of LowRankConfig holding the method's own knobs (None: LowRankConfig)
    hessian: bool = False  #: needs the layer input's ``H = X X^T / n`` (LinearStats.H), not only the activation means


FACTORISERS: Registry[LowRankMethod] = Registry("low-rank method")


def factoriser(name: str, *, calibration: bool, hessian: bool = False, config: type | None = None):
    """Register the decorated factorisation ``fn(W, stats, rank, cfg) -> (up, down)`` as low-rank method ``name``.

    A new method is one such function, anywhere in :mod:`slmkit.compress`, and a test; its own knobs, if any,
    are the fields of ``config``, a frozen dataclass subclassing :class:`LowRankConfig` (``cfg`` is then one of
    those), set with ``slmkit lowrank --option KEY=VALUE`` or the lowrank stage's ``options:``.
    ``calibration``: it needs calibration statistics; ``hessian``: they include ``H`` (costly)."""
    if config is not None and not (isinstance(config, type) and issubclass(config, LowRankConfig)):
        raise TypeError(f"low-rank method {name!r}: config must be a dataclass subclassing LowRankConfig, got {config!r}")
    if hessian and not calibration:
        raise TypeError(f"low-rank method {name!r}: hessian=True needs calibration=True")

    def deco(fn: Factoriser) -> Factoriser:
        FACTORISERS.add(name, LowRankMethod(fn, calibration, config, hessian))
        return fn

    return deco


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``r`` stand-in for an ``nn.Linear(in, out)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)  # (r, in)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)  # (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass(frozen=True)
class LowRankConfig:
    ratio: float  #: fraction of the model's parameters kept, in (0, 1)
    method: str = "whiten"  #: a registered factorisation (FACTORISERS): plain | asvd | whiten
    alpha: float = 0.5  #: ASVD's exponent on the activation scale
    damp: float = 1e-3  #: whiten: lambda = damp * mean(diag(H)) added to H before Cholesky
    batch_size: int = 8  #: calibration sequences per forward pass

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or not 0.0 < float(self.ratio) < 1.0:
            raise ConfigError(f"low-rank ratio (fraction of parameters kept) must be in (0, 1), got {self.ratio!r}")
        own = FACTORISERS.get(self.method).config  # unknown name -> ConfigError listing the known ones
        if own is not None and not isinstance(self, own):
            raise ConfigError(f"low-rank method {self.method!r} takes a {own.__name__} (its own knobs), got {type(self).__name__}",
                              "build it with slmkit.compress.lowrank.config_class(method)")
        if not 0.0 < self.alpha <= 2.0:
            raise ConfigError(f"alpha must be in (0, 2], got {self.alpha}")
        if not 0.0 <= self.damp < 1.0:
            raise ConfigError(f"damp must be in [0, 1), got {self.damp}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def needs_calibration(self) -> bool:
        return FACTORISERS.get(self.method).needs_calibration


def config_class(method: str) -> type:
    """The config class of low-rank method ``method``: its own (``@factoriser(config=...)``) or :class:`LowRankConfig`."""
    return FACTORISERS.get(method).config or LowRankConfig


# --------------------------------------------------------------------------------------
# pure factorisations: W (out, in) -> up (out, r), down (r, in)


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = S[:rank].sqrt()
    return U[:, :rank] * root[None, :], root[:, None] * Vh[:rank]


@factoriser("plain", calibration=False)
def svd_factors(W: torch.Tensor, stats: LinearStats | None, rank: int, cfg: LowRankConfig | None = None):
    """Truncated SVD ``W ~ U_r Sigma_r V_r^T``, split as ``(U sqrt(S), sqrt(S) V^T)``."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return _split(U, S, Vh, rank)


@factoriser("asvd", calibration=True)
def asvd_factors(W: torch.Tensor, stats: LinearStats, rank: int, cfg: LowRankConfig):
    """ASVD: SVD of ``W diag(s)``, ``s_j = mean|x_j|^alpha``, then undo the scaling (Sec. 3.2)."""
    s = stats.abs_mean.double().clamp_min(1e-6).pow(cfg.alpha)  # (in,)
    s = s / s.mean()
    U, S, Vh = torch.linalg.svd(W.double() * s[None, :], full_matrices=False)
    up, down = _split(U, S, Vh, rank)
    return up, down / s[None, :]


@factoriser("whiten", calibration=True, hessian=True)
def whitened_factors(W: torch.Tensor, stats: LinearStats, rank: int, cfg: LowRankConfig):
    """SVD-LLM: ``W ~ U_r Sigma_r V_r^T L^{-1}`` with ``L L^T = H`` (truncation-aware whitening, Sec. 3.1)."""
    L = damped_cholesky(stats.H, cfg.damp, "SVD-LLM whitening: the calibration statistics")  # (in, in) lower
    U, S, Vh = torch.linalg.svd(W.double() @ L, full_matrices=False)
    up, down = _split(U, S, Vh, rank)
    down = torch.linalg.solve_triangular(L, down, upper=False, left=False)  # down L^{-1}
    return up, down


# --------------------------------------------------------------------------------------
# ranks and the model


def rank_for(out_f: int, in_f: int, keep: float) -> int:
    """The largest rank whose two factors hold at most ``keep`` of the layer's ``out*in`` weights."""
    return max(1, int(keep * out_f * in_f // (out_f + in_f)))


def plan_ranks(model, ratio: float) -> dict[str, int]:
    """``{layer name: rank}`` so the factorised model has ~``ratio`` of the parameters."""
    lins = {
        f"model.layers.{i}.{name}": lin
        for i, block in enumerate(decoder_layers(model))
        for name, lin in linears(block).items()
    }
    total = unique_parameters(model)
    factorable = sum(lin.weight.numel() for lin in lins.values())
    keep = (ratio * total - (total - factorable)) / factorable  # fraction of each Linear kept
    if keep <= 0:
        lowest = (total - factorable) / total
        raise ConfigError(
            f"low-rank ratio {ratio} is below the parameters outside the decoder's Linears ({lowest:.3f} of the model)"
        )
    return {name: rank_for(*lin.weight.shape, keep) for name, lin in lins.items()}


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, child, new)


def factorise_linear(lin: nn.Linear, up: torch.Tensor, down: torch.Tensor) -> LowRankLinear:
    rank = down.shape[0]
    w = lin.weight
    new = LowRankLinear(lin.in_features, lin.out_features, rank, bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.down.weight.copy_(down.to(w.dtype))
        new.up.weight.copy_(up.to(w.dtype))
        if lin.bias is not None:
            new.up.bias.copy_(lin.bias)
    return new


def lowrank(model, calib_ids: torch.Tensor | None, cfg: LowRankConfig):
    """Factorise every decoder Linear so the model keeps ~``cfg.ratio`` of its parameters. In place.

    Records ``{layer: rank}`` in ``model.config.slmkit_lowrank`` (see the module docstring).
    """
    ranks = plan_ranks(model, cfg.ratio)
    method = FACTORISERS.get(cfg.method)
    factorise = method.run
    if cfg.needs_calibration and calib_ids is None:
        raise ConfigError(f"low-rank method {cfg.method} needs calibration ids", "or use method='plain'")

    def fn(i: int, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        for name, lin in linears(block).items():
            full = f"model.layers.{i}.{name}"
            if full not in ranks:
                continue
            up, down = factorise(lin.weight.detach(), stats.get(name), ranks[full], cfg)
            _replace(block, name, factorise_linear(lin, up, down))

    if cfg.needs_calibration:
        sequential(model, calib_ids, fn, batch_size=cfg.batch_size, hessian=method.hessian)
    else:
        with torch.no_grad():
            layers = decoder_layers(model)
            for i, block in enumerate(layers):
                fn(i, block, {})
                progress.step("blocks", i + 1, len(layers))
    model.config.slmkit_lowrank = dict(ranks)
    log.info("low-rank (%s): %d layers factorised", cfg.method, len(ranks))
    return model


def apply_structure(model, ranks: dict[str, int]) -> nn.Module:
    """Swap the named Linears of a freshly built ``model`` for empty :class:`LowRankLinear` of ``ranks``."""
    for name, rank in ranks.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CorruptModelError(f"config {CONFIG_KEY} names layer {name}, which the model does not have") from None
        if not isinstance(lin, nn.Linear):
            raise CorruptModelError(f"config {CONFIG_KEY} names {name}, which is not a Linear layer")
        new = LowRankLinear(lin.in_features, lin.out_features, int(rank), bias=lin.bias is not None,
                            dtype=lin.weight.dtype, device=lin.weight.device)
        _replace(model, name, new)
    return model


def is_lowrank_config(config) -> bool:
    return isinstance(getattr(config, CONFIG_KEY, None), dict)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise CorruptModelError(f"{path / f} is missing", "a low-rank artefact needs its safetensors weights")
        state.update(load_file(str(path / f)))
    return state


def load_lowrank(path: str | Path, config, dtype: torch.dtype = torch.float32):
    """Load a factorised model saved by ``save_pretrained`` (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_structure(model, getattr(config, CONFIG_KEY))
    state = _read_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (m == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise CorruptModelError(
            f"{path} does not match its low-rank config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if tied:
        model.tie_weights()
    return model.to(dtype).eval()


def is_lowrank_dir(path: str | Path) -> bool:
    """Whether ``path``'s config.json describes factorised Linears (written by :func:`lowrank`)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get(CONFIG_KEY), dict)


#: how :func:`slmkit.models.load` reads a factorised directory (named in :data:`slmkit.plugins.MODEL_READERS`)
READER = Reader(recognise=is_lowrank_dir, read=load_lowrank, help="factorised Linears written by `slmkit lowrank`")
