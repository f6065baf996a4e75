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

from slmkit.artefact import atomic_file
from slmkit.errors import ConfigError, UnsupportedModelError

log = logging.getLogger(__name__)

TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0")
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
) -> Path:
    """Write ``model`` as a GGUF file of type ``qtype`` (atomically); return the path.

    1-D tensors (norms) always stay F32, as in llama.cpp. ``keep_f32(hf_name)``
    may keep more tensors at full precision. ``encoders`` maps HF tensor names to
    functions that return the already-quantised block bytes for that tensor.
    """
    import gguf

    if qtype not in TYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}", f"use one of {', '.join(TYPES)}")
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

    with atomic_file(path) as tmp:
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
            want = qt
            if t.ndim == 1 or (keep_f32 is not None and keep_f32(name)):
                want = gguf.GGMLQuantizationType.F32
            elif qtype not in ("F32", "F16") and t.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0] != 0:
                log.warning("%s: width %d is not a multiple of the %s block; writing F16", name, t.shape[-1], qtype)
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
