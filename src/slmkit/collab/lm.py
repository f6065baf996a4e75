"""Cached causal LMs and the compatibility checks shared by speculative decoding and its drafters.

:class:`CachedLM` is a transformers causal LM with its KV cache (``DynamicCache``), :class:`FastLM` the same
interface on slmkit's fast path (:mod:`slmkit.runtime.generate`); :func:`token_probs` is the sampling
distribution both sides of the acceptance rule (Leviathan et al. 2023) compare; speculative decoding and
proxy tuning compare token ids, so :func:`check_same_vocab` / :func:`check_same_tokenizer` guard the pairing.
:mod:`slmkit.collab.speculative` and :mod:`slmkit.collab.drafters` both build on this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmkit.errors import UnsupportedModelError


def token_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution of ``logits`` (..., V) after temperature and nucleus (top-p) filtering."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return out / out.sum(-1, keepdim=True)



# --------------------------------------------------------------------------- cached models


class CachedLM:
    """A causal LM plus its KV cache; ``n`` is how many context tokens the cache holds."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.n = 0
        self.calls = 0

    def feed(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Run ``ids`` (T,) after the cached context; logits (keep, V) of the last ``keep`` positions."""
        out = self.model(input_ids=ids[None], cache=self.cache, use_cache=True, logits_to_keep=keep)
        self.cache = out.cache
        self.n += ids.shape[0]
        self.calls += 1
        return out.logits[0]

    def feed_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Like :meth:`feed` but returns the last position's final hidden state (H,), no LM head."""
        out = self.model.base_model(input_ids=ids[None], cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.n += ids.shape[0]
        self.calls += 1
        return out.last_hidden_state[0, -1]

    def crop(self, n: int) -> None:
        """Forget every cached token past the first ``n``."""
        if n < self.n:
            self.cache.crop(n - self.n)  # transformers 5: a negative value removes that many tokens
            self.n = n


class FastLM:
    """The target on slmkit's fast path: same interface as :class:`CachedLM`.

    An fp32 model loaded from a GGUF file runs that file's own blocks in full precision
    (:func:`slmkit.runtime.gguffast.exact_model`: the same weights bit for bit, read at the file's 4-8 bits a weight
    instead of 32); any other model shares its weights with the transformers model."""

    def __init__(self, model, capacity: int):
        from slmkit.runtime import generate as G
        from slmkit.runtime.gguffast import exact_model

        dt = next(model.parameters()).dtype
        self.G = G
        cfg = G.FastConfig(dtype="bf16" if dt == torch.bfloat16 else "fp32")
        self.fm = exact_model(model, cfg) or G.build(model, cfg)
        self.cache = self.fm.new_cache("full", context=min(self.fm.max_positions, capacity))
        self.n = 0
        self.calls = 0

    def feed(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        out = self.G.forward(self.fm, [self.G.Segment(ids.cpu(), self.cache, all_logits=keep > 1)])[0]
        self.n += ids.shape[0]
        self.calls += 1
        return out[-keep:] if keep > 1 else out[None]

    def crop(self, n: int) -> None:
        if n < self.n:
            self.cache.rewind(n)
            self.n = n


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_same_vocab(target, draft) -> None:
    """Speculative decoding compares token ids, so both models must share one vocabulary."""
    vt, vd = _vocab_size(target), _vocab_size(draft)
    if vt != vd:
        raise UnsupportedModelError(
            f"the draft's vocabulary ({vd} tokens) differs from the target's ({vt}); speculative decoding "
            "needs both models to use the same tokenizer",
            "use a draft from the same family (a pruned or distilled copy), or --draft lookup",
        )


def check_same_tokenizer(tok_a, tok_b, what: str = "these models") -> None:
    """Raise :class:`UnsupportedModelError` unless both tokenizers map the same strings to the same ids."""
    if tok_a is tok_b:
        return
    if len(tok_a) != len(tok_b) or tok_a.get_vocab() != tok_b.get_vocab():
        raise UnsupportedModelError(
            f"{what} need one shared tokenizer, but the two tokenizers differ "
            f"({len(tok_a)} vs {len(tok_b)} tokens{'' if len(tok_a) != len(tok_b) else ', different ids'})",
            "pick models of the same family (e.g. a pruned or distilled copy of the large one)",
        )
