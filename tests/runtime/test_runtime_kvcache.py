"""KV-cache policies: memory within budget (exact accounting), and their effect on attention and perplexity."""

import math

import pytest
import torch

from slmkit.errors import ConfigError
from slmkit.runtime import decoding as D
from slmkit.runtime import generate as G
from slmkit.runtime.kvcache import KV_POLICIES, KVShape, dequantize_kv, kv_policy, quantize_kv


@pytest.fixture(scope="module")
def fm(lively):
    return G.build(lively[0])


@pytest.fixture(scope="module")
def long_ids(lively):
    from slmkit.models.tiny import tiny_corpus

    tok = lively[1]
    return torch.tensor(tok(" ".join(tiny_corpus(60, seed=5))).input_ids[:300])


def test_registry_lists_every_policy():
    assert {"full", "int8", "int4", "streaming", "h2o"} <= set(KV_POLICIES.names())
    with pytest.raises(ConfigError, match="did you mean"):
        kv_policy("strem")


@pytest.mark.parametrize("name,budget", [("full", None), ("int8", None), ("int4", None), ("streaming", 32), ("h2o", 32)])
def test_memory_is_exact_and_within_budget(fm, long_ids, name, budget):
    pol = kv_policy(name, budget=budget)
    shape = fm.kv_shape()
    cache = pol.make(shape, context=len(long_ids))
    seen = []
    for b in range(0, len(long_ids), 7):  # mixed chunk sizes: 7-token chunks, then single tokens
        G.forward(fm, [G.Segment(long_ids[b : b + 7], cache)])
        seen.append(cache.nbytes())
        assert cache.tokens() <= (budget or len(long_ids))
    allocated = pol.bytes_for(shape, pol.capacity(len(long_ids)))
    assert seen[-1] == allocated  # nbytes is exactly the formula the fit planner uses
    assert max(seen) == min(seen)  # pre-allocated: memory never grows
    full = kv_policy("full").bytes_for(shape, len(long_ids))
    per_vec = {"full": 4 * shape.head_dim, "int8": shape.head_dim + 4, "int4": shape.head_dim // 2 + 4}
    if budget is None:
        assert allocated == full * per_vec[name] // per_vec["full"]
    else:
        assert cache.tokens() == budget
        assert allocated <= full * budget / len(long_ids) * (1.1 if name == "h2o" else 1.0)


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_quantisation_error_is_half_a_step(bits):
    x = torch.randn(1, 3, 10, 64) * 3
    codes, scale, lo = quantize_kv(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 64 * bits // 8
    deq = dequantize_kv(codes, scale, lo, bits, torch.float32)
    assert ((deq - x).abs() <= scale.float() / 2 + 1e-3).all()


def test_streaming_matches_a_sink_window_attention_mask(lively, fm):
    """Token-by-token StreamingLLM equals full attention under the mask 'first S tokens or last W tokens'."""
    model, _ = lively
    T, sinks, budget = 40, 4, 12
    window = budget - sinks
    x = torch.randint(5, 300, (T,), generator=torch.Generator().manual_seed(0))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    mask = (j <= i) & ((j < sinks) | (j >= i - window))
    ref = model(input_ids=x[None], attention_mask=mask[None, None]).logits[0].detach()
    cache = fm.new_cache("streaming", context=T, budget=budget)
    got = torch.stack([G.decode_one_token(fm, int(t), cache) for t in x])
    assert torch.allclose(got, ref, atol=1e-4)
    assert not torch.allclose(got, model(input_ids=x[None]).logits[0].detach(), atol=1e-2)  # it did evict


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_evicting_policy_with_room_equals_full(fm, long_ids, name):
    ids = long_ids[:60]
    full, _, _ = D.policy_nll(fm, ids, "full", chunk=5)
    roomy, _, _ = D.policy_nll(fm, ids, name, budget=64, chunk=5)
    assert roomy == pytest.approx(full, rel=1e-5)


def test_h2o_keeps_recent_and_heavy_hitters():
    """A key that receives most attention survives eviction; the recent window always does."""
    shape = KVShape(layers=1, kv_heads=1, heads=1, head_dim=4)
    cache = kv_policy("h2o", budget=4, recent_ratio=0.5).make(shape, 32)
    heavy = torch.tensor([10.0, 0, 0, 0])
    for t in range(12):
        k = (heavy if t == 1 else torch.tensor([0.0, 0, 0, 1.0]) * 0.01 * t).view(1, 1, 1, 4)
        q = heavy.view(1, 1, 1, 4)  # every query attends mostly to token 1's key
        v = torch.full((1, 1, 1, 4), float(t))
        cache.attend(0, q, k, v)
        cache.advance(1)
    kept = sorted(int(val) for val in cache.v[0, 0, 0, : cache.tokens(), 0])
    assert cache.tokens() == 4 and 1 in kept and {10, 11} <= set(kept)


def test_full_and_int8_keep_perplexity_on_long_text(fm, long_ids):
    """Stated tolerance: int8 KV within 1% of full-cache perplexity; full equals transformers' own loss."""
    full, n, _ = D.policy_nll(fm, long_ids, "full", chunk=16)
    int8, _, _ = D.policy_nll(fm, long_ids, "int8", chunk=16)
    assert n == len(long_ids) - 1
    assert abs(math.exp(int8) / math.exp(full) - 1) < 0.01
    int4, _, _ = D.policy_nll(fm, long_ids, "int4", chunk=16)
    assert math.exp(int4) / math.exp(full) < 1.25


def test_full_policy_nll_equals_transformers_loss(lively, fm, long_ids):
    model, _ = lively
    ids = long_ids[:100]
    with torch.no_grad():
        ref = float(model(input_ids=ids[None], labels=ids[None]).loss)
    got, _, _ = D.policy_nll(fm, ids, "full", chunk=1)
    assert got == pytest.approx(ref, rel=1e-5)


def test_bad_policy_options():
    with pytest.raises(ConfigError, match="sinks"):
        kv_policy("streaming", budget=4, sinks=4)
    with pytest.raises(ConfigError, match="bits"):
        KV_POLICIES.get("int8").func(bits=3)
    with pytest.raises(ConfigError, match="bad option"):
        kv_policy("full", window=3)


def test_gqa_decode_attention_matches_repeated_kv():
    # the decode step folds each KV head's query group into the query axis instead of copying the cache
    from slmkit.runtime.kvcache import sdpa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 1, 8, generator=g)
    k, v = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(sdpa(q, k, v, 4), ref)
