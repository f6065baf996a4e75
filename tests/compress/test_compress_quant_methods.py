"""RTN, GPTQ and AWQ: layer reconstruction error, exactness of the fake-quantised model, bad input."""

from __future__ import annotations

import pytest
import torch

from slmkit.compress.awq import AWQConfig, output_error, search_clip, search_scale
from slmkit.compress.gptq import GPTQConfig, gptq_quantize
from slmkit.compress.qgrid import Grid, quantize_rtn
from slmkit.compress.quantize import QUANTIZERS, RTNConfig, quantize, target_names
from slmkit.errors import ConfigError
from slmkit.models.tiny import tiny_llama_config, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread is much faster


def _correlated(n=2048, dim=128, seed=0):
    """Inputs with strongly correlated channels and a few large ("salient") ones."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5
    x = torch.randn(n, dim, generator=g) @ mix + 0.05 * torch.randn(n, dim, generator=g)
    x[:, :4] *= 8
    return x


@pytest.fixture(scope="module")
def layer():
    x = _correlated()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g) * 0.05
    return w, x.T @ x / x.shape[0], x.abs().mean(0)


@pytest.mark.parametrize("grid", [Grid(4, 32), Grid(3, 64), Grid(4, 0, symmetric=False), Grid.for_gguf("Q4_0")])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(layer, grid, act_order):
    w, H, _ = layer
    rtn = output_error(w, quantize_rtn(w, grid).dequantize(), H)
    q = gptq_quantize(w, H, GPTQConfig(grid=grid, act_order=act_order, block_size=32))
    gptq = output_error(w, q.dequantize(), H)
    assert gptq < 0.5 * rtn
    assert int(q.codes.min()) >= grid.qmin and int(q.codes.max()) <= grid.qmax


def test_gptq_equals_rtn_without_correlation():
    # H = I: no error is propagated (Alg. 1's update is zero off the diagonal), so GPTQ is RTN
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    for act_order in (False, True):
        q = gptq_quantize(w, torch.eye(64), GPTQConfig(grid=Grid(4, 32), act_order=act_order))
        assert torch.equal(q.codes, quantize_rtn(w, Grid(4, 32)).codes)


def test_gptq_handles_dead_inputs():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    x = _correlated(256, 64)
    x[:, 5] = 0  # a channel that is never active
    q = gptq_quantize(w, x.T @ x / 256, GPTQConfig(grid=Grid(4, 32)))
    assert torch.isfinite(q.dequantize()).all()
    assert (q.codes[:, 5] == 0).all()


def test_awq_scale_search_beats_rtn(layer):
    w, H, act = layer
    grid = Grid(3, 64)
    rtn = output_error(w, quantize_rtn(w, grid).dequantize(), H)
    s = search_scale([w], H, act, grid, 20)
    scaled = output_error(w, quantize_rtn(w * s, grid).dequantize() / s, H)
    assert scaled < 0.9 * rtn
    # clipping never hurts the per-group objective; here it helps the total too
    Hs = H / (s[:, None] * s[None, :])
    clip = search_clip(w * s, Hs, grid, 0.5, 10)
    assert ((clip > 0.5) & (clip <= 1.0)).all()
    clipped = output_error(w, quantize_rtn(w * s, grid, clip).dequantize() / s, H)
    assert clipped <= scaled * 1.001


@pytest.fixture(scope="module")
def calib_ids(tiny_tok):
    return torch.randint(3, len(tiny_tok), (4, 32), generator=torch.Generator().manual_seed(0))


def _fresh(tiny_tok):
    torch.manual_seed(0)
    return tiny_model(tiny_llama_config(tiny_tok))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_model_weights_are_the_codes(tiny_tok, calib_ids, method):
    dense = _fresh(tiny_tok)
    model = _fresh(tiny_tok)
    cfg = QUANTIZERS.get(method).config(grid=Grid(8, 32))
    res = quantize(model, method, cfg, calib_ids)
    params = dict(model.named_parameters())
    assert set(res.tensors) == set(target_names(model)) and len(res.tensors) == 14
    for name, qt in res.tensors.items():
        assert torch.equal(params[name].data, qt.dequantize())  # fake-quantised = stored codes, bit for bit
    # 8 bit keeps the function (AWQ's folded scales included: a wrong fold would change it a lot)
    ref, out = _logits(dense, calib_ids), _logits(model, calib_ids)
    assert (out - ref).norm() / ref.norm() < 0.02
    if method == "awq":
        norm = model.model.layers[0].input_layernorm.weight
        assert not torch.equal(norm, dense.model.layers[0].input_layernorm.weight)  # scales were folded in


def test_gptq_model_beats_rtn_on_outputs(tiny_tok, calib_ids):
    dense = _fresh(tiny_tok)
    ref = _logits(dense, calib_ids)
    errs = {}
    for method in ("rtn", "gptq"):
        m = _fresh(tiny_tok)
        quantize(m, method, QUANTIZERS.get(method).config(grid=Grid(3, 32)), calib_ids)
        errs[method] = (_logits(m, calib_ids) - ref).norm().item()
    assert errs["gptq"] < errs["rtn"]


def test_bad_input_changes_nothing(tiny_tok, calib_ids):
    model = _fresh(tiny_tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="does not divide"):
        quantize(model, "gptq", GPTQConfig(grid=Grid(4, 48)), calib_ids)
    with pytest.raises(ConfigError, match="calibration"):
        quantize(model, "awq", AWQConfig(), None)
    with pytest.raises(ConfigError, match="unknown quantizer"):
        quantize(model, "hqq", RTNConfig(), None)
    with pytest.raises(ConfigError, match="takes a GPTQConfig"):
        quantize(model, "gptq", RTNConfig(), calib_ids)
    with pytest.raises(ConfigError, match="damp"):
        GPTQConfig(damp=0.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
