"""slmkit's CPU kernel library (4-bit and GGUF-format weights x 8-bit activations), built on first use.

The library is :file:`kernels/q4.c`, :file:`kernels/ggml.c` (matmuls over llama.cpp's GGUF block
formats, wrapped by :mod:`slmkit.runtime.ggmlkernel`), :file:`kernels/decode.c` (the fused decode
step over either) and :file:`kernels/f32.c` (fp32 weights times a few activation rows, for speculative
verification and small batches of full-precision models: :func:`f32_linear`), compiled together. :file:`kernels/q4.c` follows llama.cpp's Q4_1 x Q8 scheme
(4-bit codes with an fp16 scale per 32 inputs; activations quantised to int8 per 32 on the fly;
``vpdpbusd`` dot products), written for AVX512-VNNI, with the codes centred (``w = (q - 8) s + m``)
so that the activation rounding error scales with the weight. Besides the matmul the library holds a whole llama decode step for one token
of each of several sequences (:func:`slmkit.runtime.generate.forward` uses it), and a dequantiser
to bf16 for long prompts, which are compute-bound (:func:`linear`).

**Variants.** The sources are compiled once per instruction set, each into its own cached library
with its own flags (so the AVX2 build cannot contain AVX-512 instructions): ``avx512``
(AVX512F/BW/VL/DQ, AVX512-VNNI, F16C, FMA), ``avx2`` (AVX2, FMA, F16C: llama.cpp's
``vpmaddubsw`` dot products), ``neon`` (AArch64 with the dot-product extension: ``sdot``) and
``portable`` (plain C loops the compiler vectorises for the baseline target, no ``-m`` flags).
:func:`choose` takes the first of :data:`ORDER` this CPU's flags (Linux :data:`CPUINFO`) allow;
``SLMKIT_KERNEL=avx512|avx2|neon|portable`` forces one (``auto``: choose), and a forced variant
the CPU lacks, or an unknown name, is a :class:`~slmkit.errors.ConfigError` naming it. All
variants compute the same quantities (:file:`kernels/simd.h`); they differ only in the order of
fp32 additions, so products agree to about 1e-6 of their largest value (the tests bound it at 1e-5)
and dequantised weights are equal. Through a whole decode step an int8 activation code can flip
where a value lies within fp32 rounding of a half-step, so logits may differ by about 1% of the
largest (KL about 1e-4 on the tests' tiny models, greedy tokens identical).

The kernel is optional. It is compiled with the system C compiler into a per-user cache the
first time it is needed (about 5 s) and loaded with :mod:`ctypes`; the cache is owner-only and
hash-checked before loading (:mod:`slmkit.runtime.kernelcache`). When there is no compiler, the
build fails, the cache directory is unsafe (a warning), or ``SLMKIT_Q4_KERNEL=0`` is set,
:func:`load` returns ``None`` (and says why once, at INFO) and callers use torch's kernel.

Numerics: the activations are rounded to int8 per group of 32 (absmax / 127), so results
differ from a dequantise-then-matmul in the third significant digit; the per-group offset
term uses the exact fp32 activation sums.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from pathlib import Path

import torch

from slmkit import settings
from slmkit.errors import ConfigError
from slmkit.runtime import decodelayout, kernelcache

log = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")
SOURCES = tuple(KERNELS / f for f in ("q4.c", "ggml.c", "decode.c", "f32.c"))  #: compiled together into one library
HEADERS = (KERNELS / "common.h", KERNELS / "simd.h")
#: -Werror=vla: no stack array sized by an input may come back (a batch-sized one overflowed the stack);
#: -Werror=frame-larger-than: every fixed one stays small beside a thread's 8 MB stack
FLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-Werror=vla", "-Werror=frame-larger-than=262144", "-lm", "-pthread"]
#: variant -> (the machine it runs on, its compiler flags, the CPU flags it needs)
VARIANTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "avx512": ("x86_64", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma"),
               ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")),
    "avx2": ("x86_64", ("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")),
    "neon": ("aarch64", ("-march=armv8.2-a+dotprod",), ("asimd", "asimddp")),
    "portable": ("", (), ()),
}
ORDER = ("avx512", "avx2", "neon", "portable")  #: best first
ENV = settings.KERNEL  #: forces a variant
CPUINFO = Path("/proc/cpuinfo")  #: where :func:`cpu_flags` reads the CPU's flags
GROUP = 32
SUPERBLOCK = 512  #: inputs per superblock of the avx512 kernel (16 groups; SB in kernels/common.h)

_lib: ctypes.CDLL | None = None
_why: str | None = None  # why the kernel is unavailable (None: not tried yet, or available)
_tried = False
_variant: str | None = None  # the variant :func:`load` loaded
_libs: dict[tuple[str, str], ctypes.CDLL] = {}  # (variant, cache directory) -> library, loaded in this process


def recipe(variant: str) -> kernelcache.Recipe:
    """What the library of ``variant`` is built from: the sources, ``-DSLMKIT_ISA_<VARIANT>`` and its flags."""
    _, mflags, _ = VARIANTS[variant]
    return kernelcache.Recipe(f"slmkit-{variant}", SOURCES, HEADERS, (*FLAGS, f"-DSLMKIT_ISA_{variant.upper()}", *mflags))


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags (x86 ``flags``, ARM ``Features`` of :data:`CPUINFO`); None when unreadable.
    Linux clears the flags of features the OS has not enabled."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def variant_supported(variant: str, flags: set[str] | None = None, machine: str | None = None) -> tuple[bool, str]:
    """Whether ``variant`` runs on this CPU (or on one with ``flags`` and ``machine``), and if not, why."""
    arch, _, needs = VARIANTS[variant]
    machine = machine or platform.machine().lower()
    if arch and machine not in (arch, {"x86_64": "amd64", "aarch64": "arm64"}[arch]):
        return False, f"the {variant} kernel is for {arch}, this machine is {machine}"
    if not needs:
        return True, ""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return False, f"cannot read {CPUINFO} to check the CPU for the {variant} kernel"
    missing = [f for f in needs if f not in flags]
    return (not missing), (f"CPU lacks {', '.join(missing)} (needed by the {variant} kernel)" if missing else "")


def choose(flags: set[str] | None = None, machine: str | None = None) -> str:
    """The variant to use: ``$SLMKIT_KERNEL`` when set (ConfigError when unknown or unsupported here), else
    the first of :data:`ORDER` the CPU supports (``portable`` always runs)."""
    forced = settings.kernel_variant()
    if forced and forced != "auto":
        if forced not in VARIANTS:
            raise ConfigError(f"{ENV}={forced!r} is not a kernel variant", f"use one of {', '.join(ORDER)}, or auto")
        ok, why = variant_supported(forced, flags, machine)
        if not ok:
            raise ConfigError(f"{ENV}={forced} cannot run here: {why}", f"unset {ENV} to choose from the CPU's flags")
        return forced
    return next(v for v in ORDER if variant_supported(v, flags, machine)[0])


def cpu_supported() -> tuple[bool, str]:
    """Whether the chosen variant runs on this CPU (``portable`` always does; a forced one may not)."""
    try:
        choose()
    except ConfigError as e:
        return False, str(e)
    return True, ""


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the library's entry points for ctypes."""
    p, i = ctypes.c_void_p, ctypes.c_int
    for name, res, args in (("slmkit_q4_matmul", i, [p, i, i, i, p, p, p, i, p, i]),
                            ("slmkit_q4_dequant_bf16", None, [p, p, p, i, i, p]),
                            ("slmkit_decode_batch", i, [p, i, i, i, i, i, i, i, ctypes.c_float, p, p, p, p, p, p, p, p, p, p]),
                            ("slmkit_decode_batch_arch", i, [p, i, i, i, i, i, i, i, ctypes.c_float, p, p, p, p, p, p, p, p, p, p, p, p]),
                            ("slmkit_gg_matmul", i, [p, i, i, i, i, p, i, p, i]),
                            ("slmkit_f32_matmul", i, [p, i, i, p, i, p]),
                            ("slmkit_gg_dequant_bf16", i, [i, p, i, i, p]),
                            ("slmkit_gg_rows_f32", i, [i, p, i, p, i, p]),
                            ("slmkit_gg_rows_exact", i, [i, p, i, p, i, p]),
                            ("slmkit_gg_f32_matmul_parts", i, [i, p, p, p, i, p, i, p]),
                            ("slmkit_gg_row_bytes", i, [i, i]),
                            ("slmkit_scratch_live_bytes", ctypes.c_size_t, []),
                            ("slmkit_scratch_release", None, []),
                            ("slmkit_kernel_isa", ctypes.c_char_p, [])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def load_variant(variant: str) -> ctypes.CDLL:
    """The library of ``variant``, built if needed (cached per process); the caller checks that the CPU
    supports it. Raises :class:`~slmkit.runtime.kernelcache.UnsafeCacheError`, RuntimeError or OSError."""
    key = (variant, str(cache_dir()))
    if key not in _libs:
        lib = _bind(kernelcache.load(recipe(variant), cache_dir()))
        isa = lib.slmkit_kernel_isa().decode()
        if isa != variant:
            raise RuntimeError(f"the {variant} kernel library says it was built for {isa}")
        decodelayout.check(decodelayout.from_library(lib))  # the fused step's tables as Python fills them
        _libs[key] = lib
    return _libs[key]


def variant() -> str | None:
    """The variant :func:`load` uses (None when the kernel is unavailable)."""
    load()
    return _variant


def cache_dir() -> Path:
    """Where the library is built (:func:`slmkit.runtime.kernelcache.default_dir`)."""
    return kernelcache.default_dir()


def load() -> ctypes.CDLL | None:
    """The compiled kernel of the chosen variant (:func:`choose`), or ``None`` when it cannot be used here
    (:func:`why_unavailable` says why). Raises ConfigError when ``$SLMKIT_KERNEL`` names an unknown variant
    or one this CPU lacks (nothing is compiled or loaded then); the cache is checked as
    :mod:`slmkit.runtime.kernelcache` describes (an unsafe cache directory is refused, with a warning). Raises
    :class:`~slmkit.runtime.decodelayout.LayoutMismatch` when the library's fused-step table layout differs from
    Python's.
    """
    global _lib, _why, _tried, _variant
    if _tried:
        return _lib
    _lib, _variant, level = None, None, logging.INFO
    if not settings.q4_kernel_enabled():
        _why = "disabled by SLMKIT_Q4_KERNEL=0"
    else:
        name = choose()
        try:
            _lib, _variant = load_variant(name), name
        except kernelcache.UnsafeCacheError as e:
            _why, level = str(e), logging.WARNING
        except decodelayout.LayoutMismatch:
            raise  # a source bug, not a missing compiler: never hidden behind torch's kernel
        except (OSError, RuntimeError, AttributeError) as e:
            _why = f"could not build or load {', '.join(f.name for f in SOURCES)} ({name}): {e}"
    _tried = True
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


#: :func:`f32_linear` takes passes of 2 to this many tokens (one token: torch's gemv, already bandwidth-bound,
#: and the same bits as transformers' forward; more: torch's sgemm, compute-bound by then)
F32_MAX_TOKENS = 16


def f32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """``x`` (M, K) fp32 times the fp32 weight ``w`` (N, K) transposed with :file:`kernels/f32.c`, which reads
    the weight once for all M rows; None when it does not apply (kernel unavailable, M outside
    2..:data:`F32_MAX_TOKENS`, K not a multiple of 16, other dtypes), and the caller uses ``F.linear``."""
    if x.dim() != 2 or not 2 <= x.shape[0] <= F32_MAX_TOKENS:  # first: the one-token step (the hot path) leaves here
        return None
    if w.dim() != 2 or x.shape[1] != w.shape[1] or x.device.type != "cpu" or w.device.type != "cpu":
        return None
    m, k = x.shape
    if k % 16 or x.dtype != torch.float32 or w.dtype != torch.float32:
        return None
    lib = load()
    if lib is None:
        return None
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty(m, w.shape[0], dtype=torch.float32)
    if lib.slmkit_f32_matmul(x.data_ptr(), m, k, w.data_ptr(), w.shape[0], y.data_ptr()):
        raise RuntimeError(f"f32 matmul failed for x {tuple(x.shape)}, w {tuple(w.shape)}")
    return y


#: from this many tokens per call on, :func:`linear` dequantises to bf16 and runs a bf16 matmul
#: (AMX / AVX512-BF16 kernels): long prompts are compute-bound, decode steps bandwidth-bound. This is the
#: per-chunk kernels' crossover; :data:`DEQUANT_FROM_TOKENS_BY_VARIANT` holds the variants that differ.
DEQUANT_FROM_TOKENS = 32
#: the avx512 kernel's superblocks (q4.c: matrices of at least SUPERBLOCK inputs) keep int8 ahead until about 64 tokens: a
#: whole prompt through the default model's int4 fast path, int8 / dequantised bf16 time 0.82 at 48 tokens, 0.99 at
#: 64, 1.07 at 80 (docs/benchmarks.md)
DEQUANT_FROM_TOKENS_BY_VARIANT = {"avx512": 64}


def dequant_from_tokens(k: int) -> int:
    """Tokens per call from which :func:`linear` takes the bf16 matmul for a weight of ``k`` inputs, on the loaded
    kernel variant (narrower matrices have no superblocks and keep :data:`DEQUANT_FROM_TOKENS`)."""
    if k < SUPERBLOCK:
        return DEQUANT_FROM_TOKENS
    return DEQUANT_FROM_TOKENS_BY_VARIANT.get(variant() or "", DEQUANT_FROM_TOKENS)


def dequant_bf16(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The bf16 weight (N, K) the packed codes stand for (the kernel's rounding: fp32 then round-to-nearest-even)."""
    w = torch.empty(q.shape[0], q.shape[1] * 2, dtype=torch.bfloat16)
    require().slmkit_q4_dequant_bf16(q.data_ptr(), s.data_ptr(), m.data_ptr(), q.shape[0], q.shape[1] * 2, w.data_ptr())
    return w


def linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x`` (M, K) times the packed weight: int8 dot products for few tokens, a bf16 matmul for many."""
    if x.shape[0] >= dequant_from_tokens(x.shape[-1]):
        return torch.nn.functional.linear(x.to(torch.bfloat16), dequant_bf16(q, s, m)).to(x.dtype)
    return matmul(x, q, s, m)
