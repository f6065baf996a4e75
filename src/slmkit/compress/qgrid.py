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
  ``w_hat = d * q + m`` (Q4_1).

Scales are rounded to fp16 *before* the codes are chosen, so ``w_hat`` is exactly
what a GGUF reader computes from the stored block (``fp32(d) * q (+ fp32(m))``).
With ``group_size=32`` the grids coincide with the GGUF types in :data:`GGUF_GRIDS`,
and :func:`encode_gguf_blocks` writes a :class:`QTensor`'s codes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slmkit.errors import ConfigError

BITS = (3, 4, 5, 8)
#: GGUF type -> (bits, symmetric); all use groups (blocks) of 32 with fp16 scales
GGUF_GRIDS = {"Q8_0": (8, True), "Q5_0": (5, True), "Q4_0": (4, True), "Q4_1": (4, False)}
GGUF_BLOCK = 32


@dataclass(frozen=True)
class Grid:
    """Where quantised weights may lie."""

    bits: int = 4  #: code width: 3, 4, 5 or 8
    group_size: int = 128  #: input columns per scale; 0 = per-channel (one scale per row)
    symmetric: bool = True  #: True: w = d*q; False: w = d*q + m
    gguf: str | None = None  #: a GGUF type (Q8_0, Q5_0, Q4_0, Q4_1) this grid must match exactly

    def __post_init__(self):
        if self.gguf is not None:
            if self.gguf not in GGUF_GRIDS:
                raise ConfigError(
                    f"unknown GGUF quantisation type {self.gguf!r}",
                    f"use one of {', '.join(GGUF_GRIDS)} (F32/F16 are not quantised grids)",
                )
            bits, sym = GGUF_GRIDS[self.gguf]
            if (self.bits, self.group_size, self.symmetric) != (bits, GGUF_BLOCK, sym):
                raise ConfigError(
                    f"GGUF {self.gguf} needs bits={bits}, group_size={GGUF_BLOCK}, "
                    f"{'symmetric' if sym else 'asymmetric'}; got bits={self.bits}, group_size={self.group_size}, "
                    f"{'symmetric' if self.symmetric else 'asymmetric'}",
                    f"use Grid.for_gguf({self.gguf!r})",
                )
        if self.bits not in BITS:
            raise ConfigError(f"unsupported bits {self.bits!r}", f"use one of {', '.join(map(str, BITS))}")
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(f"group size must be an integer >= 0 (0 = per-channel), got {self.group_size!r}")
        if self.bits == 8 and not self.symmetric:
            raise ConfigError("8-bit grids are symmetric only (the Q8_0 layout)", "drop --asymmetric or use fewer bits")

    @classmethod
    def for_gguf(cls, qtype: str) -> Grid:
        if qtype not in GGUF_GRIDS:
            raise ConfigError(f"unknown GGUF quantisation type {qtype!r}", f"use one of {', '.join(GGUF_GRIDS)}")
        bits, sym = GGUF_GRIDS[qtype]
        return cls(bits=bits, group_size=GGUF_BLOCK, symmetric=sym, gguf=qtype)

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -127 if self.bits == 8 else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.symmetric else (127 if self.bits == 8 else 2 ** (self.bits - 1) - 1)

    def groups(self, in_features: int) -> int:
        """Groups per row; raises ConfigError when ``group_size`` does not divide ``in_features``."""
        g = self.group_size or in_features
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
    scales: torch.Tensor  #: (out, G) fp16
    mins: torch.Tensor | None  #: (out, G) fp16 for asymmetric grids, else None
    grid: Grid

    def dequantize(self) -> torch.Tensor:
        """(out, in) fp32, computed exactly as a GGUF reader does (fp32 multiply, then add)."""
        return dequantize(self.codes, self.scales, self.mins, self.grid)


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


def quantize_rtn(w: torch.Tensor, grid: Grid, clip: torch.Tensor | None = None) -> QTensor:
    """Round-to-nearest ``w`` (out, in) on ``grid``; scales from the (clipped) group extremes."""
    grid.groups(w.shape[1])
    scale, mn = group_params(w, grid, clip)  # (out, G)
    g = grid.width(w.shape[1])
    blocks = w.float().reshape(w.shape[0], -1, g)
    q = codes_for(blocks, scale[..., None], None if mn is None else mn[..., None], grid).reshape(w.shape)
    return QTensor(q.to(torch.int8), scale.half(), None if mn is None else mn.half(), grid)


# ---------------------------------------------------------------------------------------------
# bit packing (for storage) and GGUF block encoding


def pack_codes(codes: torch.Tensor, grid: Grid) -> np.ndarray:
    """Codes -> little-endian bit stream of ``bits`` per code (uint8), codes offset by ``-qmin``."""
    u = (codes.to(torch.int32) - grid.qmin).numpy().astype(np.uint16).reshape(-1)  # [0, 2^b)
    bits = ((u[:, None] >> np.arange(grid.bits, dtype=np.uint16)) & 1).astype(np.uint8)  # (N, b)
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, shape: tuple[int, int], grid: Grid) -> torch.Tensor:
    n = shape[0] * shape[1]
    bits = np.unpackbits(packed, bitorder="little")[: n * grid.bits].reshape(n, grid.bits).astype(np.int32)
    u = (bits << np.arange(grid.bits, dtype=np.int32)).sum(1)
    return torch.from_numpy(u + grid.qmin).to(torch.int8).reshape(shape)


def encode_gguf_blocks(q: QTensor) -> np.ndarray:
    """The raw GGUF blocks of ``q`` (its grid must name a GGUF type): ``(out, in/32*bytes_per_block)`` uint8."""
    if q.grid.gguf is None:
        raise ConfigError("this tensor's grid is not a GGUF block grid", "quantise with --gguf TYPE")
    out, cols = q.codes.shape
    nb = cols // GGUF_BLOCK
    c = q.codes.to(torch.int32).numpy().reshape(out * nb, GGUF_BLOCK)
    d = q.scales.numpy().astype(np.float16).reshape(out * nb, 1).view(np.uint8)  # (B, 2)
    t = q.grid.gguf
    if t == "Q8_0":
        body = [d, c.astype(np.int8).view(np.uint8)]
    elif t in ("Q4_0", "Q4_1"):
        u = (c - q.grid.qmin).astype(np.uint8)  # [0, 15]
        qs = u[:, :16] | (u[:, 16:] << np.uint8(4))  # byte j: code j (low nibble), code j+16 (high)
        body = [d, qs] if t == "Q4_0" else [d, q.mins.numpy().astype(np.float16).reshape(-1, 1).view(np.uint8), qs]
    else:  # Q5_0: low nibbles as Q4_0, fifth bits of the 32 codes in one little-endian uint32
        u = (c + 16).astype(np.uint8)  # [0, 31]
        qs = (u[:, :16] & np.uint8(0x0F)) | ((u[:, 16:] & np.uint8(0x0F)) << np.uint8(4))
        qh = np.packbits((u >> np.uint8(4)).reshape(-1, 32), axis=-1, bitorder="little")  # (B, 4)
        body = [d, qh, qs]
    return np.concatenate(body, axis=1).reshape(out, -1)
