"""Per-tensor GGML types of llama.cpp's named quantisation mixes (Q4_K_M and friends).

``llama-quantize model.gguf out.gguf Q4_K_M`` does not quantise every matrix
to Q4_K: it picks a type per tensor. This module reproduces that choice for
llama-architecture models so that slmkit can write files whose tensor types
match llama.cpp's type for type. The logic follows ``src/llama-quant.cpp`` of
the llama.cpp pinned by llama-cpp-python 0.3.36:

* ``llama_ftype_get_default_type`` -- the mix's base type (Q4_K for
  Q4_K_S/Q4_K_M, Q3_K for the Q3_K_* mixes, ...).
* ``llama_tensor_get_type`` -- the outer wrapper: tensors that
  ``tensor_allows_quantization`` rejects keep their source type
  (``--leave-output-tensor``), then ``--token-embedding-type`` and
  ``--output-tensor-type`` are returned as given, then ``--tensor-type``
  regex overrides, then (unless ``--pure``) the mix rules, and last the
  shape fallback.
* ``llama_tensor_get_type_impl`` -- the mix rules, by ``tensor_category``:

  - ``output.weight``, and ``token_embd.weight`` when the embeddings are tied
    (no ``output.weight`` in the file, so ``has_tied_embeddings`` stays true):
    the ``--output-tensor-type`` if given, else Q8_0 when the row width is not
    a multiple of the base type's block, else Q6_K unless the base is Q8_0.
  - an untied ``token_embd.weight`` keeps the base type for every mix here.
  - ``attn_v``: Q2_K -> Q4_K if ``n_gqa >= 4`` else Q3_K; Q3_K_M -> Q5_K for
    the first two attn_v tensors, Q4_K after; Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M ->
    Q6_K where ``use_more_bits(i_attention_wv, n_attention_wv)``; Q4_K_S ->
    Q5_K for the first four. On a 70B-typed llama (80 layers with grouped
    KV heads) a Q3_K or Q4_K attn_v becomes Q5_K.
  - ``ffn_down``: Q2_K -> Q3_K; Q3_K_M -> Q5_K below ``n_layer/16`` and Q4_K
    elsewhere; Q3_K_L -> Q5_K; Q4_K_M and Q5_K_M -> Q6_K where
    ``use_more_bits(i_ffn_down, n_layer)``; Q4_K_S -> Q5_K below
    ``n_layer/8``; with an imatrix, Q4_0 -> Q4_1 and Q5_0 -> Q5_1 below
    ``n_layer/8``.
  - ``attn_output``: Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K.
  - ``attn_q``, ``attn_k``, ``ffn_gate``, ``ffn_up``: base type (their rules
    only touch IQ mixes and 8-expert models).

  ``use_more_bits(i, n)`` is ``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` in
  integer arithmetic. ``i_attention_wv`` and ``i_ffn_down`` are counters bumped
  each time the rules see such a tensor; llama.cpp visits tensors ordered by
  block number (``weight_name_comparer``), so for a plain llama they equal the
  layer index.
* ``tensor_type_fallback`` -- when the row width ``ne[0]`` (``in_features``)
  is not a multiple of the chosen type's block, Q2_K and Q3_K become Q4_0,
  Q4_K becomes Q5_0, Q5_K becomes Q5_1, Q6_K becomes Q8_0, the 256-block IQ
  types become IQ4_NL, and a 32-block type stays; if the fallback still does
  not divide the row, F16. SmolLM2-135M's 576-wide rows hit this on every
  matrix except ffn_down (1536 wide). (Older llama.cpp sent Q2_K/Q3_K to
  IQ4_NL; the pinned version sends them to Q4_0.)

IQ types: none of :data:`FTYPES` produces one on its own, but an override can
(e.g. ``output_type="IQ4_XS"`` on a tied model falls back to IQ4_NL). slmkit's
writer has no IQ encoders, so :func:`tensor_types` raises
:class:`~slmkit.errors.UnsupportedModelError` when the result holds an IQ type,
unless ``allow_iq=True`` (for predicting llama.cpp's file only).

Not modelled: other architectures' rules (Falcon, GLM5-next, MoE/expert
tensors, fused QKV), the IQ/TQ/MXFP4/Q2_K_S mixes, ``--prune-layers`` and
multi-file splits. MoE configs and non-llama model types are refused rather
than answered wrongly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import ConfigError, UnsupportedModelError

#: the llama-quantize mixes this module reproduces
FTYPES = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
    "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
)  # fmt: skip
#: llama-quantize's short names for three mixes
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# llama_ftype_get_default_type, restricted to FTYPES
_BASE = {
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
}  # fmt: skip

# tensor_type_fallback's table: target type -> a type with a 32-wide block
_FALLBACK = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}

# per-layer matrices in llama.cpp's GGUF naming, with the HF module they come from
_LAYER_MATS = (
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
)
_LLAMA_MODEL_TYPES = ("llama", "mistral")  # both convert to GGUF arch "llama"


@dataclass(frozen=True)
class _Shape:
    """The hyperparameters llama.cpp's rules read, from a transformers config."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    tied: bool

    @property
    def n_gqa(self) -> int:  # llama_hparams::n_gqa
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:  # llama arch: 80 layers and grouped KV -> LLM_TYPE_70B
        return self.n_layer == 80 and self.n_head != self.n_head_kv


def _shape(config) -> _Shape:
    model_type = getattr(config, "model_type", "llama") or "llama"
    if model_type not in _LLAMA_MODEL_TYPES:
        raise UnsupportedModelError(
            f"llama.cpp mix rules are reproduced for llama-architecture models only, not {model_type!r}",
            "the per-tensor choice differs by architecture; compare against llama-quantize directly",
        )
    if (getattr(config, "num_local_experts", 0) or 0) > 1:
        raise UnsupportedModelError(
            "mixture-of-experts configs are not covered by the mix rules here",
            "use a dense llama-architecture model",
        )
    try:
        n_head = int(config.num_attention_heads)
        n_embd = int(config.hidden_size)
        n_head_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
        head_dim = int(getattr(config, "head_dim", None) or n_embd // n_head)
        return _Shape(
            n_layer=int(config.num_hidden_layers),
            n_embd=n_embd,
            n_ff=int(config.intermediate_size),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_vocab=int(config.vocab_size),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )
    except AttributeError as err:
        raise ConfigError(f"model config lacks a llama hyperparameter: {err}") from err


def _matrices(s: _Shape) -> list[tuple[str, int, int]]:
    """(GGUF name, ne[0], ne[1]) of every 2-D weight, in llama.cpp's visiting order.

    ``weight_name_comparer`` puts tensors outside blocks first (by name), then
    block 0, 1, ... (by name within a block).
    """
    q_out = s.n_head * s.head_dim
    kv_out = s.n_head_kv * s.head_dim
    top = [("token_embd.weight", s.n_embd, s.n_vocab)]
    if not s.tied:
        top.append(("output.weight", s.n_embd, s.n_vocab))
    out = sorted(top)
    for i in range(s.n_layer):
        block = [
            ("attn_q", s.n_embd, q_out),
            ("attn_k", s.n_embd, kv_out),
            ("attn_v", s.n_embd, kv_out),
            ("attn_output", q_out, s.n_embd),
            ("ffn_gate", s.n_embd, s.n_ff),
            ("ffn_up", s.n_embd, s.n_ff),
            ("ffn_down", s.n_ff, s.n_embd),
        ]
        out.extend(sorted((f"blk.{i}.{k}.weight", ne0, ne1) for k, ne0, ne1 in block))
    return out


def _norms(s: _Shape) -> list[tuple[str, int]]:
    names = ["output_norm.weight"]
    for i in range(s.n_layer):
        names += [f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"]
    return [(n, s.n_embd) for n in names]


def _ggml_type(name: str, what: str) -> str:
    import gguf

    key = str(name).upper()
    if key not in gguf.GGMLQuantizationType.__members__:
        raise ConfigError(f"{what}: unknown GGML type {name!r}", "use a name such as Q8_0, Q6_K or F16")
    return key


def _block(type_name: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def _mix(ftype: str) -> str:
    key = str(ftype).upper()
    key = ALIASES.get(key, key)
    if key not in _BASE:
        raise ConfigError(f"unsupported llama.cpp mix {ftype!r}", f"choose one of {', '.join(FTYPES)}")
    return key


def _category(name: str) -> str:
    """tensor_get_category, for the tensors a dense llama has."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key in ("attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{key}.weight" in name:
            return key
    for key in ("ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key
    return "other"


def _use_more_bits(i: int, n: int) -> bool:
    # the middle clause only runs when i >= n // 8, so Python's % matches C's here
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _Counters:
    def __init__(self, n_attention_wv: int, n_layer: int):
        self.n_attention_wv = n_attention_wv
        self.n_ffn_down = n_layer
        self.i_attention_wv = 0
        self.i_ffn_down = 0


def _rules(
    c: _Counters, s: _Shape, new: str, ne0: int, ftype: str, cat: str, imatrix: bool, output_type: str | None
) -> str:
    """llama_tensor_get_type_impl for a dense llama and the mixes in FTYPES."""
    if cat == "output" or (s.tied and cat == "token_embd"):
        if output_type is not None:
            return output_type
        if ne0 % _block(new) != 0:
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if cat == "token_embd":
        return new  # only IQ/TQ/Q2_0 mixes change an untied embedding
    if cat == "attn_v":
        i, n = c.i_attention_wv, c.n_attention_wv
        if ftype == "Q2_K":
            new = "Q4_K" if s.n_gqa >= 4 else "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if s.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        c.i_attention_wv += 1
        return new
    if cat == "ffn_down":
        i, n = c.i_ffn_down, c.n_ffn_down
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K"  # the Q3_K arm is Falcon's only
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype == "Q4_K_M":
            if _use_more_bits(i, n):
                new = "Q6_K"
        elif ftype == "Q5_K_M" and _use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i < n // 8:
            new = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
            new = "Q4_1" if ftype == "Q4_0" else "Q5_1"
        c.i_ffn_down += 1
        return new
    if cat == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, new)
    return new


def _fallback(name: str, target: str, ne0: int) -> str:
    """tensor_type_fallback: a type whose block divides the row width."""
    block = _block(target)
    if ne0 % block == 0:
        return target
    if target in _FALLBACK:
        out = _FALLBACK[target]
    elif block <= 32:
        out = target
    else:
        raise ConfigError(f"{name}: llama.cpp defines no fallback for {target} at row width {ne0}")
    return out if ne0 % _block(out) == 0 else "F16"


def tensor_types(
    model_config,
    ftype: str,
    imatrix: bool = False,
    *,
    output_type: str | None = None,
    embedding_type: str | None = None,
    overrides: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    pure: bool = False,
    leave_output: bool = False,
    source_type: str = "F16",
    allow_iq: bool = False,
) -> dict[str, str]:
    """GGUF tensor name -> GGML type name that ``llama-quantize`` picks for ``ftype``.

    Covers every 2-D weight of a llama model: ``token_embd.weight``,
    ``output.weight`` (untied models only) and ``blk.{i}.attn_q/attn_k/attn_v/
    attn_output/ffn_gate/ffn_up/ffn_down.weight``, in llama.cpp's visiting
    order. 1-D norms are not listed (llama.cpp keeps them F32).

    ``imatrix``: whether an importance matrix is given (``--imatrix``).
    ``output_type`` / ``embedding_type``: ``--output-tensor-type`` /
    ``--token-embedding-type``; these are used as given, without the shape
    fallback, except that on a tied model ``output_type`` reaches the token
    embedding through the mix rules and so is subject to it (and ignored
    under ``pure``). ``overrides``: ``--tensor-type`` pairs (regex, type),
    first match wins, searched in the tensor name; a matched tensor skips the
    mix rules (and so does not advance the attn_v/ffn_down counters) but
    still gets the fallback. ``pure``: ``--pure``. ``leave_output``:
    ``--leave-output-tensor``; ``output.weight`` then keeps ``source_type``
    (the type in the input GGUF).

    The shape fallback can produce IQ4_NL only through overrides; slmkit
    cannot write IQ types, so a result holding one raises
    :class:`~slmkit.errors.UnsupportedModelError` unless ``allow_iq``.
    """
    s = _shape(model_config)
    mix = _mix(ftype)
    base = _BASE[mix]
    out_t = None if output_type is None else _ggml_type(output_type, "output_type")
    emb_t = None if embedding_type is None else _ggml_type(embedding_type, "embedding_type")
    src_t = _ggml_type(source_type, "source_type")
    pairs = list(overrides.items() if isinstance(overrides, Mapping) else overrides or ())
    patterns = [(re.compile(str(p).lower()), _ggml_type(t, f"override {p!r}")) for p, t in pairs]

    mats = _matrices(s)
    counters = _Counters(sum(_category(n) == "attn_v" for n, _, _ in mats), s.n_layer)
    types: dict[str, str] = {}
    for name, ne0, _ne1 in mats:
        cat = _category(name)
        if leave_output and name == "output.weight":  # tensor_allows_quantization says no
            types[name] = src_t
            continue
        if emb_t is not None and cat == "token_embd":
            types[name] = emb_t
            continue
        if out_t is not None and cat == "output":
            types[name] = out_t
            continue
        new = base
        manual = False
        for pattern, qtype in patterns:
            if pattern.search(name):
                new, manual = qtype, True
                break
        if not manual and not pure:
            new = _rules(counters, s, new, ne0, mix, cat, imatrix, out_t)
        types[name] = _fallback(name, new, ne0)

    if not allow_iq:
        iq = sorted({t for t in types.values() if t.startswith("IQ")})
        if iq:
            where = [n for n, t in types.items() if t in iq]
            raise UnsupportedModelError(
                f"llama.cpp would write {', '.join(iq)} for {', '.join(where[:3])}"
                f"{' ...' if len(where) > 3 else ''}; slmkit cannot write IQ types",
                "pick an output/override type whose block divides the row width, or pass allow_iq=True",
            )
    return types


def _hf_names(s: _Shape) -> list[str]:
    names = ["model.embed_tokens.weight"]
    if not s.tied:
        names.append("lm_head.weight")
    for i in range(s.n_layer):
        names += [f"model.layers.{i}.{hf}.weight" for _, hf in _LAYER_MATS]
    return names


def hf_tensor_types(model_config, ftype: str, imatrix: bool = False, **kwargs) -> dict[str, str]:
    """:func:`tensor_types` keyed by transformers parameter names (``model.layers.0.mlp.down_proj.weight``)."""
    from slmkit.export.gguf_names import gguf_name

    types = tensor_types(model_config, ftype, imatrix, **kwargs)
    out = {hf: types[gguf_name(hf)] for hf in _hf_names(_shape(model_config))}
    assert len(out) == len(types), "HF and GGUF tensor lists disagree"
    return out


def base_type(ftype: str) -> str:
    """The mix's default block type (``llama_ftype_get_default_type``): Q4_K for Q4_K_M, Q4_0 for Q4_0."""
    return _BASE[_mix(ftype)]


def file_type(ftype: str) -> int:
    """The ``general.file_type`` llama-quantize writes for the mix (``LLAMA_FTYPE_MOSTLY_*``)."""
    import gguf

    return int(gguf.LlamaFileType[f"MOSTLY_{_mix(ftype)}"])


def bits_per_weight(model_config, types: Mapping[str, str]) -> float:
    """Bits per weight of a llama model stored with ``types``, as llama.cpp reports it.

    Counts every weight tensor the GGUF holds: the 2-D matrices at the given
    types (keyed by GGUF or transformers names; all must be present) and the
    1-D norms at their given type, F32 by default. Metadata and padding are
    not counted.
    """
    import gguf

    from slmkit.export.gguf_names import gguf_name

    s = _shape(model_config)
    given = {}
    for name, t in types.items():
        key = name if name.startswith(("blk.", "token_embd", "output")) else gguf_name(name)
        if key is None:
            raise ConfigError(f"bits_per_weight: {name!r} is not a llama weight name")
        given[key] = _ggml_type(t, name)
    tensors = [(n, ne0, ne1) for n, ne0, ne1 in _matrices(s)] + [(n, ne0, 1) for n, ne0 in _norms(s)]
    known = {n for n, _, _ in tensors}
    extra = sorted(set(given) - known)
    if extra:
        raise ConfigError(f"bits_per_weight: tensors not in this model: {', '.join(extra[:3])}")
    bits = 0
    elements = 0
    for name, ne0, ne1 in tensors:
        t = given.get(name)
        if t is None:
            if name.endswith("norm.weight"):
                t = "F32"
            else:
                raise ConfigError(f"bits_per_weight: no type given for {name}")
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
        if ne0 % block:
            raise ConfigError(f"bits_per_weight: {t} cannot hold {name} (row width {ne0})")
        bits += 8 * size * (ne0 // block) * ne1
        elements += ne0 * ne1
    return bits / elements


def types_from_gguf(path: str | Path) -> dict[str, str]:
    """Tensor name -> GGML type name of every tensor in a GGUF file (norms included)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
