"""Packed quantised artefacts and safetensors export: exact round trips, sizes, no partial output."""

from __future__ import annotations

import pytest
import torch

from slmkit.artefact import Manifest
from slmkit.compress.qgrid import Grid
from slmkit.compress.qstore import PACKED, load_quantized, save_quantized
from slmkit.compress.quantize import RTNConfig, quantize
from slmkit.errors import ConfigError
from slmkit.export.safetensors import export_safetensors
from slmkit.models import load
from slmkit.models.tiny import tiny_llama_config, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread is much faster


def _fresh(tok):
    torch.manual_seed(0)
    return tiny_model(tiny_llama_config(tok))


@pytest.mark.parametrize("grid", [Grid(4, 32), Grid(3, 64, symmetric=False)])
def test_packed_roundtrip(tiny_tok, tmp_path, grid):
    model = _fresh(tiny_tok)
    res = quantize(model, "rtn", RTNConfig(grid))
    dest = save_quantized(model, tiny_tok, res, tmp_path / "q", Manifest(source="tiny"))
    back, res2 = load_quantized(dest)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    for name, qt in res.tensors.items():
        assert torch.equal(res2.tensors[name].codes, qt.codes)
    # slmkit.models.load reads the same directory
    loaded, tok = load(str(dest))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # packed: bits per quantised weight, plus fp16 scale (and offset) per group, plus the plain tensors
    n_q = sum(qt.codes.numel() for qt in res.tensors.values())
    n_groups = sum(qt.scales.numel() for qt in res.tensors.values())
    plain = sum(t.numel() * 4 for k, t in model.state_dict().items() if k not in res.tensors and k != "lm_head.weight")
    ideal = n_q * grid.bits / 8 + n_groups * 2 * (1 if grid.symmetric else 2) + plain
    size = (dest / PACKED).stat().st_size
    assert ideal <= size < ideal + 8192  # + the safetensors header


def test_failed_extra_step_leaves_nothing(tiny_tok, tmp_path):
    model = _fresh(tiny_tok)
    res = quantize(model, "rtn", RTNConfig(Grid(4, 32)))

    def boom(tmp):
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        save_quantized(model, tiny_tok, res, tmp_path / "q", Manifest(source="tiny"), extra=boom)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_export(tiny_llama, tmp_path):
    model, tok = tiny_llama
    rep = export_safetensors(model, tok, tmp_path / "st", dtype="F16")
    assert rep.exact == rep.tensors > 0 and rep.loader_checked
    back, _ = load(str(tmp_path / "st"), dtype="fp16")
    ref = model.state_dict()
    assert all(torch.equal(t, ref[k].half()) for k, t in back.state_dict().items())
    assert Manifest.read(tmp_path / "st").stages[-1]["stage"] == "export"
    with pytest.raises(ConfigError, match="GGUF-only"):
        export_safetensors(model, tok, tmp_path / "bad", dtype="Q4_0")
    assert not (tmp_path / "bad").exists()
