"""Architecture facts: parameter counts, shapes and memory, from a config alone.

Counts come from instantiating the model on the ``meta`` device, so no weights
are read and any architecture transformers knows is covered (MoE included).
Memory for quantised formats uses llama.cpp's bits per weight including block
scales: Q8_0 = 8.5, Q4_0 = 4.5 (32-weight blocks with one fp16 scale).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

BITS_PER_WEIGHT = {"fp32": 32.0, "bf16": 16.0, "int8": 8.5, "int4": 4.5}
KV_BYTES = {"fp32": 4, "bf16": 2}


@dataclass
class ArchInfo:
    model_type: str
    architecture: str
    parameters: int  #: total unique parameters (tied weights counted once)
    embedding_parameters: int  #: input embeddings plus an untied output head
    non_embedding_parameters: int
    active_parameters: int  #: per token; equals ``parameters`` for dense models
    layers: int
    hidden_size: int
    intermediate_size: int | None
    attention_heads: int
    kv_heads: int
    head_dim: int
    attention: str  #: "MHA", "GQA" or "MQA"
    ffn: str  #: "gated (GLU)" or "dense"; "MoE (...)" for mixtures of experts
    activation: str
    norm: str
    tied_embeddings: bool
    context_length: int | None
    vocab_size: int
    experts: int | None = None
    experts_per_token: int | None = None
    weight_memory_bytes: dict[str, int] = field(default_factory=dict)
    kv_cache_bytes_per_1k_tokens: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _get(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def describe(config) -> ArchInfo:
    """Facts about the architecture described by a transformers ``config``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return describe_model(model)


def describe_model(model) -> ArchInfo:
    """Facts about an instantiated (possibly meta) causal LM."""
    config = _text_config(model.config)
    seen: set[int] = set()
    total = 0
    expert = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name or name.endswith(".experts") or ".experts_" in name:
            expert += p.numel()
    emb_in = model.get_input_embeddings()
    emb_out = model.get_output_embeddings()
    embedding = emb_in.weight.numel() if emb_in is not None else 0
    tied = emb_out is not None and emb_in is not None and emb_out.weight is emb_in.weight
    if emb_out is not None and not tied:
        embedding += emb_out.weight.numel()

    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers", default=0)
    hidden = _get(config, "hidden_size", "n_embd", "d_model", default=0)
    heads = _get(config, "num_attention_heads", "n_head", default=0)
    kv = _get(config, "num_key_value_heads", "num_kv_heads", default=heads) or heads
    head_dim = _get(config, "head_dim", default=(hidden // heads if heads else 0))
    n_experts = _get(config, "num_local_experts", "num_experts", "n_routed_experts")
    per_tok = _get(config, "num_experts_per_tok", "moe_topk", "top_k")
    active = total
    if n_experts and per_tok and expert:
        active = total - expert + expert * per_tok // n_experts
    act = str(_get(config, "hidden_act", "activation_function", "hidden_activation", default="?"))
    mlp_names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    gated = bool(mlp_names & {"gate_proj", "w1", "gate_up_proj", "w3"}) or "gate_up_proj" in str(
        [n for n, _ in model.named_parameters()]
    )
    ffn = "gated (GLU" + (", SwiGLU" if act in ("silu", "swish") else f", {act}") + ")" if gated else "dense"
    if n_experts:
        ffn = f"MoE ({n_experts} experts, {per_tok} per token; {ffn})"
    norms = sorted({type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()})
    attention = "MHA" if kv == heads else ("MQA" if kv == 1 else "GQA")

    weight_memory = {k: int(total * bits / 8) for k, bits in BITS_PER_WEIGHT.items()}
    kv_per_1k = {k: 2 * layers * kv * head_dim * 1024 * b for k, b in KV_BYTES.items()}
    return ArchInfo(
        model_type=str(getattr(config, "model_type", "?")),
        architecture=type(model).__name__,
        parameters=total,
        embedding_parameters=embedding,
        non_embedding_parameters=total - embedding,
        active_parameters=active,
        layers=layers,
        hidden_size=hidden,
        intermediate_size=_get(config, "intermediate_size", "n_inner", "ffn_dim"),
        attention_heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        attention=attention,
        ffn=ffn,
        activation=act,
        norm=", ".join(norms) or "?",
        tied_embeddings=bool(tied),
        context_length=_get(config, "max_position_embeddings", "n_positions", "max_sequence_length"),
        vocab_size=_get(config, "vocab_size", default=0),
        experts=n_experts,
        experts_per_token=per_tok,
        weight_memory_bytes=weight_memory,
        kv_cache_bytes_per_1k_tokens=kv_per_1k,
    )
