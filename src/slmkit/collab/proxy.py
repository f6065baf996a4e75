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

from slmkit.collab.lm import CachedLM, check_same_vocab, model_device, token_probs
from slmkit.collab.speculative import SpecOutput, as_ids, finish_output
from slmkit.errors import ConfigError
from slmkit.runtime.decoding import draw


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
            tok = draw(token_probs(scores, temperature, top_p), gen)
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


# --------------------------------------------------------------------------- generate and evaluate

#: the decoders compared by :func:`evaluate_proxy`: the large model alone, each small model alone, proxy-tuned
SYSTEMS = ("base", "tuned", "untuned", "proxy")


def encode_prompt(tok, prompt, chat: bool | None = None) -> torch.Tensor:
    """Token ids of ``prompt``: through the chat template when ``chat`` (None: when the tokenizer has one), else raw text."""
    from slmkit.backends.text import render_prompt

    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    if chat:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tok(render_prompt(tok, msgs), add_special_tokens=False).input_ids
    else:
        ids = tok(prompt).input_ids
    if not ids:
        pid = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = [pid if pid is not None else 0]
    return torch.tensor(ids, dtype=torch.long)


def decode_system(system: str, large, tuned, untuned, ids, cfg: ProxyConfig, gen: torch.Generator | None = None) -> SpecOutput:
    """One of :data:`SYSTEMS` on ``ids``, all through the same token loop (so only the scores differ)."""
    if system == "proxy":
        return proxy_tune(large, tuned, untuned, ids, cfg, gen)
    model = {"base": large, "tuned": tuned, "untuned": untuned}.get(system)
    if model is None:
        raise ConfigError(f"unknown proxy system {system!r}; known: {', '.join(SYSTEMS)}")
    return combined_decode([model], lambda l: l[0], ids, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.eos_token_ids, gen)


def evaluate_proxy(large, tuned, untuned, tok, rows: Sequence[dict], cfg: ProxyConfig, chat: bool = True,
                   reference=None) -> dict:
    """Task quality of the large model alone, each small model alone, and proxy-tuned, on ``rows``.

    Rows are ``{question | prompt, answer(s), context?}``; a prediction is scored by containment
    of a normalised gold answer and by token F1 (:mod:`slmkit.collab.cascade`). The tuning gap
    closed is ``(proxy - base) / (reference - base)`` with ``reference`` a directly tuned large
    model (Liu et al. 2024, Sec. 3), and ``(proxy - base) / (tuned - base)`` against the tuned small one.
    """
    from slmkit.collab.cascade import answer_correct, qa_prompt, token_f1

    eos = set(cfg.eos_token_ids)
    systems = {s: None for s in SYSTEMS} | ({"reference": reference} if reference is not None else {})
    scores: dict[str, dict] = {s: {"correct": 0.0, "f1": 0.0} for s in systems}
    examples = []
    for row in rows:
        golds = row.get("answer", row.get("answers"))
        golds = [golds] if isinstance(golds, str) else [str(g) for g in golds]
        prompt = row["prompt"] if "prompt" in row else qa_prompt(str(row["question"]), row.get("context"), chat)
        ids = encode_prompt(tok, prompt, chat)
        ex = {"prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"], "answer": golds}
        for s in systems:
            out = (decode_system(s, large, tuned, untuned, ids, cfg) if s != "reference"
                   else decode_system("base", reference, tuned, untuned, ids, cfg))
            text = tok.decode([t for t in out.tokens if t not in eos], skip_special_tokens=True).strip()
            scores[s]["correct"] += answer_correct(text, golds) / len(rows)
            scores[s]["f1"] += max(token_f1(text, g) for g in golds) / len(rows)
            ex[s] = text
        examples.append(ex)
    report: dict = {"n": len(rows), "alpha": cfg.alpha, "metrics": scores}
    for metric in ("correct", "f1"):
        base, proxy = scores["base"][metric], scores["proxy"][metric]
        gaps = {"tuned": scores["tuned"][metric]} | ({"reference": scores["reference"][metric]} if reference is not None else {})
        for name, top in gaps.items():
            # a fraction of a gap only where there is one (top above base); else None, not a ratio of two losses
            report[f"gap_closed_vs_{name}_{metric}"] = (proxy - base) / (top - base) if top > base else None
        report[f"small_tuning_gain_{metric}"] = scores["tuned"][metric] - scores["untuned"][metric]
        report[f"proxy_gain_{metric}"] = proxy - base
    report["examples"] = examples
    return report
