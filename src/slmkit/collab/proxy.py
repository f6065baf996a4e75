"""Decoding-time steering of one model by others: proxy-tuning and contrastive decoding.

* Proxy-tuning (Liu et al. 2024, "Tuning Language Models by Proxy", arXiv:2401.08565,
  Eq. 1): ``s = large + alpha * (expert - base)``, where ``expert`` is a tuned small model
  and ``base`` the same small model untuned; the large model inherits the tuning's
  logit shift without its weights being touched.
* Contrastive decoding (Li et al. 2023, "Contrastive Decoding", arXiv:2210.15097, Eq. 3-4):
  among the plausible tokens ``V_head = {x : p_exp(x) >= alpha * max_w p_exp(w)}`` pick
  ``argmax log p_exp(x) - log p_ama(x)``; tokens outside ``V_head`` are excluded.

Both combine next-token logits position by position, so every model must use the same
tokenizer (same ids for the same strings); :func:`check_same_vocab` says so otherwise.
Each model keeps its own KV cache (see :mod:`slmkit.collab.speculative`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slmkit.collab.speculative import SpecOutput, as_ids, CachedLM, model_device, finish_output, check_same_vocab, token_probs
from slmkit.errors import ConfigError


@dataclass(frozen=True)
class ProxyConfig:
    alpha: float = 1.0  #: strength of the (expert - base) shift; 1.0 as in the paper
    max_new_tokens: int = 64
    temperature: float = 0.0  #: 0 = greedy
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not math.isfinite(self.alpha):
            raise ConfigError(f"alpha must be finite, got {self.alpha}")
        if self.max_new_tokens < 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("need max_new_tokens >= 0, temperature >= 0 and top_p in (0, 1]")


@dataclass(frozen=True)
class ContrastiveConfig:
    alpha: float = 0.1  #: plausibility cut-off: keep tokens with p_exp >= alpha * max p_exp, in (0, 1]
    max_new_tokens: int = 64
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"alpha (plausibility cut-off) must be in (0, 1], got {self.alpha}")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


def proxy_logits(large: torch.Tensor, expert: torch.Tensor, base: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Proxy-tuned scores (..., V): large + alpha * (expert - base)  (Liu et al. 2024, Eq. 1).

    Written in log-probabilities so each model's arbitrary logit offset cancels.
    """
    lp = lambda x: F.log_softmax(x.float(), dim=-1)  # noqa: E731
    return lp(large) + alpha * (lp(expert) - lp(base))


def contrastive_scores(expert: torch.Tensor, amateur: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """CD scores (..., V): log p_exp - log p_ama on V_head, -inf elsewhere (Li et al. 2023, Eq. 3-4)."""
    lpe, lpa = F.log_softmax(expert.float(), -1), F.log_softmax(amateur.float(), -1)
    head = lpe >= lpe.max(-1, keepdim=True).values + math.log(alpha)  # p_exp(x) >= alpha * max p_exp
    return (lpe - lpa).masked_fill(~head, -math.inf)


@torch.inference_mode()
def combined_decode(
    models: Sequence, combine: Callable[[list[torch.Tensor]], torch.Tensor], ids, max_new_tokens: int,
    temperature: float = 0.0, top_p: float = 1.0, eos_token_ids: tuple[int, ...] = (), gen: torch.Generator | None = None,
) -> SpecOutput:
    """Decode token by token from ``combine([logits of each model])``; every model keeps a KV cache."""
    import time

    t0 = time.perf_counter()
    for m in models[1:]:
        check_same_vocab(models[0], m)
    ctx = as_ids(ids)
    lms = [CachedLM(m) for m in models]
    out = SpecOutput(tokens=[])
    eos = set(eos_token_ids)
    feed = ctx
    while len(out.tokens) < max_new_tokens:
        scores = combine([lm.feed(feed.to(model_device(lm.model)), 1)[-1].cpu() for lm in lms])
        if temperature == 0:
            tok = int(scores.argmax(-1))
        else:
            tok = int(torch.multinomial(token_probs(scores, temperature, top_p), 1, generator=gen))
        out.tokens.append(tok)
        if tok in eos:
            break
        feed = torch.tensor([tok])
    out.target_calls = lms[0].calls
    out.seconds = time.perf_counter() - t0
    from slmkit.collab.speculative import SpecConfig

    return finish_output(out, SpecConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids))


def proxy_tune(large, expert, base, ids, cfg: ProxyConfig, gen: torch.Generator | None = None) -> SpecOutput:
    """Generate from ``large`` steered by ``expert - base`` (all three share one vocabulary)."""
    return combined_decode(
        [large, expert, base], lambda l: proxy_logits(l[0], l[1], l[2], cfg.alpha), ids,
        cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.eos_token_ids, gen,
    )


def contrastive(expert, amateur, ids, cfg: ContrastiveConfig) -> SpecOutput:
    """Greedy contrastive decoding of ``expert`` against ``amateur`` (same vocabulary)."""
    return combined_decode(
        [expert, amateur], lambda l: contrastive_scores(l[0], l[1], cfg.alpha), ids,
        cfg.max_new_tokens, 0.0, 1.0, cfg.eos_token_ids,
    )
