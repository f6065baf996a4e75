"""Tensor names in a GGUF file: the llama.cpp name of each transformers (llama-family) weight.

Read by the GGUF writer (:mod:`slmkit.export.gguf`) and by llama-quantize's type choice
(:mod:`slmkit.export.gguf_mix`), which each need the names and not each other.
"""

from __future__ import annotations

#: decoder-block submodule (transformers) -> llama.cpp's name inside ``blk.<i>``
LAYER_NAMES = {
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


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name of the transformers weight ``hf_name``, or None for one GGUF files do not hold."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        key = ".".join(parts[3:-1])
        if key in LAYER_NAMES:
            return f"blk.{parts[2]}.{LAYER_NAMES[key]}.weight"
    return None
