"""Student architectures: fresh small llama-architecture models, and block-wise weight sharing.

MobileLLM (Liu et al. 2024, arXiv:2402.14905) finds that below 1B parameters
depth matters more than width (deep-and-thin), that tied input/output
embeddings free parameters for depth, that grouped-query attention (GQA) and
SwiGLU FFNs help, and that *immediate block-wise weight sharing* (each block
run twice in a row, "MobileLLM-LS") adds depth without adding
weights. Every student here is a plain ``LlamaForCausalLM`` (RMSNorm, SwiGLU,
RoPE, GQA), so export, serving and GGUF treat it as any llama model.

Sharing is between *adjacent* blocks: with ``share=2`` blocks (0, 1), (2, 3), ...
hold the same parameters (the same ``nn.Parameter`` objects; each block keeps
its own ``layer_idx`` so the KV cache stays per-position). ``save_student``
writes each shared tensor once; :func:`restore_sharing` re-ties a loaded model
(``slmkit.models.load`` calls it when the config carries ``slmkit_shared_blocks``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from slmkit.artefact import MANIFEST, Manifest, atomic_dir
from slmkit.errors import ConfigError

SHARE_KEY = "slmkit_shared_blocks"  #: config attribute: size of each group of adjacent blocks sharing weights


@dataclass(frozen=True)
class StudentConfig:
    """A llama-architecture student (defaults: MobileLLM-125M's shape, Liu et al. 2024)."""

    layers: int = 30  #: transformer blocks run (logical depth)
    hidden: int = 576  #: model width
    heads: int = 9  #: query heads
    kv_heads: int = 3  #: key/value heads (GQA; must divide heads)
    intermediate: int = 0  #: SwiGLU inner size; 0 = 8/3 * hidden rounded up to a multiple of 64
    tie_embeddings: bool = True  #: share the input embedding and the output head
    share: int = 1  #: adjacent blocks per weight group (1 = no sharing, 2 = MobileLLM-LS repeat-twice)
    max_positions: int = 2048
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "kv_heads", "share", "max_positions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"student {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads} (GQA groups)")
        if self.layers % self.share:
            raise ConfigError(f"layers {self.layers} is not a multiple of share {self.share}")

    @property
    def ffn(self) -> int:
        return self.intermediate or -(-(8 * self.hidden // 3) // 64) * 64


PRESETS: dict[str, StudentConfig] = {
    # MobileLLM shapes (Liu et al. 2024); "-ls" = layer-shared (each block repeated twice)
    "mobilellm-125m": StudentConfig(layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536),
    "mobilellm-125m-ls": StudentConfig(layers=60, hidden=576, heads=9, kv_heads=3, intermediate=1536, share=2),
    "mobilellm-350m": StudentConfig(layers=32, hidden=960, heads=15, kv_heads=5, intermediate=2560),
    "tiny-deep": StudentConfig(layers=12, hidden=128, heads=4, kv_heads=2, intermediate=384),
}


def student_config(cfg: StudentConfig, tokenizer):
    """The ``LlamaConfig`` of ``cfg`` for ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig

    conf = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        hidden_act="silu",  # SwiGLU: down(silu(gate x) * up x)
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.share > 1:
        setattr(conf, SHARE_KEY, cfg.share)
    return conf


def make_student(cfg: StudentConfig, tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A freshly initialised student (deterministic given ``seed``), with block sharing applied."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(student_config(cfg, tokenizer), dtype=dtype)
    if cfg.share > 1:
        share_blocks(model, cfg.share)
    return model


def share_blocks(model, group: int):
    """Tie adjacent blocks' parameters in place: each block takes the parameters of its group's first block."""
    layers = model.model.layers
    if group < 1 or len(layers) % group:
        raise ConfigError(f"cannot share {len(layers)} blocks in groups of {group}")
    for i, block in enumerate(layers):
        lead = layers[i - i % group]
        if block is lead:
            continue
        for name, _ in list(block.named_parameters()):
            *path, leaf = name.split(".")
            owner, src = block, lead
            for p in path:
                owner, src = getattr(owner, p), getattr(src, p)
            setattr(owner, leaf, getattr(src, leaf))  # the same nn.Parameter object
    setattr(model.config, SHARE_KEY, group)
    return model


def restore_sharing(model):
    """Re-tie a model whose config says its blocks share weights (after a plain ``from_pretrained``)."""
    group = getattr(model.config, SHARE_KEY, None)
    if group and group > 1:
        share_blocks(model, int(group))
    return model


def unique_parameters(model) -> int:
    """Parameters counted once however many blocks (or the head and the embedding) share them."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def untied_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s state dict with each follower block's tensors copied apart from its leader's.

    What transformers can save (``save_pretrained`` refuses tensors shared outside its own declared
    ties, such as the output head) and load with plain ``AutoModelForCausalLM.from_pretrained``:
    every block is stored (the file holds each shared group ``share`` times); slmkit's own
    loader re-ties the groups (:func:`restore_sharing`). The Trainer's checkpoints and
    ``slmkit pretrain``'s artefact are written from it.
    """
    group = int(getattr(model.config, SHARE_KEY, 1) or 1)
    state = model.state_dict()
    if group < 2:
        return state
    return {k: v.detach().clone() if k.startswith("model.layers.") and int(k.split(".")[2]) % group else v
            for k, v in state.items()}


def save_student(model, tokenizer, dest: str | os.PathLike, manifest: Manifest | None = None) -> Path:
    """Save atomically: ``config.json`` + ``model.safetensors`` holding each shared tensor once, tokenizer, manifest.

    Followers of a shared group are left out of the file; :func:`restore_sharing` re-ties them on load.
    """
    from safetensors.torch import save_file

    group = int(getattr(model.config, SHARE_KEY, 1) or 1)
    state = model.state_dict()
    keep: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        if k.startswith("model.layers.") and group > 1 and int(k.split(".")[2]) % group:
            continue  # a follower block: stored by its group leader
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        ptr = v.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        keep[k] = v.detach().contiguous().clone()
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(keep, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        man = manifest or Manifest(source="slmkit.models.student")
        (tmp / MANIFEST).write_text(man.to_json())
    return dest


def load_student(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a directory written by :func:`save_student` (strict: every stored tensor must be used)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    conf = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    restore_sharing(model)
    stored = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(stored, strict=False)
    group = int(getattr(conf, SHARE_KEY, 1) or 1)
    really_missing = [k for k in missing if not (
        (k.startswith("model.layers.") and group > 1 and int(k.split(".")[2]) % group)
        or (k == "lm_head.weight" and conf.tie_word_embeddings))]
    if unexpected or really_missing:
        raise ConfigError(f"{path}: weights do not match the config (missing {really_missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def describe_sharing(model) -> dict:
    """Logical blocks, stored blocks and unique parameters (for info / manifests)."""
    group = int(getattr(model.config, SHARE_KEY, 1) or 1)
    n = len(model.model.layers)
    return {"blocks": n, "stored_blocks": n // group, "share": group, "unique_parameters": unique_parameters(model)}

