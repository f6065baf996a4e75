"""A GGUF file's own blocks in full precision (``weights="gguf-f32"``: kernels/ggml.c ``slmkit_gg_row_exact`` and
kernels/f32.c ``slmkit_gg_f32_matmul_parts``): weights dequantised on the fly exactly as gguf-py does, times fp32
activations, so the numbers are those of the fp32 model transformers loads from the file.

Exactness, not tolerance: the dequantised weights equal gguf-py's bit for bit on every variant; for 2..16 rows a
product equals ``q4kernel.f32_linear`` on the dequantised weight bit for bit (the same tile code). One-token and long
passes differ from torch's sgemm by the order of additions only (1e-6 of the product scale).
"""

import ctypes

import numpy as np
import pytest
import torch

from slmkit.runtime import generate as G
from slmkit.runtime import ggmlkernel as K
from slmkit.runtime import q4kernel as Q
from slmkit.runtime import weights as W

gguf = pytest.importorskip("gguf")
from test_runtime_gguf_fast import BLOCK32, KQUANTS, _export, _tiny, _weight, needs_kernel  # noqa: E402

pytestmark = needs_kernel


@pytest.mark.parametrize("name", BLOCK32 + KQUANTS)
def test_dequantised_weights_are_gguf_pys_bit_for_bit(name):
    qt, w, ref = _weight(name, 24, 512, seed=5)
    assert torch.equal(K.exact_f32(qt, w, 512).view(torch.int32), ref.view(torch.int32))
    ids = torch.tensor([23, 0, 5, 5])
    assert torch.equal(K.exact_f32(qt, w, 512, ids), ref[ids])


@pytest.mark.parametrize("variant", [v for v in Q.ORDER if Q.variant_supported(v)[0]])
def test_every_variant_dequantises_exactly(variant):
    lib = Q.load_variant(variant)
    for name in BLOCK32 + KQUANTS:
        qt, w, ref = _weight(name, 8, 256, seed=6)
        out = torch.empty(8, 256)
        assert lib.slmkit_gg_rows_exact(qt, w.data_ptr(), 256, None, 8, out.data_ptr()) == 0
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), (variant, name)
        x = torch.randn(5, 256, generator=torch.Generator().manual_seed(7))
        y = torch.empty(5, 8)
        types, ptrs, rows = (ctypes.c_int * 1)(qt), (ctypes.c_void_p * 1)(w.data_ptr()), (ctypes.c_int * 1)(8)
        assert lib.slmkit_gg_f32_matmul_parts(1, types, ptrs, rows, 256, x.data_ptr(), 5, y.data_ptr()) == 0
        want = x.double() @ ref.double().T
        assert float((y.double() - want).abs().max()) <= 1e-6 * float((x.abs().double() @ ref.abs().double().T).max()), (variant, name)


def _dense_kernel(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """kernels/f32.c's slmkit_f32_matmul for any number of rows (f32_linear takes 2..16)."""
    y = torch.empty(x.shape[0], w.shape[0])
    assert Q.require().slmkit_f32_matmul(x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), w.shape[0], y.data_ptr()) == 0
    return y


@pytest.mark.parametrize("name", BLOCK32 + KQUANTS)
def test_products_are_the_dense_fp32_kernels(name):
    """Bit for bit the dense kernel on the dequantised weight, for every format, several super-blocks (K = 512) and
    1-4, 5-8 (straight from the blocks on AVX-512) and more rows (through a dequantised copy)."""
    qt, w, ref = _weight(name, 37, 512, seed=8)
    g = torch.Generator().manual_seed(9)
    for m in (*range(1, 10), 16, 40):
        x = torch.randn(m, 512, generator=g)
        assert torch.equal(K.f32_matmul(x, qt, w, 512), _dense_kernel(x, ref)), (name, m)
    x = torch.randn(9, 512, generator=g)
    full = K.f32_matmul(x, qt, w, 512)
    for rows in ([0], [3, 4, 5], list(range(1, 9))):  # a row's bits do not depend on the rows beside it
        assert torch.equal(K.f32_matmul(x[rows], qt, w, 512), full[rows])
    want = x.double() @ ref.double().T  # and the sums are fp32-accurate
    assert float((full.double() - want).abs().max()) <= 1e-6 * float((x.abs().double() @ ref.abs().double().T).max())


def test_long_prompts_run_torchs_sgemm_on_the_exact_weights(monkeypatch):
    qt, w, ref = _weight("Q4_1", 24, 256, seed=11)
    monkeypatch.setattr(K, "EXACT_DEQUANT_FROM_TOKENS", 8)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(12))
    assert torch.equal(K.f32_matmul(x, qt, w, 256), torch.nn.functional.linear(x, ref))


def test_a_fused_projection_is_its_parts_side_by_side():
    """q/k/v (gate/up) as one kernel call over parts of different formats: each part's columns are the part alone, bit for bit."""
    parts = [_weight(name, n, 256, seed=i) for i, (name, n) in enumerate((("Q4_1", 40), ("Q8_0", 16), ("Q6_K", 16)))]
    bias = [torch.randn(n) for n in (40, 16, 16)]
    fused = W.Concat([W.GGUFExact(w, qt, 256, b) for (qt, w, _), b in zip(parts, bias)])
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(10))
    kind, *_ = fused.spec()
    assert kind == "gguf-f32"
    want = torch.cat([K.f32_matmul(x, qt, w, 256) + b for (qt, w, _), b in zip(parts, bias)], dim=1)
    assert torch.equal(fused(x), want)


def test_bad_activations_are_refused():
    qt, w, _ = _weight("Q4_0", 4, 64)
    with pytest.raises(ValueError, match="fp32"):
        K.f32_matmul(torch.randn(2, 64).bfloat16(), qt, w, 64)
    with pytest.raises(ValueError, match="fp32"):
        K.f32_matmul(torch.randn(2, 32), qt, w, 64)
    with pytest.raises(IndexError):
        K.exact_f32(qt, w, 64, torch.tensor([4]))
    with pytest.raises(Exception, match="fp32"):
        G.FastConfig(dtype="bf16", weights="gguf-f32")


@pytest.fixture(scope="module", params=["Q4_0", "Q8_0", "Q4_K_M"])
def loaded(request, tiny_tok, tmp_path_factory):
    from slmkit.models import load

    path = _export(tiny_tok, tmp_path_factory, request.param, 256 if "K" in request.param else 128)
    model, tok = load(str(path))
    return path, model, tok


def test_a_model_loaded_from_a_file_runs_its_blocks_with_its_numbers(loaded):
    from slmkit.runtime.gguffast import exact_model, source_file

    path, model, tok = loaded
    assert source_file(model) == path
    fm = exact_model(model)
    assert fm is not None and exact_model(model) is fm  # built once per model
    assert isinstance(fm.head, W.GGUFExact) and fm.fused is None and fm.dtype == torch.float32
    dense = G.build(model, G.FastConfig())
    ids = tok("A dog likes green apples. It is", return_tensors="pt").input_ids[0]
    want = model.generate(ids[None], max_new_tokens=16, do_sample=False)[0]
    a, b = fm.new_cache(context=64), dense.new_cache(context=64)
    la = G.forward(fm, [G.Segment(want[:8], a)])[0]
    lb = G.forward(dense, [G.Segment(want[:8], b)])[0]
    assert torch.allclose(la, lb, atol=1e-4)
    for t in range(8, len(want) - 1, 4):  # verify-sized passes, as speculation runs them
        la = G.forward(fm, [G.Segment(want[t : t + 4], a, all_logits=True)])[0]
        lb = G.forward(dense, [G.Segment(want[t : t + 4], b, all_logits=True)])[0]
        assert torch.allclose(la, lb, atol=1e-4)
        assert torch.equal(la.argmax(-1)[: len(want) - 1 - t], want[t + 1 : t + 5])


def test_a_changed_model_is_not_run_from_the_file(loaded):
    from slmkit.runtime.gguffast import CodesMismatchError, build_gguf, exact_model

    path, model, _ = loaded
    assert exact_model(model) is not None
    w = model.model.layers[0].mlp.down_proj.weight
    keep = w.detach().clone()
    try:
        with torch.no_grad():
            w[0, 0] += 1.0  # changed in place after loading: the file's codes no longer are this model
        assert exact_model(model) is None
        with torch.no_grad():
            w.copy_(keep)
        assert exact_model(model) is not None
        w.data[0, 1] += 1.0  # through .data, as adapter merges do: no version counter moves
        assert exact_model(model) is None
        with pytest.raises(CodesMismatchError, match="down_proj"):
            build_gguf(path, G.FastConfig(dtype="fp32", weights="gguf-f32"), model)
    finally:
        with torch.no_grad():
            w.copy_(keep)
    assert exact_model(model) is not None


def test_a_model_without_a_file_keeps_its_dense_weights(tiny_tok):
    from slmkit.runtime.gguffast import exact_model

    assert exact_model(_tiny(tiny_tok, 128, seed=1)) is None


def test_speculation_verifies_on_the_files_blocks_and_stays_exact(loaded):
    from slmkit.collab.drafters import quantised_draft
    from slmkit.collab.lm import FastLM
    from slmkit.collab.speculative import SpecConfig, speculate

    _, model, tok = loaded
    assert isinstance(FastLM(model, 64).fm.head, W.GGUFExact)
    ids = tok("The cat sees the", return_tensors="pt").input_ids[0]
    want = model.generate(ids[None], max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    out = speculate(model, quantised_draft(model, "int4"), ids, SpecConfig(max_new_tokens=20, adaptive=False))
    assert out.tokens == want[: len(out.tokens)] and len(out.tokens) == 20


def test_fp32_serving_and_generation_run_the_files_blocks(loaded):
    """FastBackend (generate/chat --fast) and the server's engine over an fp32 model loaded from a GGUF file use its blocks
    in full precision; greedy text equals transformers' on the dequantised file."""
    from slmkit.backends import GenParams
    from slmkit.runtime.backend import FastBackend
    from slmkit.runtime.gguffast import fast_runner

    _, model, tok = loaded
    fb = FastBackend(model, tok, G.FastConfig())
    assert isinstance(fb.fm.head, W.GGUFExact) and fast_runner(model) is fb.fm
    assert not isinstance(fast_runner(model, G.FastConfig(dtype="bf16")).head, W.GGUFExact)
    ids = tok("The cat sees", return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    got = fb.generate(["The cat sees"], GenParams(max_new_tokens=8))[0].text
    assert got == tok.decode(want, skip_special_tokens=True)


def test_a_sequences_logits_do_not_depend_on_its_batch(loaded):
    """Every row of the exact matmuls is summed in one order whatever the rows beside it, so a sequence decoded in a
    batch (the server) gets the bits it gets alone."""
    from slmkit.runtime.gguffast import exact_model

    _, model, tok = loaded
    fm = exact_model(model)
    a = tok("A dog likes green apples. It is", return_tensors="pt").input_ids[0]
    b = tok("The cat sees the", return_tensors="pt").input_ids[0]
    alone = []
    for ids in (a, b):
        c = fm.new_cache(context=64)
        G.forward(fm, [G.Segment(ids, c)])
        alone.append(G.forward(fm, [G.Segment(ids[-1:], c)])[0])
    ca, cb = fm.new_cache(context=64), fm.new_cache(context=64)
    G.forward(fm, [G.Segment(a, ca)])
    G.forward(fm, [G.Segment(b, cb)])
    together = G.forward(fm, [G.Segment(a[-1:], ca), G.Segment(b[-1:], cb)])
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])
