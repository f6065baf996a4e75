"""Quantisation grids: integer codes plus per-group fp16 scales, matching GGUF block formats.

A :class:`Grid` fixes how a weight matrix ``W`` of shape ``(out, in)`` becomes
integer codes: the input dimension is cut into groups of ``group_size``
consecutive columns (``0`` = one group per row, i.e. per-channel), and each
(row, group) gets an fp16 scale ``d`` (and, asymmetric, an fp16 offset ``m``):

* symmetric, bits < 8: ``d = v / -2^(b-1)`` where ``v`` is the group's entry of
  largest magnitude (sign kept), ``q = clamp(round(w / d), -2^(b-1), 2^(b-1)-1)``,
  ``w_hat = d * q``. This is llama.cpp's Q4_0 (b=4) and Q5_0 (b=5) convention.
* symmetric, 8 bits: ``d = max|w| / 127``, ``q`` in ``[-127, 127]`` (Q8_0).
* asymmetric: ``d = (max - min) / (2^b - 1)``, ``m = min``, ``q`` in ``[0, 2^b-1]``,
  ``w_hat = d * q + m`` (Q4_1, Q5_1).

Scales are rounded to fp16 *before* the codes are chosen, so ``w_hat`` is exactly
what a GGUF reader computes from the stored block (``fp32(d) * q (+ fp32(m))``).
(:func:`quantize_rtn` on a GGUF grid instead reproduces llama.cpp's codes, which its
reference quantisers round against the unrounded scale; they decode exactly all the same.)
With ``group_size=32`` the grids coincide with the GGUF types in :data:`GGUF_GRIDS`,
and :func:`encode_gguf_blocks` writes a :class:`QTensor`'s codes unchanged.

GGUF k-quants (:data:`GGUF_TYPES` Q6_K, Q5_K, Q4_K, Q3_K, Q2_K) group sub-blocks of
16 or 32 weights into super-blocks of 256 (:attr:`Grid.super_size`) whose sub-block
scales (and offsets) are small integers times one fp16 ``d`` (and ``dmin``). A
k-quant :class:`QTensor` keeps the *effective* sub-block values as fp32 ``scales``
(``d*sc``) and ``mins`` (``-dmin*m``), exact in fp32, so ``w_hat = scale*q + min``
is still what the reader computes, and the stored integers in ``aux``.
:func:`fit_params` is llama.cpp's scale search for each GGUF type (with its imatrix
path when given an importance vector); the math is in :mod:`slmkit.compress.kquant`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slmkit.compress import kquant
from slmkit.errors import ConfigError

BITS = (3, 4, 5, 8)  #: code widths of plain grids (GGUF k-quant grids add 2 and 6)
#: GGUF type -> (bits, symmetric); all use groups (blocks) of 32 with fp16 scales
GGUF_GRIDS = {"Q8_0": (8, True), "Q5_1": (5, False), "Q5_0": (5, True), "Q4_0": (4, True), "Q4_1": (4, False)}
GGUF_BLOCK = 32
#: GGUF k-quant type -> (bits, symmetric, sub-block size); super-blocks of :data:`QK_K` weights
KQUANT_GRIDS = {"Q6_K": (6, True, 16), "Q5_K": (5, False, 32), "Q4_K": (4, False, 32),
                "Q3_K": (3, True, 16), "Q2_K": (2, False, 16)}
QK_K = kquant.QK_K  #: weights per k-quant super-block
#: what llama-quantize writes when a row is not whole super-blocks (llama-quant.cpp tensor_type_fallback)
KQUANT_FALLBACK = {"Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_K": "Q5_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}
#: every GGUF type a grid can match -> (bits, symmetric, group_size, super_size)
GGUF_TYPES = {**{t: (b, s, GGUF_BLOCK, GGUF_BLOCK) for t, (b, s) in GGUF_GRIDS.items()},
              **{t: (b, s, g, QK_K) for t, (b, s, g) in KQUANT_GRIDS.items()}}


@dataclass(frozen=True)
class Grid:
    """Where quantised weights may lie."""

    bits: int = 4  #: code width: 3, 4, 5 or 8 (2 and 6 on GGUF Q2_K / Q6_K grids)
    group_size: int = 128  #: input columns per scale; 0 = per-channel (one scale per row)
    symmetric: bool = True  #: True: w = d*q; False: w = d*q + m
    gguf: str | None = None  #: a GGUF type (see :data:`GGUF_TYPES`) this grid must match exactly

    def __post_init__(self):
        if self.gguf is not None:
            if self.gguf not in GGUF_TYPES:
                raise ConfigError(
                    f"unknown GGUF quantisation type {self.gguf!r}",
                    f"use one of {', '.join(GGUF_TYPES)} (F32/F16 are not quantised grids)",
                )
            bits, sym, g, _ = GGUF_TYPES[self.gguf]
            if (self.bits, self.group_size, self.symmetric) != (bits, g, sym):
                raise ConfigError(
                    f"GGUF {self.gguf} needs bits={bits}, group_size={g}, "
                    f"{'symmetric' if sym else 'asymmetric'}; got bits={self.bits}, group_size={self.group_size}, "
                    f"{'symmetric' if self.symmetric else 'asymmetric'}",
                    f"use Grid.for_gguf({self.gguf!r})",
                )
        elif self.bits not in BITS:
            extra = {2: "Q2_K", 6: "Q6_K"}.get(self.bits)
            hint = f"use one of {', '.join(map(str, BITS))}"
            if extra:
                hint += f" ({self.bits} bits exist only as GGUF {extra}: Grid.for_gguf({extra!r}))"
            raise ConfigError(f"unsupported bits {self.bits!r}", hint)
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(f"group size must be an integer >= 0 (0 = per-channel), got {self.group_size!r}")
        if self.bits == 8 and not self.symmetric:
            raise ConfigError("8-bit grids are symmetric only (the Q8_0 layout)", "drop --asymmetric or use fewer bits")

    @classmethod
    def for_gguf(cls, qtype: str) -> Grid:
        if qtype not in GGUF_TYPES:
            raise ConfigError(f"unknown GGUF quantisation type {qtype!r}", f"use one of {', '.join(GGUF_TYPES)}")
        bits, sym, g, _ = GGUF_TYPES[qtype]
        return cls(bits=bits, group_size=g, symmetric=sym, gguf=qtype)

    @property
    def super_size(self) -> int:
        """Weights per GGUF super-block (256 for k-quants); else the group size."""
        return GGUF_TYPES[self.gguf][3] if self.gguf is not None else self.group_size

    @property
    def kquant(self) -> bool:
        return self.gguf in KQUANT_GRIDS

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -127 if self.bits == 8 else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.symmetric else (127 if self.bits == 8 else 2 ** (self.bits - 1) - 1)

    def groups(self, in_features: int) -> int:
        """Groups per row; raises ConfigError when ``group_size`` (or a k-quant's super-block)
        does not divide ``in_features``."""
        g = self.group_size or in_features
        if self.kquant and in_features % self.super_size:
            raise ConfigError(
                f"GGUF {self.gguf} needs rows of whole {self.super_size}-weight super-blocks; "
                f"a layer's input width {in_features} is not a multiple of {self.super_size}",
                "use a legacy type (Q8_0, Q5_0, Q4_0, ...) for this layer",
            )
        if in_features % g:
            raise ConfigError(
                f"group size {self.group_size} does not divide a layer's input width {in_features}",
                "choose a group size that divides every quantised layer's input width (e.g. 32 or 64)",
            )
        return in_features // g

    def width(self, in_features: int) -> int:
        return self.group_size or in_features


@dataclass
class QTensor:
    """A weight on a grid: ``w_hat[r, c] = scale[r, g] * codes[r, c] (+ mins[r, g])``, ``g = c // group``."""

    codes: torch.Tensor  #: (out, in) int8 (codes lie in [-128, 127] or [0, 31])
    scales: torch.Tensor  #: (out, G) fp16; k-quants: fp32 effective d*sc
    mins: torch.Tensor | None  #: (out, G) fp16 for asymmetric grids (k-quants: fp32 -dmin*m), else None
    grid: Grid
    #: k-quants: the stored super-block integers, per row: ``d`` (out, S) fp16, ``sc`` (out, G) int8/uint8,
    #: and for asymmetric types ``dmin`` (out, S) fp16, ``m`` (out, G) uint8; None otherwise
    aux: dict[str, torch.Tensor] | None = None

    def dequantize(self) -> torch.Tensor:
        """(out, in) fp32, computed exactly as a GGUF reader does (fp32 multiply, then add)."""
        return dequantize(self.codes, self.scales, self.mins, self.grid)

    def map_rows(self, fn) -> QTensor:
        """The same tensor with ``fn`` (e.g. a row permutation) applied to every per-row field."""
        aux = None if self.aux is None else {k: fn(v) for k, v in self.aux.items()}
        return QTensor(fn(self.codes), fn(self.scales), None if self.mins is None else fn(self.mins), self.grid, aux)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def group_params(
    w: torch.Tensor, grid: Grid, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and offsets) of each group of ``w`` (out, G*g): ``(out, G)`` fp32 values exactly fp16-representable.

    ``clip`` (out, G) in (0, 1] shrinks each group's range (AWQ's clipping search); None = the full range.
    """
    out = w.shape[0]
    g = grid.width(w.shape[1])
    blocks = w.reshape(out, -1, g).float()  # (out, G, g)
    r = 1.0 if clip is None else clip
    if grid.symmetric:
        if grid.bits == 8:
            d = blocks.abs().amax(-1) / 127  # Q8_0: d = max|w| / 127
        else:
            idx = blocks.abs().argmax(-1, keepdim=True)
            d = blocks.gather(-1, idx)[..., 0] / grid.qmin  # Q4_0/Q5_0: d = max / -2^(b-1)
        return _fp16(d * r), None
    lo, hi = blocks.amin(-1) * r, blocks.amax(-1) * r
    return _fp16((hi - lo) / grid.qmax), _fp16(lo)  # Q4_1: d = (max - min) / (2^b - 1), m = min


def codes_for(w: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None, grid: Grid) -> torch.Tensor:
    """Nearest codes of ``w`` (..., k) on the grid given per-entry broadcastable ``scale``/``mn`` (fp32)."""
    x = w if mn is None else w - mn
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    return torch.round(x * inv).clamp_(grid.qmin, grid.qmax)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, grid: Grid) -> torch.Tensor:
    out, cols = codes.shape
    g = grid.width(cols)
    d = scales.float().repeat_interleave(g, dim=1)  # (out, in)
    w = codes.float() * d
    if mins is not None:
        w = w + mins.float().repeat_interleave(g, dim=1)
    return w


def _check_fit_args(w: torch.Tensor, grid: Grid, clip, importance, row_sigma2=None) -> None:
    grid.groups(w.shape[1])
    if row_sigma2 is not None and row_sigma2.numel() != w.shape[0]:
        raise ConfigError(f"row_sigma2 has {row_sigma2.numel()} entries for {w.shape[0]} rows")
    if importance is not None:
        if clip is not None:
            raise ConfigError("clip and importance cannot be combined", "pass one of them")
        if importance.numel() != w.shape[1]:
            raise ConfigError(f"importance has {importance.numel()} entries for {w.shape[1]} input columns")
    if clip is not None and grid.kquant:
        raise ConfigError(f"clip is not supported on the k-quant grid {grid.gguf}",
                          "clip on a legacy type (Q4_0, Q4_1, ...) or fit without clip")


def _fit(w: torch.Tensor, grid: Grid, clip, importance, row_sigma2=None) -> kquant.Fit | None:
    """llama.cpp's fit where one applies (GGUF grid without clip; plain grid < 8 bits with importance)."""
    _check_fit_args(w, grid, clip, importance, row_sigma2)
    if clip is not None:
        return None
    if grid.gguf is not None:
        return kquant.fit(w, grid.gguf, importance, row_sigma2)
    if importance is not None and grid.bits < 8:  # 8 bits: no search, as llama.cpp's Q8_0 ignores an imatrix
        return kquant.fit_plain(w, importance, grid.bits, grid.width(w.shape[1]), grid.symmetric, row_sigma2)
    return None


def fit_params(
    w: torch.Tensor, grid: Grid, importance: torch.Tensor | None = None, clip: torch.Tensor | None = None,
    row_sigma2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """``(scales, mins, aux)`` of ``w`` (out, n) on ``grid``: llama.cpp's scale search for its GGUF type.

    ``scales``/``mins`` (out, G) are fp32 effective values (``w_hat = scale*q + min``); ``aux`` holds a
    k-quant's stored integers (None for other grids). Without ``importance`` this is what
    ``llama-quantize`` does with no imatrix (``quantize_row_<t>_ref``); with ``importance`` (n,)
    (per-input-column mean of ``x^2``, an imatrix entry) it is llama.cpp's imatrix path
    (``quantize_row_<t>_impl``), bit for bit. Plain grids: :func:`group_params`, or with
    ``importance`` the Q4_0/Q4_1 imatrix search on ``group_size`` blocks (8 bits: not used,
    like Q8_0). ``clip`` (out, G), legacy and plain grids only: :func:`group_params` of the
    clipped range. ``n`` must be a multiple of ``grid.super_size`` (ConfigError otherwise).

    ``row_sigma2`` (out,): with ``importance`` on legacy and plain grids the weights are
    ``importance * sqrt(sigma2 + w^2)`` with ``sigma2`` the mean of ``x^2`` over the whole row;
    when ``w`` is a column slice of a wider matrix (GPTQ fitting one group at a time), pass the
    full rows' mean square here to weight as llama.cpp does. K-quants use their super-block's.
    """
    f = _fit(w, grid, clip, importance, row_sigma2)
    if f is None:
        s, m = group_params(w, grid, clip)
        return s, m, None
    return f.scales, f.mins, f.aux


def quantize_rtn(
    w: torch.Tensor, grid: Grid, clip: torch.Tensor | None = None, importance: torch.Tensor | None = None
) -> QTensor:
    """Quantise ``w`` (out, in) on ``grid`` without calibration (args as :func:`fit_params`).

    GGUF grids (no ``clip``): exactly llama.cpp's codes and scales, with ``importance`` its
    imatrix quantiser, so :func:`encode_gguf_blocks` gives the bytes ``llama-quantize`` writes
    (k-quants: the nearest codes on the stored scales; legacy types: the reference's rounding
    against the unrounded scale). Otherwise nearest codes on :func:`fit_params`'s scales.
    """
    f = _fit(w, grid, clip, importance)
    if f is not None and grid.kquant:
        return QTensor(f.codes, f.scales, f.mins, grid, f.aux)
    if f is not None and grid.gguf is not None:
        return QTensor(f.codes, f.scales.half(), None if f.mins is None else f.mins.half(), grid)
    scale, mn = group_params(w, grid, clip) if f is None else (f.scales, f.mins)  # (out, G)
    g = grid.width(w.shape[1])
    blocks = w.float().reshape(w.shape[0], -1, g)
    q = codes_for(blocks, scale[..., None], None if mn is None else mn[..., None], grid).reshape(w.shape)
    return QTensor(q.to(torch.int8), scale.half(), None if mn is None else mn.half(), grid)


def gguf_fallback(qtype: str, in_features: int) -> str:
    """The type ``llama-quantize`` writes instead of ``qtype`` for rows of ``in_features`` weights
    (follows ``tensor_type_fallback`` in llama.cpp's ``src/llama-quant.cpp``): a k-quant on rows
    that are not whole super-blocks falls back to a 32-block type, one that does not fit either to F16."""
    if qtype not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF quantisation type {qtype!r}", f"use one of {', '.join(GGUF_TYPES)}")
    if in_features % GGUF_TYPES[qtype][3] == 0:
        return qtype
    t = KQUANT_FALLBACK.get(qtype, qtype)
    return t if in_features % GGUF_TYPES[t][3] == 0 else "F16"


# ---------------------------------------------------------------------------------------------
# bit packing (for storage) and GGUF block encoding


def pack_codes(codes: torch.Tensor, grid: Grid) -> np.ndarray:
    """Codes -> little-endian bit stream of ``bits`` per code (uint8), codes offset by ``-qmin``."""
    u = (codes.to(torch.int32) - grid.qmin).numpy().astype(np.uint16).reshape(-1)  # [0, 2^b)
    bits = ((u[:, None] >> np.arange(grid.bits, dtype=np.uint16)) & 1).astype(np.uint8)  # (N, b)
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, shape: tuple[int, int], grid: Grid) -> torch.Tensor:
    """The codes :func:`pack_codes` packed: ``shape`` int8."""
    n, b = shape[0] * shape[1], grid.bits
    if 8 % b == 0:  # 2, 4, 8 bits: whole codes in each byte, the first in the lowest bits
        shifts = np.arange(8 // b, dtype=np.uint8) * np.uint8(b)
        u = ((packed[:, None] >> shifts) & np.uint8((1 << b) - 1)).reshape(-1)[:n]
    else:  # 3, 5, 6 bits: each code's bits (lowest first) packed into one byte
        bits = np.unpackbits(packed, bitorder="little")[: n * b].reshape(n, b)
        u = np.packbits(bits, axis=1, bitorder="little")[:, 0]
    return torch.from_numpy(u.astype(np.int16) + grid.qmin).to(torch.int8).reshape(shape)


def _check_kquant(q: QTensor) -> None:
    """The effective scales (and offsets) must be what the stored integers give, bit for bit."""
    if q.aux is None:
        raise ConfigError(f"this {q.grid.gguf} tensor has no super-block integers (aux)",
                          "fit it with fit_params/quantize_rtn; keep aux when rows are permuted (QTensor.map_rows)")
    per = q.grid.super_size // q.grid.group_size
    d = q.aux["d"].float().repeat_interleave(per, 1) * q.aux["sc"].float()
    ok = torch.equal(d, q.scales.float())
    if "dmin" in q.aux:
        dm = q.aux["dmin"].float().repeat_interleave(per, 1) * q.aux["m"].float()
        ok = ok and q.mins is not None and torch.equal(-dm, q.mins.float())
    if not ok:
        raise ConfigError(f"this {q.grid.gguf} tensor's scales are not d*sc (and mins not -dmin*m) of its aux",
                          "take scales, mins and aux together from fit_params")


def encode_gguf_blocks(q: QTensor) -> np.ndarray:
    """The raw GGUF blocks of ``q`` (its grid must name a GGUF type): ``(out, in/block*bytes_per_block)`` uint8."""
    if q.grid.gguf is None:
        raise ConfigError("this tensor's grid is not a GGUF block grid", "quantise with --gguf TYPE")
    out, cols = q.codes.shape
    q.grid.groups(cols)
    if int(q.codes.min()) < q.grid.qmin or int(q.codes.max()) > q.grid.qmax:
        raise ConfigError(f"codes outside [{q.grid.qmin}, {q.grid.qmax}] cannot be written as {q.grid.gguf}")
    t = q.grid.gguf
    if q.grid.kquant:
        _check_kquant(q)
        return kquant.encode_kquant(t, q.codes, q.aux)
    nb = cols // GGUF_BLOCK
    c = q.codes.to(torch.int32).numpy().reshape(out * nb, GGUF_BLOCK)
    d = q.scales.float().numpy().astype(np.float16).reshape(out * nb, 1).view(np.uint8)  # (B, 2)
    m = None if q.mins is None else q.mins.float().numpy().astype(np.float16).reshape(-1, 1).view(np.uint8)
    if t == "Q8_0":
        body = [d, c.astype(np.int8).view(np.uint8)]
    elif t in ("Q4_0", "Q4_1"):
        u = (c - q.grid.qmin).astype(np.uint8)  # [0, 15]
        qs = u[:, :16] | (u[:, 16:] << np.uint8(4))  # byte j: code j (low nibble), code j+16 (high)
        body = [d, qs] if t == "Q4_0" else [d, m, qs]
    else:  # Q5_0/Q5_1: low nibbles as Q4_0, fifth bits of the 32 codes in one little-endian uint32
        u = (c - q.grid.qmin).astype(np.uint8)  # [0, 31]
        qs = (u[:, :16] & np.uint8(0x0F)) | ((u[:, 16:] & np.uint8(0x0F)) << np.uint8(4))
        qh = np.packbits((u >> np.uint8(4)).reshape(-1, 32), axis=-1, bitorder="little")  # (B, 4)
        body = [d, qh, qs] if t == "Q5_0" else [d, m, qh, qs]
    return np.concatenate(body, axis=1).reshape(out, -1)
