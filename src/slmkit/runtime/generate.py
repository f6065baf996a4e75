"""Fast CPU generation for the decoder families :mod:`slmkit.runtime.arch` describes: the gpt-fast recipe on a CPU.

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
  cache) runs through every layer in one C call (no per-op dispatch, :mod:`slmkit.runtime.fusedstep`); elsewhere
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
of all segments at once; attention runs per segment against its own cache. Sampling, the
token loop and scoring through a KV policy are in :mod:`slmkit.runtime.decoding`.

In fp32 with the full cache, greedy output equals ``model.generate`` token for token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from slmkit.errors import ConfigError, UnsupportedModelError
from slmkit.runtime import fusedstep, q4kernel
from slmkit.runtime.arch import ArchSpec, describe, families, text_config
from slmkit.runtime.kvcache import AttnOpts, KVShape, QuantKV, FullKV, kv_policy
from slmkit.runtime.weights import GGUFQ, Q4, Concat, Dense, Int4, Int8, apply_linear

__all__ = ["FastConfig", "FastModel", "Layer", "Segment", "build", "forward", "prefill", "decode_one_token", "supports", "runner",
           "SUPPORTED"]

log = logging.getLogger(__name__)

SUPPORTED = tuple(families())  #: model types the fast path describes (slmkit.runtime.arch.ARCHS)


@dataclass(frozen=True)
class FastConfig:
    """Knobs of the fast path."""

    dtype: str = "fp32"  #: compute dtype: "fp32" or "bf16"
    weights: str = "native"  #: "native" (the compute dtype), "int8" (per-channel), "int4" (groups of 32), "gguf" (a GGUF file's own blocks: build_gguf; these compute in bf16), or "gguf-f32" (the file's own blocks in full precision: fp32, the dequantised model's numbers)
    compile: bool = False  #: torch.compile the decode step's per-layer work (slow to start; see bench/runtime.py)
    kernel: str = "auto"  #: int4 matmuls: "auto" (slmkit's q4 kernel where it builds and compile is off, else torch's), "slmkit" or "torch"

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"fast path dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.weights not in ("native", "int8", "int4", "gguf", "gguf-f32"):
            raise ConfigError(f"fast path weights must be native, int8, int4, gguf or gguf-f32, got {self.weights!r}")
        if self.weights == "gguf-f32" and self.dtype != "fp32":
            raise ConfigError("weights='gguf-f32' computes in fp32 (dtype='fp32'); weights='gguf' runs the blocks in bf16")
        if self.kernel not in ("auto", "slmkit", "torch"):
            raise ConfigError(f"fast path kernel must be auto, slmkit or torch, got {self.kernel!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        full = self.weights in ("native", "gguf-f32")
        return torch.bfloat16 if (self.dtype == "bf16" or not full) else torch.float32


@dataclass
class Layer:
    """One decoder layer's weights. Norm weights are the effective scale (``offset + w``, :func:`norm_weight`)."""

    attn_norm: torch.Tensor  # (D,)
    qkv: Dense  # D -> (H + 2 Hk) * hd
    o: Dense  # H * hd -> D
    mlp_norm: torch.Tensor
    gate_up: Dense  # D -> 2 F
    down: Dense  # F -> D
    q_norm: torch.Tensor | None = None  # (hd,) per-head RMSNorm of q before RoPE (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # (D,) on the attention output before the residual (Gemma 2/3)
    post_mlp_norm: torch.Tensor | None = None  # (D,) on the MLP output before the residual (Gemma 2/3)
    attn: AttnOpts | None = None  # scale / soft-cap / sliding window of this layer's attention; None: plain causal
    rope_key: str | None = None  # the rotary module's layer type (Gemma 3's local and global RoPE)

    def norms(self) -> list[torch.Tensor]:
        return [t for t in (self.attn_norm, self.mlp_norm, self.q_norm, self.k_norm, self.post_attn_norm, self.post_mlp_norm)
                if t is not None]


@dataclass
class FastModel:
    """A decoder as flat tensors (built by :func:`build`), computing what its :class:`~slmkit.runtime.arch.ArchSpec` says."""

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
    rope_cache: dict = field(default_factory=dict)  # rotary key -> (cos, sin) fp32 (P, hd), positions 0..P-1, grown on demand
    arch: ArchSpec | None = None  # what the family computes (norm offset, activation, q/k norms, windows, soft-caps, ...)
    embed_scale: torch.Tensor | None = None  # Gemma: sqrt(hidden) at the embedding's dtype; None: 1
    fused_ext: torch.Tensor | None = None  # the fused step's per-layer architecture extras (decode.c X_*), None: llama
    fused_fp: torch.Tensor | None = None  # its model-wide extras (decode.c F_*)
    fused_norm: torch.Tensor | None = None  # bf16 final norm for a fused head
    fused_keep: list = field(default_factory=list)  # bf16 norm copies the descriptors point into
    rope_keys: tuple = (None,)  # the distinct rotary keys, in the order of the fused step's tables
    exact_sources: list = field(default_factory=list)  # gguf-f32: (data_ptr of the model's weight, its GGUFExact blocks)

    def rope(self, x: torch.Tensor, pos: torch.Tensor, key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, N, rd) of positions ``pos`` (1, N) for rotary layer type ``key`` (Gemma 3; None: the only one)."""
        return self.rotary(x, pos) if key is None else self.rotary(x, pos, key)

    def rope_at(self, pos: int, key: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin (hd,) of one position, from transformers' rotary module (every rope_scaling variant)."""
        c = self.rope_cache.get(key)
        if c is None or pos >= c[0].shape[0]:
            n = min(self.max_positions, max(1024, 2 * (pos + 1)))
            p = torch.arange(n)[None]
            cos, sin = self.rope(torch.zeros(1, 1, dtype=torch.float32), p, key)
            c = self.rope_cache[key] = (cos[0].float().contiguous(), sin[0].float().contiguous())
        return c[0][pos], c[1][pos]

    @property
    def dtype(self) -> torch.dtype:
        return self.cfg.torch_dtype

    def kv_shape(self) -> KVShape:
        return KVShape(len(self.layers), self.kv_heads, self.heads, self.head_dim, self.dtype)

    def new_cache(self, policy="full", context: int | None = None, budget: int | None = None):
        """A cache for one sequence; ``policy`` is a name or a config from :mod:`slmkit.runtime.kvcache`."""
        cfg = kv_policy(policy, budget=budget) if isinstance(policy, str) else policy
        if any(ly.attn is not None for ly in self.layers) and not isinstance(cfg, (FullKV, QuantKV)):
            fam = self.arch.family if self.arch is not None else "this"
            raise ConfigError(f"a {fam} model's attention (sliding window / soft-cap / query scale) runs with the full, "
                              f"int8 or int4 KV cache, not {type(cfg).__name__}", "use --kv full, int8 or int4")
        return cfg.make(self.kv_shape(), context or self.max_positions)

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights read to decode one token (every matmul weight, the head, the norms)."""
        total = self.head.nbytes() + self.norm.numel() * self.norm.element_size()
        for ly in self.layers:
            total += sum(m.nbytes() for m in (ly.qkv, ly.o, ly.gate_up, ly.down))
            total += sum(t.numel() * t.element_size() for t in ly.norms())
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


def supports(model, warn: bool = False) -> bool:
    """Whether the fast path describes ``model``'s architecture (:func:`slmkit.runtime.arch.describe`; ``warn``: say why not)."""
    return describe(model.config, warn=warn) is not None


#: ``weights(hf_name, module) -> Dense``: where a custom builder takes each matrix from
#: (hf_name like "model.layers.0.self_attn.q_proj", "lm_head", "model.embed_tokens")
WeightSource = Callable[[str, torch.nn.Module], Dense]


def norm_weight(norm: torch.nn.Module, arch: ArchSpec, dtype: torch.dtype) -> torch.Tensor:
    """The effective RMSNorm scale: ``w`` at the compute dtype (shared in fp32), or ``offset + w`` in fp32 (Gemma's
    ``Gemma3RMSNorm`` multiplies in fp32 and rounds after; :func:`rms_norm` does the same for an fp32 scale)."""
    w = norm.weight.detach()
    return w.to(dtype) if not arch.norm_offset else (arch.norm_offset + w.float())


def _attn_opts(arch: ArchSpec, layer: int) -> AttnOpts | None:
    opts = AttnOpts(scale=arch.attn_scale, softcap=arch.attn_softcap, window=arch.window(layer))
    return None if opts == AttnOpts() else opts


def build(model, cfg: FastConfig = FastConfig(), weights: WeightSource | None = None) -> FastModel:
    """Pull the weights out of a transformers decoder whose family :mod:`slmkit.runtime.arch` describes
    (shared, not copied, in fp32).

    ``weights`` (used by :func:`slmkit.runtime.gguffast.build_gguf`) supplies every matrix, the
    output head and the embedding table instead (the model still gives config, norms and rotary);
    q/k/v and gate/up then run as :class:`Concat` of the parts it returns.

    The one-call fused decode step (:func:`slmkit.runtime.fusedstep.run`) runs only what
    :func:`slmkit.runtime.fusedstep.covers` accepts; a model with anything else (partial rotary, biases on
    o/gate/up/down) decodes per op, which follows the whole spec.
    """
    arch = _arch_of(model, cfg, weights)
    from transformers.activations import ACT2FN

    c = text_config(model.config)
    dtype = cfg.torch_dtype
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    mk = _Linears(model, cfg, weights)
    with torch.no_grad():
        layers = [_layer(ly, f"model.layers.{i}.", i, arch, dtype, mk.one, mk.fused) for i, ly in enumerate(model.model.layers)]
        head, embed = mk.head_and_embed(model)
    act = getattr(c, "hidden_activation", None) if arch.act == "gelu_tanh" else None
    fm = FastModel(
        cfg=cfg, layers=layers, embed=embed, norm=norm_weight(model.model.norm, arch, dtype), head=head,
        rotary=model.model.rotary_emb, act=ACT2FN[act or c.hidden_act], heads=heads, kv_heads=kv, head_dim=head_dim,
        eps=c.rms_norm_eps, vocab=c.vocab_size, max_positions=c.max_position_embeddings, eos=_eos_of(model),
        ffn=c.intermediate_size, arch=arch,
        # transformers' scaled embedding multiplies by its fp32 scale rounded to the table's dtype
        embed_scale=None if arch.embed_scale == 1.0 else torch.tensor(arch.embed_scale).to(dtype),
    )
    fm.specs = [(ly.qkv.spec(), ly.o.spec(), ly.gate_up.spec(), ly.down.spec()) for ly in layers]
    if (mk.use_q4 or cfg.weights == "gguf") and not cfg.compile and fusedstep.covers(arch):  # not gguf-f32: int8 activations
        fusedstep.attach(fm, with_head=cfg.weights == "gguf")
    if cfg.compile:
        # One graph each for the work before and after attention of a one-token decode step, shared by
        # every layer (weights are arguments, not constants); prefill and batches run eagerly.
        fm.blocks["pre"] = torch.compile(_pre_attn, dynamic=False, fullgraph=True)
        fm.blocks["post"] = torch.compile(_post_attn, dynamic=False, fullgraph=True)
    return fm


def _arch_of(model, cfg: FastConfig, weights: WeightSource | None) -> ArchSpec:
    """The model's :class:`~slmkit.runtime.arch.ArchSpec`; refuses a family the fast path does not describe, and
    ``weights="gguf"`` without a weight source (or a source without it)."""
    if (cfg.weights in ("gguf", "gguf-f32")) != (weights is not None):
        raise ConfigError("weights='gguf' runs a GGUF file's own blocks: build it with slmkit.runtime.gguffast.build_gguf(path)")
    arch = describe(model.config, warn=False)
    if arch is None:
        mt = getattr(model.config, "model_type", "?")
        raise UnsupportedModelError(
            f"the fast path has no description of a {mt!r} model (it runs {', '.join(SUPPORTED)})",
            "run without --fast (model.generate works for every architecture)",
        )
    return arch


def _eos_of(model) -> tuple[int, ...]:
    """The end-of-sequence ids of ``model``'s generation config (none when it has none)."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))


class _Linears:
    """How :func:`build` makes the fast path's linears: at the compute dtype or quantised per ``cfg.weights``
    (shared with the transformers model when nothing changes), or taken from a :data:`WeightSource` (GGUF)."""

    def __init__(self, model, cfg: FastConfig, weights: WeightSource | None):
        self.cfg, self.dtype, self.weights = cfg, cfg.torch_dtype, weights
        # slmkit's q4 kernel is a ctypes call, which torch.compile cannot trace: compile=True keeps torch's kernel
        self.use_q4 = cfg.weights == "int4" and cfg.kernel != "torch" and not cfg.compile and q4kernel.load() is not None
        if cfg.weights == "int4" and cfg.kernel == "slmkit" and not self.use_q4:
            why = "compile=True needs torch's kernel" if cfg.compile else q4kernel.why_unavailable()
            raise ConfigError(f"slmkit's q4 kernel is unavailable: {why}", "use kernel='auto' or 'torch'")
        # Fuse q/k/v and gate/up into one matmul each when new tensors are made anyway (dtype change or
        # quantisation); when the weights can be shared with the transformers model, share them instead
        # (no second copy of the model in memory) and run the parts one after the other.
        self.share = cfg.weights == "native" and model.model.layers[0].mlp.down_proj.weight.dtype == self.dtype

    def lin(self, w, b=None) -> Dense:
        cfg, dtype = self.cfg, self.dtype
        if self.use_q4 and w.shape[1] % 64 == 0:
            return Q4(w.detach(), None if b is None else b.detach(), dtype)
        if cfg.weights == "int4" and w.shape[0] % 16 == 0 and w.shape[1] % 32 == 0:  # the packing kernel's constraints
            return Int4(w.detach(), None if b is None else b.detach(), dtype)
        if cfg.weights in ("int8", "int4"):
            return Int8(w.detach(), None if b is None else b.detach(), dtype)
        return Dense(w.detach().to(dtype), None if b is None else b.detach().to(dtype))

    def one(self, name: str, mod) -> Dense:
        return self.weights(name, mod) if self.weights is not None else self.lin(mod.weight, mod.bias)

    def fused(self, mods, names=()) -> Dense:
        if self.weights is not None:
            return Concat([self.weights(n, m) for n, m in zip(names, mods)])
        if self.share:
            return Concat([self.lin(m.weight, m.bias) for m in mods])
        bias = None
        if any(m.bias is not None for m in mods):
            bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods])
        return self.lin(torch.cat([m.weight for m in mods]), bias)

    def head_and_embed(self, model) -> tuple[Dense, object]:
        """The output head, and the embedding table: a tensor, an int8 or GGUF table with ``rows``, or None to
        look rows up in the int8 head."""
        cfg, weights = self.cfg, self.weights
        emb_w = model.get_input_embeddings().weight.detach()
        head_w = model.get_output_embeddings().weight.detach()
        tied = emb_w.data_ptr() == head_w.data_ptr()
        head = self.lin(head_w) if weights is None else weights("lm_head", model.get_output_embeddings())
        if weights is not None:
            embed = weights("model.embed_tokens", model.get_input_embeddings())
            embed = embed.w if type(embed) is Dense else embed  # a dense table is indexed directly
        elif cfg.weights == "int8" and tied:
            embed = None  # look rows up in the int8 head
        elif cfg.weights == "int4":
            embed = Int8(emb_w, None, self.dtype)  # rows are looked up from an int8 copy (int4 packing is for matmuls)
        elif tied and cfg.weights == "native":
            embed = head.w
        else:
            embed = emb_w.to(self.dtype)
        return head, embed


def _layer(ly, pre: str, i: int, arch: ArchSpec, dtype, one, fused) -> Layer:
    """Layer ``i`` of a transformers decoder (module names per :class:`~slmkit.runtime.arch.ArchSpec`)."""
    a, m = ly.self_attn, ly.mlp
    if arch.fused_qkv:
        qkv = one(pre + "self_attn.qkv_proj", a.qkv_proj)
    else:
        qkv = fused([a.q_proj, a.k_proj, a.v_proj], [pre + f"self_attn.{x}_proj" for x in "qkv"])
    if arch.fused_gate_up:
        gate_up = one(pre + "mlp.gate_up_proj", m.gate_up_proj)
    else:
        gate_up = fused([m.gate_proj, m.up_proj], [pre + "mlp.gate_proj", pre + "mlp.up_proj"])
    nw = lambda mod: norm_weight(mod, arch, dtype)  # noqa: E731
    sandwich = arch.sandwich_norms
    return Layer(
        attn_norm=nw(ly.input_layernorm), qkv=qkv, o=one(pre + "self_attn.o_proj", a.o_proj),
        mlp_norm=nw(ly.pre_feedforward_layernorm if sandwich else ly.post_attention_layernorm),
        gate_up=gate_up, down=one(pre + "mlp.down_proj", m.down_proj),
        q_norm=nw(a.q_norm) if arch.qk_norm else None, k_norm=nw(a.k_norm) if arch.qk_norm else None,
        post_attn_norm=nw(ly.post_attention_layernorm) if sandwich else None,
        post_mlp_norm=nw(ly.post_feedforward_layernorm) if sandwich else None,
        attn=_attn_opts(arch, i), rope_key=arch.layer_types[i] if arch.rope_per_layer_type else None,
    )


# ---------------------------------------------------------------------------- the forward pass


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it (statistics in fp32): LlamaRMSNorm rounds to ``x``'s dtype, then
    multiplies by ``w``; an fp32 ``w`` under bf16 ``x`` (Gemma's ``1 + w``, :func:`norm_weight`) multiplies first."""
    if x.dtype == torch.float32:  # transformers' own op sequence: fp32 greedy output must match generate exactly
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    # bf16: torch's fused fp32 rms_norm, then the same rounding to bf16 and weight product (fewer ops per call)
    if w.dtype == torch.float32:
        return (F.rms_norm(x.float(), (x.shape[-1],), None, eps) * w).to(x.dtype)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * w


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE (Su et al. 2021) as transformers applies it, ``x * cos + rotate_half(x) * sin``, on the first
    ``rd = cos.shape[-1]`` dims of each head (all of them, or Phi-3's partial rotary; the rest pass through):
    ``rotate_half(x) * sin == roll(x, rd/2) * [-sin_1, sin_2]`` element for element (negation is exact)."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + x.roll(rd // 2, -1) * sin_signed
    r = x[..., :rd]
    return torch.cat([r * cos + r.roll(rd // 2, -1) * sin_signed, x[..., rd:]], dim=-1)


def _pre_attn(x, norm_w, qkv: tuple, cos, sin_signed, eps: float, H: int, Hk: int, hd: int, q_norm=None, k_norm=None):
    """Norm, fused q/k/v projection, per-head q/k norms (when given) and RoPE of N tokens: q (N, H, hd), k and v (N, Hk, hd).

    RoPE runs on q and k heads together, with ``sin_signed`` built once per forward pass (:func:`rope`).
    """
    qkv = apply_linear(qkv, rms_norm(x, norm_w, eps))  # (N, (H + 2Hk) hd)
    qk, v = qkv.split([(H + Hk) * hd, Hk * hd], dim=-1)
    qk = qk.view(-1, H + Hk, hd)
    if q_norm is not None:  # Qwen3 / Gemma 3: RMSNorm of every head before RoPE
        qk = torch.cat([rms_norm(qk[:, :H], q_norm, eps), rms_norm(qk[:, H:], k_norm, eps)], dim=1)
    qk = rope(qk, cos, sin_signed)
    return qk[:, :H], qk[:, H:], v.view(-1, Hk, hd)


def _post_attn(x, att, o: tuple, mlp_norm, gate_up: tuple, down: tuple, eps: float, act, post_attn=None, post_mlp=None):
    """Attention output projection, residual, then the GLU MLP block (``act(gate) * up``) with its residual;
    Gemma 2/3 also normalise each block's output before its residual (``post_attn``, ``post_mlp``)."""
    a = apply_linear(o, att)
    x = x + (a if post_attn is None else rms_norm(a, post_attn, eps))
    g, u = apply_linear(gate_up, rms_norm(x, mlp_norm, eps)).chunk(2, dim=-1)
    m = apply_linear(down, act(g) * u)
    return x + (m if post_mlp is None else rms_norm(m, post_mlp, eps))


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
            raise ConfigError(f"KV policy {policy!r} needs the fast path; this model (an architecture it does not describe) supports 'full' only")
        return HFCache(context or self.max_positions)


def runner(model, cfg: FastConfig = FastConfig()):
    """The fast path for the families :mod:`slmkit.runtime.arch` describes, else :class:`HFRunner` (same interface
    for :func:`forward`; :func:`slmkit.runtime.arch.describe` says in one warning line which architecture and why)."""
    if supports(model, warn=True):
        return build(model, cfg)
    c = text_config(model.config)
    ctx = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048
    return HFRunner(model.eval(), ctx, c.vocab_size, _eos_of(model))


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
    if fm.fused is not None and all(s.ids.shape[0] == 1 and fusedstep.fusable(s.cache) for s in segs):
        return _fused_forward(fm, segs)
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
    if fm.embed_scale is not None:
        x = x * fm.embed_scale  # Gemma: sqrt(hidden), at the embedding's dtype
    ropes = {key: _rope_tables(fm, x, pos, key) for key in {ly.rope_key for ly in fm.layers}}
    one = len(segs) == 1 and lens[0] == 1  # a one-token decode step: the compiled graphs, when built
    pre = fm.blocks.get("pre", _pre_attn) if one else _pre_attn
    post = fm.blocks.get("post", _post_attn) if one else _post_attn
    for li, ly in enumerate(fm.layers):
        qkv_s, o_s, gu_s, down_s = fm.specs[li]
        q, k, v = pre(x, ly.attn_norm, qkv_s, *ropes[ly.rope_key], fm.eps, H, Hk, hd, ly.q_norm, ly.k_norm)  # (N, heads, hd)
        extra = () if ly.attn is None else (ly.attn,)  # the layer's scale / soft-cap / window (AttnOpts)
        if one:  # (1, heads, hd) -> (1, heads, 1, hd): the same memory layout for one token, so views
            att = segs[0].cache.attend(li, q.reshape(1, H, 1, hd), k.reshape(1, Hk, 1, hd), v.reshape(1, Hk, 1, hd), *extra)
            att = att.reshape(1, H * hd)
        else:
            outs, off = [], 0
            for s, n in zip(segs, lens):
                sl = slice(off, off + n)
                o = s.cache.attend(li, q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None], *extra)
                outs.append(o[0].transpose(0, 1).reshape(n, H * hd))  # (1, H, T, hd) -> (T, H hd)
                off += n
            att = torch.cat(outs) if len(outs) > 1 else outs[0]
        x = post(x, att, o_s, ly.mlp_norm, gu_s, down_s, fm.eps, fm.act, ly.post_attn_norm, ly.post_mlp_norm)
    for s, n in zip(segs, lens):
        s.cache.advance(n)
    # only the rows whose logits are wanted go through the norm and the head
    rows, off = [], 0
    for s, n in zip(segs, lens):
        rows.append(torch.arange(off, off + n) if s.all_logits else torch.tensor([off + n - 1]))
        off += n
    idx = torch.cat(rows)
    logits = softcap_logits(fm, fm.head(rms_norm(x[idx], fm.norm, fm.eps)).float())  # (R, V)
    out, off = [], 0
    for s, n in zip(segs, lens):
        m = n if s.all_logits else 1
        out.append(logits[off : off + m] if s.all_logits else logits[off])
        off += m
    return out


def _rope_tables(fm: FastModel, x: torch.Tensor, pos: torch.Tensor, key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (N, 1, rd) of positions ``pos`` (N,) for the rotary layer type ``key`` (see :func:`rope`)."""
    cos, sin = fm.rope(x[None], pos[None], key)  # (1, N, rd)
    cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # (N, 1, rd)
    h = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :h], sin[..., h:]), dim=-1)  # signed for the roll form of RoPE


def softcap_logits(fm: FastModel, logits: torch.Tensor) -> torch.Tensor:
    """Gemma 2's final soft-cap ``c * tanh(logits / c)`` (transformers' op order), when the spec has one."""
    cap = fm.arch.final_softcap if fm.arch is not None else None
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _fused_forward(fm: FastModel, segs: Sequence[Segment]) -> list[torch.Tensor]:
    """A decode step through :func:`slmkit.runtime.fusedstep.run`; the final norm and head in torch unless it ran them."""
    x, logits = fusedstep.run(fm, segs)
    if logits is None:  # the head in torch; a dense (bf16) head takes bf16 inputs, as in forward's per-op path
        h = x.to(fm.dtype) if type(fm.head) is Dense else x
        logits = fm.head(rms_norm(h, fm.norm, fm.eps)).float()  # (M, V)
    logits = softcap_logits(fm, logits)
    return [logits[i : i + 1] if s.all_logits else logits[i] for i, s in enumerate(segs)]


def prefill(fm: FastModel, ids: torch.Tensor, cache) -> torch.Tensor:
    """Run a prompt (T,) into ``cache``; logits of its last token (V,)."""
    return forward(fm, [Segment(ids, cache)])[0]


def decode_one_token(fm: FastModel, token: int, cache) -> torch.Tensor:
    """One decoding step; logits (V,) of the next token."""
    return forward(fm, [Segment(torch.tensor([token]), cache)])[0]
