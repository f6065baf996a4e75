"""llama.cpp's GGUF quantisers (legacy 32-blocks and k-quants), vectorised in torch, bit for bit.

Each fitter follows the C function it names in llama.cpp's ``ggml/src/ggml-quants.c``
(the copy vendored in llama-cpp-python 0.3.36) and reproduces its output exactly:
without an importance vector it is what ``llama-quantize`` does with no imatrix
(``quantize_row_<t>_ref``), with one it is the imatrix path (``quantize_row_<t>_impl``
fed ``quant_weights``). To be exact the float work is done as the C code does it:
every operation in fp32 in the same order, sums accumulated sequentially over a
block (a loop over the 16/32/256 positions, vectorised over all blocks at once),
``nearest_int`` as round-half-even, fp16 by round-to-nearest-even.

Layout: the helpers take blocks as *columns*, ``x (n, B)``, ``n`` weights per block,
``B`` blocks (row-major over (row, block)), so a sequential sum is ``n`` contiguous
vector adds. A :class:`Fit` holds the *effective* per-(sub-)block scale and offset
(``w_hat = scale * code + offset``, exactly what a GGUF reader computes), the codes
llama.cpp writes and, for k-quants, the integers stored in the super-block
(``aux``). :func:`encode_kquant` writes those in llama.cpp's byte layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

QK_K = 256  #: weights per k-quant super-block
EPS = 1e-15  #: GROUP_MAX_EPS: a block whose largest |x| is below this is all zero
CHUNK = 1 << 17  #: weights per row chunk (keeps the working set in cache)

Tensor = torch.Tensor


@dataclass
class Fit:
    """A fitted GGUF tensor: ``w_hat = scales[r, g] * codes[r, c] + mins[r, g]``."""

    scales: Tensor  #: (out, G) fp32 effective scale per (sub-)block
    mins: Tensor | None  #: (out, G) fp32 effective offset (asymmetric types), else None
    aux: dict[str, Tensor] | None  #: k-quants: per super-block fp16 ``d``/``dmin`` and integer ``sc``/``m``
    codes: Tensor  #: (out, n) int8, the codes llama.cpp writes


# ---------------------------------------------------------------------------------------------
# fp32 helpers


def _t(v) -> Tensor:
    """A 0-dim fp32 tensor (so ``a / b`` is one correctly rounded fp32 division, never 1/b * a)."""
    return torch.tensor(float(np.float32(v)), dtype=torch.float32)


def _sqrt(x: Tensor) -> Tensor:
    """``sqrtf``, correctly rounded: torch's fp32 sqrt may be 1 ulp off; an fp64 sqrt rounded to
    fp32 is always the correctly rounded fp32 result (53 >= 2*24 + 2 bits)."""
    return torch.sqrt(x.double()).float()


def _fp16(x: Tensor) -> Tensor:
    return x.to(torch.float16).to(torch.float32)  # GGML_FP32_TO_FP16, then back


def _seqsum(t: Tensor, first: bool = False, dim: int = 0) -> Tensor:
    """``t`` summed over ``dim`` in order, in fp32, as a C loop ``s += t[i]`` from ``s = 0``
    (``first``: from ``s = t[0]``, as make_qkx2_quants starts its sums)."""
    acc = t.select(dim, 0).clone() if first else torch.zeros_like(t.select(dim, 0)).add_(t.select(dim, 0))
    for i in range(1, t.shape[dim]):
        acc.add_(t.select(dim, i))
    return acc


def _cols(w: Tensor, n: int) -> Tensor:
    """``w (rows, N)`` -> ``(n, rows*N/n)``: blocks of ``n`` consecutive weights as columns."""
    return w.reshape(-1, n).T.contiguous()


def _imp_cols(imp: Tensor, n: int, rows: int) -> Tensor:
    """The importance of each weight in :func:`_cols` layout: ``imp (N,)`` -> ``(n, rows*N/n)``."""
    return imp.float().reshape(-1, n).T.repeat(1, rows)


def _pos_max(t: Tensor) -> Tensor:
    """Row maxima of ``t (R, k)`` floored at +0 (C: ``max = 0; if (v > max) max = v``, never -0)."""
    m = t.amax(1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _signed_absmax(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(value, |value|) of the first entry of largest magnitude along ``dim`` (C: ``if (ax > amax)``
    from ``amax = 0``, so an all-zero block gives +0)."""
    ax = x.abs()
    idx = ax.argmax(dim, keepdim=True)
    amax = ax.gather(dim, idx).squeeze(dim)
    mx = x.gather(dim, idx).squeeze(dim)
    return torch.where(amax > 0, mx, torch.zeros_like(mx)), amax


# ---------------------------------------------------------------------------------------------
# the scale searches


def make_qx_quants(x: Tensor, nmax: int, qw: Tensor | None) -> tuple[Tensor, Tensor]:
    """Symmetric scale search; follows ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``.

    ``x (n, B)``, ``qw (n, B)`` weights (None: ``x^2``). Returns the scale ``(B,)`` and
    ``L (n, B)`` in ``[0, 2*nmax)`` (code + nmax), both as llama.cpp computes them. The 19
    trial scales (``-(nmax + 0.1*is)/max``, ``is`` = 0, -9..9) are independent, so they are
    evaluated as one batch and then compared in the C loop's order.
    """
    n = x.shape[0]
    mx, amax = _signed_absmax(x, 0)
    w = x * x if qw is None else qw
    wx = w * x
    nums = [-np.float32(nmax)] + [-(np.float32(nmax) + np.float32(0.1) * np.float32(s)) for s in range(-9, 10) if s]
    iscale = torch.stack([_t(v) / mx for v in nums])  # (C, B)
    l = (iscale[:, None, :] * x[None]).round_().clamp_(-nmax, nmax - 1)  # (C, n, B)
    C = len(nums)
    sums = torch.empty(2, C, n, x.shape[1], dtype=torch.float32)
    torch.mul(wx[None], l, out=sums[0])  # sumlx += w*x*l
    torch.mul(w[None] * l, l, out=sums[1])  # suml2 += w*l*l
    sumlx, suml2 = _seqsum(sums, dim=2)  # (C, B) each
    pick = torch.zeros_like(mx, dtype=torch.long)
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], torch.zeros_like(mx))
    best = scale * sumlx[0]
    for c in range(1, C):
        better = (suml2[c] > 0) & (sumlx[c] * sumlx[c] > best * suml2[c])
        pick = torch.where(better, c, pick)
        scale = torch.where(better, sumlx[c] / suml2[c], scale)
        best = torch.where(better, scale * sumlx[c], best)
    L = l.gather(0, pick[None, None, :].expand(1, n, -1))[0] + nmax
    zero = amax < EPS
    return scale.masked_fill(zero, 0.0), L.masked_fill(zero, 0.0)


def make_qkx_quants(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Scale-and-offset search; follows ``make_qkx2_quants`` (and ``make_qkx3_quants``, identical
    when weights are given) with ``(rmin, rdelta, nstep, use_mad)``.

    ``x, w (n, B)``. Returns ``scale (B,)``, ``the_min (B,)`` (>= 0; ``w = scale*L - the_min``)
    and ``L (n, B)`` in ``[0, nmax]``.
    """
    mn = x.amin(0).clamp(max=0.0)  # if (min > 0) min = 0
    mx = x.amax(0)
    sum_w = _seqsum(w, first=True)
    sum_x = _seqsum(w * x, first=True)

    def err(scale: Tensor, mn_: Tensor, L_: Tensor) -> Tensor:
        diff = (scale * L_ + mn_) - x  # scale*L + min - x
        return _seqsum(w * (diff.abs() if use_mad else diff * diff))

    flat = mx == mn  # (qkx3: max <= min) nothing to fit: L = 0, scale 0
    iscale = _t(nmax) / (mx - mn)
    scale = _t(1.0) / iscale
    L = torch.round(iscale * (x - mn)).clamp_(0, nmax)
    best = err(scale, mn, L)
    buf = torch.empty(x.shape[0], 3, x.shape[1], dtype=torch.float32)
    for s in range(nstep + 1):
        num = np.float32(rmin) + np.float32(rdelta) * np.float32(s) + np.float32(nmax)
        l = torch.round((_t(num) / (mx - mn)) * (x - mn)).clamp_(0, nmax)
        torch.mul(w, l, out=buf[:, 0])
        torch.mul(buf[:, 0], l, out=buf[:, 1])
        torch.mul(buf[:, 0], x, out=buf[:, 2])
        sum_l, sum_l2, sum_xl = _seqsum(buf)  # += w*l, w*l*l, w*l*x
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0  # a positive offset is not allowed: refit the scale alone
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = this_min.masked_fill(pos, 0.0)
        cur = err(this_scale, this_min, l)
        better = (D > 0) & (cur < best) & ~flat
        L = torch.where(better, l, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    return scale.masked_fill(flat, 0.0), -mn, L.masked_fill(flat, 0.0)


def make_qp_quants(x: Tensor, nmax: int, qw: Tensor) -> tuple[Tensor, Tensor]:
    """Positive scale search for the sub-block scales of a super-block; follows ``make_qp_quants``.

    ``x, qw (n, B)``, ``x >= 0``. Returns the scale ``(B,)`` and ``L (n, B)`` (as the uint8 it is stored in).
    """
    mx = x.amax(0).clamp(min=0.0)
    iscale = _t(nmax) / mx
    scale = _t(1.0) / iscale
    L = torch.round(iscale * x).remainder_(256)  # uint8_t L[i] = nearest_int(iscale*x[i])
    diff = x - scale * L
    best = _seqsum((qw * diff) * diff)
    for s in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = _t(np.float32(0.1) * np.float32(s) + np.float32(nmax)) / mx
        sc = _t(1.0) / isc
        diff = x - sc * torch.round(isc * x).clamp_(max=nmax)
        mse = _seqsum((qw * diff) * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isc, iscale)
    L = torch.round(iscale * x).clamp_(max=nmax).remainder_(256)  # uint8_t L[i] = MIN(nmax, l)
    qx = qw * x
    sumlx, suml2 = _seqsum(qx * L), _seqsum((qw * L) * L)
    for _ in range(5):  # coordinate descent; a pass that changes nothing leaves the next unchanged too
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - qx[i] * li
            sl2 = suml2 - (qw[i] * li) * li
            new = torch.round((x[i] * sl2) / slx).clamp_(max=nmax)
            slx2 = slx + qx[i] * new
            sl22 = sl2 + (qw[i] * new) * new
            take = (slx > 0) & (sl2 > 0) & (new != li) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            L[i] = torch.where(take, new.remainder(256), li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    zero = mx < EPS
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return scale.masked_fill(zero, 0.0), L.masked_fill(zero, 0.0)


def make_q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric scale search with coordinate descent; follows ``make_q3_quants(n, nmax, x, L, do_rmse=true)``.

    Returns the scale ``(B,)`` and ``L (n, B)`` in ``[0, 2*nmax)`` (0 for an all-zero block).
    """
    mx, amax = _signed_absmax(x, 0)
    L = torch.round((_t(-nmax) / mx) * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = _seqsum(wx * L), _seqsum((w * L) * L)
    for _ in range(5):
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            new = torch.round((x[i] * sl2) / slx).clamp_(-nmax, nmax - 1)
            slx2 = slx + wx[i] * new
            sl22 = sl2 + (w[i] * new) * new
            take = (slx > 0) & (new != li) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            L[i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    zero = amax < EPS
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return scale.masked_fill(zero, 0.0), (L + nmax).masked_fill(zero, 0.0)


def _sigma2_weights(xs: Tensor, x256: Tensor, qw: Tensor, factor: float, nsub: int) -> Tensor:
    """The imatrix weighting ``qw * sqrt(sigma2 + x^2)``, ``sigma2 = factor * sum(x^2) / QK_K`` per super-block."""
    sigma2 = (_t(factor) * _seqsum(x256 * x256)) / _t(QK_K)  # (R,)
    return qw * _sqrt(sigma2.repeat_interleave(nsub)[None, :] + xs * xs)


# ---------------------------------------------------------------------------------------------
# legacy 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)


def _legacy_ref(w: Tensor, qtype: str) -> Fit:
    """Follows ``quantize_row_{q4_0,q4_1,q5_0,q5_1,q8_0}_ref``: scales from the block extremes,
    codes rounded against the fp32 scale (``(int8_t)(x*id + 8.5f)`` etc.), fp16 stored."""
    out = w.shape[0]
    b = w.reshape(out, -1, 32)  # (out, G, 32)
    if qtype in ("Q4_1", "Q5_1"):
        nmax = 15 if qtype == "Q4_1" else 31
        lo, hi = b.amin(-1), b.amax(-1)
        d = (hi - lo) / _t(nmax)
        inv = torch.where(d != 0, _t(1.0) / d, torch.zeros_like(d))
        q = torch.trunc((b - lo[..., None]) * inv[..., None] + _t(0.5)).clamp_(0, nmax)
        return Fit(_fp16(d), _fp16(lo), None, q.to(torch.int8).reshape(w.shape))
    if qtype == "Q8_0":
        d = b.abs().amax(-1) / _t(127)
        inv = torch.where(d != 0, _t(1.0) / d, torch.zeros_like(d))
        t = b * inv[..., None]
        a = t.abs()
        f = torch.floor(a)
        q = torch.sign(t) * (f + torch.floor(_t(2.0) * (a - f)))  # roundf: halves away from zero
        return Fit(_fp16(d), None, None, q.to(torch.int8).reshape(w.shape))
    half = 8 if qtype == "Q4_0" else 16
    mx, _ = _signed_absmax(b, -1)
    d = mx / _t(-half)
    inv = torch.where(d != 0, _t(1.0) / d, torch.zeros_like(d))
    q = torch.trunc(b * inv[..., None] + _t(half + 0.5)).clamp_(0, 2 * half - 1) - half
    return Fit(_fp16(d), None, None, q.to(torch.int8).reshape(w.shape))


def row_sigma2(w: Tensor) -> Tensor:
    """Each row's mean square, summed in column order (``sum_x2/n_per_row`` of the ``_impl`` functions)."""
    xt = w.T.contiguous()
    return _seqsum(xt * xt) / _t(w.shape[1])


def _imatrix_blocks(w: Tensor, imp: Tensor, g: int, nmax: int, symmetric: bool, sigma2: Tensor | None = None) -> Fit:
    """Importance-weighted fit of blocks of ``g`` weights: weights ``qw * sqrt(sigma2 + x^2)``
    (``sigma2`` = the row's mean square), then make_qx_quants (symmetric, codes in
    ``[-nmax, nmax)``) or make_qkx3_quants(rmin=-0.9, rdelta=0.05, nstep=36) (asymmetric, codes
    in ``[0, nmax]``); the codes are the search's, the scale (and offset) fp16-rounded afterwards.
    With ``g = 32`` this follows ``quantize_row_{q4_0,q5_0,q4_1,q5_1}_impl``."""
    out, n = w.shape
    sigma2 = row_sigma2(w) if sigma2 is None else sigma2  # (out,)
    xs = _cols(w, g)
    qw = _imp_cols(imp, g, out) * _sqrt(sigma2.repeat_interleave(n // g)[None, :] + xs * xs)
    if symmetric:
        d, L = make_qx_quants(xs, nmax, qw)
        return Fit(_fp16(d).reshape(out, -1), None, None, (L - nmax).T.reshape(out, n).to(torch.int8))
    d, the_min, L = make_qkx_quants(xs, qw, nmax, -0.9, 0.05, 36, False)
    return Fit(_fp16(d).reshape(out, -1), _fp16(-the_min).reshape(out, -1), None, L.T.reshape(out, n).to(torch.int8))


#: legacy type -> (nmax, symmetric) of its imatrix search
_LEGACY_IMATRIX = {"Q4_0": (8, True), "Q5_0": (16, True), "Q4_1": (15, False), "Q5_1": (31, False)}


# ---------------------------------------------------------------------------------------------
# k-quants: 256-weight super-blocks


def _requant(xs: Tensor, L: Tensor, d_eff: Tensor, dm: Tensor | None, lo: int, hi: int) -> Tensor:
    """Codes recomputed on the stored scales, ``nearest_int((x + dm) / d)`` clamped; sub-blocks
    whose effective scale is 0 keep the search's ``L`` (the C code skips them)."""
    x = xs if dm is None else xs + dm[None, :]
    q = torch.round(x / d_eff[None, :]).clamp_(lo, hi)
    return torch.where(d_eff[None, :] != 0, q, L)


def _q45k(w: Tensor, imp: Tensor | None, nmax: int) -> Fit:
    """Q4_K (nmax 15) / Q5_K (nmax 31): 8 sub-blocks of 32, ``w = d*sc*q - dmin*m``.

    Without importance follows ``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref``: weights
    ``rms(x) + |x|``, make_qkx2_quants (rmin -1, rdelta 0.1, 20 steps for Q4_K; -0.5, 0.1, 15
    for Q5_K), then sc, m rounded to 6 bits against ``d = max(sc)/63``, ``dmin = max(m)/63``.
    With importance follows ``quantize_row_q4_K_impl`` / ``quantize_row_q5_K_impl``: weights
    ``qw*sqrt(sigma2 + x^2)`` (``sigma2 = 2*mean(x^2)`` of the super-block), make_qkx3_quants
    (-0.9, 0.05, 36), and make_qp_quants for the 6-bit sc and m.
    """
    out, n = w.shape
    R = out * n // QK_K
    xs = _cols(w, 32)  # (32, R*8)
    if imp is None:
        av_x = _sqrt(_seqsum(xs * xs) / _t(32))
        wt = av_x[None, :] + xs.abs()
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scale, the_min, L = make_qkx_quants(xs, wt, nmax, rmin, 0.1, nstep, False)
        scale, the_min = scale.reshape(R, 8), the_min.reshape(R, 8)
        max_scale = _pos_max(scale)
        max_min = _pos_max(the_min)
        inv_s = torch.where(max_scale > 0, _t(63) / max_scale, torch.zeros_like(max_scale))
        inv_m = torch.where(max_min > 0, _t(63) / max_min, torch.zeros_like(max_min))
        sc = torch.round(inv_s[:, None] * scale).remainder_(256).clamp_(max=63)  # uint8_t ls; MIN(63, ls)
        m = torch.round(inv_m[:, None] * the_min).remainder_(256).clamp_(max=63)
        d = _fp16(max_scale / _t(63))
        dmin = _fp16(max_min / _t(63))
    else:
        wt = _sigma2_weights(xs, _cols(w, QK_K), _imp_cols(imp, 32, out), 2.0, 8)
        sw = _seqsum(wt).reshape(R, 8)
        scale, the_min, L = make_qkx_quants(xs, wt, nmax, -0.9, 0.05, 36, False)
        d, sc = make_qp_quants(scale.reshape(R, 8).T.contiguous(), 63, sw.T.contiguous())
        dmin, m = make_qp_quants(the_min.reshape(R, 8).T.contiguous(), 63, sw.T.contiguous())
        d, dmin, sc, m = _fp16(d), _fp16(dmin), sc.T.clamp(max=63), m.T.clamp(max=63)
    d_eff = (d[:, None] * sc).reshape(-1)  # (R*8,)
    dm = (dmin[:, None] * m).reshape(-1)
    q = _requant(xs, L, d_eff, dm, 0, nmax)
    aux = {"d": d.half().reshape(out, -1), "dmin": dmin.half().reshape(out, -1),
           "sc": sc.to(torch.uint8).reshape(out, -1), "m": m.to(torch.uint8).reshape(out, -1)}
    return Fit(d_eff.reshape(out, -1), (-dm).reshape(out, -1), aux, q.T.reshape(out, n).to(torch.int8))


def _q6k(w: Tensor, imp: Tensor | None) -> Fit:
    """Q6_K: 16 sub-blocks of 16, ``w = d*sc*q``, ``q`` in [-32, 31], int8 ``sc``.

    Follows ``quantize_row_q6_K_ref`` (make_qx_quants(16, 32, rmse_type 1) weighted by ``x^2``)
    and, with importance, ``quantize_row_q6_K_impl`` (the same search weighted by the
    importance itself, no ``sigma2``); then ``d = -max_scale/128`` and ``sc = nearest_int``.
    """
    out, n = w.shape
    R = out * n // QK_K
    xs = _cols(w, 16)  # (16, R*16)
    scale, L = make_qx_quants(xs, 32, None if imp is None else _imp_cols(imp, 16, out))
    scale = scale.reshape(R, 16)
    max_scale, max_abs = _signed_absmax(scale, 1)
    zero = max_abs < EPS
    iscale = _t(-128) / max_scale
    d = _fp16(_t(1.0) / iscale).masked_fill(zero, 0.0)
    sc = torch.round(iscale[:, None] * scale).clamp_(max=127).masked_fill(zero[:, None], 0.0)
    d_eff = (d[:, None] * sc).reshape(-1)
    L = L.masked_fill(zero.repeat_interleave(16)[None, :], 0.0)  # an all-zero super-block is all zero bytes
    q = _requant(xs, L - 32, d_eff, None, -32, 31)
    aux = {"d": d.half().reshape(out, -1), "sc": sc.to(torch.int8).reshape(out, -1)}
    return Fit(d_eff.reshape(out, -1), None, aux, q.T.reshape(out, n).to(torch.int8))


def _q3k(w: Tensor, imp: Tensor | None) -> Fit:
    """Q3_K: 16 sub-blocks of 16, ``w = d*sc*q``, ``q`` in [-4, 3], 6-bit ``sc`` in [-32, 31].

    Follows ``quantize_row_q3_K_ref`` (make_q3_quants, then ``sc`` against ``d = -max/32``)
    and, with importance, ``quantize_row_q3_K_impl`` (weights ``qw*sqrt(sigma2 + x^2)``,
    ``sigma2 = 2*mean(x^2)``; make_qx_quants for the codes and again for the scales).
    """
    out, n = w.shape
    R = out * n // QK_K
    xs = _cols(w, 16)
    if imp is None:
        scale, L = make_q3_quants(xs, 4)
        scale = scale.reshape(R, 16)
        max_scale, _ = _signed_absmax(scale, 1)
        some = max_scale != 0
        iscale = _t(-32) / max_scale
        sc = torch.round(iscale[:, None] * scale).clamp_(-32, 31).masked_fill(~some[:, None], -32.0)
        d = _fp16(_t(1.0) / iscale).masked_fill(~some, 0.0)
    else:
        wt = _sigma2_weights(xs, _cols(w, QK_K), _imp_cols(imp, 16, out), 2.0, 16)
        sw = _seqsum(wt).reshape(R, 16)
        scale, L = make_qx_quants(xs, 4, wt)
        d, Ls = make_qx_quants(scale.reshape(R, 16).T.contiguous(), 32, sw.T.contiguous())
        d, sc = _fp16(d), Ls.T - 32
    d_eff = (d[:, None] * sc).reshape(-1)
    q = _requant(xs, L - 4, d_eff, None, -4, 3)
    aux = {"d": d.half().reshape(out, -1), "sc": sc.to(torch.int8).reshape(out, -1)}
    return Fit(d_eff.reshape(out, -1), None, aux, q.T.reshape(out, n).to(torch.int8))


def _q2k(w: Tensor, imp: Tensor | None) -> Fit:
    """Q2_K: 16 sub-blocks of 16, ``w = d*sc*q - dmin*m``, ``q`` in [0, 3], 4-bit ``sc`` and ``m``.

    Follows ``quantize_row_q2_K_ref`` (weights ``|x|``, make_qkx2_quants(rmin -0.5, rdelta 0.1,
    15 steps, mean absolute error), sc and m against ``max/15``) and, with importance,
    ``quantize_row_q2_K_impl`` (weights ``qw*sqrt(sigma2 + x^2)``, ``sigma2 = mean(x^2)``,
    make_qkx3_quants(-0.9, 0.05, 36), make_qp_quants for sc and m).
    """
    out, n = w.shape
    R = out * n // QK_K
    xs = _cols(w, 16)
    if imp is None:
        scale, the_min, L = make_qkx_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
        scale, the_min = scale.reshape(R, 16), the_min.reshape(R, 16)
        max_scale = _pos_max(scale)
        max_min = _pos_max(the_min)
        ls = torch.round((_t(15) / max_scale)[:, None] * scale).masked_fill((max_scale <= 0)[:, None], 0.0)
        lm = torch.round((_t(15) / max_min)[:, None] * the_min).masked_fill((max_min <= 0)[:, None], 0.0)
        d = _fp16(max_scale / _t(15))
        dmin = _fp16(max_min / _t(15))
    else:
        wt = _sigma2_weights(xs, _cols(w, QK_K), _imp_cols(imp, 16, out), 1.0, 16)
        sw = _seqsum(wt).reshape(R, 16)
        scale, the_min, L = make_qkx_quants(xs, wt, 3, -0.9, 0.05, 36, False)
        d, ls = make_qp_quants(scale.reshape(R, 16).T.contiguous(), 15, sw.T.contiguous())
        dmin, lm = make_qp_quants(the_min.reshape(R, 16).T.contiguous(), 15, sw.T.contiguous())
        d, dmin, ls, lm = _fp16(d), _fp16(dmin), ls.T, lm.T
    byte = (ls.to(torch.int64) & 255) | ((lm.to(torch.int64) << 4) & 255)  # y.scales[j] = ls | (lm << 4), uint8
    sc, m = (byte & 15).float(), (byte >> 4).float()
    d_eff = (d[:, None] * sc).reshape(-1)
    dm = (dmin[:, None] * m).reshape(-1)
    q = _requant(xs, L, d_eff, dm, 0, 3)
    aux = {"d": d.half().reshape(out, -1), "dmin": dmin.half().reshape(out, -1),
           "sc": sc.to(torch.uint8).reshape(out, -1), "m": m.to(torch.uint8).reshape(out, -1)}
    return Fit(d_eff.reshape(out, -1), (-dm).reshape(out, -1), aux, q.T.reshape(out, n).to(torch.int8))


def _legacy(w: Tensor, imp: Tensor | None, qtype: str) -> Fit:
    """``quantize_<t>``: the reference rounding without quant_weights (always for Q8_0, which ignores
    them), else ``quantize_row_<t>_impl`` (:func:`_imatrix_blocks`)."""
    if imp is None or qtype == "Q8_0":
        return _legacy_ref(w, qtype)
    return _imatrix_blocks(w, imp, 32, *_LEGACY_IMATRIX[qtype])


#: GGUF type -> fitter(w (rows, n) fp32, importance (n,) | None) -> Fit
FITTERS: dict[str, Callable[[Tensor, Tensor | None], Fit]] = {
    **{t: partial(_legacy, qtype=t) for t in ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")},
    "Q6_K": _q6k,
    "Q5_K": partial(_q45k, nmax=31),
    "Q4_K": partial(_q45k, nmax=15),
    "Q3_K": _q3k,
    "Q2_K": _q2k,
}


def _by_rows(fn: Callable[[Tensor, Tensor | None], Fit], w: Tensor, sigma2: Tensor | None) -> Fit:
    """``fn`` over cache-sized chunks of rows of ``w``, concatenated (every fitter is row-wise)."""
    rows = max(1, CHUNK // w.shape[1])
    parts = [fn(w[r : r + rows], None if sigma2 is None else sigma2[r : r + rows]) for r in range(0, w.shape[0], rows)]
    if len(parts) == 1:
        return parts[0]
    aux = None if parts[0].aux is None else {k: torch.cat([p.aux[k] for p in parts]) for k in parts[0].aux}
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
    return Fit(torch.cat([p.scales for p in parts]), mins, aux, torch.cat([p.codes for p in parts]))


def _prep(w: Tensor, importance: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return w.detach().float().contiguous(), None if importance is None else importance.detach().float().reshape(-1)


def fit(w: Tensor, qtype: str, importance: Tensor | None = None, sigma2: Tensor | None = None) -> Fit:
    """llama.cpp's quantisation of ``w (out, n)`` to ``qtype`` (``n`` a multiple of the block),
    with its imatrix path when ``importance (n,)`` is given. ``sigma2 (out,)`` replaces the
    rows' mean square in the legacy types' imatrix weighting (k-quants use their super-block's)."""
    w, imp = _prep(w, importance)
    # QAT calls this inside the trainer's bf16 autocast: the fit is fp32 arithmetic (and the fp16 super-block
    # scales cannot go through autocast's torch.cat on CPU), so autocast is off here
    with torch.autocast(w.device.type, enabled=False):
        if imp is not None and qtype in _LEGACY_IMATRIX:  # sigma2 is row-wide: sum it once, not per chunk
            s2 = row_sigma2(w) if sigma2 is None else sigma2.float()
            return _by_rows(lambda x, s: _imatrix_blocks(x, imp, 32, *_LEGACY_IMATRIX[qtype], s), w, s2)
        return _by_rows(lambda x, _: FITTERS[qtype](x, imp), w, None)


def fit_plain(w: Tensor, importance: Tensor, bits: int, group: int, symmetric: bool,
              sigma2: Tensor | None = None) -> Fit:
    """llama.cpp's imatrix search (as for Q4_0/Q4_1) on a plain grid: blocks of ``group`` weights,
    codes in ``[-2^(b-1), 2^(b-1))`` (symmetric) or ``[0, 2^b)``; fp16 scales and offsets."""
    w, imp = _prep(w, importance)
    nmax = 2 ** (bits - 1) if symmetric else 2**bits - 1
    s2 = row_sigma2(w) if sigma2 is None else sigma2.float()
    return _by_rows(lambda x, s: _imatrix_blocks(x, imp, group, nmax, symmetric, s), w, s2)


# ---------------------------------------------------------------------------------------------
# k-quant block encoding (llama.cpp's byte layouts, ggml-common.h)


def _u8(t: Tensor) -> np.ndarray:
    return t.to(torch.int32).numpy().astype(np.uint8)


def _h(t: Tensor, R: int) -> np.ndarray:
    return t.to(torch.float16).numpy().reshape(R, 1).view(np.uint8)  # (R, 2) little-endian fp16


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> the 12 bytes ``get_scale_min_k4`` reads (``sc, m (R, 8)``)."""
    return np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
                           m[:, :4] | ((m[:, 4:] >> 4) << 6),
                           (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], axis=1)


def _pack2(L: np.ndarray) -> np.ndarray:
    """2-bit codes ``L (R, 256)`` -> ``qs (R, 64)``: byte ``32h + l`` holds codes ``128h + l + 32k`` at bits ``2k``."""
    L = L.reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def encode_kquant(qtype: str, codes: Tensor, aux: dict[str, Tensor]) -> np.ndarray:
    """The super-blocks of ``codes (out, n)`` with ``aux``'s stored integers: ``(out, n/256*bytes)`` uint8."""
    out, n = codes.shape
    R = out * n // QK_K
    c = codes.to(torch.int32).numpy().reshape(R, QK_K)
    d = _h(aux["d"], R)
    if qtype in ("Q4_K", "Q5_K"):
        L = c.astype(np.uint8).reshape(R, 4, 2, 32)  # 64-weight chunks, low/high 32
        qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(R, 128)
        scales = _scales_k4(_u8(aux["sc"]).reshape(R, 8), _u8(aux["m"]).reshape(R, 8))
        body = [d, _h(aux["dmin"], R), scales]
        if qtype == "Q5_K":  # fifth bits: qh[l] bit 2c+h = bit 4 of code 64c + 32h + l
            hb = (L >> 4) & 1
            shifts = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
            body.append(np.bitwise_or.reduce(hb << shifts, axis=(1, 2)).astype(np.uint8))
        return np.concatenate([*body, qs], axis=1).reshape(out, -1)
    if qtype == "Q6_K":
        L = (c + 32).astype(np.uint8).reshape(R, 2, 4, 32)  # halves of 128, quarters of 32
        lo = L & 0xF
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
        ql = ql.reshape(R, 128)
        hi = L >> 4
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(R, 64)
        sc = aux["sc"].to(torch.int8).numpy().reshape(R, 16).view(np.uint8)
        return np.concatenate([ql, qh, sc, d], axis=1).reshape(out, -1)
    if qtype == "Q3_K":
        L = (c + 4).astype(np.uint8)  # [0, 7]
        hb = ((L >> 2) & 1).reshape(R, 8, 32)  # the high bit of code 32b + m goes to hmask[m] bit b
        hmask = np.bitwise_or.reduce(hb << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1).astype(np.uint8)
        u = (aux["sc"].to(torch.int32).numpy().reshape(R, 16) + 32).astype(np.uint8)  # 6-bit, offset 32
        low = (u[:, :8] & 0xF) | ((u[:, 8:] & 0xF) << 4)
        shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)  # byte 8+k, bits 2q: sub-block 4q+k
        high = np.bitwise_or.reduce(((u.reshape(R, 4, 4) >> 4) & 3) << shift, axis=1).astype(np.uint8)
        return np.concatenate([hmask, _pack2(L & 3), low, high, d], axis=1).reshape(out, -1)
    if qtype == "Q2_K":
        scales = _u8(aux["sc"]).reshape(R, 16) | (_u8(aux["m"]).reshape(R, 16) << 4)
        return np.concatenate([scales, _pack2(c.astype(np.uint8)), d, _h(aux["dmin"], R)], axis=1).reshape(out, -1)
    raise KeyError(qtype)
