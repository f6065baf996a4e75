"""Quantisation grids: error bounds, GGUF block layouts, bit packing, bad input."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from slmkit.compress.qgrid import (
    GGUF_GRIDS,
    Grid,
    encode_gguf_blocks,
    group_params,
    pack_codes,
    quantize_rtn,
    unpack_codes,
)
from slmkit.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread is much faster


def _weights(out=48, inn=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.05
    w[3, 17] = 0.9  # an outlier
    return w


@pytest.mark.parametrize(
    "grid",
    [Grid(3, 32), Grid(4, 128), Grid(5, 64), Grid(8, 32), Grid(4, 0), Grid(4, 32, symmetric=False), Grid(3, 0, symmetric=False)],
)
def test_dequant_error_bound(grid):
    w = _weights()
    q = quantize_rtn(w, grid)
    assert q.codes.dtype == torch.int8
    assert int(q.codes.min()) >= grid.qmin and int(q.codes.max()) <= grid.qmax
    # scales are stored as fp16 and used exactly
    assert torch.equal(q.scales.float(), q.scales.float().half().float())
    g = grid.width(w.shape[1])
    d = q.scales.float().abs().repeat_interleave(g, 1)
    amax = w.abs().reshape(w.shape[0], -1, g).amax(-1).repeat_interleave(g, 1)
    err = (q.dequantize() - w).abs()
    # half a step, plus the fp16 rounding of the scale; symmetric grids with 2^(b-1) negative
    # and 2^(b-1)-1 positive levels may clip the side opposite the extreme by one more step
    slack = 1.0 if grid.symmetric and grid.bits < 8 else 0.5
    assert (err <= slack * d + amax * 2.0**-10 + 1e-8).all()
    # the bulk is within half a step
    assert (err <= 0.5 * d + amax * 2.0**-10 + 1e-8).float().mean() > 0.95


def test_error_shrinks_with_bits():
    w = _weights()
    errs = [(quantize_rtn(w, Grid(b, 32)).dequantize() - w).square().mean().item() for b in (3, 4, 5, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[1] / errs[2] > 3  # one bit more: ~4x lower MSE


def test_symmetric_scale_follows_ggml_convention():
    w = torch.tensor([[0.1, -0.8, 0.3, 0.2] * 8])  # (1, 32): extreme is -0.8
    s, m = group_params(w, Grid(4, 32))
    assert m is None
    assert s.item() == pytest.approx(-0.8 / -8, rel=1e-3)  # d = max / -8 (Q4_0)
    q = quantize_rtn(w, Grid(4, 32))
    assert int(q.codes[0, 1]) == -8  # the extreme maps to the end of the grid


@pytest.mark.parametrize("qtype", list(GGUF_GRIDS))
def test_gguf_blocks_decode_to_our_weights_exactly(qtype):
    w = _weights(16, 96)
    q = quantize_rtn(w, Grid.for_gguf(qtype))
    t = gguf.GGMLQuantizationType[qtype]
    raw = encode_gguf_blocks(q)
    block, nbytes = gguf.GGML_QUANT_SIZES[t]
    assert raw.shape == (16, 96 // block * nbytes) and raw.dtype == np.uint8
    back = gguf.quants.dequantize(raw, t)
    assert np.array_equal(back, q.dequantize().numpy())
    # our RTN is the reference rounding (up to fp16-aware tie breaks) and never worse
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), t), t)
    assert (back == ref).mean() > 0.97
    ours, theirs = ((back - w.numpy()) ** 2).mean(), ((ref - w.numpy()) ** 2).mean()
    assert ours <= theirs * 1.001


@pytest.mark.parametrize("grid", [Grid(3, 32), Grid(4, 64), Grid(5, 32), Grid(8, 32), Grid(4, 32, symmetric=False)])
def test_pack_roundtrip(grid):
    q = quantize_rtn(_weights(7, 64), grid)
    packed = pack_codes(q.codes, grid)
    assert packed.nbytes == -(-q.codes.numel() * grid.bits // 8)
    assert torch.equal(unpack_codes(packed, tuple(q.codes.shape), grid), q.codes)



@pytest.mark.parametrize("grid", [Grid(3, 32, symmetric=False), Grid(5, 32, symmetric=False), Grid(8, 32),
                                  Grid.for_gguf("Q6_K"), Grid.for_gguf("Q2_K"), Grid.for_gguf("Q3_K")])
def test_pack_roundtrip_every_code_width(grid):
    """Every code of the range, in sizes that do not fill the last byte, comes back (2/4/8 bits: whole codes per
    byte; 3/5/6 bits: codes across byte boundaries)."""
    g = torch.Generator().manual_seed(grid.bits)
    for shape in [(1, 1), (3, 7), (5, 33)]:
        c = torch.randint(grid.qmin, grid.qmax + 1, shape, generator=g).to(torch.int8)
        c.view(-1)[0], c.view(-1)[-1] = grid.qmin, grid.qmax
        assert torch.equal(unpack_codes(pack_codes(c, grid), shape, grid), c), (grid, shape)

def test_bad_grids():
    with pytest.raises(ConfigError, match="unsupported bits 6"):
        Grid(bits=6)
    with pytest.raises(ConfigError, match="unsupported bits"):
        Grid(bits=16)
    with pytest.raises(ConfigError, match="unknown GGUF"):
        Grid.for_gguf("IQ4_NL")  # an i-quant: no grid (Q3_K is one since k-quants were added)
    with pytest.raises(ConfigError, match="Q4_0 needs"):
        Grid(4, 64, gguf="Q4_0")
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_rtn(torch.zeros(4, 96), Grid(4, 64))
    with pytest.raises(ConfigError, match=">= 0"):
        Grid(4, -1)
