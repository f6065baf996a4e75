"""The fast path's weight kinds: one ``y = x W^T (+ b)`` each, over dense, int8, int4, slmkit-q4 or GGUF-block weights.

Every kind exposes :meth:`Dense.spec` (plain values, so torch.compile can trace :func:`apply_linear`) and
:meth:`Dense.nbytes`; the kinds with a kernel in the fused decode step (:class:`Q4`, :class:`GGUFQ`) also
give their matrix descriptors (``segments``). Moved out of :mod:`slmkit.runtime.generate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmkit.errors import ConfigError
from slmkit.runtime import decodelayout, ggmlkernel, q4kernel


class Dense:
    """y = x W^T (+ b) with W at the compute dtype."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None):
        self.w, self.b = w, b

    def __call__(self, x):
        """``x`` (N, K) -> (N, out); every weight kind multiplies through :func:`apply_linear`."""
        return apply_linear(self.spec(), x)

    def spec(self) -> tuple:
        """(kind, tensors..., bias, group): what :func:`apply_linear` needs, as plain values (for torch.compile)."""
        return ("dense", self.w, None, self.b, 0)

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size() + (0 if self.b is None else self.b.numel() * self.b.element_size())


class Concat:
    """Several linears applied to one input, outputs concatenated: a fused matmul without copying shared weights."""

    def __init__(self, parts: list[Dense]):
        self.parts = parts
        self._exact_spec = None  # the parts as one exact GGUF call, when they all are GGUFExact (see spec)

    def __call__(self, x):
        return apply_linear(self.spec(), x)

    def spec(self) -> tuple:
        if self._exact_spec is not None:
            return self._exact_spec
        if all(type(p) is GGUFExact for p in self.parts) and len({p.k for p in self.parts}) == 1 and len(self.parts) <= 8:
            # one kernel call for q/k/v (gate/up): the same products, fewer calls and no cat
            bias = None
            if any(p.b is not None for p in self.parts):
                bias = torch.cat([p.b if p.b is not None else torch.zeros(p.q.shape[0]) for p in self.parts])
            self._exact_spec = ("gguf-f32", ggmlkernel.ExactParts([(p.qtype, p.q, p.k) for p in self.parts]), None, bias, 0)
            return self._exact_spec
        return ("concat", tuple(p.spec() for p in self.parts), None, None, 0)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)


class Int8(Dense):
    """Weight-only int8: W ~ q * s with one scale per output channel (symmetric, absmax / 127)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype):
        wf = w.float()
        s = (wf.abs().amax(1) / 127).clamp_min(1e-12)  # (N,)
        self.q = (wf / s[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()  # (N, K)
        self.s = s.to(dtype)
        self.b = None if b is None else b.to(dtype)
        self.w = self.q

    def spec(self) -> tuple:
        return ("int8", self.q, self.s, self.b, 0)

    def rows(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        """Dequantised rows (an embedding lookup from the same int8 table)."""
        return self.q[ids].to(dtype) * self.s[ids, None].to(dtype)

    def nbytes(self) -> int:
        return self.q.numel() + self.s.numel() * self.s.element_size() + (0 if self.b is None else self.b.numel() * self.b.element_size())


class Int4(Dense):
    """Weight-only int4, asymmetric per group of ``group`` input channels: W ~ (q - 8) * s + z (gpt-fast's layout).

    Multiplies with ``torch._weight_int4pack_mm_for_cpu`` (bf16 activations). The default
    model's weights already lie on a 32-wide 4-bit grid (its GGUF is Q4_1), so group 32
    reproduces them up to the bf16 rounding of scales and offsets.
    """

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype, group: int = 32):
        n, k = w.shape
        if k % group:
            raise ConfigError(f"int4 weights need in_features divisible by {group}, got {k}")
        wg = w.float().view(n, k // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((wg - lo) / scale).round().clamp(0, 15).view(n, k).to(torch.int32)
        zero = lo + 8 * scale  # so that W = (q - 8) * scale + zero
        self.sz = torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/g, N, 2)
        self.q = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        self.group = group
        self.b = None if b is None else b.to(dtype)
        self.w = self.q

    def spec(self) -> tuple:
        return ("int4", self.q, self.sz, self.b, self.group)

    def nbytes(self) -> int:
        extra = 0 if self.b is None else self.b.numel() * self.b.element_size()
        return self.q.numel() * self.q.element_size() + self.sz.numel() * self.sz.element_size() + extra


class Q4(Dense):
    """Weight-only int4 in slmkit's kernel layout: w ~ (code - 8) * s + m per group of 32 (fp16 s, m).

    Multiplies with :func:`slmkit.runtime.q4kernel.matmul` (activations rounded to int8 per 32).
    """

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype):
        self.q, self.s, self.m = q4kernel.pack(w.detach())
        self.b = None if b is None else b.to(dtype)
        self.w = self.q

    def spec(self) -> tuple:
        return ("q4", self, None, self.b, 0)

    def segments(self) -> list[list[int]]:
        """The matrix descriptor for the fused decode step (:mod:`slmkit.runtime.decodelayout`'s ``SEG_*``)."""
        return [decodelayout.segment(decodelayout.KIND_Q4, 0, self.q.shape[0], self.q.data_ptr(), self.s.data_ptr(), self.m.data_ptr())]

    def nbytes(self) -> int:
        extra = 0 if self.b is None else self.b.numel() * self.b.element_size()
        return self.q.numel() + self.s.numel() * 2 + self.m.numel() * 2 + extra


class GGUFQ(Dense):
    """A GGUF tensor's own quantised blocks (llama.cpp format ``qtype``; one row of blocks per output).

    Multiplies with :func:`slmkit.runtime.ggmlkernel.linear` (activations rounded to int8 per 32);
    :meth:`rows` dequantises table rows (an embedding lookup from the same blocks).
    """

    def __init__(self, raw: torch.Tensor, qtype: int, k: int, b: torch.Tensor | None = None):
        if ggmlkernel.row_bytes(qtype, k) != raw.shape[1]:
            raise ValueError(f"{tuple(raw.shape)} is not a table of {k}-wide {ggmlkernel.TYPES.get(qtype, ('?',))[0]} rows")
        self.q, self.qtype, self.k = raw.contiguous(), qtype, k
        self.b = b
        self.w = self.q

    def spec(self) -> tuple:
        return ("gguf", self, None, self.b, 0)

    def rows(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        return ggmlkernel.rows_f32(self.qtype, self.q, self.k, ids).to(dtype)

    def segments(self) -> list[list[int]]:
        """The matrix descriptor for the fused decode step (:mod:`slmkit.runtime.decodelayout`'s ``SEG_*``)."""
        return [decodelayout.segment(decodelayout.KIND_GGUF, self.qtype, self.q.shape[0], self.q.data_ptr())]

    def nbytes(self) -> int:
        return self.q.numel() + (0 if self.b is None else self.b.numel() * self.b.element_size())


class GGUFExact(GGUFQ):
    """A GGUF tensor's own blocks multiplied in full precision: fp32 activations times the weights exactly as gguf-py
    dequantises them (:class:`slmkit.runtime.ggmlkernel.ExactParts`), so the weights are the dequantised fp32 model's
    (what transformers loads from the file) while they stream at the file's size. No fused-step segment."""

    def __init__(self, raw: torch.Tensor, qtype: int, k: int, b: torch.Tensor | None = None):
        super().__init__(raw, qtype, k, b)
        self.exact = ggmlkernel.ExactParts([(qtype, self.q, k)])

    def spec(self) -> tuple:
        return ("gguf-f32", self.exact, None, self.b, 0)

    def rows(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        return ggmlkernel.exact_f32(self.qtype, self.q, self.k, ids).to(dtype)

    def dequantised(self) -> torch.Tensor:
        """The fp32 weight (N, K) these blocks stand for, bit for bit gguf-py's (every row)."""
        return self.rows(None, torch.float32)

    def segments(self) -> list[list[int]]:
        raise TypeError("an exact (fp32) GGUF weight has no fused-step descriptor: the fused step rounds activations to int8")


def apply_linear(spec: tuple, x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, K) through a weight given by its :meth:`Dense.spec`."""
    kind, a, b, bias, group = spec
    if kind == "concat":
        return torch.cat([apply_linear(p, x) for p in a], dim=-1)
    if kind == "dense":
        y = q4kernel.f32_linear(x, a)  # 2..16 tokens: the weight read once (fp32 rounding apart from torch's sgemm)
        if y is None:
            return F.linear(x, a, bias)  # what nn.Linear computes: one-token fp32 steps give transformers' bits
        return y if bias is None else y.add_(bias)
    if kind == "q4":
        y = q4kernel.linear(x, a.q, a.s, a.m)
    elif kind == "gguf":
        y = ggmlkernel.linear(x, a.qtype, a.q, a.k)
    elif kind == "gguf-f32":
        y = a(x)  # ggmlkernel.ExactParts
    elif kind == "int4":
        y = torch._weight_int4pack_mm_for_cpu(x, a, group, b)
    else:  # int8
        y = torch._weight_int8pack_mm(x, a, b)
    return y if bias is None else y + bias
