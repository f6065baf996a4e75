"""Will a model fit a device? Memory = weights + KV cache + activations + runtime overhead.

* **weights**: parameters (from :func:`slmkit.models.describe`) x bits per weight
  (fp32 32, bf16 16, int8 8.5, int4 4.5: llama.cpp's Q8_0/Q4_0 including block scales);
* **KV cache**: exactly what the chosen policy of :mod:`slmkit.runtime.kvcache`
  allocates for ``context`` tokens, times ``batch`` (keys/values at fp32 when the
  weights are fp32, else 16-bit);
* **activations**: the transient peak of one forward of the fast path
  (:mod:`slmkit.runtime.generate`): a prefill chunk's hidden states, q/k/v and
  MLP intermediates, the GQA-expanded keys/values of one layer over the whole
  context, and the logits row;
* **runtime overhead**: the process before any weights (interpreter, PyTorch,
  transformers, tokenizer). The default, 450 MB, was measured on the machine this
  was written on (Linux x86-64, torch 2.13 CPU); a llama.cpp-style native runtime
  needs far less: pass ``overhead`` for your runtime.

``bench/runtime.py`` checks the total against the resident memory of a real run
(within 15%). Device presets give the memory one app can use, not the RAM printed
on the box (the OS and other apps keep the rest); see :data:`DEVICES`. Each preset also names the
CPU it assumes and the variant of slmkit's kernels (:mod:`slmkit.runtime.q4kernel`) that CPU would
run: ``avx512``, ``avx2``, ``neon`` or ``portable``; a custom budget reports this machine's.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from slmkit.errors import ConfigError
from slmkit.runtime.kvcache import KVShape, kv_policy

GB = 1_000_000_000
BITS = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "int8": 8.5, "int4": 4.5}
RUNTIME_OVERHEAD = 450_000_000  #: bytes; PyTorch runtime RSS before weights, measured here (see module docstring)
PREFILL_CHUNK = 512  #: tokens per prefill step in the fast path (decoding.stream's default)


@dataclass(frozen=True)
class Device:
    name: str
    ram_bytes: int  #: RAM on the box
    usable_bytes: int  #: what one app can use
    note: str
    cpu: str  #: the CPU the preset assumes
    kernel: str  #: the kernel variant that CPU runs (slmkit.runtime.q4kernel.VARIANTS)


#: Common targets. Usable memory is a rule of thumb, stated per device.
DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device("phone-4gb", 4 * GB, int(1.8 * GB), "Android/iOS phone, 4 GB RAM: OS and other apps keep ~55%",
               "ARMv8.2-A with the dot product (Cortex-A55/A75 and newer; a Cortex-A53 runs the portable kernel)", "neon"),
        Device("phone-8gb", 8 * GB, int(4.0 * GB), "phone with 8 GB RAM: about half for one foreground app",
               "ARMv8.2-A or newer with the dot product", "neon"),
        Device("rpi5-8gb", 8 * GB, int(6.5 * GB), "Raspberry Pi 5 (8 GB), headless Raspberry Pi OS: ~1.5 GB for the system",
               "Cortex-A76 (ARMv8.2-A, dot product)", "neon"),
        Device("rpi5-4gb", 4 * GB, int(3.0 * GB), "Raspberry Pi 5 (4 GB), headless: ~1 GB for the system",
               "Cortex-A76 (ARMv8.2-A, dot product)", "neon"),
        Device("laptop-16gb", 16 * GB, int(10 * GB), "16 GB laptop with a browser and editor open",
               "x86-64 with AVX2, FMA, F16C and no AVX-512 (most laptop CPUs; AMD Zen 4 runs avx512)", "avx2"),
    )
}


def parse_size(text: str) -> int:
    """'4GB' -> 4e9 bytes; also MB, KB, GiB, MiB, KiB and plain bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"cannot read memory size {text!r}", "write e.g. 4GB, 512MB, 6GiB, or a device preset: " + ", ".join(DEVICES))
    num, unit = float(m.group(1)), (m.group(2) or "b")
    powers = {"k": 1, "m": 2, "g": 3, "t": 4}
    if unit == "b":
        return int(num)
    base = 1024 if "i" in unit else 1000
    return int(num * base ** powers[unit[0]])


def parse_tokens(text: str | int) -> int:
    """'8k' -> 8192, '2048' -> 2048."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+)\s*([kK])?\s*", str(text))
    if not m:
        raise ConfigError(f"cannot read token count {text!r}", "write e.g. 8k or 2048")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


@dataclass(frozen=True)
class FitConfig:
    memory_bytes: int  #: budget in bytes
    device: str = "custom"  #: preset name, or "custom"
    context: int = 4096  #: tokens per sequence (prompt + completion)
    precision: str = "bf16"  #: weights: fp32, bf16, fp16, int8, int4
    kv: str = "full"  #: KV policy name
    kv_budget: int | None = None  #: tokens kept by streaming/h2o
    batch: int = 1  #: concurrent sequences
    overhead_bytes: int = RUNTIME_OVERHEAD

    def __post_init__(self):
        if self.memory_bytes <= 0:
            raise ConfigError(f"memory must be > 0, got {self.memory_bytes}")
        if self.precision not in BITS:
            raise ConfigError(f"unknown precision {self.precision!r}; known: {', '.join(BITS)}")
        if self.context < 1 or self.batch < 1:
            raise ConfigError("context and batch must be >= 1")
        kv_policy(self.kv, budget=self.kv_budget)  # validates the policy name and budget

    @classmethod
    def parse(cls, memory: str, context: str | int = "4k", precision: str = "bf16", kv: str = "full",
              kv_budget: int | None = None, batch: int = 1, overhead: str | None = None) -> FitConfig:
        dev = DEVICES.get(str(memory).lower())
        if kv in ("streaming", "h2o") and kv_budget is None:
            kv_budget = 1024
        return cls(
            memory_bytes=dev.usable_bytes if dev else parse_size(memory),
            device=dev.name if dev else "custom",
            context=parse_tokens(context), precision=precision, kv=kv, kv_budget=kv_budget, batch=batch,
            overhead_bytes=RUNTIME_OVERHEAD if overhead is None else parse_size(overhead),
        )


@dataclass
class FitResult:
    model: str
    device: str
    memory_bytes: int
    precision: str
    kv: str
    context: int
    batch: int
    parameters: int
    weights_bytes: int
    kv_bytes: int
    activation_bytes: int
    overhead_bytes: int
    total_bytes: int
    fits: bool
    max_context: int  #: largest context (batch 1) that fits, capped at the model's trained context
    max_batch: int  #: largest batch at ``context`` that fits (0: none)
    model_context: int | None
    kernel: str = "portable"  #: the kernel variant the device runs (avx512, avx2, neon, portable)
    kernel_cpu: str = ""  #: the CPU that choice assumes

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Sizes:
    """What the estimate needs from the architecture."""

    parameters: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int | None

    @classmethod
    def of(cls, info) -> Sizes:
        return cls(info.parameters, info.layers, info.hidden_size, info.intermediate_size or 4 * info.hidden_size,
                   info.attention_heads, info.kv_heads, info.head_dim, info.vocab_size, info.context_length)


def kv_bytes(s: Sizes, precision: str, kv: str, kv_budget: int | None, context: int, batch: int = 1) -> int:
    import torch

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    shape = KVShape(s.layers, s.kv_heads, s.heads, s.head_dim, dtype)
    pol = kv_policy(kv, budget=kv_budget)
    return batch * pol.bytes_for(shape, pol.capacity(context))


def activation_bytes(s: Sizes, precision: str, context: int, batch: int = 1) -> int:
    """Transient peak of one forward: a prefill chunk (or one token per sequence) through one layer, plus logits."""
    elem = 4 if precision == "fp32" else 2
    chunk = max(min(PREFILL_CHUNK, context), batch)
    per_token = 2 * s.hidden + (s.heads + 2 * s.kv_heads) * s.head_dim + 3 * s.intermediate + s.heads * s.head_dim
    expanded_kv = 2 * s.heads * context * s.head_dim  # GQA keys/values repeated to every query head, one layer
    logits = 4 * s.vocab * batch
    return elem * (chunk * per_token + expanded_kv) + logits


def estimate(s: Sizes, cfg: FitConfig, context: int | None = None, batch: int | None = None) -> tuple[int, int, int, int]:
    """(weights, kv, activations, total) bytes."""
    context = cfg.context if context is None else context
    batch = cfg.batch if batch is None else batch
    w = int(s.parameters * BITS[cfg.precision] / 8)
    k = kv_bytes(s, cfg.precision, cfg.kv, cfg.kv_budget, context, batch)
    a = activation_bytes(s, cfg.precision, context, batch)
    return w, k, a, w + k + a + cfg.overhead_bytes


def _largest(ok, hi: int) -> int:
    """Largest n in [0, hi] with ok(n) (ok monotone decreasing)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def device_kernel(device: str) -> tuple[str, str]:
    """(kernel variant, CPU) of a preset; for a custom budget, the variant this machine would run
    (:func:`slmkit.runtime.q4kernel.choose`: its CPU flags, or ``$SLMKIT_KERNEL``)."""
    if device in DEVICES:
        return DEVICES[device].kernel, DEVICES[device].cpu
    from slmkit.runtime import q4kernel

    return q4kernel.choose(), "this machine"


def plan_sizes(s: Sizes, cfg: FitConfig, model: str = "?") -> FitResult:
    w, k, a, total = estimate(s, cfg)
    fits = total <= cfg.memory_bytes
    cap = s.context or 1 << 20
    max_ctx = _largest(lambda c: c >= 1 and estimate(s, cfg, context=c, batch=1)[3] <= cfg.memory_bytes, cap)
    max_batch = _largest(lambda b: b >= 1 and estimate(s, cfg, batch=b)[3] <= cfg.memory_bytes, 65536)
    return FitResult(model, cfg.device, cfg.memory_bytes, cfg.precision, cfg.kv, cfg.context, cfg.batch, s.parameters,
                     w, k, a, cfg.overhead_bytes, total, fits, max_ctx, max_batch, s.context, *device_kernel(cfg.device))


def plan(model: str, cfg: FitConfig) -> FitResult:
    """The fit of ``model`` (any spec :func:`slmkit.models.load_config` takes) under ``cfg``."""
    from slmkit.models import describe, load_config

    return plan_sizes(Sizes.of(describe(load_config(model))), cfg, model)
