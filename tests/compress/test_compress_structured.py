"""Depth and width pruning: rankings vs from-scratch computations, exact equivalences, save/reload/generate."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from slmkit.compress.calibrate import decoder_layers
from slmkit.compress.prune import prune
from slmkit.compress.structured import (
    DepthConfig,
    WidthConfig,
    block_influence,
    perplexity_impact,
    prune_depth,
    prune_width,
    remove_layers,
    refit_columns,
    width_plan,
)
from slmkit.errors import ConfigError, UnsupportedModelError
from slmkit.models.tiny import tiny_llama_config, tiny_model


@pytest.fixture(scope="module")
def four_layer(tiny_tok):
    return tiny_model(tiny_llama_config(tiny_tok, layers=4), seed=7)


def _ids(n=4, t=24, seed=0):
    return torch.randint(3, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def _make_identity(block):
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def test_block_influence_matches_hooks(four_layer):
    model = four_layer
    ids = _ids()
    ins, outs = {}, {}
    hooks = []
    for i, blk in enumerate(decoder_layers(model)):
        hooks.append(blk.register_forward_pre_hook(lambda m, a, k, i=i: ins.__setitem__(i, (a[0] if a else k["hidden_states"])), with_kwargs=True))
        hooks.append(blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    want = torch.stack([1 - F.cosine_similarity(ins[i], outs[i], dim=-1).mean() for i in range(4)])
    torch.testing.assert_close(block_influence(model, ids, batch_size=3), want, atol=1e-5, rtol=1e-4)


def test_depth_removes_an_identity_block_without_changing_outputs(four_layer):
    model = copy.deepcopy(four_layer)
    _make_identity(decoder_layers(model)[2])
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    kept = [decoder_layers(model)[i] for i in (0, 1, 3)]
    prune_depth(model, ids, keep_layers=3)
    assert model.config.num_hidden_layers == 3
    assert all(a is b for a, b in zip(decoder_layers(model), kept))
    assert [b.self_attn.layer_idx for b in decoder_layers(model)] == [0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_perplexity_ranking_matches_removing_each_block(four_layer):
    ids = _ids(3, 16, seed=2)

    def nll(m):
        with torch.no_grad():
            logits = m(ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()

    base = nll(four_layer)
    want = torch.tensor([nll(remove_layers(copy.deepcopy(four_layer), [i])) - base for i in range(4)])
    got = perplexity_impact(four_layer, ids, batch_size=2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert four_layer.config.num_hidden_layers == 4 and len(decoder_layers(four_layer)) == 4  # restored
    model = copy.deepcopy(four_layer)
    prune(model, ids, "depth", DepthConfig(keep_layers=2, method="perplexity"))
    assert model.config.num_hidden_layers == 2


def test_depth_pruned_model_saves_reloads_and_generates(four_layer, tiny_tok, tmp_path):
    from slmkit.models import load

    model = prune_depth(copy.deepcopy(four_layer), _ids(), keep_layers=2)
    model.save_pretrained(tmp_path / "m")
    tiny_tok.save_pretrained(tmp_path / "m")
    back, tok = load(str(tmp_path / "m"))
    assert back.config.num_hidden_layers == 2 and len(decoder_layers(back)) == 2
    ids = _ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)
    prompt = ids[:1]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    gen_back = back.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    gen_mem = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    assert gen_back.shape[1] > prompt.shape[1] and torch.equal(gen_back, gen_mem)


def test_depth_bad_input(four_layer):
    with pytest.raises(ConfigError):
        DepthConfig(keep_layers=0)
    with pytest.raises(ConfigError, match="did you mean"):
        DepthConfig(keep_layers=2, method="block_influenc")
    with pytest.raises(ConfigError, match="below the model's 4"):
        prune_depth(copy.deepcopy(four_layer), _ids(), keep_layers=4)


def _kept_rows(old: torch.Tensor, new: torch.Tensor) -> list[int]:
    """Indices of the rows of ``old`` that ``new`` kept (rows are distinct in random weights)."""
    return [int((old == r).all(1).nonzero()[0]) for r in new]


def test_width_pruning_equals_masking_the_removed_structures(four_layer):
    orig = four_layer
    model = copy.deepcopy(orig)
    ids = _ids(4, 24, seed=3)
    total = sum(p.numel() for p in orig.parameters())
    plan = width_plan(model, WidthConfig(0.7))
    prune_width(model, ids, 0.7, refit=False)
    n = sum(p.numel() for p in model.parameters())
    assert n == plan.parameters and abs(n / total - 0.7) < 0.06
    c = model.config
    assert (c.num_key_value_heads, c.num_attention_heads, c.intermediate_size) == (plan.kv_heads, plan.heads, plan.intermediate)
    assert plan.kv_heads == 1 and c.num_attention_heads // c.num_key_value_heads == 2 and c.head_dim == 16

    # the same function as the original model with the removed heads' / channels' output columns zeroed
    masked = copy.deepcopy(orig)
    for bo, bn, bm in zip(decoder_layers(orig), decoder_layers(model), decoder_layers(masked)):
        q_keep = _kept_rows(bo.self_attn.q_proj.weight, bn.self_attn.q_proj.weight)
        ch_keep = _kept_rows(bo.mlp.up_proj.weight, bn.mlp.up_proj.weight)
        assert _kept_rows(bo.mlp.gate_proj.weight, bn.mlp.gate_proj.weight) == ch_keep
        kv_keep = _kept_rows(bo.self_attn.k_proj.weight, bn.self_attn.k_proj.weight)
        assert [r // 16 for r in q_keep[::32]] == [k // 16 * 2 for k in kv_keep[::16]]  # whole GQA groups
        with torch.no_grad():
            drop_q = torch.ones(64, dtype=torch.bool)
            drop_q[q_keep] = False
            bm.self_attn.o_proj.weight[:, drop_q] = 0
            drop_c = torch.ones(128, dtype=torch.bool)
            drop_c[ch_keep] = False
            bm.mlp.down_proj.weight[:, drop_c] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked(ids).logits, atol=1e-5, rtol=1e-5)


def test_width_keeps_the_loudest_group_of_block_zero(four_layer):
    """Block 0 sees the unpruned embeddings, so its choice can be recomputed from scratch."""
    model = copy.deepcopy(four_layer)
    ids = _ids(4, 24, seed=4)
    attn = decoder_layers(four_layer)[0].self_attn
    acts = []
    h = attn.o_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        four_layer(ids)
    h.remove()
    X = torch.cat(acts)  # (n, 64)
    score = (X.norm(dim=0) * attn.o_proj.weight.norm(dim=0)).reshape(2, 32).sum(1)
    best = int(score.argmax())
    prune_width(model, ids, 0.7)
    new_k = decoder_layers(model)[0].self_attn.k_proj.weight
    assert torch.equal(new_k, attn.k_proj.weight[best * 16 : (best + 1) * 16])


def test_width_pruned_model_saves_reloads_and_generates(four_layer, tiny_tok, tmp_path):
    from slmkit.models import load

    model = prune_width(copy.deepcopy(four_layer), _ids(), 0.6)
    model.save_pretrained(tmp_path / "w")
    tiny_tok.save_pretrained(tmp_path / "w")
    back, tok = load(str(tmp_path / "w"))
    assert back.config.intermediate_size == model.config.intermediate_size < 128
    ids = _ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)
    out = back.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=5, do_sample=False,
                        pad_token_id=tok.pad_token_id)
    assert out.shape[1] == 15


def test_width_bad_input(four_layer):
    for r in (0.0, 1.0, 1.2):
        with pytest.raises(ConfigError):
            WidthConfig(r)
    with pytest.raises(ConfigError, match="below what width pruning can reach"):
        width_plan(four_layer, WidthConfig(0.05))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError):
        prune_width(gpt2, torch.zeros(1, 4, dtype=torch.long), 0.7)


def test_refit_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=g) @ torch.randn(12, 12, generator=g)  # (n, in) correlated
    W = torch.randn(5, 12, generator=g)
    keep = torch.tensor([0, 3, 4, 8, 11])
    got = refit_columns(W, X.T @ X / 300, keep, damp=0.0)
    want = torch.linalg.lstsq(X[:, keep].double(), (X @ W.T).double()).solution.T  # (out, |S|)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    err = lambda Wp: ((X @ W.T) - X[:, keep] @ Wp.T).square().sum()  # noqa: E731
    assert err(got) < err(W[:, keep])


def test_refit_brings_the_pruned_model_closer(four_layer):
    ids = _ids(4, 24, seed=6)
    with torch.no_grad():
        ref = four_layer(ids).logits.log_softmax(-1)

    def kl(refit):
        m = prune_width(copy.deepcopy(four_layer), ids, 0.6, refit=refit)
        with torch.no_grad():
            lp = m(ids).logits.log_softmax(-1)
        return (ref.exp() * (ref - lp)).sum(-1).mean().item()

    assert kl(True) < kl(False)
