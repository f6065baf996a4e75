"""Calibrated codes reach the kernel unchanged: GPTQ's blocks -> GGUF file -> the fast path's weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slmkit.runtime import q4kernel

pytestmark = pytest.mark.skipif(q4kernel.load() is None, reason=f"slmkit's kernels unavailable: {q4kernel.why_unavailable()}")

SHORT = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q4_0"])
def test_gptq_codes_are_the_bytes_the_kernel_reads(tiny_tok, tmp_path, ftype):
    from slmkit.compress.gptq import GPTQConfig
    from slmkit.compress.qgrid import encode_gguf_blocks
    from slmkit.compress.quantize import gguf_grids, quantize
    from slmkit.export.gguf import export_gguf_validated
    from slmkit.models import load
    from slmkit.models.tiny import tiny_llama_config, tiny_model
    from slmkit.runtime.gguffast import build_gguf

    model = tiny_model(tiny_llama_config(tiny_tok, hidden=256), seed=3)
    calib = torch.randint(3, len(tiny_tok), (8, 64), generator=torch.Generator().manual_seed(4))
    q = quantize(model, "gptq", GPTQConfig(), calib, embeddings=True,
                 grids=gguf_grids(model, ftype, imatrix=True), gguf=ftype)
    path = export_gguf_validated(model, tiny_tok, tmp_path / "m.gguf", ftype, q, check_loader=False, imatrix=True).path
    ref, _ = load(str(path))
    fm = build_gguf(path, model=ref)
    kinds = set()
    for i, ly in enumerate(fm.layers):
        held = dict(zip(SHORT, [*ly.qkv.parts, ly.o, *ly.gate_up.parts, ly.down]))
        for name, m in held.items():
            qt = q.tensors[f"model.layers.{i}.{name}.weight"]
            # the fast path holds q/k rows in transformers' order: GPTQ's own row order, no permutation
            assert np.array_equal(m.q.numpy(), encode_gguf_blocks(qt)), (i, name)
            kinds.add(qt.grid.gguf)
    assert np.array_equal(fm.head.q.numpy(), encode_gguf_blocks(q.tensors["model.embed_tokens.weight"]))
    if ftype == "Q4_K_M":
        assert {"Q4_K", "Q6_K"} <= kinds  # k-quant blocks are among them
