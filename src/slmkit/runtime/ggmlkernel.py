"""Matmuls over a GGUF file's own quantised blocks (llama.cpp's formats), in slmkit's kernel library.

:file:`kernels/ggml.c` reads the raw block bytes of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and
Q6_K rows (``gguf.GGUFReader(path).tensors[i].data``: one row of blocks per output) and multiplies
them with activations rounded to int8 per group of 32 on the fly (``vpdpbusd``, as llama.cpp's
``ggml_vec_dot_*_q8_*``), so a GGUF model runs its own codes, not a re-quantised copy. The library
is built and loaded by :mod:`slmkit.runtime.q4kernel` (the same variants: avx512, avx2, neon or
portable, chosen from the CPU's flags or ``SLMKIT_KERNEL``; the same ``SLMKIT_Q4_KERNEL=0`` switch).

Numerics: the weights are exact (the file's codes and fp16 scales); the activations are rounded
to int8 per 32 (absmax / 127) and the per-block centre uses their exact fp32 sums, so a product
differs from a dequantise-then-matmul by about 0.5% of its norm (int8 rounding; the tests bound it
at 1.5%). From :data:`DEQUANT_FROM_TOKENS` tokens per call on, :func:`linear` dequantises to bf16
and runs a bf16 matmul instead (long prompts are compute-bound).
"""

from __future__ import annotations

import ctypes

import torch

from slmkit.runtime import q4kernel

#: ggml type id -> (name, inputs per block, bytes per block) for the formats the kernel reads
TYPES: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
DEQUANT_FROM_TOKENS = 32  #: where the GGUF block kernels (ggml.c, per 32-input block) stop beating a bf16 matmul


def type_id(name: str) -> int:
    """The ggml type id of a format name ("Q4_K" -> 12)."""
    for i, (n, _, _) in TYPES.items():
        if n == name:
            return i
    raise KeyError(f"no GGUF kernel for type {name!r}; supported: {', '.join(n for n, _, _ in TYPES.values())}")


def row_bytes(qtype: int, k: int) -> int | None:
    """Bytes of one row of ``k`` weights in format ``qtype``; None when the kernel cannot run it (type or shape)."""
    if qtype not in TYPES:
        return None
    _, blk, nbytes = TYPES[qtype]
    if k <= 0 or k % 64 or k % blk:
        return None
    return k // blk * nbytes


def _check(w: torch.Tensor, qtype: int, k: int) -> int:
    rb = row_bytes(qtype, k)
    if rb is None:
        name = TYPES.get(qtype, (f"type {qtype}",))[0]
        raise ValueError(f"no GGUF kernel for {name} rows of {k} inputs (needs a supported type and k % 64 == 0)")
    if w.dtype != torch.uint8 or w.dim() != 2 or w.shape[1] != rb or not w.is_contiguous():
        raise ValueError(f"expected contiguous uint8 blocks of shape (N, {rb}), got {tuple(w.shape)} {w.dtype}")
    return rb


def matmul(x: torch.Tensor, qtype: int, w: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` (M, k) fp32 or bf16 times the GGUF weight ``w`` (N rows of raw blocks) transposed: (M, N) in ``x``'s dtype."""
    lib = q4kernel.require()
    _check(w, qtype, k)
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"GGUF matmul takes fp32 or bf16 activations, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"GGUF matmul: activations have {x.shape[-1]} features, the weight takes {k}")
    x = x.contiguous()
    bf = int(x.dtype == torch.bfloat16)
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    rc = lib.slmkit_gg_matmul(x.data_ptr(), bf, x.shape[0], k, qtype, w.data_ptr(), w.shape[0], y.data_ptr(), bf)
    if rc:
        raise RuntimeError(f"GGUF matmul failed (code {rc})")
    return y


def dequant_bf16(qtype: int, w: torch.Tensor, k: int) -> torch.Tensor:
    """The bf16 weight (N, k) the blocks stand for (fp32 values rounded to nearest even)."""
    _check(w, qtype, k)
    out = torch.empty(w.shape[0], k, dtype=torch.bfloat16)
    if q4kernel.require().slmkit_gg_dequant_bf16(qtype, w.data_ptr(), w.shape[0], k, out.data_ptr()):
        raise RuntimeError("GGUF dequantisation failed")
    return out


def rows_f32(qtype: int, w: torch.Tensor, k: int, ids: torch.Tensor) -> torch.Tensor:
    """fp32 rows ``ids`` (n,) of the weight: (n, k) (an embedding lookup)."""
    _check(w, qtype, k)
    ids = ids.to(torch.int64).contiguous()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]):
        raise IndexError(f"row ids out of range for a table of {w.shape[0]} rows")
    out = torch.empty(ids.numel(), k, dtype=torch.float32)
    if q4kernel.require().slmkit_gg_rows_f32(qtype, w.data_ptr(), k, ids.data_ptr(), ids.numel(), out.data_ptr()):
        raise RuntimeError("GGUF row lookup failed")
    return out


def linear(x: torch.Tensor, qtype: int, w: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` (M, k) times the weight: int8 dot products for few tokens, a bf16 matmul on the dequantised weight for many."""
    if x.shape[0] >= DEQUANT_FROM_TOKENS:
        return torch.nn.functional.linear(x.to(torch.bfloat16), dequant_bf16(qtype, w, k)).to(x.dtype)
    return matmul(x, qtype, w, k)


def exact_f32(qtype: int, w: torch.Tensor, k: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight (rows ``ids``, or all N) exactly as gguf-py's ``dequantize`` computes it, bit for bit: what
    transformers holds after loading the file (``kernels/ggml.c``, ``slmkit_gg_row_exact``)."""
    _check(w, qtype, k)
    n = w.shape[0]
    ptr = None
    if ids is not None:
        ids = ids.to(torch.int64).contiguous()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise IndexError(f"row ids out of range for a table of {n} rows")
        n, ptr = ids.numel(), ids.data_ptr()
    out = torch.empty(n, k, dtype=torch.float32)
    if q4kernel.require().slmkit_gg_rows_exact(qtype, w.data_ptr(), k, ptr, n, out.data_ptr()):
        raise RuntimeError("GGUF exact dequantisation failed")
    return out


#: from this many rows per call :class:`ExactParts` dequantises (exactly) and runs torch's sgemm, which beats the
#: kernel's 4x4 tiles on long prompts: default model, a whole pass of 512 tokens 652 ms in the kernel, 515 ms this
#: way, 498 ms on dense fp32 weights (300 tokens: kernel 339-347 ms, dense 297-314). Below it the kernel wins
#: (17 tokens 30-34 vs 56-60 ms dense, 100 tokens 108-116 vs 113-122).
EXACT_DEQUANT_FROM_TOKENS = 384


class ExactParts:
    """GGUF weights multiplied in full precision side by side (a fused q/k/v or gate/up projection): each part
    ``(qtype, blocks (N_p, row bytes), k)`` dequantised exactly as :func:`exact_f32` does and multiplied as
    :func:`slmkit.runtime.q4kernel.f32_linear` multiplies a dense fp32 weight (the same products in the same order),
    in one call of ``kernels/f32.c``'s ``slmkit_gg_f32_matmul_parts``; checked once here, so a call costs little."""

    def __init__(self, parts: list[tuple[int, torch.Tensor, int]]):
        if not 1 <= len(parts) <= 8 or len({k for _, _, k in parts}) != 1:
            raise ValueError("exact GGUF parts: 1 to 8 weights with the same number of inputs")
        self.k = parts[0][2]
        if self.k % 16:
            raise ValueError(f"exact GGUF matmul needs k % 16 == 0, got {self.k}")
        for qtype, w, k in parts:
            _check(w, qtype, k)
        self.blocks = [w for _, w, _ in parts]  # kept alive: the pointers below point into them
        self.n = sum(w.shape[0] for w in self.blocks)
        n = len(parts)
        self._types = (ctypes.c_int * n)(*[q for q, _, _ in parts])
        self._ptrs = (ctypes.c_void_p * n)(*[w.data_ptr() for w in self.blocks])
        self._rows = (ctypes.c_int * n)(*[w.shape[0] for w in self.blocks])
        self._nparts = n
        self._fn = q4kernel.require().slmkit_gg_f32_matmul_parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (M, k) fp32 times the weights: (M, sum of N) fp32."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.k or x.device.type != "cpu":
            raise ValueError(f"exact GGUF matmul takes fp32 CPU activations (M, {self.k}), got {tuple(x.shape)} {x.dtype} on {x.device}")
        x = x.contiguous()
        if x.shape[0] >= EXACT_DEQUANT_FROM_TOKENS:  # a long prompt: torch's sgemm on the exactly dequantised weights
            w = torch.cat([exact_f32(q, b, self.k) for q, b in zip(self._types, self.blocks)])
            return torch.nn.functional.linear(x, w)
        y = torch.empty(x.shape[0], self.n, dtype=torch.float32)
        rc = self._fn(self._nparts, self._types, self._ptrs, self._rows, self.k, x.data_ptr(), x.shape[0], y.data_ptr())
        if rc:
            raise RuntimeError(f"exact GGUF matmul failed (code {rc})")
        return y


def f32_matmul(x: torch.Tensor, qtype: int, w: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` (M, k) fp32 times the weight in full precision (:class:`ExactParts` of one part): for any M the result
    equals ``kernels/f32.c``'s ``slmkit_f32_matmul`` on ``exact_f32(w)`` bit for bit (so ``q4kernel.f32_linear`` for
    2..16 rows) while the weight streams at its file size; torch's gemv/sgemm differ by fp32 rounding."""
    return ExactParts([(qtype, w, k)])(x)
