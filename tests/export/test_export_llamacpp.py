"""slmkit's GGUF files in llama.cpp itself: tensor types as llama-quantize picks them, logits that agree.

Skipped with a message where llama.cpp's tools (scripts/build_llamacpp.sh) are absent. The tiny
model is 256 wide so that k-quant blocks (256 weights) fit its rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmkit.export import llamacpp
from slmkit.models.tiny import tiny_llama_config, tiny_model

pytestmark = pytest.mark.skipif(llamacpp.tools() is None, reason=f"llama.cpp not built: {llamacpp.HOW}")


@pytest.fixture(scope="module")
def bindings():
    from slmkit.errors import ConfigError

    try:
        return llamacpp.bindings()
    except ConfigError as err:
        pytest.skip(str(err).splitlines()[0])


@pytest.fixture(scope="module")
def wide(tiny_tok):
    """(model, tokenizer): 2 layers, hidden 256, FFN 512, GQA 4/2, tied embeddings."""
    cfg = tiny_llama_config(tiny_tok, layers=2, hidden=256, heads=4, kv_heads=2)
    return tiny_model(cfg, seed=1), tiny_tok


@pytest.fixture(scope="module")
def wide_f32(wide, tmp_path_factory):
    from slmkit.export.gguf import export_gguf

    model, tok = wide
    return export_gguf(model, tok, tmp_path_factory.mktemp("llama") / "f32.gguf", "F32")


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(p_logits).double(), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("ftype", ["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_types_match_llama_quantize(wide, wide_f32, tmp_path, ftype):
    """slmkit's per-tensor types for a mix equal those of llama-quantize's file of that name."""
    from slmkit.export.gguf_mix import tensor_types, types_from_gguf

    model, _ = wide
    ref = llamacpp.quantize(wide_f32, tmp_path / f"{ftype}.gguf", ftype)
    theirs = {k: v for k, v in types_from_gguf(ref).items() if not k.endswith("norm.weight")}
    assert tensor_types(model.config, ftype) == theirs


def _ids(n: int = 48, vocab: int = 384) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def test_f32_logits_agree(wide, wide_f32, bindings):
    """The F32 export runs in llama.cpp with the logits of the transformers model (fp32 rounding only)."""
    model, _ = wide
    ids = _ids()
    theirs = llamacpp.logits(wide_f32, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-3 * max(1.0, np.abs(ours).max())


@pytest.mark.parametrize("method,ftype", [("gptq", "Q4_0"), ("gptq", "Q4_K_M"), ("gptq", "Q5_K_M"),
                                          ("awq", "Q4_0"), ("awq", "Q4_K_M")])
def test_quantised_logits_agree(wide, tmp_path, method, ftype, bindings):
    """A GPTQ- or AWQ-quantised model written at a llama.cpp mix: llama.cpp's logits on the file agree with
    slmkit's in-memory model of the same codes. llama.cpp rounds activations to 8 bits for its
    quantised dot products, so the tolerance is statistical: mean KL divergence below 1e-3 nats and
    the same top token at 95% of positions or more (measured here: 0.7-1.0e-5 nats and 0.98-1.0)."""
    import copy

    from slmkit.compress.awq import AWQConfig
    from slmkit.compress.gptq import GPTQConfig
    from slmkit.compress.quantize import gguf_grids, quantize
    from slmkit.export.gguf import export_gguf_validated

    model, tok = wide
    model = copy.deepcopy(model)
    calib = torch.randint(3, 384, (8, 64), generator=torch.Generator().manual_seed(1))
    cfg = GPTQConfig() if method == "gptq" else AWQConfig()
    q = quantize(model, method, cfg, calib, embeddings=True, grids=gguf_grids(model, ftype, imatrix=True),
                 gguf=ftype)
    path = export_gguf_validated(model, tok, tmp_path / f"{ftype}.gguf", ftype, q, check_loader=False, imatrix=True).path
    ids = _ids()
    theirs = llamacpp.logits(path, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    kl = _kl(ours, theirs)
    print(f"{ftype}: KL {kl:.2e}, top-1 {(ours.argmax(-1) == theirs.argmax(-1)).mean():.3f}")
    assert kl < 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95


def test_perplexity_parser():
    out = """perplexity: calculating perplexity over 20 chunks, n_ctx=512, batch_size=512, n_seq=1
Mean PPL(Q)                   :  19.655325 ±   0.774744
Mean    KLD:   0.275409 ±   0.003363
Same top p:  69.608 ±  0.644 %"""
    r = llamacpp.parse_perplexity(out)
    assert (r.perplexity, r.perplexity_err, r.kl_divergence, r.kl_divergence_err) == (19.655325, 0.774744, 0.275409, 0.003363)
    assert r.top1_agreement == pytest.approx(0.69608) and r.tokens == 20 * 256
    assert llamacpp.parse_perplexity("Final estimate: PPL = 16.1605 +/- 0.65849").perplexity == 16.1605
