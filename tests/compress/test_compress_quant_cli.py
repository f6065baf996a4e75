"""`slmkit quantize` and `slmkit export`: JSON output, artefacts, exit code 2 and no output on bad input."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from slmkit.cli import main
from slmkit.compress.qstore import load_quantized
from slmkit.export.gguf import read_gguf_weights


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread is much faster


def test_quantize_gguf_and_export(tiny_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_dir), "--method", "gptq", "--bits", "4", "--gguf", "Q4_0",
               "--calib", str(calib_file), "--calib-samples", "4", "--calib-len", "32", "--output", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "gptq" and res["group_size"] == 32 and res["calibration_tokens"] == 128
    assert res["gguf_exact_tensors"] == res["gguf_tensors"] == 20
    model, q = load_quantized(out)
    gguf_path = out / "model-Q4_0.gguf"
    back = read_gguf_weights(gguf_path, model.config)
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in back.items())
    # exporting the quantised directory again to Q4_0 writes the same codes
    rc = main(["export", str(out), "--format", "gguf", "--type", "Q4_0", "--output", str(tmp_path / "again.gguf"),
               "--no-loader-check", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["exact"] == rep["tensors"] == 20
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(gguf_path)).tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "again.gguf")).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "rtn", "--bits", "6"], "unsupported bits 6"),
        (["--method", "rtn", "--bits", "4", "--group-size", "48"], "does not divide"),
        (["--method", "rtn", "--bits", "4", "--gguf", "Q7_X"], "unknown --gguf type"),
        (["--method", "rtn", "--bits", "3", "--gguf", "Q4_0"], "Q4_0 means 4-bit Q4_0 blocks"),
        (["--method", "gptq", "--bits", "4", "--calib", "/nonexistent.txt"], "does not exist"),
        (["--method", "gtpq", "--bits", "4"], "did you mean gptq"),
    ],
)
def test_quantize_bad_input(tiny_dir, tmp_path, capsys, args, message):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), *args, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_quantize_short_calibration_text(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--method", "awq", "--bits", "4", "--group-size", "32",
                 "--calib", str(short), "--output", str(out)]) == 2
    assert "tokens" in capsys.readouterr().err
    assert not out.exists()


def test_export_bad_input(tiny_dir, tmp_path, capsys):
    assert main(["export", str(tiny_dir), "--format", "gguf", "--type", "Q7_X", "--output", str(tmp_path / "x.gguf")]) == 2
    assert "unknown GGUF type" in capsys.readouterr().err
    assert main(["export", str(tiny_dir), "--format", "onnx", "--output", str(tmp_path / "x")]) == 2
    assert main(["export", str(tiny_dir), "--format", "safetensors", "--type", "Q4_0", "--output", str(tmp_path / "x")]) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def wide_dir(tiny_tok, tmp_path_factory):
    """A tiny model 256 wide (k-quant super-blocks fit its rows), saved as a directory."""
    from slmkit.models.tiny import save_tiny, tiny_llama_config, tiny_model

    model = tiny_model(tiny_llama_config(tiny_tok, hidden=256), seed=2)
    return save_tiny(model, tiny_tok, tmp_path_factory.mktemp("wide") / "model")


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M", "Q6_K"])
def test_quantize_kquant_mix_writes_its_codes(wide_dir, calib_file, tmp_path, capsys, ftype):
    """--gguf MIX: one .gguf in DIR with llama-quantize's types, holding GPTQ's codes bit for bit;
    the packed directory exported again at the same type writes the same bytes."""
    from slmkit.export.gguf_mix import tensor_types, types_from_gguf

    out = tmp_path / "q"
    rc = main(["quantize", str(wide_dir), "--method", "gptq", "--gguf", ftype, "--calib", str(calib_file),
               "--calib-samples", "4", "--calib-len", "32", "--output", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["gguf_exact_tensors"] == res["gguf_tensors"] == 20
    ggufs = sorted(out.glob("*.gguf"))
    assert [p.name for p in ggufs] == [f"model-{ftype}.gguf"]
    model, q = load_quantized(out)
    assert q.gguf == ftype
    types = {k: v for k, v in types_from_gguf(ggufs[0]).items() if not k.endswith("norm.weight")}
    assert types == tensor_types(model.config, ftype, imatrix=True)
    assert any(t.endswith("_K") for t in types.values())
    back = read_gguf_weights(ggufs[0], model.config)
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in back.items())
    rc = main(["export", str(out), "--format", "gguf", "--type", ftype, "--output", str(tmp_path / "again.gguf"),
               "--no-loader-check", "--json"])
    assert rc == 0
    capsys.readouterr()
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(ggufs[0])).tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "again.gguf")).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_quantize_option_sets_any_config_field(tiny_dir, tmp_path, capsys):
    """--option KEY=VALUE reaches a field of the method's config that has no flag of its own; a wrong key is exit 2."""
    from slmkit.artefact import Manifest

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib-samples", "2",
                 "--calib-len", "16", "--option", "block_size=32", "--option", "importance=false", "--output", str(out),
                 "--json"]) == 0
    capsys.readouterr()
    cfg = Manifest.read(out).stages[-1]["config"]
    assert cfg["block_size"] == 32 and cfg["importance"] is False
    for method, opt, message in [("rtn", "blocksize=4", "blocksize does not apply to quantizer rtn"),
                                 ("gptq", "grid=1", "set by the shared"), ("gptq", "seed=3", "set by the shared"),
                                 ("rtn", "seed", "takes KEY=VALUE")]:
        assert main(["quantize", str(tiny_dir), "--method", method, "--bits", "4", "--option", opt,
                     "--output", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
