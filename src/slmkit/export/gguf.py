"""GGUF export for llama-architecture models, validated by reading the file back.

Tensor names and the rotary Q/K row permutation follow llama.cpp's
``convert_hf_to_gguf.py`` conventions (llama.cpp stores Q and K with the two
rotary halves interleaved; transformers' GGUF loader undoes it on load). The
tokenizer is written as a byte-level BPE (``tokenizer.ggml.model = gpt2``).

Quantised tensor types use the ``gguf`` package's own quantisers, which
reproduce llama.cpp's round-to-nearest formats; a caller that has already
chosen codes on the block grid (GPTQ/AWQ) passes ``encoders`` to write them
unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from slmkit.artefact import atomic_file, is_gguf_file
from slmkit.errors import ConfigError, UnsupportedModelError

log = logging.getLogger(__name__)

TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0")
#: the tensors ``embedding_type`` applies to (token embedding, untied output head)
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
#: ``encoder(hf_name, weight (out, in) fp32, qtype) -> raw bytes`` for a pre-quantised tensor.
Encoder = Callable[[str, torch.Tensor, "object"], np.ndarray]


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary permutation of Q/K rows: (H, 2, D/2, in) -> (H, D/2, 2, in)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        key = ".".join(parts[3:-1])
        if key in _LAYER_NAMES:
            return f"blk.{parts[2]}.{_LAYER_NAMES[key]}.weight"
    return None


def _tokenizer_fields(writer, tokenizer) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise UnsupportedModelError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {spec['model']['type']}"
        )
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for tok, idx in vocab.items():
        tokens[idx] = tok
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, setter in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if getattr(tokenizer, name, None) is not None:
            setter(int(getattr(tokenizer, name)))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(
    model,
    tokenizer,
    path: str | Path,
    qtype: str = "F16",
    encoders: dict[str, Encoder] | None = None,
    keep_f32: Callable[[str], bool] | None = None,
    embedding_type: str | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` as a GGUF file of type ``qtype`` (atomically); return the path.

    An existing ``path`` is replaced only if it is a GGUF file (or with ``force``).

    1-D tensors (norms) always stay F32, as in llama.cpp. ``keep_f32(hf_name)``
    may keep more tensors at full precision. ``encoders`` maps HF tensor names to
    functions that return the already-quantised block bytes for that tensor.
    ``embedding_type`` (default: ``qtype``) is the type of the token embedding and
    of the output head (for a tied model they are one tensor): llama.cpp's own
    ``llama-quantize`` keeps the output head at a higher precision than the
    4/5-bit body (Q6_K); the ``gguf`` package cannot write Q6_K, so Q8_0 is the
    nearest choice here.
    """
    import gguf

    if qtype not in TYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}", f"use one of {', '.join(TYPES)}")
    if embedding_type is not None and embedding_type not in TYPES:
        raise ConfigError(f"unknown GGUF embedding type {embedding_type!r}", f"use one of {', '.join(TYPES)}")
    cfg = model.config
    if cfg.model_type not in ("llama", "mistral") or getattr(cfg, "attention_bias", False):
        raise UnsupportedModelError(
            f"GGUF export supports llama-architecture models (this is {cfg.model_type!r})",
            "export to safetensors instead (--format safetensors)",
        )
    path = Path(path)
    qt = gguf.GGMLQuantizationType[qtype]
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))

    with atomic_file(path, force=force, owned=is_gguf_file) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(str(getattr(cfg, "name_or_path", "") or "slmkit-model"))
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(int(heads))
        w.add_head_count_kv(int(kv_heads))
        w.add_rope_dimension_count(int(head_dim))
        w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(int(cfg.vocab_size))
        w.add_file_type(int(gguf.LlamaFileType[{"F32": "ALL_F32", "F16": "MOSTLY_F16"}.get(qtype, "MOSTLY_" + qtype)]))
        _tokenizer_fields(w, tokenizer)
        state = model.state_dict()
        for name, tensor in state.items():
            gname = gguf_name(name)
            if gname is None:
                if name == "lm_head.weight" or "rotary_emb" in name:
                    continue
                raise UnsupportedModelError(f"GGUF export: no llama.cpp name for tensor {name}")
            if name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
                continue
            t = tensor.detach().to(torch.float32)
            if name.endswith("q_proj.weight"):
                t = permute_qk(t, heads)
            elif name.endswith("k_proj.weight"):
                t = permute_qk(t, kv_heads)
            arr = t.numpy()
            want = gguf.GGMLQuantizationType[embedding_type] if embedding_type and name in EMBEDDING_NAMES else qt
            if t.ndim == 1 or (keep_f32 is not None and keep_f32(name)):
                want = gguf.GGMLQuantizationType.F32
            elif want.name not in ("F32", "F16") and t.shape[-1] % gguf.GGML_QUANT_SIZES[want][0] != 0:
                log.warning("%s: width %d is not a multiple of the %s block; writing F16", name, t.shape[-1], want.name)
                want = gguf.GGMLQuantizationType.F16
            if want == gguf.GGMLQuantizationType.F32:
                w.add_tensor(gname, arr.astype(np.float32))
            elif want == gguf.GGMLQuantizationType.F16:
                w.add_tensor(gname, arr.astype(np.float16))
            else:
                enc = (encoders or {}).get(name)
                data = enc(name, t, want) if enc is not None else gguf.quants.quantize(arr, want)
                w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=want)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_gguf_weights(path: str | Path, model_config) -> dict[str, torch.Tensor]:
    """Dequantise every tensor of a GGUF file back to HF names and layouts (for validation)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    inv = {}
    for hf in model_config_names(model_config):
        g = gguf_name(hf)
        if g:
            inv[g] = hf
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    out = {}
    for t in reader.tensors:
        hf = inv.get(t.name)
        if hf is None:
            continue
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(list(reversed(t.shape.tolist())))
        if hf.endswith("q_proj.weight"):
            w = _unpermute(w, heads)
        elif hf.endswith("k_proj.weight"):
            w = _unpermute(w, kv_heads)
        out[hf] = w
    return out


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def model_config_names(cfg) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        names += [f"model.layers.{i}.{k}.weight" for k in _LAYER_NAMES]
    return names


# ---------------------------------------------------------------------------------------------
# pre-quantised tensors (GPTQ / AWQ / RTN codes on a GGUF grid) and validated export


def encoders_for(quantized, model_config, qtype: str) -> dict[str, Encoder]:
    """Encoders writing ``quantized``'s codes unchanged into ``qtype`` blocks.

    Only tensors whose grid is exactly ``qtype``'s block grid get an encoder; Q/K
    codes and scales are row-permuted like the weights (rotary layout).
    """
    from slmkit.compress.qgrid import QTensor, encode_gguf_blocks

    if quantized is None or quantized.grid.gguf != qtype:
        return {}
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads

    def make(name: str, qt: QTensor) -> Encoder:
        def enc(hf_name: str, t: torch.Tensor, want) -> np.ndarray:
            if want.name != qtype:
                raise RuntimeError(f"{hf_name}: codes are on the {qtype} grid, the writer asked for {want.name}")
            n = heads if name.endswith("q_proj.weight") else kv_heads if name.endswith("k_proj.weight") else None
            q = qt
            if n is not None:
                q = QTensor(permute_qk(qt.codes, n), permute_qk(qt.scales, n),
                            None if qt.mins is None else permute_qk(qt.mins, n), qt.grid)
            data = encode_gguf_blocks(q)
            # the codes must reproduce the weight handed to the writer, bit for bit
            if not torch.equal(q.dequantize(), t):
                raise RuntimeError(f"{hf_name}: the model's weight is not the dequantised codes (was it changed after quantising?)")
            return data

        return enc

    return {name: make(name, qt) for name, qt in quantized.tensors.items()}


def _expected(arr: np.ndarray, qtype: str, is_vector: bool) -> np.ndarray:
    """What a reader must return for a tensor written without an encoder (the reference round trip)."""
    import gguf

    if is_vector or qtype == "F32":
        return arr.astype(np.float32)
    if qtype == "F16":
        return arr.astype(np.float16).astype(np.float32)
    qt = gguf.GGMLQuantizationType[qtype]
    if arr.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:
        return arr.astype(np.float16).astype(np.float32)
    return np.asarray(gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt), dtype=np.float32)


def export_gguf_validated(model, tokenizer, path: str | Path, qtype: str = "F16", quantized=None,
                          check_loader: bool = True, embedding_type: str | None = None, force: bool = False):
    """Export as GGUF, then read it back and compare every tensor with what it must hold.

    Tensors carried by ``quantized`` (its grid being ``qtype``'s) must read back
    bit-identical to the in-memory (fake-quantised) weights; the others must equal
    the ``gguf`` package's reference round trip of the in-memory weights. The
    file is read with the ``gguf`` reader and (``check_loader``) reloaded through
    transformers' GGUF loader (:func:`slmkit.models.load`), all before it replaces
    anything at ``path`` (a GGUF file, or anything with ``force``). On any
    mismatch RuntimeError is raised and ``path`` is left as it was. Returns an
    :class:`~slmkit.export.safetensors.ExportReport`.
    """
    from slmkit.export.safetensors import ExportReport

    path = Path(path)
    if quantized is not None and quantized.grid.gguf not in (None, qtype):
        log.warning("codes are on the %s grid; exporting %s re-rounds them", quantized.grid.gguf, qtype)
    encoders = encoders_for(quantized, model.config, qtype)
    if embedding_type not in (None, qtype):
        encoders = {k: v for k, v in encoders.items() if k not in EMBEDDING_NAMES}
    with atomic_file(path, force=force, owned=is_gguf_file) as tmp:  # validated before it replaces path
        export_gguf(model, tokenizer, tmp, qtype, encoders=encoders, embedding_type=embedding_type)
        state = {k: v.detach().float() for k, v in model.state_dict().items()}
        tied = getattr(model.config, "tie_word_embeddings", False)
        want = {}
        for name, t in state.items():
            if gguf_name(name) is None or (name == "lm_head.weight" and tied):
                continue
            typ = embedding_type if embedding_type and name in EMBEDDING_NAMES else qtype
            want[name] = t if name in encoders else torch.from_numpy(_expected(t.numpy(), typ, t.ndim == 1))
        back = read_gguf_weights(tmp, model.config)
        if set(back) != set(want):
            raise RuntimeError(f"GGUF read-back has tensors {sorted(set(back) ^ set(want))[:4]} it should not (or lacks them)")
        exact, worst = 0, 0.0
        for name, t in back.items():
            same = torch.equal(t, want[name])
            exact += same
            if not same:
                worst = max(worst, (t - want[name]).abs().max().item())
        if exact != len(want):
            raise RuntimeError(f"GGUF export {path}: {len(want) - exact} of {len(want)} tensors differ on read-back (max {worst:g})")
        if check_loader:
            from slmkit.models import load

            loaded, _ = load(str(tmp))
            lstate = loaded.state_dict()
            for name, t in want.items():
                if not torch.equal(lstate[name].float(), t):
                    diff = (lstate[name].float() - t).abs().max().item()
                    raise RuntimeError(f"GGUF export {path}: transformers' loader gives a different {name} (max diff {diff:g})")
    return ExportReport(str(path), "gguf", qtype, path.stat().st_size, len(want), exact, worst, check_loader)
