"""slmkit's q4 kernel (4-bit weights x int8 activations) and the fused one-call decode step."""

import copy
import shutil

import pytest
import torch

from slmkit.errors import ConfigError
from slmkit.runtime import decoding as D
from slmkit.runtime import generate as G
from slmkit.runtime import weights as W
from slmkit.runtime import q4kernel as Q

CAN_BUILD = Q.cpu_supported()[0] and any(shutil.which(c) for c in ("cc", "gcc", "g++"))
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason=f"q4 kernel cannot be built here: {Q.cpu_supported()[1] or 'no C compiler'}")


def _ref_matmul(x: torch.Tensor, q, s, m) -> torch.Tensor:
    """What the kernel computes, in torch: activations rounded to int8 per 32 (absmax / 127), exact group sums."""
    mm, k = x.shape
    xg = x.float().view(mm, k // 32, 32)
    d = xg.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(d > 0, xg * torch.where(d > 0, 127 / xg.abs().amax(-1, keepdim=True), 0), 0).round()
    w = Q.unpack(q, s, m)  # (N, K)
    centred = w.view(w.shape[0], k // 32, 32) - m.float()[..., None]  # (code - 8) * s
    dot = torch.einsum("tgi,ngi->tn", xq * d, centred)
    offset = xg.sum(-1) @ m.float().T  # exact sums times the centres
    return dot + offset


@needs_kernel
def test_kernel_builds_on_a_capable_cpu(tmp_path, monkeypatch):
    """Where the CPU has AVX512-VNNI and there is a compiler, the kernel builds into the cache atomically."""
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path))
    for name, value in (("_tried", False), ("_lib", None), ("_why", None)):
        monkeypatch.setattr(Q, name, value)
    assert Q.load() is not None, Q.why_unavailable()
    names = sorted(p.name for p in (tmp_path / "kernels").iterdir())  # no temp file left behind
    assert len(names) == 3 and names[0] == ".lock" and names[1].endswith(".so") and names[2] == names[1] + ".json", names


def test_disabled_kernel_falls_back_to_torch(lively, monkeypatch):
    monkeypatch.setenv("SLMKIT_Q4_KERNEL", "0")
    for name, value in (("_tried", False), ("_lib", None), ("_why", None)):
        monkeypatch.setattr(Q, name, value)
    assert Q.load() is None and "SLMKIT_Q4_KERNEL" in Q.why_unavailable()
    model, _ = lively
    fm = G.build(model, G.FastConfig(weights="int4"))
    assert isinstance(fm.layers[0].qkv, W.Int4) and fm.fused is None
    with pytest.raises(ConfigError, match="unavailable"):
        G.build(model, G.FastConfig(weights="int4", kernel="slmkit"))
    with pytest.raises(ConfigError, match="kernel"):
        G.FastConfig(kernel="fast")


def test_pack_reproduces_weights_on_a_4bit_grid():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (40, 128), generator=g).float()
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the whole grid
    scale = (torch.rand(40, 4, 1, generator=g) * 0.05 + 0.01).half().float()
    lo = (torch.randn(40, 4, 1, generator=g) * 0.1).half().float()
    w = (codes.view(40, 4, 32) * scale + lo).view(40, 128)
    q, s, m = Q.pack(w)
    assert q.shape == (40, 64) and q.dtype == torch.uint8 and s.shape == m.shape == (40, 4)
    assert (Q.unpack(q, s, m) - w).abs().max() <= 2e-3 * w.abs().max()  # fp16 centre = lo + 8 s rounds once
    with pytest.raises(ValueError, match="divisible by 64"):
        Q.pack(torch.randn(4, 96))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m_rows,k,n", [(1, 64, 8), (3, 192, 37), (6, 128, 16), (9, 64, 5),
                                        # superblocks of 512 inputs (with and without chunked groups after them: 2, 4, 14),
                                        # more tokens than one pass over the weights takes (8)
                                        (1, 512, 9), (8, 576, 24), (17, 1088, 11), (12, 1536, 8), (5, 960, 6)])
def test_matmul_matches_its_reference(dtype, m_rows, k, n):
    g = torch.Generator().manual_seed(m_rows * 1000 + k + n)
    w = torch.randn(n, k, generator=g) * 0.05 + 0.01
    q, s, m = Q.pack(w)
    x = (torch.randn(m_rows, k, generator=g) * 2).to(dtype)
    x[0, :32] = 0  # an all-zero group (scale 0) must not produce NaN
    y = Q.matmul(x, q, s, m)
    assert y.dtype == dtype and y.shape == (m_rows, n)
    ref = _ref_matmul(x, q, s, m)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert (y.float() - ref).abs().max() <= tol * ref.abs().max(), (y.float() - ref).abs().max()
    exact = x.float() @ Q.unpack(q, s, m).T  # int8 activations: within a percent or so of the exact product
    assert (y.float() - exact).norm() <= 0.03 * exact.norm()
    for i in {0, m_rows // 2, m_rows - 1}:  # a token's products do not depend on the tokens beside it (batch invariance)
        assert torch.equal(Q.matmul(x[i : i + 1], q, s, m)[0], y[i])


def _dequantised_copy(model):
    """The model with every matmul weight replaced by its q4 round trip (the embedding untied and kept)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for mod in ref.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(Q.unpack(*Q.pack(mod.weight)))
        head = ref.get_output_embeddings()
        head.weight = torch.nn.Parameter(Q.unpack(*Q.pack(head.weight.detach())))
    return ref


@needs_kernel
def test_fused_decode_step_matches_the_dequantised_model(lively):
    """One C call per token: the same logits as transformers' forward on the q4-dequantised weights, up to int8 activations and a bf16 cache."""
    model, tok = lively
    fm = G.build(model, G.FastConfig(weights="int4"))
    assert fm.fused is not None and isinstance(fm.layers[0].qkv, W.Q4)
    ref_model = _dequantised_copy(model)
    ids = tok("A dog likes green apples. It is", return_tensors="pt").input_ids[0]
    cache = fm.new_cache(context=64)
    logits = G.prefill(fm, ids, cache)
    seq, agree, worst = ids.tolist(), 0, 0.0
    for _ in range(12):
        nxt = int(logits.argmax())
        seq.append(nxt)
        logits = G.decode_one_token(fm, nxt, cache)  # the fused step
        with torch.no_grad():
            ref = torch.log_softmax(ref_model(input_ids=torch.tensor([seq])).logits[0, -1], -1)
        got = torch.log_softmax(logits, -1)
        worst = max(worst, float((ref.exp() * (ref - got)).sum()))
        agree += int(got.argmax() == ref.argmax())
    assert cache.seen == len(seq)
    assert worst < 0.02, worst
    assert agree >= 11


@needs_kernel
def test_fused_step_respects_the_cache_capacity(lively):
    model, tok = lively
    fm = G.build(model, G.FastConfig(weights="int4"))
    cache = fm.new_cache(context=4)
    G.prefill(fm, torch.arange(4), cache)
    with pytest.raises(ConfigError, match="capacity"):
        G.decode_one_token(fm, 5, cache)


@needs_kernel
def test_token_by_token_scoring_goes_through_the_fused_step(lively):
    """policy_nll with one token per step (the fused path, all_logits) agrees with chunked reading (the layerwise path)."""
    model, tok = lively
    fm = G.build(model, G.FastConfig(weights="int4"))
    ids = tok("The cat sees the dog. A dog likes green apples. It is red and the cat is not.", return_tensors="pt").input_ids[0]
    one, n1, _ = D.policy_nll(fm, ids, "full", chunk=1)
    many, n8, _ = D.policy_nll(fm, ids, "full", chunk=8)
    assert n1 == n8 == len(ids) - 1
    assert abs(one - many) < 0.02 * abs(many), (one, many)


@needs_kernel
def test_fused_step_batches_sequences_at_different_positions(lively):
    """Continuous batching: one fused call for several sequences gives each the logits it gets alone."""
    model, tok = lively
    fm = G.build(model, G.FastConfig(weights="int4"))
    prompts = [tok(t, return_tensors="pt").input_ids[0] for t in ("The cat sees the", "A dog likes green apples. It is", "Hi")]
    alone, together = [], []
    for p in prompts:
        c = fm.new_cache(context=32 + len(p))
        G.prefill(fm, p, c)
        alone.append([G.decode_one_token(fm, 7, c), G.decode_one_token(fm, 9, c)])
    caches = [fm.new_cache(context=32 + len(p)) for p in prompts]
    for p, c in zip(prompts, caches):
        G.prefill(fm, p, c)
    for tok_id in (7, 9):
        together.append(G.forward(fm, [G.Segment(torch.tensor([tok_id]), c) for c in caches]))
    for i in range(len(prompts)):
        for step in range(2):
            assert torch.allclose(alone[i][step], together[step][i], atol=1e-4, rtol=1e-4)
    assert [c.seen for c in caches] == [len(p) + 2 for p in prompts]


@needs_kernel
def test_many_tokens_use_a_bf16_matmul_on_the_dequantised_weight():
    """Long prompts are compute-bound: from DEQUANT_FROM_TOKENS rows on, the weight is dequantised to bf16."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 192, generator=g) * 0.05
    q, s, m = Q.pack(w)
    exact = Q.unpack(q, s, m)
    wb = Q.dequant_bf16(q, s, m)
    assert wb.dtype == torch.bfloat16 and wb.shape == (40, 192)
    assert torch.allclose(wb.float(), exact, rtol=8e-3, atol=1e-6)
    x = torch.randn(Q.dequant_from_tokens(192) + 3, 192, generator=g).bfloat16()
    y = Q.linear(x, q, s, m)
    ref = x.float() @ exact.T
    assert y.dtype == torch.bfloat16 and (y.float() - ref).norm() <= 0.01 * ref.norm()
    assert torch.equal(y, torch.nn.functional.linear(x, wb))  # the bf16 matmul, not the int8 kernel
    # matrices of 512+ inputs on the avx512 superblock kernel stay on int8 up to 63 tokens
    assert Q.dequant_from_tokens(192) == Q.DEQUANT_FROM_TOKENS
    assert (Q.dequant_from_tokens(576) == 64) == (Q.variant() == "avx512")
    w2 = torch.randn(8, 576, generator=g) * 0.05
    q2, s2, m2 = Q.pack(w2)
    x2 = torch.randn(Q.dequant_from_tokens(576) - 1, 576, generator=g)
    assert torch.equal(Q.linear(x2, q2, s2, m2), Q.matmul(x2, q2, s2, m2))
    few = Q.linear(x[:2], q, s, m)  # below the threshold: the int8 dot-product kernel
    assert torch.equal(few, Q.matmul(x[:2], q, s, m))


@needs_kernel
def test_fused_step_at_superblock_widths(tiny_tok):
    """A model whose matrices have 512+ inputs (hidden 576 as the default model, MLP 1152: superblocks plus a chunked
    tail) through the fused step: the dequantised model's logits up to int8 activations, and each sequence's logits
    bitwise the same alone or batched with others (the server's batch invariance)."""
    from slmkit.models.tiny import tiny_llama_config, tiny_model

    model = tiny_model(tiny_llama_config(tiny_tok, layers=1, hidden=576, heads=9, kv_heads=3, initializer_range=0.05), seed=2)
    fm = G.build(model, G.FastConfig(weights="int4"))
    assert fm.fused is not None
    ref_model = _dequantised_copy(model)
    prompts = [tiny_tok(t, return_tensors="pt").input_ids[0] for t in ("The cat sees the", "A dog likes green apples. It is")]
    alone = []
    for p in prompts:
        c = fm.new_cache(context=len(p) + 4)
        G.prefill(fm, p, c)
        logits = G.decode_one_token(fm, 7, c)
        with torch.no_grad():
            ref = torch.log_softmax(ref_model(input_ids=torch.cat([p, torch.tensor([7])])[None]).logits[0, -1], -1)
        got = torch.log_softmax(logits, -1)
        assert float((ref.exp() * (ref - got)).sum()) < 0.02
        alone.append(logits)
    caches = [fm.new_cache(context=len(p) + 4) for p in prompts]
    for p, c in zip(prompts, caches):
        G.prefill(fm, p, c)
    together = G.forward(fm, [G.Segment(torch.tensor([7]), c) for c in caches])
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
