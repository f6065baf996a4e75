"""slmkit's CPU kernel library (4-bit and GGUF-format weights x 8-bit activations), built on first use.

The library is :file:`kernels/q4.c`, :file:`kernels/ggml.c` (matmuls over llama.cpp's GGUF block
formats, wrapped by :mod:`slmkit.runtime.ggmlkernel`) and :file:`kernels/decode.c` (the fused decode
step over either), compiled together. :file:`kernels/q4.c` follows llama.cpp's Q4_1 x Q8 scheme
(4-bit codes with an fp16 scale per 32 inputs; activations quantised to int8 per 32 on the fly;
``vpdpbusd`` dot products), written for AVX512-VNNI, with the codes centred (``w = (q - 8) s + m``)
so that the activation rounding error scales with the weight. Besides the matmul the library holds a whole llama decode step for one token
of each of several sequences (:func:`slmkit.runtime.generate.forward` uses it), and a dequantiser
to bf16 for long prompts, which are compute-bound (:func:`linear`).

The kernel is optional. It is compiled with the system C compiler into a per-user cache the
first time it is needed (about 5 s) and loaded with :mod:`ctypes`; the cache is owner-only and
hash-checked before loading (:mod:`slmkit.runtime.kernelcache`). When the CPU lacks
AVX512-VNNI (nothing is then compiled or loaded), there is no compiler, the build fails, the
cache directory is unsafe (a warning), or ``SLMKIT_Q4_KERNEL=0`` is set, :func:`load` returns
``None`` (and says why once, at INFO) and callers use torch's kernel.

Numerics: the activations are rounded to int8 per group of 32 (absmax / 127), so results
differ from a dequantise-then-matmul in the third significant digit; the per-group offset
term uses the exact fp32 activation sums.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import torch

from slmkit.runtime import kernelcache

log = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")
SOURCES = tuple(KERNELS / f for f in ("q4.c", "ggml.c", "decode.c"))  #: compiled together into one library
HEADERS = (KERNELS / "common.h",)
#: -Werror=vla: no stack array sized by an input may come back (a batch-sized one overflowed the stack);
#: -Werror=frame-larger-than: every fixed one stays small beside a thread's 8 MB stack
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma",
         "-fopenmp", "-shared", "-fPIC", "-Werror=vla", "-Werror=frame-larger-than=262144", "-lm", "-pthread"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")
CPUINFO = Path("/proc/cpuinfo")  #: where :func:`cpu_supported` reads the CPU's flags
RECIPE = kernelcache.Recipe("slmkit", SOURCES, HEADERS, tuple(FLAGS))
GROUP = 32

_lib: ctypes.CDLL | None = None
_why: str | None = None  # why the kernel is unavailable (None: not tried yet, or available)
_tried = False


def cpu_supported() -> tuple[bool, str]:
    """Whether this CPU has the instructions the kernel is built for (Linux :data:`CPUINFO` flags,
    which the kernel clears for features the OS has not enabled)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return False, f"cannot read {CPUINFO} (the kernel is built for Linux on x86-64 only)"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    missing = [f for f in CPU_FLAGS if f not in flags]
    return (not missing), ("CPU lacks " + ", ".join(missing)) if missing else ""


def cache_dir() -> Path:
    """Where the library is built (:func:`slmkit.runtime.kernelcache.default_dir`)."""
    return kernelcache.default_dir()


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or ``None`` when it cannot be used here (:func:`why_unavailable` says why).

    A CPU without the instructions never compiles or loads it; the cache is checked as
    :mod:`slmkit.runtime.kernelcache` describes (an unsafe cache directory is refused, with a warning).
    """
    global _lib, _why, _tried
    if _tried:
        return _lib
    _tried = True
    level = logging.INFO
    if os.environ.get("SLMKIT_Q4_KERNEL", "1") == "0":
        _why = "disabled by SLMKIT_Q4_KERNEL=0"
    else:
        ok, why = cpu_supported()
        if not ok:
            _why = why
        else:
            try:
                lib = kernelcache.load(RECIPE, cache_dir())
                fn = lib.slmkit_q4_matmul
                fn.restype = ctypes.c_int
                p, i = ctypes.c_void_p, ctypes.c_int
                fn.argtypes = [p, i, i, i, p, p, p, i, p, i]
                dq = lib.slmkit_q4_dequant_bf16
                dq.restype = None
                dq.argtypes = [p, p, p, i, i, p]
                st = lib.slmkit_decode_batch
                st.restype = ctypes.c_int
                st.argtypes = [p, i, i, i, i, i, i, i, ctypes.c_float, p, p, p, p, p, p, p, p, p, p]
                for name, args in (("slmkit_gg_matmul", [p, i, i, i, i, p, i, p, i]),
                                   ("slmkit_gg_dequant_bf16", [i, p, i, i, p]),
                                   ("slmkit_gg_rows_f32", [i, p, i, p, i, p]),
                                   ("slmkit_gg_row_bytes", [i, i])):
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = ctypes.c_int, args
                lib.slmkit_scratch_live_bytes.restype, lib.slmkit_scratch_live_bytes.argtypes = ctypes.c_size_t, []
                lib.slmkit_scratch_release.restype, lib.slmkit_scratch_release.argtypes = None, []
                _lib = lib
            except kernelcache.UnsafeCacheError as e:
                _why, level = str(e), logging.WARNING
            except (OSError, RuntimeError, AttributeError) as e:
                _why = f"could not build or load {', '.join(f.name for f in SOURCES)}: {e}"
    if _lib is None:
        log.log(level, "slmkit's q4 kernel is unavailable (%s); int4 weights use torch's kernel", _why)
    return _lib


def why_unavailable() -> str | None:
    load()
    return _why


def scratch_live_bytes() -> int:
    """Bytes of per-thread scratch the kernels hold now, all threads together (each thread's is freed when it exits)."""
    return int(require().slmkit_scratch_live_bytes())


def pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``w`` (N, K) to 4-bit codes per group of 32 (asymmetric min/max grid, as GGUF Q4_1).

    Returns ``(q, s, m)``: q (N, K/2) uint8 in the kernel's nibble layout, s and m (N, K/32) fp16,
    with ``w ~ (code - 8) * s + m`` (m is the grid's centre: min + 8 s).
    """
    n, k = w.shape
    if k % 64:
        raise ValueError(f"the q4 kernel needs in_features divisible by 64, got {k}")
    wg = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp_min(1e-8).half()
    m = (lo + 8 * s.float()).half()
    codes = ((wg - m.float()) / s.float() + 8).round().clamp(0, 15).to(torch.uint8)  # against the stored fp16 values
    c = codes.reshape(n, k // 64, 2, 32)
    q = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return q, s.reshape(n, -1).contiguous(), m.reshape(n, -1).contiguous()


def unpack(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The fp32 weight (N, K) that ``(q, s, m)`` stands for."""
    n = q.shape[0]
    c = q.reshape(n, -1, 32)
    codes = torch.stack([c & 0x0F, c >> 4], dim=2).reshape(n, -1, GROUP).float() - 8
    return (codes * s.float()[..., None] + m.float()[..., None]).reshape(n, -1)


def require() -> ctypes.CDLL:
    """The compiled kernel; a RuntimeError saying why when it is unavailable."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"slmkit's q4 kernel is unavailable: {_why}")
    return lib


def matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x`` (M, K) fp32 or bf16 times the packed weight's transpose: (M, N) in ``x``'s dtype."""
    lib = require()
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"q4 matmul takes fp32 or bf16 activations, got {x.dtype}")
    x = x.contiguous()
    n, kk = q.shape[0], q.shape[1] * 2
    if x.shape[-1] != kk:
        raise ValueError(f"q4 matmul: activations have {x.shape[-1]} features, the weight takes {kk}")
    bf = int(x.dtype == torch.bfloat16)
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    rc = lib.slmkit_q4_matmul(x.data_ptr(), bf, x.shape[0], kk, q.data_ptr(), s.data_ptr(), m.data_ptr(), n, y.data_ptr(), bf)
    if rc:
        raise RuntimeError(f"q4 matmul failed (code {rc})")
    return y


#: from this many tokens per call on, :func:`linear` dequantises to bf16 and runs a bf16 matmul
#: (AMX / AVX512-BF16 kernels): long prompts are compute-bound, decode steps bandwidth-bound.
DEQUANT_FROM_TOKENS = 32


def dequant_bf16(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The bf16 weight (N, K) the packed codes stand for (the kernel's rounding: fp32 then round-to-nearest-even)."""
    w = torch.empty(q.shape[0], q.shape[1] * 2, dtype=torch.bfloat16)
    require().slmkit_q4_dequant_bf16(q.data_ptr(), s.data_ptr(), m.data_ptr(), q.shape[0], q.shape[1] * 2, w.data_ptr())
    return w


def linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x`` (M, K) times the packed weight: int8 dot products for few tokens, a bf16 matmul for many."""
    if x.shape[0] >= DEQUANT_FROM_TOKENS:
        return torch.nn.functional.linear(x.to(torch.bfloat16), dequant_bf16(q, s, m)).to(x.dtype)
    return matmul(x, q, s, m)
