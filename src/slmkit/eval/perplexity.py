"""Sliding-window perplexity, as in the Hugging Face perplexity guide.

The text is tokenised once. Windows of ``context`` tokens start every
``stride`` tokens; each window scores only the tokens the previous window did
not score, so with ``stride < context`` every token after the first window is
predicted from at least ``context - stride`` tokens of history. A window's
first token has no history inside the window and is never scored (so with
``stride == context`` one token per window is skipped, exactly like the HF
guide's label masking). Perplexity is
``exp(sum NLL / scored tokens)`` with the exact count of scored tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from slmkit.data.readers import read_utf8
from slmkit.errors import ConfigError, DataError


@dataclass(frozen=True)
class PerplexityConfig:
    context: int = 512  #: tokens per window
    stride: int = 512  #: tokens between window starts (<= context)
    max_tokens: int | None = None  #: use only the first N tokens of the text (None = all)
    add_bos: bool = False  #: prepend the tokenizer's BOS token

    def __post_init__(self):
        if self.context < 2:
            raise ConfigError(f"--context must be >= 2, got {self.context}")
        if not 1 <= self.stride <= self.context:
            raise ConfigError(f"--stride must be in [1, context={self.context}], got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"--max-tokens must be >= 2, got {self.max_tokens}")


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  #: mean negative log-likelihood per scored token (nats)
    tokens: int  #: tokens scored
    windows: int
    context: int
    stride: int
    source: str = ""


def read_text(path: str | Path) -> str:
    """The text of a perplexity file (UTF-8, not empty)."""
    return read_utf8(path, "perplexity file", "pass a text file with some content")


@torch.inference_mode()
def perplexity(model, tokenizer, text: str | Sequence[str], cfg: PerplexityConfig = PerplexityConfig(), source: str = "",
               logits_fn=None) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (a string, or texts joined with blank lines).

    ``logits_fn(window (1, T)) -> (T, V)`` replaces ``model``'s forward (e.g. slmkit's fast path on a
    GGUF file's own codes: :func:`slmkit.eval.efficiency.fast_logits_fn`)."""
    if not isinstance(text, str):
        text = "\n\n".join(text)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if cfg.add_bos and tokenizer.bos_token_id is not None:
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    if cfg.max_tokens is not None:
        ids = ids[: cfg.max_tokens]
    if ids.numel() < 2:
        raise DataError(f"text{' ' + source if source else ''} has {ids.numel()} tokens; perplexity needs at least 2")
    device = next(model.parameters()).device if logits_fn is None else torch.device("cpu")
    n = ids.numel()
    total_nll = 0.0
    scored = 0
    windows = 0
    prev_end = 1  # token 0 is never scored
    begin = 0
    while prev_end < n:
        end = min(begin + cfg.context, n)
        window = ids[begin:end].to(device)[None]  # (1, T)
        logits = (model(window).logits[0] if logits_fn is None else logits_fn(window)).float()  # (T, V)
        # position t predicts token t+1; score targets in [prev_end, end)
        # a window's first token has no history inside the window: with stride == context
        # it is skipped (one token per window, as in the HF guide's label masking)
        first = max(prev_end - begin, 1)
        targets = window[0, first:end - begin]
        lp = F.log_softmax(logits[first - 1 : end - begin - 1], dim=-1)
        total_nll -= lp.gather(-1, targets[:, None]).sum().item()
        scored += targets.numel()
        windows += 1
        prev_end = end
        begin += cfg.stride
        if end == n:
            break
    nll = total_nll / scored
    return PerplexityResult(math.exp(nll), nll, scored, windows, cfg.context, cfg.stride, source)
