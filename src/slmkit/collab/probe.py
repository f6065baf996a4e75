"""A linear probe on the small model's hidden states that predicts whether an answer is wrong.

Supervised truthfulness probing (Azaria & Mitchell 2023, "The Internal State of an LLM
Knows When It's Lying", arXiv:2304.13734; Li et al. 2023, "Inference-Time Intervention",
arXiv:2306.03341, Sec. 3.1, which probes TruthfulQA): run ``context + answer`` through the
model, mean-pool the hidden states of the answer's tokens at one layer, and fit an
L2-regularised logistic regression (scikit-learn) on labelled correctness. The regulariser
is chosen by an inner cross-validation on the training rows only.

Quality is measured on held-out folds: :func:`cross_val_risk` groups the rows by question
(both answers to one question fall in the same fold), so no question is seen in training and
scoring. A trained probe is saved as one safetensors file (tensors ``coef``, ``intercept``,
``mean``, ``scale``; the config and provenance in its JSON metadata), never as a pickle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slmkit.errors import ConfigError, DataError, UnsupportedModelError

log = logging.getLogger(__name__)

POOLS = ("mean", "last")


@dataclass(frozen=True)
class ProbeConfig:
    layer: int | None = None  #: hidden-state index (0 = embeddings, -1 = last block); None = the middle block
    pool: str = "mean"  #: mean over the answer's tokens | last answer token
    folds: int = 5  #: held-out folds (grouped by question) for the cross-validated score
    cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)  #: inverse L2 strengths tried by the inner CV
    batch_size: int = 8  #: sequences per forward pass
    max_tokens: int = 512  #: longest context + answer (tokens); longer rows keep their end
    seed: int = 0

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ConfigError(f"probe pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.folds < 2:
            raise ConfigError(f"probe folds must be >= 2, got {self.folds}")
        if not self.cs or any(c <= 0 for c in self.cs):
            raise ConfigError(f"probe cs (inverse L2 strengths) must be > 0, got {self.cs}")
        if self.batch_size < 1 or self.max_tokens < 2:
            raise ConfigError("probe batch_size must be >= 1 and max_tokens >= 2")


@dataclass
class Probe:
    """A fitted probe: ``P(wrong) = sigmoid(((h - mean) / scale) @ coef + intercept)``."""

    coef: np.ndarray  #: (H,)
    intercept: float
    mean: np.ndarray  #: (H,)
    scale: np.ndarray  #: (H,)
    layer: int
    pool: str
    meta: dict = field(default_factory=dict)  #: model, n_train, cv AUROC, ...

    def risk(self, feats: np.ndarray) -> np.ndarray:
        """(N,) probability that each row's answer is wrong, from (N, H) pooled hidden states."""
        if feats.shape[1] != self.coef.shape[0]:
            raise UnsupportedModelError(
                f"the probe was trained on hidden states of width {self.coef.shape[0]}, this model has {feats.shape[1]}",
                "train a probe for this model (slmkit judge --signal probe --save-probe FILE)",
            )
        z = ((feats - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))


def resolve_layer(model, layer: int | None) -> int:
    """The hidden-state index a config's ``layer`` means for ``model`` (0 = embeddings)."""
    n = int(model.config.get_text_config().num_hidden_layers)
    idx = n // 2 if layer is None else (layer if layer >= 0 else n + 1 + layer)
    if not 0 <= idx <= n:
        raise ConfigError(f"probe layer {layer} is out of range for a model with {n} blocks (0..{n} or -1..-{n + 1})")
    return idx


def hidden_features(model, tokenizer, contexts: Sequence[str], answers: Sequence[str], layer: int, pool: str = "mean",
                    batch_size: int = 8, max_tokens: int = 512) -> np.ndarray:
    """(N, H) hidden states at ``layer`` pooled over each answer's tokens, given its context."""
    return hidden_features_at(model, tokenizer, contexts, answers, [layer], pool, batch_size, max_tokens)[layer]


@torch.inference_mode()
def hidden_features_at(model, tokenizer, contexts: Sequence[str], answers: Sequence[str], layers: Sequence[int],
                       pool: str = "mean", batch_size: int = 8, max_tokens: int = 512) -> dict[int, np.ndarray]:
    """:func:`hidden_features` at several hidden-state indices from one forward pass per batch."""
    if model is None or tokenizer is None:
        raise UnsupportedModelError("the probe reads hidden states, so it needs a local model", "use a local MODEL, not an endpoint")
    seqs = []
    for ctx, ans in zip(contexts, answers):
        start = len(tokenizer(ctx, add_special_tokens=False).input_ids)
        ids = tokenizer(ctx + ans, add_special_tokens=False).input_ids
        if len(ids) <= start:  # an empty answer: pool the last context token
            start = len(ids) - 1
        cut = max(0, len(ids) - max_tokens)
        seqs.append((ids[cut:], max(0, start - cut)))
    device = next(model.parameters()).device
    out: dict[int, list] = {layer: [] for layer in layers}
    for b in range(0, len(seqs), batch_size):
        batch = seqs[b : b + batch_size]
        T = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros((len(batch), T), dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for i, (ids, _) in enumerate(batch):  # right padding: positions match the unpadded run
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        hs = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True).hidden_states
        for layer in layers:
            h = hs[layer].float().cpu()  # (B, T, H)
            for i, (ids, start) in enumerate(batch):
                span = h[i, start : len(ids)] if pool == "mean" else h[i, len(ids) - 1 : len(ids)]
                out[layer].append(span.mean(0).numpy())
    return {layer: np.stack(v).astype(np.float64) for layer, v in out.items()}


def fit_probe(feats: np.ndarray, labels: Sequence[int], cfg: ProbeConfig, layer: int, groups: Sequence | None = None) -> Probe:
    """Standardise, then L2 logistic regression with C chosen by an inner (grouped) CV on these rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    y = np.asarray(labels, dtype=int)
    if len(set(y.tolist())) != 2:
        raise DataError("the probe needs both correct (0) and wrong (1) answers to train on")
    mean, scale = feats.mean(0), feats.std(0)
    scale[scale < 1e-6] = 1.0
    x = (feats - mean) / scale
    best_c, best = cfg.cs[0], -1.0
    if len(cfg.cs) > 1:
        inner = min(3, int(np.bincount(y).min()))
        if inner >= 2:
            splits = (GroupKFold(inner).split(x, y, groups) if groups is not None
                      else StratifiedKFold(inner, shuffle=True, random_state=cfg.seed).split(x, y))
            splits = list(splits)
            for c in cfg.cs:
                s = []
                for tr, te in splits:
                    if len(set(y[tr].tolist())) < 2 or len(set(y[te].tolist())) < 2:
                        continue
                    m = LogisticRegression(C=c, max_iter=2000).fit(x[tr], y[tr])
                    s.append(_auroc_np(m.decision_function(x[te]), y[te]))
                if s and np.mean(s) > best:
                    best_c, best = c, float(np.mean(s))
    m = LogisticRegression(C=best_c, max_iter=2000).fit(x, y)
    return Probe(m.coef_[0].astype(np.float64), float(m.intercept_[0]), mean, scale, layer, cfg.pool,
                 {"C": best_c, "n_train": int(len(y))})


def _auroc_np(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores))


def cross_val_risk(feats: np.ndarray, labels: Sequence[int], groups: Sequence, cfg: ProbeConfig, layer: int) -> np.ndarray:
    """Out-of-fold risk of every row: each is scored by a probe trained on the other folds' questions."""
    from sklearn.model_selection import GroupKFold

    y = np.asarray(labels, dtype=int)
    uniq = len(set(groups))
    if uniq < cfg.folds:
        raise DataError(f"{cfg.folds} probe folds need at least {cfg.folds} distinct questions, got {uniq}")
    risk = np.zeros(len(y))
    for tr, te in GroupKFold(cfg.folds).split(feats, y, list(groups)):
        g_tr = [groups[i] for i in tr]
        risk[te] = fit_probe(feats[tr], y[tr], cfg, layer, g_tr).risk(feats[te])
    return risk


def save_probe(probe: Probe, path: str | Path) -> Path:
    """Write ``probe`` as one safetensors file (tensors + JSON metadata), atomically."""
    from safetensors.numpy import save_file

    from slmkit.artefact import atomic_file

    path = Path(path)
    meta = {"slmkit_probe": json.dumps({"layer": probe.layer, "pool": probe.pool, "intercept": probe.intercept, **probe.meta})}
    tensors = {k: np.ascontiguousarray(getattr(probe, k), dtype=np.float64) for k in ("coef", "mean", "scale")}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_probe(path: str | Path) -> Probe:
    """Read a probe written by :func:`save_probe` (a clear error for anything else)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"probe file {path} does not exist", "train one with slmkit judge --signal probe --save-probe FILE")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["slmkit_probe"])
            t = {k: f.get_tensor(k) for k in ("coef", "mean", "scale")}
        layer, pool, intercept = int(meta.pop("layer")), str(meta.pop("pool")), float(meta.pop("intercept"))
    except Exception as err:  # safetensors raises several types for a bad file
        raise DataError(f"{path} is not a probe written by slmkit ({type(err).__name__}: {err})") from None
    return Probe(t["coef"], intercept, t["mean"], t["scale"], layer, pool, meta)
