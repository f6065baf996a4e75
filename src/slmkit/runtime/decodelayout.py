"""The fused decode step's table layout: where each value sits in the int64 and float arrays Python hands to
``slmkit_decode_batch`` / ``slmkit_decode_batch_arch`` (kernels/decode.c).

Python and C each name these positions; the C enums in :file:`kernels/decode.c` are the source of truth and this
module mirrors them. The library exports ``slmkit_decode_layout`` (every enum's name and value), and
:func:`check` compares it with :data:`LAYOUT` when :mod:`slmkit.runtime.q4kernel` loads the library: a difference
is a :class:`LayoutMismatch` naming the field, never a silently misread pointer. ``tests/runtime/test_decode_layout.py``
also parses decode.c's enums and compares them with this module without building anything.

Layout (who fills it: :mod:`slmkit.runtime.fusedstep`, from :class:`~slmkit.runtime.generate.FastModel`):

``layers``: int64, ``L * L_N`` values, one row per layer:
    ``L_ANORM``, ``L_MNORM``  addresses of the attention-input and MLP-input RMSNorm weights (bf16, D values, the
                              effective scale: Gemma's ``1 + w``); never 0.
    ``L_SEGS + s * SEG_N``    matrix slot ``s`` (``S_Q`` .. ``S_DOWN``), ``SEG_N`` values each (below). Slots
                              ``S_Q``, ``S_K``, ``S_V`` read the attention input and write q|k|v side by side (slmkit's
                              q4 path has one fused q|k|v matrix in ``S_Q`` and empty ``S_K``, ``S_V``); ``S_O`` the
                              output projection; ``S_GATE``, ``S_UP`` gate|up (one fused matrix may fill ``S_GATE``);
                              ``S_DOWN`` the down projection.
A matrix descriptor (also the optional ``head`` argument: the output head), ``SEG_N`` int64 values:
    ``SEG_KIND``  ``KIND_EMPTY`` (slot unused; every other value 0), ``KIND_Q4`` (slmkit's 4-bit layout,
                  :mod:`slmkit.runtime.q4kernel`), ``KIND_GGUF`` (llama.cpp blocks, :mod:`slmkit.runtime.ggmlkernel`).
    ``SEG_TYPE``  GGUF: the ggml type id of the blocks (``GGMLQuantizationType``); q4: 0.
    ``SEG_ROWS``  output rows of the matrix (the slots of one input add up to that input's output width).
    ``SEG_P0``    address of the codes (q4: uint8 (rows, K/2); GGUF: the rows' block bytes).
    ``SEG_P1``    q4: address of the fp16 scales (rows, K/32); GGUF: 0.
    ``SEG_P2``    q4: address of the fp16 centres (rows, K/32); GGUF: 0.
``ext`` (optional, ``slmkit_decode_batch_arch``): int64, ``L * X_N`` values, one row per layer, 0 where absent:
    ``X_QNORM``, ``X_KNORM``    addresses of the per-head q and k RMSNorm weights (bf16, hd values; both or neither).
    ``X_PANORM``, ``X_PMNORM``  addresses of the norms on the attention and MLP outputs before their residuals (bf16, D).
    ``X_WINDOW``                sliding window in tokens (keys at positions > pos - window); 0: full attention.
    ``X_ROPE``                  which rotary table the layer reads, ``0 <= X_ROPE < fp[F_NROPE]``.
    ``X_QKVBIAS``               address of the fp32 q|k|v bias ((H + 2 Hk) hd values).
``fp`` (optional, with ``ext``): float32, ``F_N`` model-wide values:
    ``F_SCALE``    query scale (0: 1/sqrt(hd)).
    ``F_SOFTCAP``  attention soft-cap c in c * tanh(s / c) (0: none).
    ``F_ACT``      GLU activation: 0 SiLU, 1 GELU (tanh approximation).
    ``F_NROPE``    rotary tables per token (>= 1; cos and sin are then M x F_NROPE x hd).
"""

from __future__ import annotations

import ctypes

__all__ = ["LAYOUT", "LayoutMismatch", "check", "from_library", "segment"]

# layers: one row per layer
L_ANORM, L_MNORM, L_SEGS = 0, 1, 2
# matrix slots within a row
S_Q, S_K, S_V, S_O, S_GATE, S_UP, S_DOWN, S_N = range(8)
# one matrix descriptor
SEG_KIND, SEG_TYPE, SEG_ROWS, SEG_P0, SEG_P1, SEG_P2, SEG_N = range(7)
L_N = L_SEGS + S_N * SEG_N
# SEG_KIND values
KIND_EMPTY, KIND_Q4, KIND_GGUF = 0, 1, 2
# ext: one row per layer
X_QNORM, X_KNORM, X_PANORM, X_PMNORM, X_WINDOW, X_ROPE, X_QKVBIAS, X_N = range(8)
# fp: model-wide floats
F_SCALE, F_SOFTCAP, F_ACT, F_NROPE, F_N = range(5)

#: every named position and code, as decode.c names them
LAYOUT: dict[str, int] = {k: v for k, v in globals().items() if k.split("_")[0] in ("L", "S", "SEG", "KIND", "X", "F")
                          and k.isupper()}


def segment(kind: int, qtype: int, rows: int, p0: int, p1: int = 0, p2: int = 0) -> list[int]:
    """One matrix descriptor (``SEG_N`` values, each at its ``SEG_*`` position)."""
    d = [0] * SEG_N
    d[SEG_KIND], d[SEG_TYPE], d[SEG_ROWS], d[SEG_P0], d[SEG_P1], d[SEG_P2] = kind, qtype, rows, p0, p1, p2
    return d


class LayoutMismatch(RuntimeError):
    """The kernel library and :mod:`slmkit.runtime.decodelayout` disagree on the fused step's table layout."""


def from_library(lib: ctypes.CDLL) -> dict[str, int]:
    """Every name and value the library's ``slmkit_decode_layout(i, &name, &value)`` lists (it returns 0 past the end)."""
    fn = lib.slmkit_decode_layout
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_int64)]
    out, name, value = {}, ctypes.c_char_p(), ctypes.c_int64()
    i = 0
    while fn(i, ctypes.byref(name), ctypes.byref(value)):
        out[name.value.decode()] = value.value
        i += 1
    return out


def check(found: dict[str, int], where: str = "kernels/decode.c") -> None:
    """Raise :class:`LayoutMismatch` naming each field where ``found`` (the C side) and :data:`LAYOUT` differ."""
    diffs = [f"{k}: C {found.get(k, 'missing')}, Python {LAYOUT.get(k, 'missing')}"
             for k in sorted(set(found) | set(LAYOUT)) if found.get(k) != LAYOUT.get(k)]
    if diffs:
        raise LayoutMismatch(f"the fused decode step's table layout in {where} differs from "
                             f"slmkit/runtime/decodelayout.py ({'; '.join(diffs)}); change both together")
