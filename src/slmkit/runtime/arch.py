"""Architecture descriptions for the fast path: what a decoder family computes, read from its transformers config.

The fast path (:mod:`slmkit.runtime.generate`) runs one decoder loop for every family it knows; what
differs between families is data, an :class:`ArchSpec`, not a branch per model type. A family is one
function from a transformers config to an :class:`ArchSpec`, registered in :data:`ARCHS` under its
``model_type``; adding a family is a function and a registration beside these (no dispatcher changes).

What the fields mean, with the transformers code they follow:

* RMSNorm (Zhang & Sennrich 2019) scales by ``w`` (Llama) or by ``1 + w`` with the product taken in
  fp32 before rounding (``Gemma3RMSNorm``: ``norm_offset=1``);
* the MLP is GLU-gated (Shazeer 2020, arXiv:2002.05202): ``act(gate) * up`` with SiLU (SwiGLU) or
  GELU's tanh approximation (GeGLU, Gemma);
* Qwen2 has q/k/v biases; Qwen3 and Gemma 3 RMS-normalise each query and key head before RoPE;
* Gemma 2/3 wrap both sub-blocks in norms on both sides ("sandwich": ``post_attention_layernorm`` on
  the attention output, ``pre_feedforward_layernorm``/``post_feedforward_layernorm`` around the MLP),
  scale embeddings by ``sqrt(hidden)``, scale queries by ``query_pre_attn_scalar ** -0.5``;
* Gemma 2 soft-caps attention scores and final logits, ``c * tanh(x / c)`` (Gemma 2 report,
  arXiv:2408.00118, Sec. 2);
* sliding-window layers (Mistral, Gemma 2/3, Qwen2 when enabled) let the token at position ``p``
  see keys at positions ``> p - window`` (transformers' ``sliding_window_overlay``);
* Gemma 3 runs its sliding layers with a local RoPE base (``rope_parameters["sliding_attention"]``)
  and its full layers with the global one: the rotary module is called per layer type;
* Phi-3 stores q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` and may rotate only a
  fraction of each head (``partial_rotary_factor``).

:func:`describe` returns ``None`` (and logs one warning line naming the model type) for a family not
registered here: callers then run transformers' own forward, which is slower but correct.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from slmkit.registry import Registry

log = logging.getLogger(__name__)

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class ArchSpec:
    """What one decoder family computes (see the module docstring for each field's source)."""

    family: str  #: the config's model_type
    layer_types: tuple[str, ...]  #: per layer: "full_attention" or "sliding_attention"
    act: str = "silu"  #: GLU activation: "silu" or "gelu_tanh"
    norm_offset: float = 0.0  #: RMSNorm multiplies by (norm_offset + w); Gemma: 1, product in fp32
    qkv_bias: bool = False  #: q/k/v projections have biases (Qwen2)
    o_bias: bool = False  #: the output projection has a bias
    mlp_bias: bool = False  #: gate/up/down have biases
    qk_norm: bool = False  #: per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool = False  #: post-attention, pre- and post-feedforward norms (Gemma 2/3)
    rope_theta: float = 10000.0  #: RoPE base of full-attention layers
    rope_local_theta: float | None = None  #: RoPE base of sliding layers when it differs (Gemma 3)
    rope_per_layer_type: bool = False  #: the rotary module takes the layer type (Gemma 3)
    rotary_fraction: float = 1.0  #: share of each head's dims that RoPE rotates (Phi-3 partial_rotary_factor)
    sliding_window: int | None = None  #: keys a sliding layer's token sees (itself included); None: no sliding layers
    attn_scale: float | None = None  #: query scaling; None: head_dim ** -0.5
    attn_softcap: float | None = None  #: c in c * tanh(scores / c) (Gemma 2)
    final_softcap: float | None = None  #: c in c * tanh(logits / c) (Gemma 2)
    embed_scale: float = 1.0  #: embeddings are multiplied by this (Gemma: sqrt(hidden))
    tied_head: bool = False  #: the output head is the embedding table
    fused_qkv: bool = False  #: one qkv_proj module (Phi-3)
    fused_gate_up: bool = False  #: one gate_up_proj module (Phi-3)

    def __post_init__(self):
        if self.act not in ("silu", "gelu_tanh"):
            raise ValueError(f"ArchSpec.act must be silu or gelu_tanh, got {self.act!r}")
        bad = [t for t in self.layer_types if t not in (FULL, SLIDING)]
        if bad:
            raise ValueError(f"ArchSpec.layer_types: unknown layer type {bad[0]!r}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("ArchSpec: sliding layers need sliding_window >= 1")
        if not 0 < self.rotary_fraction <= 1:
            raise ValueError(f"ArchSpec.rotary_fraction must be in (0, 1], got {self.rotary_fraction}")

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: full attention)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None


#: model_type -> ``describe(config) -> ArchSpec``
ARCHS: Registry[Callable[[object], ArchSpec]] = Registry("architecture")

#: transformers activation names -> ArchSpec.act
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


class Unsupported(Exception):
    """A registered family whose config asks for something the fast path does not compute (the message says what)."""


def text_config(config):
    """The decoder's config (a multimodal config's text part)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _act(c, key: str = "hidden_act") -> str:
    name = getattr(c, key, None)
    if name not in _ACTS:
        raise Unsupported(f"activation {name!r}")
    return _ACTS[name]


def _theta(c, layer_type: str | None = None) -> float:
    rp = getattr(c, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    return float(rp.get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def _layer_types(c, window: int | None) -> tuple[str, ...]:
    """The config's layer_types; without them, every layer slides when ``window`` is set (Mistral, Phi-3)."""
    types = getattr(c, "layer_types", None)
    if types:
        return tuple(types)
    return (SLIDING if window else FULL,) * c.num_hidden_layers


def _tied(c) -> bool:
    return bool(getattr(c, "tie_word_embeddings", False))


@ARCHS.register("llama")
def llama(c) -> ArchSpec:
    return ArchSpec("llama", _layer_types(c, None), act=_act(c), qkv_bias=bool(getattr(c, "attention_bias", False)),
                    o_bias=bool(getattr(c, "attention_bias", False)), mlp_bias=bool(getattr(c, "mlp_bias", False)),
                    rope_theta=_theta(c), tied_head=_tied(c))


@ARCHS.register("mistral")
def mistral(c) -> ArchSpec:
    window = getattr(c, "sliding_window", None)  # transformers' Mistral: every layer slides when set
    return ArchSpec("mistral", _layer_types(c, window), act=_act(c), rope_theta=_theta(c), sliding_window=window,
                    tied_head=_tied(c))


@ARCHS.register("qwen2")
def qwen2(c) -> ArchSpec:
    window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", False) else None
    types = _layer_types(c, None)
    return ArchSpec("qwen2", types, act=_act(c), qkv_bias=True, rope_theta=_theta(c),
                    sliding_window=window if SLIDING in types else None, tied_head=_tied(c))


@ARCHS.register("qwen3")
def qwen3(c) -> ArchSpec:
    window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", False) else None
    types = _layer_types(c, None)
    bias = bool(getattr(c, "attention_bias", False))
    return ArchSpec("qwen3", types, act=_act(c), qkv_bias=bias, o_bias=bias, qk_norm=True, rope_theta=_theta(c),
                    sliding_window=window if SLIDING in types else None, tied_head=_tied(c))


def _gemma(c, family: str, qk_norm: bool) -> dict:
    bias = bool(getattr(c, "attention_bias", False))
    return dict(family=family, layer_types=_layer_types(c, None), act=_act(c, "hidden_activation"), norm_offset=1.0,
                qkv_bias=bias, o_bias=bias, qk_norm=qk_norm, sandwich_norms=True, sliding_window=c.sliding_window,
                attn_scale=float(c.query_pre_attn_scalar) ** -0.5, embed_scale=math.sqrt(c.hidden_size), tied_head=_tied(c))


@ARCHS.register("gemma2")
def gemma2(c) -> ArchSpec:
    return ArchSpec(**_gemma(c, "gemma2", qk_norm=False), rope_theta=_theta(c),
                    attn_softcap=getattr(c, "attn_logit_softcapping", None),
                    final_softcap=getattr(c, "final_logit_softcapping", None))


@ARCHS.register("gemma3_text", "gemma3")
def gemma3(c) -> ArchSpec:
    if getattr(c, "use_bidirectional_attention", False):
        raise Unsupported("use_bidirectional_attention (an encoder, not a causal decoder)")
    return ArchSpec(**_gemma(c, "gemma3_text", qk_norm=True), rope_theta=_theta(c, FULL),
                    rope_local_theta=_theta(c, SLIDING), rope_per_layer_type=True,
                    attn_softcap=getattr(c, "attn_logit_softcapping", None),
                    final_softcap=getattr(c, "final_logit_softcapping", None))


@ARCHS.register("phi3")
def phi3(c) -> ArchSpec:
    rp = getattr(c, "rope_parameters", None) or {}
    window = getattr(c, "sliding_window", None)
    return ArchSpec("phi3", _layer_types(c, window), act=_act(c), rope_theta=_theta(c), sliding_window=window,
                    rotary_fraction=float(rp.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))),
                    fused_qkv=True, fused_gate_up=True, tied_head=_tied(c))


def describe(config, warn: bool = True) -> ArchSpec | None:
    """The :class:`ArchSpec` of a transformers config (or a model's), or ``None`` when the fast path cannot run it.

    ``None`` comes with one warning line naming the model type and what is missing (with ``warn``):
    the caller then runs transformers' own forward.
    """
    c = text_config(getattr(config, "config", config))
    mt = getattr(c, "model_type", None)
    if mt not in ARCHS:
        if warn:
            log.warning("the fast path has no description of architecture %r (it knows %s): running transformers' forward",
                        mt, ", ".join(ARCHS.names()))
        return None
    try:
        return ARCHS.get(mt)(c)
    except (Unsupported, AttributeError, ValueError) as err:
        if warn:
            log.warning("the fast path cannot run this %r model (%s): running transformers' forward", mt, err)
        return None


def families() -> list[str]:
    """The model types the fast path describes."""
    return ARCHS.names()
