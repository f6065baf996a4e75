"""Quantisation-aware training: STE fake quantisation on GGUF grids; the result exports losslessly."""

from __future__ import annotations

import pytest
import torch

from slmkit.compress.qgrid import Grid, quantize_rtn
from slmkit.models.tiny import tiny_corpus, tiny_llama_config, tiny_model
from slmkit.train.data import DataConfig
from slmkit.train.distill import DistillConfig, distill
from slmkit.train.losses import LossConfig
from slmkit.train.qat import FakeQuantLinear, attach_fake_quant, detach_fake_quant, fake_quant


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_train_qat_fake_quant_is_rtn_forward_identity_backward(qtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g, requires_grad=True)
    grid = Grid.for_gguf(qtype)
    wq = fake_quant(w, grid)
    assert torch.equal(wq.detach(), quantize_rtn(w.detach(), grid).dequantize())
    assert not torch.equal(wq.detach(), w.detach())
    up = torch.randn(8, 64, generator=g)
    (wq * up).sum().backward()
    assert torch.equal(w.grad, up)  # straight-through: dL/dw = dL/dw_q


def test_train_qat_distill_ends_on_grid_and_exports_losslessly(tiny_tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from slmkit.export.gguf import export_gguf, read_gguf_weights

    data = tmp_path / "t.txt"
    data.write_text("\n".join(tiny_corpus(60, seed=4)))
    teacher = tiny_model(tiny_llama_config(tiny_tok, layers=2), seed=1)
    student = tiny_model(tiny_llama_config(tiny_tok, layers=2), seed=1)  # start = teacher; QAT recovers from rounding
    names = attach_fake_quant(student, Grid.for_gguf("Q4_0"))
    assert len(names) == 2 * 7 and isinstance(student.model.layers[0].mlp.up_proj, FakeQuantLinear)
    assert set(student.state_dict()) == set(teacher.state_dict())  # checkpoints see an ordinary model
    detach_fake_quant(student)
    cfg = DistillConfig(loss=LossConfig("fkl"), data=DataConfig(block_size=24), max_steps=4, batch_size=2,
                        learning_rate=1e-3, save_steps=4, qat="Q4_0")
    distill(student, tiny_tok, data, tmp_path / "q", cfg, teacher=teacher)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    grid = Grid.for_gguf("Q4_0")
    sd = saved.state_dict()
    w = sd["model.layers.1.self_attn.o_proj.weight"]
    assert torch.equal(quantize_rtn(w, grid).dequantize(), w)  # already on the grid: re-rounding changes nothing
    path = export_gguf(saved, tiny_tok, tmp_path / "q.gguf", "Q4_0")
    back = read_gguf_weights(path, saved.config)
    for name in [n for n in sd if n.startswith("model.layers.") and n.endswith("proj.weight")]:
        assert torch.equal(back[name], sd[name]), name


def test_train_qat_on_a_llama_cpp_mix(tiny_tok, tmp_path):
    """--qat Q4_K_M: every Linear trains on the block type llama-quantize gives it (k-quants included)
    and ends on that grid."""
    from transformers import AutoModelForCausalLM

    from slmkit.train.qat import qat_grids

    data = tmp_path / "t.txt"
    data.write_text("\n".join(tiny_corpus(60, seed=5)))
    teacher = tiny_model(tiny_llama_config(tiny_tok, layers=2, hidden=256), seed=1)
    student = tiny_model(tiny_llama_config(tiny_tok, layers=2, hidden=256), seed=1)
    grids = qat_grids(student, "Q4_K_M")
    assert {g.gguf for g in grids.values()} >= {"Q4_K", "Q6_K"}
    cfg = DistillConfig(loss=LossConfig("fkl"), data=DataConfig(block_size=24), max_steps=2, batch_size=2,
                        learning_rate=1e-3, save_steps=2, qat="Q4_K_M")
    distill(student, tiny_tok, data, tmp_path / "q", cfg, teacher=teacher)
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "q").state_dict()
    # the codes training ended on are kept beside the weights; the GGUF export writes exactly them
    from slmkit.compress.qstore import load_quantized
    from slmkit.export.gguf import export_gguf_validated, read_gguf_weights

    model, q = load_quantized(tmp_path / "q")
    assert q.gguf == "Q4_K_M" and {t.grid.gguf for t in q.tensors.values()} >= {"Q4_K", "Q6_K"}
    rep = export_gguf_validated(model, tiny_tok, tmp_path / "q.gguf", "Q4_K_M", q, check_loader=False, imatrix=True)
    assert rep.exact == rep.tensors
    back = read_gguf_weights(tmp_path / "q.gguf", model.config)
    for name in grids:
        assert torch.equal(back[name], sd[name]), name
    with pytest.raises(Exception, match="unknown QAT grid"):
        DistillConfig(qat="Q7_X")
