"""The one damped-Cholesky routine shared by GPTQ, SparseGPT and SVD-LLM whitening (compress/hessian.py)."""

from __future__ import annotations

import pytest
import torch

from slmkit.compress.hessian import damped, damped_cholesky, inverse_hessian_factor, mask_dead_inputs
from slmkit.errors import ConfigError


def _spd(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    X = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X.T @ X / tokens


def test_first_try_is_the_percdamp_rule():
    H = _spd(16, 64)
    eye = torch.eye(16, dtype=torch.float64)
    lam = 0.01 * H.diagonal().mean()
    assert torch.equal(damped(H, 0.01), H + lam * eye)
    L = damped_cholesky(H, 0.01)
    assert torch.equal(L, L.tril())
    assert torch.allclose(L @ L.T, H + lam * eye, atol=1e-12)
    U = inverse_hessian_factor(H, 0.01)
    assert torch.equal(U, U.triu())
    assert torch.allclose(U.T @ U, torch.linalg.inv(H + lam * eye), atol=1e-10)


@pytest.mark.parametrize("damp", [1e-4, 0.0])
def test_retry_grows_damping_tenfold(damp):
    # smallest eigenvalue -0.005, mean(diag) m = 1.49875: the first lambda that works is 1e-2 * m, reached
    # from 1e-4 in two steps (1e-4, 1e-3, 1e-2) and from 0 in five (0, 1e-6, ..., 1e-2)
    H = torch.diag(torch.tensor([2.0, 2.0, 2.0, -0.005], dtype=torch.float64))
    L = damped_cholesky(H, damp)
    assert torch.allclose(L @ L.T - H, 1e-2 * H.diagonal().mean() * torch.eye(4, dtype=torch.float64), atol=1e-14)


def test_error_names_the_caller_when_every_damping_fails():
    H = torch.diag(torch.tensor([4.0, 4.0, 4.0, -1.0], dtype=torch.float64))  # needs lambda > 1; at most 1e-4 * 2.75
    with pytest.raises(ConfigError, match="GPTQ: the calibration Hessian is not positive definite"):
        inverse_hessian_factor(H, 1e-9, "GPTQ: the calibration Hessian")


def test_dead_inputs_are_masked_in_place():
    H = _spd(6, 32)
    H[2, :] = 0
    H[:, 2] = 0
    W = torch.ones(3, 6)
    dead = mask_dead_inputs(H, W)
    assert dead.tolist() == [False, False, True, False, False, False]
    assert H[2, 2] == 1 and (W[:, 2] == 0).all() and (W[:, [0, 1, 3, 4, 5]] == 1).all()
    damped_cholesky(H, 0.0)  # no longer singular
