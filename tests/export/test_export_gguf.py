"""GGUF export of quantised models: codes written unchanged, bit-exact read-back, validation, bad input."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from slmkit.compress.gptq import GPTQConfig
from slmkit.compress.qgrid import Grid, encode_gguf_blocks
from slmkit.compress.quantize import RTNConfig, quantize
from slmkit.errors import ConfigError
from slmkit.export.gguf import export_gguf_validated, read_gguf_weights
from slmkit.models import load
from slmkit.models.tiny import tiny_llama_config, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread is much faster


def _fresh(tok):
    torch.manual_seed(0)
    return tiny_model(tiny_llama_config(tok))


@pytest.fixture(scope="module")
def gptq_q4_0(tiny_tok):
    model = _fresh(tiny_tok)
    ids = torch.randint(3, len(tiny_tok), (4, 32), generator=torch.Generator().manual_seed(0))
    res = quantize(model, "gptq", GPTQConfig(grid=Grid.for_gguf("Q4_0")), ids, embeddings=True)
    return model, res


def test_gptq_q4_0_roundtrips_bit_exactly(gptq_q4_0, tiny_tok, tmp_path):
    model, res = gptq_q4_0
    path = tmp_path / "m.gguf"
    rep = export_gguf_validated(model, tiny_tok, path, "Q4_0", res, check_loader=True, pure=True)
    assert rep.exact == rep.tensors == 20 and rep.max_abs_diff == 0.0
    state = model.state_dict()
    # 1. the gguf reader: every tensor (the 14 Linears and the embedding included) equals the in-memory weight
    back = read_gguf_weights(path, model.config)
    for name, t in back.items():
        assert torch.equal(t, state[name]), name
    # 2. transformers' GGUF loader, through slmkit.models.load
    loaded, _ = load(str(path))
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, state[name]), name
    # 3. the blocks are our codes, unchanged (a tensor without the rotary row permutation)
    reader = gguf.GGUFReader(str(path))
    raw = {t.name: t for t in reader.tensors}["blk.1.ffn_down.weight"]
    assert raw.tensor_type == gguf.GGMLQuantizationType.Q4_0
    expect = encode_gguf_blocks(res.tensors["model.layers.1.mlp.down_proj.weight"])
    assert np.array_equal(np.asarray(raw.data).reshape(expect.shape), expect)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_1"])
def test_each_block_type_roundtrips(tiny_tok, tmp_path, qtype):
    model = _fresh(tiny_tok)
    res = quantize(model, "rtn", RTNConfig(Grid.for_gguf(qtype)), embeddings=True)
    rep = export_gguf_validated(model, tiny_tok, tmp_path / "m.gguf", qtype, res, check_loader=False)
    assert rep.exact == rep.tensors


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q4_0"])
def test_reference_export_is_validated(tiny_llama, tmp_path, qtype):
    model, tok = tiny_llama
    rep = export_gguf_validated(model, tok, tmp_path / "ref.gguf", qtype, None, check_loader=False)
    assert rep.exact == rep.tensors and rep.bytes == (tmp_path / "ref.gguf").stat().st_size


def test_changed_weights_fail_and_leave_no_file(tiny_tok, tmp_path):
    model = _fresh(tiny_tok)
    res = quantize(model, "rtn", RTNConfig(Grid.for_gguf("Q4_0")))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 0.001  # no longer the stored codes
    with pytest.raises(RuntimeError, match="not the dequantised codes"):
        export_gguf_validated(model, tiny_tok, tmp_path / "bad.gguf", "Q4_0", res, check_loader=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_type_is_a_clear_error(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(ConfigError, match="unknown GGUF type 'Q7_X'"):
        export_gguf_validated(model, tok, tmp_path / "x.gguf", "Q7_X")
    assert list(tmp_path.iterdir()) == []


def test_embedding_type_keeps_linear_codes_and_writes_embedding_at_its_own_type(gptq_q4_0, tiny_tok, tmp_path):
    model, res = gptq_q4_0
    path = tmp_path / "e8.gguf"
    rep = export_gguf_validated(model, tiny_tok, path, "Q4_0", res, check_loader=False, embedding_type="Q8_0")
    assert rep.exact == rep.tensors
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0
    # the Linears still carry the GPTQ codes unchanged
    raw = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}["blk.1.ffn_down.weight"]
    expect = encode_gguf_blocks(res.tensors["model.layers.1.mlp.down_proj.weight"])
    assert np.array_equal(np.asarray(raw.data).reshape(expect.shape), expect)
    with pytest.raises(ConfigError, match="embedding type 'Q7_X'"):
        export_gguf_validated(model, tiny_tok, tmp_path / "x.gguf", "Q4_0", res, embedding_type="Q7_X")
    assert not (tmp_path / "x.gguf").exists()
