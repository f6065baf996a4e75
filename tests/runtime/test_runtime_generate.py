"""The fast decoding path against transformers' own forward and generate."""

import pytest
import torch

from slmkit.runtime import decoding as D
from slmkit.runtime import generate as G
from slmkit.runtime import weights as W
from slmkit.runtime.kvcache import FullCache

PROMPTS = ["The cat sees the", "A dog likes green apples. It is", "<|im_start|>user\nWhere is paris?<|im_end|>\n"]


def _hf_greedy(model, tok, text, n):
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    return ids[0], out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def references(lively):
    """transformers' greedy continuations (48 tokens at most) of each prompt."""
    model, tok = lively
    return [_hf_greedy(model, tok, text, 48) for text in PROMPTS]


def test_fast_greedy_equals_generate_fp32(lively, references):
    model, tok = lively
    fm = G.build(model)
    distinct = set()
    for ids, ref in references:
        for chunk in (512, 3):  # one prefill, and a chunked prefill
            assert D.generate(fm, ids, 48, prefill_chunk=chunk) == ref
        distinct |= set(ref)
    assert len(distinct) > 10  # the test model really produces varied text


def test_forward_logits_match_transformers(lively):
    model, tok = lively
    fm = G.build(model)
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids[0]
    ref = model(input_ids=ids[None]).logits[0]
    got = G.forward(fm, [G.Segment(ids, fm.new_cache(context=64), all_logits=True)])[0]
    assert torch.allclose(got, ref, atol=1e-4)


def test_batched_segments_equal_separate_runs(lively):
    """Continuous batching: sequences at different positions in one forward give their solo logits."""
    model, tok = lively
    fm = G.build(model)
    a = tok(PROMPTS[0], return_tensors="pt").input_ids[0]
    b = tok(PROMPTS[1], return_tensors="pt").input_ids[0]
    ca, cb = fm.new_cache(context=64), fm.new_cache(context=64)
    G.prefill(fm, a, ca)  # a is ahead; b starts now
    la, lb = G.forward(fm, [G.Segment(torch.tensor([7]), ca), G.Segment(b, cb)])
    sa, sb = fm.new_cache(context=64), fm.new_cache(context=64)
    G.prefill(fm, a, sa)
    assert torch.allclose(la, G.decode_one_token(fm, 7, sa), atol=1e-5)
    assert torch.allclose(lb, G.prefill(fm, b, sb), atol=1e-5)
    assert ca.seen == len(a) + 1 and cb.seen == len(b)


@pytest.mark.parametrize("cfg", [G.FastConfig(dtype="bf16"), G.FastConfig(weights="int8"), G.FastConfig(weights="int4")])
def test_low_precision_paths_stay_close(lively, cfg):
    model, tok = lively
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids[0]
    ref = torch.log_softmax(model(input_ids=ids[None]).logits[0, -1], -1)
    fm = G.build(model, cfg)
    got = torch.log_softmax(G.prefill(fm, ids, fm.new_cache(context=64)), -1)
    p = ref.exp()
    kl = float((p * (ref - got)).sum().detach())
    assert kl < (0.5 if cfg.weights == "int4" else 0.05), kl  # int4 of random (off-grid) weights is coarse
    ratio = {"native": 0.6, "int8": 0.35, "int4": 0.25}[cfg.weights]
    assert fm.weight_bytes_per_token() < G.build(model).weight_bytes_per_token() * ratio


def test_int8_weights_round_trip_within_half_a_step():
    w = torch.randn(48, 64)
    q = W.Int8(w, None, torch.float32)
    deq = q.q.float() * q.s[:, None]
    assert ((deq - w).abs() <= q.s[:, None] / 2 + 1e-6).all()
    x = torch.randn(3, 64).bfloat16()
    q16 = W.Int8(w, None, torch.bfloat16)
    assert torch.allclose(q16(x).float(), x.float() @ (q16.q.float() * q16.s.float()[:, None]).T, rtol=0.02, atol=0.05)


def test_sample_rules():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert D.sample(logits, 0.0, 1.0, None) == 1
    assert D.sample(logits, 1.0, 1e-6, torch.Generator().manual_seed(0)) == 1  # nucleus of one token
    draws = [D.sample(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) <= {1, 3, 2} and 0 not in draws
    again = [D.sample(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again


def test_eos_stops_and_is_returned(lively, references):
    model, _ = lively
    fm = G.build(model)
    ids, ref = references[0]
    fm.eos = (ref[5],)  # pretend the 6th generated token is EOS: generation stops there, EOS included
    got = D.generate(fm, ids, 48)
    assert got == ref[: ref.index(ref[5]) + 1]


def test_unsupported_architecture_is_a_clear_error(tiny_tok):
    from transformers import GPT2Config

    from slmkit.errors import UnsupportedModelError
    from slmkit.models.tiny import tiny_model

    gpt2 = tiny_model(GPT2Config(vocab_size=len(tiny_tok), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="llama"):
        G.build(gpt2)


def test_full_cache_overflow_is_a_config_error(lively):
    from slmkit.errors import ConfigError

    model, _ = lively
    fm = G.build(model)
    cache = fm.new_cache(context=4)
    assert isinstance(cache, FullCache)
    with pytest.raises(ConfigError, match="capacity"):
        G.prefill(fm, torch.arange(5), cache)


@pytest.mark.integration
def test_default_model_fast_greedy_equals_generate(default_model):
    model, tok = default_model
    fm = G.build(model)
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                         pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)[0, ids.shape[1]:].tolist()
    assert D.generate(fm, ids[0], 24) == ref


def test_int4_reproduces_weights_on_a_4bit_grid():
    """Weights already on a Q4_1-style grid (32-wide groups, 16 levels) come back up to bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 96), generator=g).float()
    codes[:, ::32] = 0  # every group uses the lowest and the highest level,
    codes[:, 1::32] = 15  # as real quantised groups almost always do
    scale = torch.rand(64, 3, 1, generator=g) * 0.05 + 0.01
    lo = torch.randn(64, 3, 1, generator=g) * 0.1
    w = (codes.view(64, 3, 32) * scale + lo).view(64, 96)
    lin = W.Int4(w, None, torch.bfloat16)
    x = torch.randn(5, 96, generator=g).bfloat16()
    ref = x.float() @ w.T
    assert (lin(x).float() - ref).abs().max() <= 0.02 * ref.abs().max()
    assert lin.nbytes() == w.numel() // 2 + w.numel() // 32 * 4  # 4 bits a weight + bf16 scale and offset per 32


def test_compiled_decode_step_matches_eager(lively):
    """compile=True runs the one-token decode step through torch.compile; prefill stays eager."""
    model, tok = lively
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids[0]
    eager, comp = G.build(model), G.build(model, G.FastConfig(compile=True))
    assert set(comp.blocks) == {"pre", "post"} and not eager.blocks
    ce, cc = eager.new_cache(context=64), comp.new_cache(context=64)
    le, lc = G.prefill(eager, ids, ce), G.prefill(comp, ids, cc)
    for _ in range(4):
        t = int(le.argmax())
        le, lc = G.decode_one_token(eager, t, ce), G.decode_one_token(comp, t, cc)
        torch.testing.assert_close(lc, le, atol=1e-4, rtol=1e-4)
