"""Fast CPU generation for llama-architecture models: the gpt-fast recipe on a CPU.

gpt-fast (PyTorch Labs, 2023) showed that a plain-PyTorch decoder with a static
KV cache, low-precision weights and ``torch.compile`` gets close to the memory
bandwidth bound. Here the same ideas run on CPU:

* the model's weights are pulled out of the transformers module once into a flat
  :class:`FastModel` (q/k/v and gate/up fused into one matmul each when the weights are
  converted or quantised; shared with the transformers model, not copied, when they are not);
* the KV cache is a pre-allocated buffer owned by a policy from
  :mod:`slmkit.runtime.kvcache` (full, int8/int4, streaming, H2O);
* ``dtype="bf16"`` runs in bfloat16 (AMX/AVX512-BF16 kernels where the CPU has them);
* ``weights="int8"`` stores every linear weight (and the tied head/embedding) as
  int8 with one scale per output channel and multiplies with
  ``torch._weight_int8pack_mm`` (weight-only quantisation: activations stay bf16);
  ``weights="int4"`` packs groups of 32 at 4 bits; on CPUs with AVX512-VNNI the matmuls run in
  slmkit's own kernel (:mod:`slmkit.runtime.q4kernel`: 4-bit weights, activations rounded to int8
  per 32) and a decode step (one new token for each of one or more sequences with the full
  cache) runs through every layer in one C call (no per-op dispatch); elsewhere
  ``torch._weight_int4pack_mm_for_cpu``;
* a GGUF file's own quantised blocks (Q4_0 ... Q6_K, :mod:`slmkit.runtime.ggmlkernel`) run as
  :class:`GGUFQ` weights, built by :func:`slmkit.runtime.gguffast.build_gguf`, through the same
  fused decode step;
* ``compile=True`` compiles the work around attention of a one-token decode step
  (norms, matmuls, RoPE, SwiGLU, residuals) with ``torch.compile``: one graph for all layers,
  weights passed as arguments (optional, slow to start: measured in ``bench/runtime.py``).

Decoding is a set of plain functions over the model: :func:`forward` takes a list of
segments (token ids + that sequence's cache), so one call serves a single prompt
(:func:`prefill`, :func:`decode_one_token`) or a continuous batch of several
sequences at different positions (the server). The matmuls run over all tokens
of all segments at once; attention runs per segment against its own cache.

In fp32 with the full cache, greedy output equals ``model.generate`` token for token.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from slmkit.errors import ConfigError, UnsupportedModelError
from slmkit.runtime import ggmlkernel, q4kernel
from slmkit.runtime.kvcache import FullCache, KVShape, kv_policy

log = logging.getLogger(__name__)

SUPPORTED = ("llama",)


@dataclass(frozen=True)
class FastConfig:
    """Knobs of the fast path."""

    dtype: str = "fp32"  #: compute dtype: "fp32" or "bf16"
    weights: str = "native"  #: "native" (the compute dtype), "int8" (per-channel), "int4" (groups of 32), or "gguf" (a GGUF file's own blocks: build_gguf); all but native compute in bf16
    compile: bool = False  #: torch.compile the decode step's per-layer work (slow to start; see bench/runtime.py)
    kernel: str = "auto"  #: int4 matmuls: "auto" (slmkit's q4 kernel where it builds and compile is off, else torch's), "slmkit" or "torch"

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"fast path dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.weights not in ("native", "int8", "int4", "gguf"):
            raise ConfigError(f"fast path weights must be native, int8, int4 or gguf, got {self.weights!r}")
        if self.kernel not in ("auto", "slmkit", "torch"):
            raise ConfigError(f"fast path kernel must be auto, slmkit or torch, got {self.kernel!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if (self.dtype == "bf16" or self.weights != "native") else torch.float32


# ---------------------------------------------------------------------------- weights


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

    def __call__(self, x):
        return apply_linear(self.spec(), x)

    def spec(self) -> tuple:
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

    def segments(self) -> list[tuple]:
        """(kind, type, rows, p0, p1, p2) for the fused decode step (kind 1: slmkit's q4 layout)."""
        return [(1, 0, self.q.shape[0], self.q.data_ptr(), self.s.data_ptr(), self.m.data_ptr())]

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

    def segments(self) -> list[tuple]:
        """(kind, type, rows, p0, p1, p2) for the fused decode step (kind 2: GGUF blocks)."""
        return [(2, self.qtype, self.q.shape[0], self.q.data_ptr(), 0, 0)]

    def nbytes(self) -> int:
        return self.q.numel() + (0 if self.b is None else self.b.numel() * self.b.element_size())


@dataclass
class Layer:
    attn_norm: torch.Tensor  # (D,)
    qkv: Dense  # D -> (H + 2 Hk) * hd
    o: Dense  # H * hd -> D
    mlp_norm: torch.Tensor
    gate_up: Dense  # D -> 2 F
    down: Dense  # F -> D


@dataclass
class FastModel:
    """A llama-architecture decoder as flat tensors (built by :func:`build`)."""

    cfg: FastConfig
    layers: list[Layer]
    embed: torch.Tensor | None  # (V, D) at the compute dtype; None when it shares the int8 head
    norm: torch.Tensor
    head: Dense
    rotary: torch.nn.Module  # transformers' rotary embedding (handles every rope_scaling variant)
    act: Callable
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    vocab: int
    max_positions: int
    eos: tuple[int, ...] = ()
    blocks: dict = field(default_factory=dict)  # compiled decode-step functions ("pre", "post") when cfg.compile
    specs: list = field(default_factory=list)  # per layer: the .spec() of qkv, o, gate_up, down
    fused: torch.Tensor | None = None  # kernel library: per-layer descriptors (norms, matrices) for the one-call decode step
    ffn: int = 0  # intermediate size (the fused step's F)
    fused_head: torch.Tensor | None = None  # the output head's descriptor when the fused step also runs norm + head (GGUF)
    rope_cache: tuple = ()  # (cos, sin) fp32 (P, hd) for positions 0..P-1, grown on demand (fused step)

    def rope_at(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin (hd,) of one position, from transformers' rotary module (every rope_scaling variant)."""
        if not self.rope_cache or pos >= self.rope_cache[0].shape[0]:
            n = min(self.max_positions, max(1024, 2 * (pos + 1)))
            p = torch.arange(n)[None]
            cos, sin = self.rotary(torch.zeros(1, 1, dtype=torch.float32), p)
            self.rope_cache = (cos[0].float().contiguous(), sin[0].float().contiguous())
        return self.rope_cache[0][pos], self.rope_cache[1][pos]

    @property
    def dtype(self) -> torch.dtype:
        return self.cfg.torch_dtype

    def kv_shape(self) -> KVShape:
        return KVShape(len(self.layers), self.kv_heads, self.heads, self.head_dim, self.dtype)

    def new_cache(self, policy="full", context: int | None = None, budget: int | None = None):
        """A cache for one sequence; ``policy`` is a name or a config from :mod:`slmkit.runtime.kvcache`."""
        cfg = kv_policy(policy, budget=budget) if isinstance(policy, str) else policy
        return cfg.make(self.kv_shape(), context or self.max_positions)

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights read to decode one token (every matmul weight, the head, the norms)."""
        total = self.head.nbytes() + self.norm.numel() * self.norm.element_size()
        for ly in self.layers:
            total += sum(m.nbytes() for m in (ly.qkv, ly.o, ly.gate_up, ly.down))
            total += (ly.attn_norm.numel() + ly.mlp_norm.numel()) * ly.attn_norm.element_size()
        return total

    def nbytes(self) -> int:
        """Bytes of all weights held (embedding table included)."""
        if self.embed is None:
            emb = 0
        elif isinstance(self.embed, (Int8, GGUFQ)):
            emb = 0 if self.embed is self.head else self.embed.nbytes()
        else:
            emb = 0 if self.embed.data_ptr() == self.head.w.data_ptr() else self.embed.numel() * self.embed.element_size()
        return self.weight_bytes_per_token() + emb


def supports(model) -> bool:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "model_type", None) in SUPPORTED and not getattr(cfg, "mlp_bias", False)


#: ``weights(hf_name, module) -> Dense``: where a custom builder takes each matrix from
#: (hf_name like "model.layers.0.self_attn.q_proj", "lm_head", "model.embed_tokens")
WeightSource = Callable[[str, torch.nn.Module], Dense]


def build(model, cfg: FastConfig = FastConfig(), weights: WeightSource | None = None) -> FastModel:
    """Pull the weights out of a transformers llama model (shared, not copied, in fp32).

    ``weights`` (used by :func:`slmkit.runtime.gguffast.build_gguf`) supplies every matrix, the
    output head and the embedding table instead (the model still gives config, norms and rotary);
    q/k/v and gate/up then run as :class:`Concat` of the parts it returns.
    """
    if (cfg.weights == "gguf") != (weights is not None):
        raise ConfigError("weights='gguf' runs a GGUF file's own blocks: build it with slmkit.runtime.gguffast.build_gguf(path)")
    if not supports(model):
        mt = getattr(model.config, "model_type", "?")
        raise UnsupportedModelError(
            f"the fast path supports llama-architecture models without MLP bias, not {mt!r}",
            "run without --fast (model.generate works for every architecture)",
        )
    from transformers.activations import ACT2FN

    c = model.config
    dtype = cfg.torch_dtype
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads

    # slmkit's q4 kernel is a ctypes call, which torch.compile cannot trace: compile=True keeps torch's kernel
    use_q4 = cfg.weights == "int4" and cfg.kernel != "torch" and not cfg.compile and q4kernel.load() is not None
    if cfg.weights == "int4" and cfg.kernel == "slmkit" and not use_q4:
        why = "compile=True needs torch's kernel" if cfg.compile else q4kernel.why_unavailable()
        raise ConfigError(f"slmkit's q4 kernel is unavailable: {why}", "use kernel='auto' or 'torch'")

    def lin(w, b=None):
        if use_q4 and w.shape[1] % 64 == 0:
            return Q4(w.detach(), None if b is None else b.detach(), dtype)
        if cfg.weights == "int4" and w.shape[0] % 16 == 0 and w.shape[1] % 32 == 0:  # the packing kernel's constraints
            return Int4(w.detach(), None if b is None else b.detach(), dtype)
        if cfg.weights in ("int8", "int4"):
            return Int8(w.detach(), None if b is None else b.detach(), dtype)
        return Dense(w.detach().to(dtype), None if b is None else b.detach().to(dtype))

    def cat_bias(*mods):
        if all(m.bias is None for m in mods):
            return None
        return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods])

    # Fuse q/k/v and gate/up into one matmul each when new tensors are made anyway (dtype change or
    # quantisation); when the weights can be shared with the transformers model, share them instead
    # (no second copy of the model in memory) and run the parts one after the other.
    share = cfg.weights == "native" and model.model.layers[0].mlp.down_proj.weight.dtype == dtype

    def one(name, mod):
        return weights(name, mod) if weights is not None else lin(mod.weight, mod.bias)

    def fused(mods, names=()):
        if weights is not None:
            return Concat([weights(n, m) for n, m in zip(names, mods)])
        if share:
            return Concat([lin(m.weight, m.bias) for m in mods])
        return lin(torch.cat([m.weight for m in mods]), cat_bias(*mods))

    layers = []
    with torch.no_grad():
        for i, ly in enumerate(model.model.layers):
            a, m = ly.self_attn, ly.mlp
            pre = f"model.layers.{i}."
            layers.append(
                Layer(
                    attn_norm=ly.input_layernorm.weight.detach().to(dtype),
                    qkv=fused([a.q_proj, a.k_proj, a.v_proj], [pre + f"self_attn.{x}_proj" for x in "qkv"]),
                    o=one(pre + "self_attn.o_proj", a.o_proj),
                    mlp_norm=ly.post_attention_layernorm.weight.detach().to(dtype),
                    gate_up=fused([m.gate_proj, m.up_proj], [pre + "mlp.gate_proj", pre + "mlp.up_proj"]),
                    down=one(pre + "mlp.down_proj", m.down_proj),
                )
            )
        emb_w = model.get_input_embeddings().weight.detach()
        head_w = model.get_output_embeddings().weight.detach()
        tied = emb_w.data_ptr() == head_w.data_ptr()
        head = lin(head_w) if weights is None else weights("lm_head", model.get_output_embeddings())
        if weights is not None:
            embed = weights("model.embed_tokens", model.get_input_embeddings())
            embed = embed.w if type(embed) is Dense else embed  # a dense table is indexed directly
        elif cfg.weights == "int8" and tied:
            embed = None  # look rows up in the int8 head
        elif cfg.weights == "int4":
            embed = Int8(emb_w, None, dtype)  # rows are looked up from an int8 copy (int4 packing is for matmuls)
        elif tied and cfg.weights == "native":
            embed = head.w
        else:
            embed = emb_w.to(dtype)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    fm = FastModel(
        cfg=cfg, layers=layers, embed=embed, norm=model.model.norm.weight.detach().to(dtype), head=head,
        rotary=model.model.rotary_emb, act=ACT2FN[c.hidden_act], heads=heads, kv_heads=kv, head_dim=head_dim,
        eps=c.rms_norm_eps, vocab=c.vocab_size, max_positions=c.max_position_embeddings, eos=eos,
        ffn=c.intermediate_size,
    )
    fm.specs = [(ly.qkv.spec(), ly.o.spec(), ly.gate_up.spec(), ly.down.spec()) for ly in layers]
    if (use_q4 or weights is not None) and not cfg.compile and c.hidden_act == "silu":
        fm.fused = _fused_table(fm)
        head_seg = _segments(fm.head) if weights is not None and fm.fused is not None else None
        if head_seg is not None and len(head_seg) == 1:  # the q4 path keeps its head in torch (its logits unchanged)
            fm.fused_head = torch.tensor(head_seg[0], dtype=torch.int64)
    if cfg.compile:
        # One graph each for the work before and after attention of a one-token decode step, shared by
        # every layer (weights are arguments, not constants); prefill and batches run eagerly.
        fm.blocks["pre"] = torch.compile(_pre_attn, dynamic=False, fullgraph=True)
        fm.blocks["post"] = torch.compile(_post_attn, dynamic=False, fullgraph=True)
    return fm


def _segments(m) -> list[tuple] | None:
    """The fused step's matrix descriptors of a weight (parts of a Concat side by side); None if it has no kernel there."""
    if isinstance(m, Concat):
        parts = [_segments(p) for p in m.parts]
        return None if any(p is None for p in parts) else [s for p in parts for s in p]
    if type(m) in (Q4, GGUFQ) and m.b is None:
        return m.segments()
    return None


def _fused_table(fm: FastModel) -> torch.Tensor | None:
    """Per layer: the two norm weights, then q|k|v (3 slots), o, gate|up (2 slots), down, 6 values each.

    ``None`` when a matrix has no kernel in the fused step (dense or int8 weights, biases), the
    library is unavailable, or a size does not suit it (multiples of 64); forward then runs per op.
    """
    D, hd, F = fm.layers[0].attn_norm.shape[0], fm.head_dim, fm.ffn
    if q4kernel.load() is None or D % 64 or (fm.heads * hd) % 64 or F % 64 or hd % 2 or fm.dtype != torch.bfloat16:
        return None
    rows = []
    for ly in fm.layers:
        segs = [_segments(m) for m in (ly.qkv, ly.o, ly.gate_up, ly.down)]
        if any(s is None for s in segs) or len(segs[0]) > 3 or len(segs[1]) != 1 or len(segs[2]) > 2 or len(segs[3]) != 1:
            return None
        empty = (0, 0, 0, 0, 0, 0)
        slots = segs[0] + [empty] * (3 - len(segs[0])) + segs[1] + segs[2] + [empty] * (2 - len(segs[2])) + segs[3]
        rows.append([ly.attn_norm.data_ptr(), ly.mlp_norm.data_ptr(), *(v for seg in slots for v in seg)])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1)


# ---------------------------------------------------------------------------- the forward pass


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' LlamaRMSNorm computes it (statistics in fp32)."""
    if x.dtype == torch.float32:  # transformers' own op sequence: fp32 greedy output must match generate exactly
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    # bf16: torch's fused fp32 rms_norm, then the same rounding to bf16 and weight product (fewer ops per call)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * w


def apply_linear(spec: tuple, x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, K) through a weight given by its :meth:`Dense.spec`."""
    kind, a, b, bias, group = spec
    if kind == "concat":
        return torch.cat([apply_linear(p, x) for p in a], dim=-1)
    if kind == "dense":
        return F.linear(x, a, bias)  # what nn.Linear computes: fp32 greedy output must match generate
    if kind == "q4":
        y = q4kernel.linear(x, a.q, a.s, a.m)
    elif kind == "gguf":
        y = ggmlkernel.linear(x, a.qtype, a.q, a.k)
    elif kind == "int4":
        y = torch._weight_int4pack_mm_for_cpu(x, a, group, b)
    else:  # int8
        y = torch._weight_int8pack_mm(x, a, b)
    return y if bias is None else y + bias


def _pre_attn(x, norm_w, qkv: tuple, cos, sin_signed, eps: float, H: int, Hk: int, hd: int):
    """Norm, fused q/k/v projection and RoPE of N tokens: q (N, H, hd), k and v (N, Hk, hd).

    RoPE (Su et al. 2021) as transformers applies it, ``x * cos + rotate_half(x) * sin``, on q and k
    heads together: ``rotate_half(x) * sin == roll(x, hd/2) * [-sin_1, sin_2]`` element for element
    (negation is exact), with ``sin_signed`` built once per forward pass instead of a cat per layer.
    """
    qkv = apply_linear(qkv, rms_norm(x, norm_w, eps))  # (N, (H + 2Hk) hd)
    qk, v = qkv.split([(H + Hk) * hd, Hk * hd], dim=-1)
    qk = qk.view(-1, H + Hk, hd)
    qk = qk * cos + qk.roll(hd // 2, -1) * sin_signed
    return qk[:, :H], qk[:, H:], v.view(-1, Hk, hd)


def _post_attn(x, att, o: tuple, mlp_norm, gate_up: tuple, down: tuple, eps: float, act):
    """Attention output projection, residual, then the SwiGLU MLP block with its residual."""
    x = x + apply_linear(o, att)
    g, u = apply_linear(gate_up, rms_norm(x, mlp_norm, eps)).chunk(2, dim=-1)
    return x + apply_linear(down, act(g) * u)


@dataclass
class Segment:
    """New tokens of one sequence and the cache holding its past."""

    ids: torch.Tensor  # (T,) long
    cache: object  # a cache from slmkit.runtime.kvcache (its .seen is the first new position)
    all_logits: bool = False  # return logits for every new token (scoring), not only the last


class HFCache:
    """A transformers KV cache for one sequence (the fallback path; full cache only)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.seen = 0
        self.cache = None  # transformers' DynamicCache, created by the first forward

    def tokens(self) -> int:
        return self.seen

    def advance(self, n: int) -> None:
        self.seen += n

    def nbytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values) if t is not None)


@dataclass
class HFRunner:
    """Any causal LM through its own forward, one sequence at a time: what the server uses when the fast path cannot."""

    model: torch.nn.Module
    max_positions: int
    vocab: int
    eos: tuple[int, ...] = ()

    def new_cache(self, policy="full", context: int | None = None, budget: int | None = None) -> HFCache:
        if policy != "full":
            raise ConfigError(f"KV policy {policy!r} needs the fast path (llama models); this model supports 'full' only")
        return HFCache(context or self.max_positions)


def runner(model, cfg: FastConfig = FastConfig()):
    """The fast path for llama models, else :class:`HFRunner` (same interface for :func:`forward`)."""
    if supports(model):
        return build(model, cfg)
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    ctx = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048
    log.warning("%s is not a llama model: serving through its own forward, one sequence per step", type(model).__name__)
    return HFRunner(model.eval(), ctx, c.vocab_size, eos)


def _hf_forward(fm: HFRunner, segs: Sequence[Segment]) -> list[torch.Tensor]:
    out = []
    for s in segs:
        if s.cache.seen + len(s.ids) > min(fm.max_positions, s.cache.capacity):
            raise ConfigError(f"sequence of {s.cache.seen + len(s.ids)} tokens exceeds the context of {fm.max_positions}")
        res = fm.model(input_ids=s.ids[None], cache=s.cache.cache, use_cache=True)
        s.cache.cache = res.cache
        s.cache.advance(len(s.ids))
        out.append(res.logits[0].float() if s.all_logits else res.logits[0, -1].float())
    return out


@torch.inference_mode()
def forward(fm: FastModel, segs: Sequence[Segment]) -> list[torch.Tensor]:
    """Run the new tokens of every segment through the model; advance each cache.

    Returns, per segment, fp32 logits of shape (T, V) if ``all_logits`` else (V,).
    """
    if isinstance(fm, HFRunner):
        return _hf_forward(fm, segs)
    if fm.fused is not None and all(s.ids.shape[0] == 1 and _fusable(s.cache) for s in segs):
        return _fused_step(fm, segs)
    dt = fm.dtype
    H, Hk, hd = fm.heads, fm.kv_heads, fm.head_dim
    lens = [int(s.ids.shape[0]) for s in segs]
    for s, n in zip(segs, lens):
        if n < 1:
            raise ConfigError("a segment needs at least one token")
        if s.cache.seen + n > fm.max_positions:
            raise ConfigError(f"sequence of {s.cache.seen + n} tokens exceeds the model's context of {fm.max_positions}")
    ids = torch.cat([s.ids for s in segs])  # (N,)
    pos = torch.cat([torch.arange(s.cache.seen, s.cache.seen + n) for s, n in zip(segs, lens)])  # (N,)
    if fm.embed is None:
        x = fm.head.rows(ids, dt)  # (N, D)
    elif isinstance(fm.embed, (Int8, GGUFQ)):
        x = fm.embed.rows(ids, dt)
    else:
        x = fm.embed[ids]
    cos, sin = fm.rotary(x[None], pos[None])  # (1, N, hd)
    cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # (N, 1, hd)
    sin = torch.cat((-sin[..., : hd // 2], sin[..., hd // 2 :]), dim=-1)  # signed for the roll form of RoPE
    one = len(segs) == 1 and lens[0] == 1  # a one-token decode step: the compiled graphs, when built
    pre = fm.blocks.get("pre", _pre_attn) if one else _pre_attn
    post = fm.blocks.get("post", _post_attn) if one else _post_attn
    for li, ly in enumerate(fm.layers):
        qkv_s, o_s, gu_s, down_s = fm.specs[li]
        q, k, v = pre(x, ly.attn_norm, qkv_s, cos, sin, fm.eps, H, Hk, hd)  # (N, heads, hd)
        if one:  # (1, heads, hd) -> (1, heads, 1, hd): the same memory layout for one token, so views
            att = segs[0].cache.attend(li, q.reshape(1, H, 1, hd), k.reshape(1, Hk, 1, hd), v.reshape(1, Hk, 1, hd))
            att = att.reshape(1, H * hd)
        else:
            outs, off = [], 0
            for s, n in zip(segs, lens):
                sl = slice(off, off + n)
                o = s.cache.attend(li, q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None])
                outs.append(o[0].transpose(0, 1).reshape(n, H * hd))  # (1, H, T, hd) -> (T, H hd)
                off += n
            att = torch.cat(outs) if len(outs) > 1 else outs[0]
        x = post(x, att, o_s, ly.mlp_norm, gu_s, down_s, fm.eps, fm.act)
    for s, n in zip(segs, lens):
        s.cache.advance(n)
    # only the rows whose logits are wanted go through the norm and the head
    rows, off = [], 0
    for s, n in zip(segs, lens):
        rows.append(torch.arange(off, off + n) if s.all_logits else torch.tensor([off + n - 1]))
        off += n
    idx = torch.cat(rows)
    logits = fm.head(rms_norm(x[idx], fm.norm, fm.eps)).float()  # (R, V)
    out, off = [], 0
    for s, n in zip(segs, lens):
        m = n if s.all_logits else 1
        out.append(logits[off : off + m] if s.all_logits else logits[off])
        off += m
    return out


def _fusable(cache) -> bool:
    return type(cache) is FullCache and cache.k.dtype == torch.bfloat16 and cache.k.is_contiguous() and cache.v.is_contiguous()


def _fused_step(fm: FastModel, segs: Sequence[Segment]) -> list[torch.Tensor]:
    """One new token of each sequence through every layer in one call of slmkit's kernel library."""
    for s in segs:
        if s.cache.seen + 1 > min(fm.max_positions, s.cache.capacity):
            raise ConfigError(f"context of {s.cache.seen + 1} tokens exceeds the KV cache capacity of {s.cache.capacity}")
    ids = torch.cat([s.ids for s in segs])
    table = fm.embed if isinstance(fm.embed, (Int8, GGUFQ)) else fm.head
    x = (table.rows(ids, torch.float32) if hasattr(table, "rows") else fm.embed[ids].float()).contiguous()
    pos = [s.cache.seen for s in segs]
    rope = [fm.rope_at(p) for p in pos]
    cos = torch.stack([c for c, _ in rope]).contiguous()
    sin = torch.stack([s for _, s in rope]).contiguous()
    kp = torch.tensor([s.cache.k.data_ptr() for s in segs], dtype=torch.int64)
    vp = torch.tensor([s.cache.v.data_ptr() for s in segs], dtype=torch.int64)
    caps = torch.tensor([s.cache.capacity for s in segs], dtype=torch.int32)
    posv = torch.tensor(pos, dtype=torch.int32)
    head = fm.fused_head
    logits = torch.empty(len(segs), int(head[2])) if head is not None else None  # (M, V), written by the call
    rc = q4kernel.require().slmkit_decode_batch(
        x.data_ptr(), len(segs), len(fm.layers), x.shape[1], fm.heads, fm.kv_heads, fm.head_dim, fm.ffn, fm.eps,
        fm.fused.data_ptr(), kp.data_ptr(), vp.data_ptr(), caps.data_ptr(), posv.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        None if head is None else fm.norm.data_ptr(), None if head is None else head.data_ptr(),
        None if head is None else logits.data_ptr(),
    )
    if rc:
        raise RuntimeError(f"fused decode step failed (code {rc})")
    for s in segs:
        s.cache.advance(1)
    if logits is None:  # the head in torch; a dense (bf16) head takes bf16 inputs, as in forward's per-op path
        h = x.to(fm.dtype) if type(fm.head) is Dense else x
        logits = fm.head(rms_norm(h, fm.norm, fm.eps)).float()  # (M, V)
    return [logits[i : i + 1] if s.all_logits else logits[i] for i, s in enumerate(segs)]


def prefill(fm: FastModel, ids: torch.Tensor, cache) -> torch.Tensor:
    """Run a prompt (T,) into ``cache``; logits of its last token (V,)."""
    return forward(fm, [Segment(ids, cache)])[0]


def decode_one_token(fm: FastModel, token: int, cache) -> torch.Tensor:
    """One decoding step; logits (V,) of the next token."""
    return forward(fm, [Segment(torch.tensor([token]), cache)])[0]


# ---------------------------------------------------------------------------- sampling and the loop


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Greedy when temperature is 0; else softmax(logits / T) restricted to the top-p nucleus (Holtzman et al. 2020)."""
    if temperature <= 0:
        return int(logits.max(-1).indices)  # = argmax (first maximum), about 3x faster on CPU
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # smallest prefix whose mass reaches top_p (first token always kept)
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@dataclass
class Step:
    token: int
    logprob: float  # log-probability of ``token`` under the model (temperature 1)


def stream(
    fm: FastModel,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    cache=None,
    prefill_chunk: int = 512,
    mask=None,
) -> Iterator[Step]:
    """Yield generated tokens one by one; stops after EOS (which is yielded) or ``max_new_tokens``.

    ``mask`` (a :class:`slmkit.runtime.constrain.TokenMask`) constrains every token to its grammar; the
    stream also ends once the grammar is complete (nothing but EOS may follow: ``mask.done``). The mask of
    the next token is computed while the model runs the current one (when the mask has a worker pool).
    """
    if cache is None:
        cache = fm.new_cache("full", context=min(fm.max_positions, ids.shape[0] + max_new_tokens))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if max_new_tokens <= 0:
        return
    logits = None
    for b in range(0, ids.shape[0], prefill_chunk):
        logits = prefill(fm, ids[b : b + prefill_chunk], cache)
    for i in range(max_new_tokens):
        if mask is not None:
            mask.apply(logits, max_new_tokens - i)
        tok = sample(logits, temperature, top_p, gen)
        if mask is not None:
            tok = mask.vet(tok, max_new_tokens - i)
        yield Step(tok, float(torch.log_softmax(logits, -1)[tok]))
        if tok in fm.eos or i == max_new_tokens - 1:
            return
        if mask is not None:
            mask.accept(tok)  # starts the next mask on the pool: it overlaps the forward pass below
            if mask.done:
                return
        logits = decode_one_token(fm, tok, cache)


def generate(fm: FastModel, ids: torch.Tensor, max_new_tokens: int, **kw) -> list[int]:
    """Generated token ids (EOS included when hit), like ``model.generate(...)[prompt_len:]``."""
    return [s.token for s in stream(fm, ids, max_new_tokens, **kw)]


def log_softmax_at(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row of logits (T, V)."""
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]


@torch.inference_mode()
def policy_nll(fm: FastModel, ids: torch.Tensor, policy="full", budget: int | None = None, chunk: int = 1) -> tuple[float, int, int]:
    """Mean negative log-likelihood of ``ids`` (T,) read through a KV policy, ``chunk`` tokens per step.

    Returns (nll, tokens scored, peak cache bytes). ``chunk=1`` is exact token-by-token decoding.
    """
    cache = fm.new_cache(policy, context=ids.shape[0], budget=budget)
    total, n, peak = 0.0, 0, 0
    for b in range(0, ids.shape[0] - 1, chunk):
        x = ids[b : min(b + chunk, ids.shape[0] - 1)]
        tgt = ids[b + 1 : b + 1 + x.shape[0]]
        logits = forward(fm, [Segment(x, cache, all_logits=True)])[0]
        total -= float(log_softmax_at(logits, tgt).sum())
        n += x.shape[0]
        peak = max(peak, cache.nbytes())
    return total / max(n, 1), n, peak


def set_threads(n: int | None) -> int:
    """Use ``n`` intra-op threads (None: leave as is); returns the count in use."""
    if n is not None:
        torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def perplexity_of(nll: float) -> float:
    return math.exp(nll)
