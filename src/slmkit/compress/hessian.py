"""Damped Cholesky factors of a layer Hessian ``H ~ X^T X``: one routine for GPTQ, SparseGPT and SVD-LLM.

GPTQ (Frantar et al. 2022, arXiv:2210.17323, Sec. 4 "Cholesky reformulation") adds
``lambda = percdamp * mean(diag H)`` to the diagonal before factoring ``H``, and uses the upper
Cholesky factor of ``H^-1``; SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774, Alg. 1 line 1)
uses the same factor; SVD-LLM's truncation-aware whitening (Wang et al. 2024, arXiv:2403.07378,
Sec. 3.1) uses the lower factor ``L`` of ``H`` itself.

The one damping rule, for every caller (all in float64):

* try ``k = 0, 1, ..., DAMP_TRIES - 1`` with ``lambda_k = d_k * max(mean(diag H), DAMP_FLOOR)``
  and ``d_k = damp * 10**k`` (a zero ``damp`` factors ``H`` undamped first, then retries with
  ``d_k = ZERO_DAMP_RETRY * 10**(k-1)``);
* the first ``H + lambda_k I`` whose Cholesky factorisation succeeds is used; if none does, a
  :class:`~slmkit.errors.ConfigError` names the caller and asks for more calibration data or damping.

Dead inputs (a zero ``H_jj``: the input column never fired) are handled by
:func:`mask_dead_inputs` as in the GPTQ reference code: ``H_jj = 1`` and ``W[:, j] = 0``.
"""

from __future__ import annotations

import logging

import torch

from slmkit.errors import ConfigError

log = logging.getLogger(__name__)

DAMP_FLOOR = 1e-12  #: smallest mean(diag H) the damping is scaled by (an all-zero H still gets damped)
DAMP_TRIES = 6  #: factorisations tried, damping x10 each time
ZERO_DAMP_RETRY = 1e-6  #: relative damping of the first retry when ``damp`` is zero


def mask_dead_inputs(H: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """In place: ``H_jj = 1`` and ``W[:, j] = 0`` for every input ``j`` with ``H_jj == 0``; returns the ``(in,)`` mask."""
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return dead


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * max(mean(diag H), DAMP_FLOOR) * I`` in float64 (a new tensor): the first try's damping."""
    H = H.double()
    return _damped(H, damp * H.diagonal().mean().clamp_min(DAMP_FLOOR))


def _damped(H: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    A = H.clone()
    A.diagonal().add_(lam)
    return A


def _factors(H: torch.Tensor, damp: float, who: str, inverse: bool) -> torch.Tensor:
    """The module's damping rule around one factorisation: of ``H + lambda I`` (lower), or with ``inverse`` of its
    inverse (upper); a try whose factorisation fails, either one, moves to the next damping."""
    H = H.double()
    scale = H.diagonal().mean().clamp_min(DAMP_FLOOR)
    for k in range(DAMP_TRIES):
        d = damp * 10**k if damp > 0 or k == 0 else ZERO_DAMP_RETRY * 10 ** (k - 1)
        L, info = torch.linalg.cholesky_ex(_damped(H, d * scale))  # (n, n) lower
        if int(info) == 0 and inverse:
            L, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if int(info) == 0:
            return L
        log.debug("%s: not positive definite with damp %g; trying more", who, d)
    raise ConfigError(f"{who} is not positive definite even after damping it by {d:g} x mean(diag H)",
                      "use more calibration data or a larger damp")


def damped_cholesky(H: torch.Tensor, damp: float, who: str = "the calibration Hessian") -> torch.Tensor:
    """Lower ``L`` (float64) with ``L L^T = H + lambda I``, ``lambda`` by the module's damping rule.

    ``who`` names the caller in the error raised when every damping fails.
    """
    return _factors(H, damp, who, inverse=False)


def inverse_hessian_factor(H: torch.Tensor, damp: float, who: str = "the calibration Hessian") -> torch.Tensor:
    """Upper ``U`` (float64) with ``U^T U = (H + lambda I)^-1`` (GPTQ Sec. 4; SparseGPT Alg. 1, line 1)."""
    return _factors(H, damp, who, inverse=True)  # (n, n)
