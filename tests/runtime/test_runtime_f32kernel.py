"""kernels/f32.c through :func:`slmkit.runtime.q4kernel.f32_linear`: fp32 weights times 2..16 activation rows
(speculative verification and small batches of full-precision models on the fast path)."""

from __future__ import annotations

import pytest
import torch

from slmkit.runtime import q4kernel as Q
from slmkit.runtime.weights import Dense, apply_linear

pytestmark = pytest.mark.skipif(Q.load() is None, reason="slmkit's kernel library is unavailable here")


@pytest.mark.parametrize("m,n,k", [(2, 1, 16), (3, 4, 48), (5, 17, 576), (16, 100, 64), (4, 7, 1536)])
def test_matches_float64_to_fp32_rounding(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    y = Q.f32_linear(x, w)
    ref = x.double() @ w.double().T
    scale = (x.double().abs() @ w.double().abs().T).max()
    assert y.shape == (m, n) and float((y.double() - ref).abs().max()) <= 1e-6 * float(scale)


def test_each_row_is_computed_alone():
    """A row's output has the same bits whatever rows share the pass (batch invariance of the verify pass)."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 96, generator=g), torch.randn(33, 96, generator=g)
    full = Q.f32_linear(x, w)
    for rows in ([0, 8], [3, 4, 5], list(range(2, 9))):
        assert torch.equal(Q.f32_linear(x[rows], w), full[rows])


@pytest.mark.parametrize("x,w", [(torch.randn(1, 32), torch.randn(4, 32)), (torch.randn(17, 32), torch.randn(4, 32)),
                                 (torch.randn(3, 40), torch.randn(4, 40)), (torch.randn(3, 32).bfloat16(), torch.randn(4, 32).bfloat16())])
def test_declines_what_it_does_not_take(x, w):
    """One token (torch's gemv: transformers' own bits), more than 16, K not a multiple of 16, not fp32: None."""
    assert Q.f32_linear(x, w) is None


def test_dense_weights_use_it_with_the_bias_added():
    g = torch.Generator().manual_seed(2)
    w, b, x = torch.randn(12, 64, generator=g), torch.randn(12, generator=g), torch.randn(4, 64, generator=g)
    got = apply_linear(Dense(w, b).spec(), x)
    assert torch.allclose(got, torch.nn.functional.linear(x, w, b), atol=1e-5)
    assert torch.equal(got, Q.f32_linear(x, w) + b)
