"""Unstructured / N:M pruning: exact sparsity per row, N:M patterns, Wanda scores, SparseGPT's reconstruction."""

from __future__ import annotations

import copy

import pytest
import torch

from slmkit.compress.calibrate import block_inputs, decoder_layers
from slmkit.compress.prune import (
    PRUNERS,
    MagnitudeConfig,
    SparseGPTConfig,
    WandaConfig,
    magnitude_prune,
    mask_from_scores,
    prune,
    sparsegpt_prune,
    wanda_prune,
    weight_sparsity,
)
from slmkit.errors import ConfigError


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.logspace(-1, 1, d)
    return (torch.randn(n, d, generator=g) * scale) @ mix + 0.5 * torch.randn(n, 1, generator=g)  # (n, d)


def _decoder_weights(model):
    return {
        f"{i}.{name}": m.weight
        for i, block in enumerate(decoder_layers(model))
        for name, m in block.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def test_registry_lists_the_three_methods():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(PRUNERS.names())
    with pytest.raises(ConfigError, match="did you mean"):
        PRUNERS.get("wandaa")


@pytest.mark.parametrize(
    "kwargs",
    [dict(sparsity=0.0), dict(sparsity=1.0), dict(sparsity=1.5), dict(sparsity=-0.1), dict(pattern="4:2"),
     dict(pattern="0:4"), dict(pattern="2:2"), dict(pattern="two:four"), dict(sparsity=0.3, pattern="2:4")],
)
def test_bad_configs_are_rejected(kwargs):
    for cls in (MagnitudeConfig, WandaConfig, SparseGPTConfig):
        with pytest.raises(ConfigError):
            cls(**kwargs)


def test_sparsity_defaults_follow_the_pattern():
    assert MagnitudeConfig().sparsity == 0.5
    assert WandaConfig(pattern="1:4").sparsity == 0.75
    assert SparseGPTConfig(pattern="4:8").sparsity == 0.5


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_exact_per_row_sparsity_of_the_pure_functions(sparsity):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 100, generator=g)
    X = _correlated_inputs(300, 100)
    k = round(sparsity * 100)
    for new in (
        magnitude_prune(W, sparsity),
        wanda_prune(W, X.square().sum(0), sparsity),
        sparsegpt_prune(W, X.T @ X / 300, sparsity, blocksize=32),
    ):
        assert ((new == 0).sum(1) == k).all()


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_n_m_pattern_holds(nm):
    n, m = nm
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 64, generator=g)
    X = _correlated_inputs(200, 64)
    for new in (
        magnitude_prune(W, 1 - n / m, nm),
        wanda_prune(W, X.square().sum(0), 1 - n / m, nm),
        sparsegpt_prune(W, X.T @ X / 200, 1 - n / m, nm, blocksize=16),
    ):
        nonzero_per_group = (new != 0).reshape(16, 64 // m, m).sum(-1)
        assert (nonzero_per_group == n).all()


def test_magnitude_and_wanda_keep_the_right_weights():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    assert torch.equal(magnitude_prune(W, 0.5), torch.tensor([[0.0, 0.0, 3.0, -4.0], [4.0, 3.0, 0.0, 0.0]]))
    # column norms 10, 1, 1, 0.1: Wanda keeps the small weight of the loud input column, drops the big quiet one
    sq = torch.tensor([100.0, 1.0, 1.0, 0.01])
    want = torch.tensor([[1.0, 0.0, 3.0, 0.0], [4.0, 3.0, 0.0, 0.0]])
    assert torch.equal(wanda_prune(W, sq, 0.5), want)
    # the mask is the lowest |W| * ||X|| of each row, as computed from scratch
    scores = W.abs() * sq.sqrt()
    assert torch.equal(mask_from_scores(scores, 0.5), scores <= scores.median(dim=1, keepdim=True).values)


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, 64, generator=g)
    X = _correlated_inputs(512, 64, seed=3)
    H = X.T @ X / 512

    def err(Wp):
        return ((W - Wp) @ X.T).square().sum().item()

    sq = X.square().sum(0)
    for nm in (None, (2, 4)):
        e_sgpt = err(sparsegpt_prune(W, H, 0.5, nm, blocksize=16))
        e_wanda = err(wanda_prune(W, sq, 0.5, nm))
        e_mag = err(magnitude_prune(W, 0.5, nm))
        assert e_sgpt < 0.8 * e_wanda and e_wanda < e_mag


def test_sparsegpt_with_no_pruning_pressure_is_exact():
    """A dead input column is pruned for free and nothing else changes the layer's output."""
    g = torch.Generator().manual_seed(4)
    X = _correlated_inputs(256, 16)
    X[:, 3] = 0.0
    W = torch.randn(8, 16, generator=g)
    new = sparsegpt_prune(W, X.T @ X / 256, 1 / 16, blocksize=16, damp=0.0)
    assert (new[:, 3] == 0).all() and ((new == 0).sum(1) == 1).all()
    torch.testing.assert_close(new @ X.T, W @ X.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "method,cfg",
    [("magnitude", MagnitudeConfig(0.5)), ("wanda", WandaConfig(0.4)), ("sparsegpt", SparseGPTConfig(pattern="2:4"))],
)
def test_model_level_pruning(tiny_llama, method, cfg):
    model = copy.deepcopy(tiny_llama[0])
    emb = model.model.embed_tokens.weight.clone()
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    prune(model, ids, method, cfg)
    for name, w in _decoder_weights(model).items():
        if cfg.pattern:
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name
        else:
            assert ((w == 0).sum(1) == round(cfg.sparsity * w.shape[1])).all(), name
    assert abs(weight_sparsity(model) - cfg.sparsity) < 0.01
    assert torch.equal(model.model.embed_tokens.weight, emb)
    after = model(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


def test_wanda_in_the_model_uses_the_block_inputs(tiny_llama):
    model = copy.deepcopy(tiny_llama[0])
    ids = torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(5))
    q = decoder_layers(model)[0].self_attn.q_proj
    W0 = q.weight.clone()
    xs, kws = block_inputs(model, ids)
    x = decoder_layers(model)[0].input_layernorm(xs[0]).reshape(-1, 64)  # q_proj's input
    want = wanda_prune(W0, x.square().sum(0), 0.5)
    prune(model, ids, "wanda", WandaConfig(0.5))
    assert torch.equal(q.weight == 0, want == 0)


def test_impossible_pattern_for_the_model(tiny_llama):
    model = copy.deepcopy(tiny_llama[0])
    before = {k: v.clone() for k, v in _decoder_weights(model).items()}
    with pytest.raises(ConfigError, match="divisible by 3"):
        prune(model, None, "magnitude", MagnitudeConfig(pattern="2:3"))
    assert all(torch.equal(before[k], v) for k, v in _decoder_weights(model).items())
    with pytest.raises(ConfigError, match="needs calibration"):
        prune(model, None, "wanda", WandaConfig())
