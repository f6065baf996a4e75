"""A new low-rank factorisation brings its own config (issue 18): ``@factoriser(name, config=XConfig)``, XConfig a
frozen subclass of LowRankConfig, is built from ``slmkit lowrank --option`` and the lowrank stage's ``options:``
with no edit to LowRankConfig, the CLI or the stage. The method here is registered inside the test and undone after."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from slmkit.artefact import Manifest
from slmkit.cli import main
from slmkit.compress.lowrank import FACTORISERS, LowRankConfig, config_class, factoriser, svd_factors
from slmkit.errors import ConfigError
from slmkit.pipeline.typed import RecipeError, build_config


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(FACTORISERS, "_items", dict(FACTORISERS._items))


@dataclass(frozen=True)
class RandomisedConfig(LowRankConfig):
    oversample: int = 4  #: extra sketch columns beyond the rank (Halko, Martinsson & Tropp 2011, Sec. 4.2)
    niter: int = 2  #: subspace (power) iterations (Halko et al., Alg. 4.4)
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.oversample < 0 or self.niter < 0:
            raise ConfigError(f"oversample and niter must be >= 0, got {self.oversample}, {self.niter}")


def register_randomised():
    @factoriser("seam-rsvd", calibration=False, config=RandomisedConfig)
    def randomised_factors(W: torch.Tensor, stats, rank: int, cfg: RandomisedConfig):
        """Randomised truncated SVD (Halko et al. 2011) through torch.svd_lowrank, split like the plain SVD."""
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            U, S, V = torch.svd_lowrank(W.double(), q=min(rank + cfg.oversample, *W.shape), niter=cfg.niter)
        root = S[:rank].sqrt()
        return U[:, :rank] * root[None, :], root[:, None] * V[:, :rank].T

    return randomised_factors


def test_a_new_factoriser_with_its_own_knobs_needs_no_other_edit(tiny_dir, tmp_path, capsys):
    from slmkit.pipeline.stages.compress import LowRankStageConfig

    fn = register_randomised()
    assert config_class("seam-rsvd") is RandomisedConfig and config_class("whiten") is LowRankConfig
    # the knobs act: with power iterations it comes within 0.1% of the exact truncated SVD (the optimum,
    # Eckart-Young); with none and no oversampling it is further off
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)).double()
    up0, down0 = svd_factors(W, None, 6)
    best = torch.linalg.matrix_norm(W - up0 @ down0)
    errors = [torch.linalg.matrix_norm(W - torch.mm(*fn(W, None, 6, RandomisedConfig(ratio=0.5, method="seam-rsvd", **kw))))
              for kw in ({"niter": 6}, {"niter": 0, "oversample": 0})]
    assert best <= errors[0] < best * 1.001 and errors[1] > errors[0] * 1.01

    out = tmp_path / "lr"
    assert main(["lowrank", str(tiny_dir), "--ratio", "0.8", "--method", "seam-rsvd", "--option", "niter=3",
                 "--option", "oversample=2", "--output", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "seam-rsvd"
    recorded = Manifest.read(out).stages[-1]["config"]
    assert (recorded["method"], recorded["niter"], recorded["oversample"], recorded["ratio"]) == ("seam-rsvd", 3, 2, 0.8)

    stage = build_config(LowRankStageConfig, {"ratio": 0.7, "method": "seam-rsvd", "options": {"seed": 5}}, "stage 1")
    assert stage.method_config() == RandomisedConfig(ratio=0.7, method="seam-rsvd", seed=5)
    with pytest.raises(RecipeError, match="stage 1: options: oversample and niter must be >= 0"):
        build_config(LowRankStageConfig, {"ratio": 0.7, "method": "seam-rsvd", "options": {"niter": -1}}, "stage 1")
    # the method's knobs belong to it alone: a built-in method's config does not take them
    with pytest.raises(RecipeError, match="unknown key 'niter'; LowRankConfig takes"):
        build_config(LowRankStageConfig, {"ratio": 0.7, "method": "whiten", "options": {"niter": 3}}, "stage 1")
    assert main(["lowrank", str(tiny_dir), "--ratio", "0.8", "--method", "plain", "--option", "niter=3",
                 "--output", str(tmp_path / "no")]) == 2
    assert "--option: unknown key 'niter'" in capsys.readouterr().err


def test_a_config_without_the_methods_class_is_refused():
    register_randomised()
    with pytest.raises(ConfigError, match="low-rank method 'seam-rsvd' takes a RandomisedConfig"):
        LowRankConfig(ratio=0.5, method="seam-rsvd")
    with pytest.raises(TypeError, match="config must be a dataclass subclassing LowRankConfig"):
        factoriser("seam-bad", calibration=False, config=dict)
    with pytest.raises(TypeError, match="hessian=True needs calibration=True"):
        factoriser("seam-bad", calibration=False, hessian=True)
    # built-ins: LowRankConfig, and only SVD-LLM's whitening collects H
    assert all(FACTORISERS.get(m).config is None for m in ("plain", "asvd", "whiten"))
    assert [m for m in ("plain", "asvd", "whiten") if FACTORISERS.get(m).hessian] == ["whiten"]


def test_registrations_do_not_leak():
    assert not any(n.startswith("seam-") for n in FACTORISERS.names())
