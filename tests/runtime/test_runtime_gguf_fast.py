"""A GGUF file's own quantised blocks on the fast path (kernels/ggml.c, runtime/gguffast.py).

Tolerances. The kernel rounds activations to int8 per 32 inputs (absmax / 127) and nothing else:
on activations that int8 represents exactly it equals x @ dequantise(W).T to fp32 rounding (1e-5
relative), and on Gaussian activations within 1.5% of the product's norm (measured 0.2-0.8%).
Whole models are compared with transformers' fp32 forward on the dequantised file, teacher-forced
over 24 greedy tokens of three prompts: KL(ref || fast) below 0.05 nats at every step and 0.01 on
average, and the top token the same wherever transformers' top-two margin exceeds 0.25 nats (tiny
random models have near-ties, where bf16 prompts and int8 activations may pick the other token).
Measured: max 0.002-0.036, mean 0.001-0.008; the dense bf16 fast path on the same weights, with no
quantisation at all, has max 0.004-0.013 and mean 0.001-0.003.
"""

import shutil

import numpy as np
import pytest
import torch

from slmkit.errors import ConfigError, UnsupportedModelError
from slmkit.runtime import generate as G
from slmkit.runtime import weights as W
from slmkit.runtime import ggmlkernel as K
from slmkit.runtime import q4kernel

gguf = pytest.importorskip("gguf")

CAN_BUILD = q4kernel.cpu_supported()[0] and any(shutil.which(c) for c in ("cc", "gcc", "g++"))
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason=f"kernel library cannot be built here: {q4kernel.cpu_supported()[1] or 'no C compiler'}")
BLOCK32 = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")


def _blocks(name: str, n: int, k: int, seed: int) -> np.ndarray:
    """(n, row bytes) uint8 blocks of format ``name``: gguf's quantiser for the 32-blocks; random valid bytes for the
    K-quants (gguf-py dequantises them but does not quantise), with finite small fp16 scales."""
    rng = np.random.default_rng(seed)
    qt = gguf.GGMLQuantizationType[name]
    if name in BLOCK32:
        return gguf.quants.quantize((rng.standard_normal((n, k)) * 0.05 + 0.01).astype(np.float32), qt)
    _, blk, nbytes = K.TYPES[int(qt)]
    raw = rng.integers(0, 256, size=(n, k // blk, nbytes), dtype=np.uint8)
    half = lambda lo, hi: (rng.random((n, k // blk)) * (hi - lo) + lo).astype(np.float16).view(np.uint8).reshape(n, k // blk, 2)
    if name == "Q6_K":
        raw[..., 208:210] = half(1e-3, 1e-2)
        raw[..., 192:208] = rng.integers(-64, 64, size=(n, k // blk, 16)).astype(np.int8).view(np.uint8)
    else:
        raw[..., 0:2], raw[..., 2:4] = half(1e-3, 1e-2), half(0, 1e-2)
    return raw.reshape(n, -1)


def _weight(name: str, n: int, k: int, seed: int = 0):
    raw = _blocks(name, n, k, seed)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float32))
    return int(gguf.GGMLQuantizationType[name]), torch.from_numpy(np.ascontiguousarray(raw)), ref


def _int8_exact(m: int, k: int, seed: int) -> torch.Tensor:
    """Activations int8-per-32 represents exactly: integer codes with a +-127 in every group, times a power of two."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (m, k // 32, 32), generator=g).float()
    q[:, :, 0] = 127 * torch.where(torch.rand(m, k // 32, generator=g) < 0.5, -1.0, 1.0)
    scale = 2.0 ** torch.randint(-9, -3, (m, k // 32, 1), generator=g).float()
    return (q * scale).reshape(m, k)


@needs_kernel
@pytest.mark.parametrize("name", BLOCK32 + KQUANTS)
def test_matmul_is_exact_where_int8_activations_are(name):
    """The file's blocks decoded right: on int8-representable activations the kernel is x @ dequantise(W).T (fp32 rounding)."""
    k = 768  # 24 groups of 32 (48 of 16): a full panel of 16 groups and a partial one; 3 K-quant super-blocks
    qt, w, ref = _weight(name, 45, k)
    for m in (1, 3, 6):  # one token, a partial group of four, more than four
        x = _int8_exact(m, k, seed=m)
        y = K.matmul(x, qt, w, k)
        exact = x.double() @ ref.double().T
        assert y.shape == (m, 45) and y.dtype == torch.float32
        assert (y.double() - exact).abs().max() <= 1e-5 * exact.abs().max(), name
        yb = K.matmul(x.bfloat16(), qt, w, k)  # bf16 in and out
        assert yb.dtype == torch.bfloat16 and (yb.double() - exact).abs().max() <= 1e-2 * exact.abs().max()
        # a token's products do not depend on the tokens beside it (the server's batch invariance)
        assert all(torch.equal(K.matmul(x[i : i + 1], qt, w, k)[0], y[i]) for i in range(m))


@needs_kernel
@pytest.mark.parametrize("name", BLOCK32 + KQUANTS)
def test_matmul_within_the_int8_activation_tolerance(name):
    qt, w, ref = _weight(name, 37, 576 if name in BLOCK32 else 512, seed=1)  # the default model's width; 37 rows: a tail
    k = ref.shape[1]
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(2)) * 2
    x[0, :32] = 0  # an all-zero group (scale 0) gives no NaN
    exact = x @ ref.T
    y = K.matmul(x, qt, w, k)
    assert torch.isfinite(y).all()
    assert (y - exact).norm() <= 0.015 * exact.norm(), float((y - exact).norm() / exact.norm())


@needs_kernel
@pytest.mark.parametrize("name", BLOCK32 + KQUANTS)
def test_dequantise_and_row_lookup_match_gguf(name):
    qt, w, ref = _weight(name, 40, 256, seed=3)
    wb = K.dequant_bf16(qt, w, 256)
    assert wb.dtype == torch.bfloat16 and torch.equal(wb, ref.bfloat16())  # fp32 value, rounded to nearest even
    ids = torch.tensor([39, 0, 7, 7])
    assert torch.allclose(K.rows_f32(qt, w, 256, ids), ref[ids], rtol=1e-6, atol=1e-9)
    x = torch.randn(K.DEQUANT_FROM_TOKENS, 256, generator=torch.Generator().manual_seed(4))
    many = K.linear(x, qt, w, 256)  # a long prompt: bf16 matmul on the dequantised weight
    assert (many - x @ ref.T).norm() <= 0.01 * (x @ ref.T).norm()
    assert torch.equal(K.linear(x[:3], qt, w, 256), K.matmul(x[:3], qt, w, 256))


def test_formats_without_a_kernel_are_named():
    assert K.row_bytes(int(gguf.GGMLQuantizationType.Q2_K), 256) is None
    assert K.row_bytes(2, 96) is None  # Q4_0 rows must hold a multiple of 64 inputs
    assert K.row_bytes(12, 320) is None and K.row_bytes(12, 512) == 288
    with pytest.raises(ValueError, match="Q4_0"):
        W.GGUFQ(torch.zeros(4, 10, dtype=torch.uint8), 2, 64)


# ---------------------------------------------------------------------------- whole models


def _tiny(tiny_tok, hidden: int, seed: int):
    from slmkit.models.tiny import tiny_llama_config, tiny_model

    std = 0.2 * (128 / hidden) ** 0.5  # the same logit scale at every width
    return tiny_model(tiny_llama_config(tiny_tok, hidden=hidden, heads=4, kv_heads=2, initializer_range=std), seed=seed)


def _export(tiny_tok, tmp_path_factory, qtype: str, hidden: int):
    from slmkit.export import gguf as ex

    if qtype not in ex.TYPES:
        pytest.skip(f"export_gguf does not write {qtype} yet")
    path = tmp_path_factory.mktemp("gguf_fast") / f"tiny-{qtype}.gguf"
    return ex.export_gguf(_tiny(tiny_tok, hidden, seed=hidden), tiny_tok, path, qtype)


@pytest.fixture(scope="module", params=["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K_M", "Q6_K"])
def gguf_file(request, tiny_tok, tmp_path_factory):
    """(path, transformers' model of the dequantised file, tokenizer, fast model on the file's blocks)."""
    if not CAN_BUILD:
        pytest.skip("kernel library cannot be built here")
    from slmkit.models import load
    from slmkit.runtime.gguffast import build_gguf

    hidden = 256 if "K" in request.param else 128  # K-quants need rows of 256
    path = _export(tiny_tok, tmp_path_factory, request.param, hidden)
    ref, tok = load(str(path))
    return path, ref, tok, build_gguf(path, model=ref)


def _file_tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_the_kernel_holds_the_files_bytes(gguf_file):
    """Every quantised matrix is the file's own blocks: q/k rows un-permuted (permute again: the file's bytes), the rest as stored."""
    from slmkit.export.gguf import permute_qk

    path, ref, _, fm = gguf_file
    tensors = _file_tensors(path)
    c = ref.config
    seen = 0
    for i, ly in enumerate(fm.layers):
        parts = dict(zip(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
                         [*ly.qkv.parts, ly.o, *ly.gate_up.parts, ly.down]))
        for short, m in parts.items():
            t = tensors[f"blk.{i}.{short}.weight"]
            assert isinstance(m, W.GGUFQ) and m.qtype == int(t.tensor_type)
            held = m.q
            if short == "attn_q":
                held = permute_qk(held, c.num_attention_heads)
            elif short == "attn_k":
                held = permute_qk(held, c.num_key_value_heads)
            assert np.array_equal(held.numpy(), np.asarray(t.data)), (i, short)
            seen += 1
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    assert np.array_equal(fm.head.q.numpy(), np.asarray(head.data))
    assert fm.embed is fm.head  # tied: the lookup reads the head's blocks
    assert seen == 7 * len(fm.layers) and fm.fused is not None


def test_fast_path_follows_transformers_on_the_dequantised_file(gguf_file):
    """Teacher-forced on transformers' greedy text: small KL everywhere, the same top token wherever it is not a near tie."""
    path, ref, tok, fm = gguf_file
    for prompt in ("A dog likes green apples. It is", "The cat sees the", "Hi"):
        ids = tok(prompt, return_tensors="pt").input_ids[0]
        seq = ref.generate(ids[None], max_new_tokens=24, do_sample=False)[0]
        with torch.no_grad():
            want = torch.log_softmax(ref(seq[None]).logits[0, len(ids) - 1 : -1].float(), -1)  # (24, V)
        cache = fm.new_cache(context=64)
        got = [G.prefill(fm, ids, cache)] + [G.decode_one_token(fm, t, cache) for t in seq[len(ids) : -1].tolist()]
        got = torch.log_softmax(torch.stack(got), -1)
        kl = (want.exp() * (want - got)).sum(-1)
        assert float(kl.max()) < 0.05 and float(kl.mean()) < 0.01, (path.name, prompt, float(kl.max()), float(kl.mean()))
        top2 = want.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.25
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), (path.name, prompt)
        assert cache.seen == len(seq) - 1


def test_batched_fused_step_equals_one_sequence_at_a_time(gguf_file):
    _, _, tok, fm = gguf_file
    prompts = [tok(t, return_tensors="pt").input_ids[0] for t in ("The cat sees the", "A dog likes green apples. It is")]
    alone = []
    for p in prompts:
        c = fm.new_cache(context=40)
        G.prefill(fm, p, c)
        alone.append(G.decode_one_token(fm, 7, c))
    caches = [fm.new_cache(context=40) for _ in prompts]
    for p, c in zip(prompts, caches):
        G.prefill(fm, p, c)
    together = G.forward(fm, [G.Segment(torch.tensor([7]), c) for c in caches])
    for a, b in zip(alone, together):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@needs_kernel
def test_a_format_without_a_kernel_is_a_one_line_error(tiny_tok, tmp_path_factory, monkeypatch):
    from slmkit.runtime.gguffast import build_gguf

    path = _export(tiny_tok, tmp_path_factory, "Q4_0", 128)
    monkeypatch.delitem(K.TYPES, 2)  # as if Q4_0 had no kernel
    with pytest.raises(UnsupportedModelError, match=r"tensor blk\.0\.attn_q\.weight is Q4_0") as err:
        build_gguf(path)
    assert "\n" not in err.value.problem and "--dtype fp32" in err.value.hint


@needs_kernel
def test_the_cli_rule_for_gguf_files(tiny_tok, tmp_path_factory):
    """A quantised FILE.gguf runs its blocks by default; --dtype runs the dequantised weights; --int4 alone is refused."""
    from slmkit.export.gguf import export_gguf
    from slmkit.runtime.gguffast import file_codes

    q = _export(tiny_tok, tmp_path_factory, "Q8_0", 128)
    assert file_codes(str(q), None) == q
    assert file_codes(str(q), "fp32") is None and file_codes(str(q), "bf16", "int4") is None
    with pytest.raises(ConfigError, match="re-quantise"):
        file_codes(str(q), None, "int4")
    f = export_gguf(_tiny(tiny_tok, 128, 0), tiny_tok, q.with_name("tiny-F16.gguf"), "F16")
    assert file_codes(str(f), None) is None  # nothing quantised: the dense path as before


@needs_kernel
def test_generate_fast_on_a_gguf_file_runs_its_blocks(tiny_tok, tmp_path_factory, capsys):
    import json

    from slmkit.cli import main
    from slmkit.runtime.backend import FastBackend

    path = _export(tiny_tok, tmp_path_factory, "Q4_0", 128)
    assert main(["generate", str(path), "The cat sees", "--fast", "--max-new-tokens", "8", "--json", "--raw"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert main(["generate", str(path), "x", "--fast", "--int4"]) == 2  # re-quantising the file's codes: refused
    from slmkit.models import load

    model, tok = load(str(path))
    fb = FastBackend(model, tok, gguf=path)
    assert fb.fm.cfg.weights == "gguf" and isinstance(fb.fm.head, W.GGUFQ)
    from slmkit.backends import GenParams

    assert out["text"] == fb.generate(["The cat sees"], GenParams(max_new_tokens=8))[0].text


@needs_kernel
def test_a_gguf_draft_runs_its_blocks_and_the_target_stays_exact(tiny_tok, tmp_path_factory):
    """``speculate --draft FILE.gguf``: the draft runs the file's blocks on the fast path; greedy output is the target's."""
    from slmkit.collab.drafters import FastDrafter, resolve_draft
    from slmkit.collab.speculative import SpecConfig, autoregressive, speculate

    path = _export(tiny_tok, tmp_path_factory, "Q4_0", 128)
    target = _tiny(tiny_tok, 128, seed=128)  # the model the file was exported from
    draft = resolve_draft(str(path), target, tiny_tok)
    assert isinstance(draft, FastDrafter) and isinstance(draft.fm.head, W.GGUFQ)
    ids = tiny_tok("The cat sees the", return_tensors="pt").input_ids[0]
    cfg = SpecConfig(max_new_tokens=20, adaptive=False)  # draft every step (the controller may decode plainly on tiny models)
    out = speculate(target, draft, ids, cfg)
    assert out.tokens == autoregressive(target, ids, cfg).tokens and out.accepted > 0
