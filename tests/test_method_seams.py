"""A new pruning method, quantiser or distillation loss is one decorated function (with its config): the CLI
verb, the build stage and the library entry point find it by name with no other file edited (issue 18).

Each test registers a method here, beside the test, exactly as a new module would, and runs it through
``slmkit prune`` / ``quantize`` / ``distill`` and a recipe stage. The registries are copied per test,
so the registrations are undone afterwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from slmkit.artefact import Manifest
from slmkit.cli import main
from slmkit.errors import ConfigError
from slmkit.compress.prune import PRUNERS, mask_from_scores, pruner
from slmkit.compress.qgrid import Grid, quantize_rtn
from slmkit.compress.qmethods import QUANTIZERS, quantizer
from slmkit.models.tiny import save_tiny, tiny_corpus, tiny_llama_config, tiny_model
from slmkit.pipeline.recipe import build_config
from slmkit.train.losses import LOSSES, LossConfig, divergence, token_divergence


@pytest.fixture(autouse=True)
def fresh_registries(monkeypatch):
    for registry in (PRUNERS, QUANTIZERS, LOSSES):
        monkeypatch.setattr(registry, "_items", dict(registry._items))


def test_a_new_pruner_needs_no_other_edit(tiny_dir, tmp_path, capsys):
    from slmkit.pipeline.stages.compress import PruneConfig

    @dataclass(frozen=True)
    class RandomConfig:
        sparsity: float = 0.5
        seed: int = 0

    @pruner("seam-random", RandomConfig, calibration=False, help="random unstructured pruning")
    def random_prune(model, calib_ids, cfg: RandomConfig):
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("model.layers.") and p.dim() == 2:
                    p.masked_fill_(mask_from_scores(torch.rand(p.shape, generator=gen), cfg.sparsity), 0.0)
        return model

    out = tmp_path / "p"
    assert main(["prune", str(tiny_dir), "--method", "seam-random", "--sparsity", "0.3", "--option", "seed=3",
                 "--output", str(out), "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["sparsity"] - 0.3) < 0.02
    assert Manifest.read(out).stages[-1]["config"] == {"sparsity": 0.3, "seed": 3}
    stage = build_config(PruneConfig, {"method": "seam-random", "sparsity": 0.4, "options": {"seed": 1}}, "stage 1")
    assert stage.method_config() == RandomConfig(sparsity=0.4, seed=1)


def test_a_new_quantizer_needs_no_other_edit(tiny_dir, tmp_path, capsys):
    from slmkit.pipeline.stages.compress import QuantizeConfig

    @dataclass(frozen=True)
    class ClipConfig:
        grid: Grid = Grid()
        quantile: float = 0.999

    @quantizer("seam-clip", ClipConfig, calibration=False, help="RTN on rows clipped at a magnitude quantile")
    def clip_model(model, ids, cfg: ClipConfig, names, grid_of=None):
        params, out = dict(model.named_parameters()), {}
        with torch.no_grad():
            for name in names:
                w = params[name].float()
                c = w.abs().quantile(cfg.quantile, dim=1, keepdim=True)  # (out, 1)
                out[name] = quantize_rtn(w.clamp(-c, c), grid_of(name) if grid_of else cfg.grid)
                params[name].copy_(out[name].dequantize())
        return out

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--method", "seam-clip", "--bits", "4", "--group-size", "32",
                 "--option", "quantile=0.99", "--output", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "seam-clip"
    assert Manifest.read(out).stages[-1]["config"]["quantile"] == 0.99
    stage = build_config(QuantizeConfig, {"method": "seam-clip", "options": {"quantile": 0.99}}, "stage 1")
    assert isinstance(stage.method_config(), ClipConfig) and stage.method_config().grid.gguf == "Q4_0"


def test_a_new_loss_needs_no_other_edit(tiny_tok, tmp_path, capsys):
    from slmkit.pipeline.stages.train import DistillStageConfig
    from slmkit.train.losses import loss_config

    @dataclass(frozen=True)
    class AlphaConfig(LossConfig):
        a: float = 0.5  #: Amari's alpha in (0, 1); 0.5 is four times the squared Hellinger distance

    @divergence("seam-alpha", summary="Amari alpha-divergence", config=AlphaConfig)
    def alpha_divergence(lp, lq, cfg: AlphaConfig):
        # D_a(P || Q) = (1 - sum_v p_v^a q_v^(1-a)) / (a (1 - a))  (Amari 2009)
        return (1 - torch.exp(cfg.a * lp + (1 - cfg.a) * lq).sum(-1)) / (cfg.a * (1 - cfg.a))

    logits = torch.randn(5, 11)
    cfg = loss_config({"loss": "seam-alpha"}, {"a": 0.3})
    assert cfg == AlphaConfig(loss="seam-alpha", a=0.3)
    assert token_divergence(logits, logits, cfg).abs().max() < 1e-6
    assert (token_divergence(logits, torch.randn(5, 11), cfg) > 0).all()
    with pytest.raises(ConfigError, match="takes a AlphaConfig"):
        LossConfig(loss="seam-alpha")
    save_tiny(tiny_model(tiny_llama_config(tiny_tok, layers=2), seed=1), tiny_tok, tmp_path / "t")
    save_tiny(tiny_model(tiny_llama_config(tiny_tok, layers=1), seed=2), tiny_tok, tmp_path / "s")
    (tmp_path / "d.txt").write_text("\n".join(tiny_corpus(40)))
    assert main(["distill", "--teacher", str(tmp_path / "t"), "--student", str(tmp_path / "s"), "--data", str(tmp_path / "d.txt"),
                 "--max-steps", "2", "--block-size", "32", "--loss", "seam-alpha", "--loss-option", "a=0.25",
                 "--output", str(tmp_path / "o"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == "seam-alpha"
    assert Manifest.read(tmp_path / "o").stages[-1]["config"]["loss"]["a"] == 0.25
    stage = build_config(DistillStageConfig, {"loss": "seam-alpha", "loss_options": {"a": 0.7},
                                              "data": str(tmp_path / "d.txt")}, "stage 1")
    assert stage.distill_config(0).loss == AlphaConfig(loss="seam-alpha", a=0.7)


def test_registrations_do_not_leak():
    """The registries each test starts from hold none of the methods registered above."""
    assert not any(n.startswith("seam-") for r in (PRUNERS, QUANTIZERS, LOSSES) for n in r.names())


def test_a_method_in_a_new_module_registers_itself(tmp_path, monkeypatch):
    """A family's package imports all its modules (registry.import_package_modules), so a method in a new module of
    slmkit.compress or slmkit.train.losses needs no import line: shown on a throwaway package laid out the same way,
    and checked on the two real packages (every module of each is imported once the package is; slmkit.compress
    has modules nothing else imports, entry and qstore)."""
    import importlib
    import subprocess
    import sys

    pkg = tmp_path / "seampkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from slmkit.registry import Registry, import_package_modules\n"
                                     "THINGS = Registry('thing')\nimport_package_modules(__name__, __path__)\n")
    (pkg / "newmethod.py").write_text("from seampkg import THINGS\nTHINGS.add('new', object())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.import_module("seampkg").THINGS.names() == ["new"]
    monkeypatch.delitem(sys.modules, "seampkg")
    monkeypatch.delitem(sys.modules, "seampkg.newmethod")

    for package in ("slmkit.compress", "slmkit.train.losses"):
        code = (f"import sys, pkgutil, {package} as p; "
                "print(sorted(m.name for m in pkgutil.iter_modules(p.__path__) if f'{p.__name__}.{m.name}' not in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "[]", (package, out)
