"""GGUF export for llama-architecture models, validated by reading the file back.

Tensor names and the rotary Q/K row permutation follow llama.cpp's
``convert_hf_to_gguf.py`` conventions (llama.cpp stores Q and K with the two
rotary halves interleaved; transformers' GGUF loader undoes it on load). The
tokenizer is written as a byte-level BPE (``tokenizer.ggml.model = gpt2``).

A quantised file is a llama.cpp file type (``Q4_0``, ``Q4_K_M``, ``Q5_K_M``, ...): each matrix
gets the type ``llama-quantize`` would give it (:mod:`slmkit.export.gguf_mix`: output and
embedding precision, ``use_more_bits`` layers, fallbacks for rows that are not whole
super-blocks), so a slmkit file and llama.cpp's file of the same name differ only in the codes.
Tensors without codes of their own are rounded as llama-quantize rounds them without an
importance matrix (the ``gguf`` package's quantisers for the 32-weight types, slmkit's port of
llama.cpp's k-quant search for the others); a caller that has already chosen codes on the block
grids (GPTQ/AWQ/QAT) passes ``encoders`` to write them unchanged.
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
from slmkit.export.gguf_names import LAYER_NAMES, gguf_name  # noqa: F401 (gguf_name re-exported)

log = logging.getLogger(__name__)

#: what ``qtype`` may be: plain float files, or a llama.cpp file type (mix) or its short alias
TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
         "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q3_K", "Q4_K", "Q5_K")
#: the tensors ``embedding_type`` applies to (token embedding, untied output head)
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
#: ``encoder(hf_name, weight (out, in) fp32, qtype) -> raw bytes`` for a pre-quantised tensor.
Encoder = Callable[[str, torch.Tensor, "object"], np.ndarray]


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary permutation of Q/K rows: (H, 2, D/2, in) -> (H, D/2, 2, in)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
    imatrix: bool = False,
    pure: bool = False,
) -> Path:
    """Write ``model`` as a GGUF file of type ``qtype`` (atomically); return the path.

    An existing ``path`` is replaced only if it is a GGUF file (or with ``force``).

    1-D tensors (norms) always stay F32, as in llama.cpp. ``keep_f32(hf_name)``
    may keep more tensors at full precision. ``encoders`` maps HF tensor names to
    functions that return the already-quantised block bytes for that tensor.
    The per-tensor types are :func:`tensor_plan`'s: ``embedding_type`` overrides the
    token embedding's (and an untied output head's) type as ``llama-quantize
    --token-embedding-type/--output-tensor-type`` do; ``imatrix`` picks the types
    llama.cpp picks when quantising with an importance matrix; ``pure`` puts every
    matrix at the mix's base type (``--pure``).
    """
    import gguf

    from slmkit.compress.qgrid import Grid, encode_gguf_blocks, quantize_rtn

    cfg = model.config
    plan = tensor_plan(cfg, qtype, embedding_type=embedding_type, imatrix=imatrix, pure=pure)
    path = Path(path)
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
        w.add_file_type(file_type(qtype))
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
            typ = "F32" if t.ndim == 1 or (keep_f32 is not None and keep_f32(name)) else plan[name]
            if typ == "F32":
                w.add_tensor(gname, arr.astype(np.float32))
            elif typ == "F16":
                w.add_tensor(gname, arr.astype(np.float16))
            else:
                want = gguf.GGMLQuantizationType[typ]
                enc = (encoders or {}).get(name)
                if enc is not None:
                    data = enc(name, t, want)
                elif typ in _GGUF_PACKAGE_TYPES:
                    data = gguf.quants.quantize(arr, want)
                else:  # k-quants: llama.cpp's search without an importance matrix
                    data = encode_gguf_blocks(quantize_rtn(t, Grid.for_gguf(typ)))
                w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=want)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


#: block types the ``gguf`` package quantises itself (llama.cpp's reference rounding)
_GGUF_PACKAGE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def _matrix_names(cfg) -> list[str]:
    tied = getattr(cfg, "tie_word_embeddings", False)
    return [n for n in model_config_names(cfg)
            if not n.endswith("norm.weight") and not (n == "lm_head.weight" and tied)]


def tensor_plan(model_config, qtype: str, embedding_type: str | None = None, imatrix: bool = False,
                pure: bool = False) -> dict[str, str]:
    """The GGUF type of every matrix (by HF name) in a file of type ``qtype``.

    F32 / F16: every matrix at that type (``embedding_type`` may differ). A llama.cpp file
    type (mix): the types ``llama-quantize`` picks (:func:`slmkit.export.gguf_mix.hf_tensor_types`).
    """
    from slmkit.export.gguf_mix import hf_tensor_types

    if qtype not in TYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}", f"use one of {', '.join(TYPES)}")
    if embedding_type is not None and embedding_type not in ("F32", "F16", *_GGUF_PACKAGE_TYPES, "Q4_K", "Q5_K", "Q6_K"):
        raise ConfigError(f"unknown GGUF embedding type {embedding_type!r}",
                          f"use one of F32, F16, {', '.join(_GGUF_PACKAGE_TYPES)}, Q4_K, Q5_K, Q6_K")
    cfg = model_config
    if cfg.model_type not in ("llama", "mistral") or getattr(cfg, "attention_bias", False):
        raise UnsupportedModelError(
            f"GGUF export supports llama-architecture models (this is {cfg.model_type!r})",
            "export to safetensors instead (--format safetensors)",
        )
    if qtype in ("F32", "F16"):
        plan = dict.fromkeys(_matrix_names(cfg), qtype)
        for n in EMBEDDING_NAMES:
            if embedding_type and n in plan:
                plan[n] = embedding_type
        return plan
    return hf_tensor_types(cfg, qtype, imatrix=imatrix, embedding_type=embedding_type, pure=pure,
                           **({"output_type": embedding_type} if embedding_type else {}))


def file_type(qtype: str) -> int:
    """``general.file_type`` of a file of type ``qtype``."""
    import gguf

    from slmkit.export.gguf_mix import file_type as mix_file_type

    if qtype in ("F32", "F16"):
        return int(gguf.LlamaFileType["ALL_F32" if qtype == "F32" else "MOSTLY_F16"])
    return mix_file_type(qtype)


def read_gguf_weights(path: str | Path, model_config, reader=None) -> dict[str, torch.Tensor]:
    """Dequantise every tensor of a GGUF file back to HF names and layouts (for validation).

    ``reader``: the file's ``gguf.GGUFReader`` when the caller has one (opening one parses the whole
    vocabulary: ~3 s for a 49k-token one)."""
    import gguf

    reader = reader if reader is not None else gguf.GGUFReader(str(path))
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
            w = unpermute_qk(w, heads)
        elif hf.endswith("k_proj.weight"):
            w = unpermute_qk(w, kv_heads)
        out[hf] = w
    return out


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def model_config_names(cfg) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        names += [f"model.layers.{i}.{k}.weight" for k in LAYER_NAMES]
    return names


# ---------------------------------------------------------------------------------------------
# pre-quantised tensors (GPTQ / AWQ / RTN codes on a GGUF grid) and validated export


def encoders_for(quantized, model_config, plan: dict[str, str] | str) -> dict[str, Encoder]:
    """Encoders writing ``quantized``'s codes unchanged into their GGUF blocks.

    ``plan`` is :func:`tensor_plan`'s (or one type for every tensor). Only tensors whose grid
    is exactly the block grid of their planned type get an encoder (the others are re-rounded,
    with a warning); Q/K codes and scales are row-permuted like the weights (rotary layout).
    """
    from slmkit.compress.qgrid import QTensor, encode_gguf_blocks

    if quantized is None:
        return {}
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads

    def make(name: str, qt: QTensor, typ: str) -> Encoder:
        def enc(hf_name: str, t: torch.Tensor, want) -> np.ndarray:
            if want.name != typ:
                raise RuntimeError(f"{hf_name}: codes are on the {typ} grid, the writer asked for {want.name}")
            n = heads if name.endswith("q_proj.weight") else kv_heads if name.endswith("k_proj.weight") else None
            q = qt if n is None else qt.map_rows(lambda x: permute_qk(x, n))
            data = encode_gguf_blocks(q)
            # the codes must reproduce the weight handed to the writer, bit for bit
            if not torch.equal(q.dequantize(), t):
                raise RuntimeError(f"{hf_name}: the model's weight is not the dequantised codes (was it changed after quantising?)")
            return data

        return enc

    out, rerounded = {}, []
    for name, qt in quantized.tensors.items():
        typ = plan if isinstance(plan, str) else plan.get(name)
        if typ is not None and qt.grid.gguf == typ:
            out[name] = make(name, qt, typ)
        else:
            rerounded.append(f"{name} ({qt.grid.gguf or 'not a GGUF grid'} -> {typ})")
    if rerounded:
        log.warning("%d tensors' codes are not on their GGUF type's grid and are re-rounded, e.g. %s",
                    len(rerounded), rerounded[0])
    return out


def _expected(arr: np.ndarray, qtype: str, is_vector: bool) -> np.ndarray:
    """What a reader must return for a tensor written without an encoder (the reference round trip)."""
    import gguf

    from slmkit.compress.qgrid import Grid, quantize_rtn

    if is_vector or qtype == "F32":
        return arr.astype(np.float32)
    if qtype == "F16":
        return arr.astype(np.float16).astype(np.float32)
    if qtype not in _GGUF_PACKAGE_TYPES:
        return quantize_rtn(torch.from_numpy(arr), Grid.for_gguf(qtype)).dequantize().numpy()
    qt = gguf.GGMLQuantizationType[qtype]
    return np.asarray(gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt), dtype=np.float32)


def export_gguf_validated(model, tokenizer, path: str | Path, qtype: str = "F16", quantized=None,
                          check_loader: bool = True, embedding_type: str | None = None, force: bool = False,
                          imatrix: bool = False, pure: bool = False):
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
    plan = tensor_plan(model.config, qtype, embedding_type=embedding_type, imatrix=imatrix, pure=pure)
    encoders = encoders_for(quantized, model.config, plan)
    with atomic_file(path, force=force, owned=is_gguf_file) as tmp:  # validated before it replaces path
        export_gguf(model, tokenizer, tmp, qtype, encoders=encoders, embedding_type=embedding_type,
                    imatrix=imatrix, pure=pure)
        state = {k: v.detach().float() for k, v in model.state_dict().items()}
        tied = getattr(model.config, "tie_word_embeddings", False)
        want = {}
        for name, t in state.items():
            if gguf_name(name) is None or (name == "lm_head.weight" and tied):
                continue
            typ = "F32" if t.ndim == 1 else plan[name]  # rows round alone: the rotary row permutation commutes
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
