"""compressed-tensors export: slmkit's GPTQ/AWQ codes read back by compressed-tensors and transformers."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.artefact import Manifest
from slmkit.cli import main
from slmkit.compress.awq import AWQConfig
from slmkit.compress.gptq import GPTQConfig
from slmkit.compress.qgrid import Grid
from slmkit.compress.qstore import load_quantized, save_quantized
from slmkit.compress.quantize import RTNConfig, quantize
from slmkit.errors import ConfigError
from slmkit.export.compressed_tensors import WEIGHTS, export_compressed_tensors, pack_int32, unpack_int32
from slmkit.models.tiny import tiny_llama_config, tiny_model

ct = pytest.importorskip("compressed_tensors", reason="pip install 'slmkit[compressed-tensors]'")

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread is much faster


def _quantised_dir(tok, tmp_path, method: str, cfg) -> str:
    torch.manual_seed(0)
    model = tiny_model(tiny_llama_config(tok))
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    res = quantize(model, method, cfg, ids)
    manifest = Manifest(source="tiny")
    manifest.add_stage("quantize", cfg, method=method)
    return save_quantized(model, tok, res, tmp_path / f"{method}-q", manifest)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    lo = -(2 ** (bits - 1))
    codes = torch.randint(lo, -lo, (5, 44), generator=g).to(torch.int8)  # 44: a partial last word
    ours = pack_int32(codes, bits)
    assert ours.dtype == torch.int32 and torch.equal(ours, pack_to_int32(codes, bits))
    assert torch.equal(unpack_from_int32(ours, bits, codes.shape), codes)
    assert torch.equal(unpack_int32(ours, bits, codes.shape[1]), codes)


@pytest.mark.parametrize(
    "method, cfg",
    [("gptq", GPTQConfig(grid=Grid(4, 32), act_order=True)),
     ("awq", AWQConfig(grid=Grid(4, 64))),
     ("gptq", GPTQConfig(grid=Grid(8, 0), act_order=False))],
    ids=["gptq-4bit-g32-actorder", "awq-4bit-g64", "gptq-8bit-per-channel"],
)
def test_roundtrip_transformers_and_compressed_tensors(tiny_tok, tmp_path, method, cfg):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = _quantised_dir(tiny_tok, tmp_path, method, cfg)
    model, quantized = load_quantized(src)  # slmkit's own model of these codes (fp32)
    rep = export_compressed_tensors(model, tiny_tok, quantized, tmp_path / "ct", Manifest.read(src))
    n = len(quantized.tensors)
    assert rep.exact == rep.tensors == n == 14 and rep.loader_checked and rep.max_abs_diff <= 1e-5
    out = tmp_path / "ct"
    stages = json.loads((out / "slmkit.json").read_text())["stages"]
    assert stages[-1]["stage"] == "export" and stages[-1]["config"]["format"] == "compressed-tensors"

    # 1. the stored integers are slmkit's codes (read by compressed-tensors' own unpacker)
    qcfg = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    (scheme,) = qcfg.config_groups.values()
    assert scheme.weights.num_bits == cfg.grid.bits and scheme.weights.symmetric
    assert scheme.weights.group_size == (cfg.grid.group_size or None)
    # GPTQ's act-order keeps groups contiguous: compressed-tensors' "weight" order (read from the source manifest)
    assert scheme.weights.actorder == ("weight" if getattr(cfg, "act_order", False) else None)
    assert qcfg.ignore == ["lm_head"]
    written = load_file(str(out / WEIGHTS))
    compressor = BaseCompressor.get_value_from_registry(qcfg.format)
    for name, qt in quantized.tensors.items():
        m = name[: -len(".weight")]
        assert f"{name}" not in written
        codes = unpack_from_int32(written[f"{m}.weight_packed"], cfg.grid.bits, written[f"{m}.weight_shape"])
        assert torch.equal(codes, qt.codes), name
        assert torch.equal(written[f"{m}.weight_scale"], qt.scales), name
        # 2. compressed-tensors' decompressor gives slmkit's dequantised weight, bit for bit (fp32 scales)
        local = {k[len(m) + 1:]: v for k, v in written.items() if k.startswith(m + ".")}
        local["weight_scale"] = local["weight_scale"].float()
        dense = compressor.decompress(local, scheme)["weight"]
        assert torch.equal(dense, qt.dequantize()), name

    # 3. transformers loads it (CompressedTensorsHfQuantizer, on the CPU) and gives slmkit's logits
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = model(ids).logits, back(ids).logits
    assert (got - ref).abs().max().item() <= 1e-5  # same weights, same ops: equal up to fp32 summation order


def test_gguf_q4_0_dir_via_cli(tiny_dir, calib_file, tmp_path, capsys):
    """A `quantize --gguf Q4_0` directory: Q4_0 blocks are 4-bit groups of 32; the quantised embedding stays dense."""
    from transformers import AutoModelForCausalLM

    q = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--method", "gptq", "--gguf", "Q4_0", "--calib", str(calib_file),
                 "--calib-samples", "4", "--calib-len", "32", "--output", str(q), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "ct"
    assert main(["export", str(q), "--format", "compressed-tensors", "--output", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["format"] == "compressed-tensors" and rep["exact"] == rep["tensors"] == 14 and rep["loader_checked"]
    model, quantized = load_quantized(q)
    assert "model.embed_tokens.weight" in quantized.tensors  # quantised, written dense as slmkit holds it
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert torch.equal(back.get_input_embeddings().weight, model.get_input_embeddings().weight)
    ids = torch.arange(16)[None, :]
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "grid, message",
    [(Grid(4, 32, symmetric=False), "is asymmetric"),
     (Grid(3, 32), "4- or 8-bit codes, not 3-bit"),
     (Grid.for_gguf("Q4_K"), "two-level scales")],
)
def test_inexpressible_codes_exit_2(tiny_tok, tmp_path, capsys, grid, message):
    torch.manual_seed(0)
    src = _quantised_dir(tiny_tok, tmp_path, "rtn", RTNConfig(grid)) if not grid.kquant else None
    if src is None:  # k-quant grids need 256-wide rows
        model = tiny_model(tiny_llama_config(tiny_tok, hidden=256))
        res = quantize(model, "rtn", RTNConfig(Grid(4, 32)), grids={n: grid for n in _names(model)})
        src = save_quantized(model, tiny_tok, res, tmp_path / "kq", Manifest(source="tiny"))
    out = tmp_path / "ct"
    assert main(["export", str(src), "--format", "compressed-tensors", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "model.layers.0." in err and "Traceback" not in err
    assert not out.exists()
    model, quantized = load_quantized(src)
    with pytest.raises(ConfigError, match=message):
        export_compressed_tensors(model, tiny_tok, quantized, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ct")]


def _names(model):
    from slmkit.compress.quantize import target_names

    return target_names(model)


@pytest.mark.parametrize(
    "args, message",
    [(["--format", "compressed-tensors"], "not a directory written by `slmkit quantize`"),
     (["--format", "compressed-tensors", "--type", "Q4_0"], "--type 'Q4_0'"),
     (["--format", "safetensors", "--pure"], "--pure: only for --format gguf")],
)
def test_export_bad_input_exit_2(tiny_dir, tmp_path, capsys, args, message):
    out = tmp_path / "ct"
    assert main(["export", str(tiny_dir), *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("family, cls, extra", [
    ("qwen2", "Qwen2Config", {}),  # q/k/v biases stay dense beside the packed weights
    ("phi3", "Phi3Config", {}),  # fused qkv_proj and gate_up_proj
    ("gemma3_text", "Gemma3TextConfig", {"head_dim": 16, "sliding_window": 4,
                                         "layer_types": ["sliding_attention", "full_attention"]}),
])
def test_other_families(tmp_path, family, cls, extra):
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = getattr(transformers, cls)(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # transformers starts biases at 0: random ones check they are written
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    res = quantize(model, "gptq", GPTQConfig(grid=Grid(4, 32)), ids)
    rep = export_compressed_tensors(model, None, res, tmp_path / "ct")
    assert rep.exact == rep.tensors == len(res.tensors) and rep.max_abs_diff <= 1e-5
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    x = torch.arange(12)[None, :]
    with torch.no_grad():
        assert (back(x).logits - model(x).logits).abs().max().item() <= 1e-5


def test_foreign_output_refused_then_forced(tiny_tok, tmp_path, capsys):
    src = _quantised_dir(tiny_tok, tmp_path, "rtn", RTNConfig(Grid(4, 32)))
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "thesis.txt").write_text("not slmkit's\n")
    args = ["export", str(src), "--format", "compressed-tensors", "--output", str(dest), "--no-loader-check"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(dest) in err and "--force" in err and "Traceback" not in err
    assert sorted(p.name for p in dest.iterdir()) == ["thesis.txt"]
    assert main([*args, "--force", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["exact"] == 14 and rep["loader_checked"] is False
    assert not (dest / "thesis.txt").exists() and (dest / "slmkit.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "rtn-q"]  # nothing temporary left
