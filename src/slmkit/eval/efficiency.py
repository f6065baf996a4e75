"""Efficiency: load time, peak memory, prefill and decode throughput, time to first token.

Decode speed is measured with a plain greedy loop over the model's KV cache
(one token per forward pass), after a warm-up run, so it reflects the model
and not Python start-up. Peak RSS is the process' high-water mark
(``getrusage``), which includes everything loaded before the measurement.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from slmkit.errors import ConfigError


@dataclass(frozen=True)
class EfficiencyConfig:
    prompt_tokens: int = 128  #: prefill length
    new_tokens: int = 64  #: decode length
    repeats: int = 3  #: timed repetitions (median is reported)
    seed: int = 0

    def __post_init__(self):
        if self.prompt_tokens < 1 or self.new_tokens < 1 or self.repeats < 1:
            raise ConfigError("prompt_tokens, new_tokens and repeats must all be >= 1")


@dataclass
class EfficiencyResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    time_to_first_token_s: float
    peak_rss_mb: float
    prompt_tokens: int
    new_tokens: int
    dtype: str
    threads: int
    load_time_s: float | None = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _result(prefills, ttfts, decodes, cfg: EfficiencyConfig, dtype, load_time_s) -> EfficiencyResult:
    return EfficiencyResult(
        prefill_tokens_per_s=_median(prefills),
        decode_tokens_per_s=_median(decodes),
        time_to_first_token_s=_median(ttfts),
        peak_rss_mb=peak_rss_mb(),
        prompt_tokens=cfg.prompt_tokens,
        new_tokens=cfg.new_tokens,
        dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
        load_time_s=load_time_s,
    )


@torch.inference_mode()
def decode_loop(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy decode; returns (generated ids, prefill+first-token seconds, decode seconds)."""
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    past = out.cache
    t1 = time.perf_counter()
    gen = [nxt]
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, cache=past, use_cache=True)
        past = out.cache
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        gen.append(nxt)
    t2 = time.perf_counter()
    return torch.cat(gen, dim=1), t1 - t0, t2 - t1


@torch.inference_mode()
def measure(model, cfg: EfficiencyConfig = EfficiencyConfig(), load_time_s: float | None = None) -> EfficiencyResult:
    """Measure prefill/decode speed of ``model`` on random token ids (greedy, batch 1)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, cfg.prompt_tokens), generator=g).to(device)
    model(input_ids=ids[:, :8])  # warm-up
    decode_loop(model, ids[:, :16], 4)
    prefills, ttfts, decodes = [], [], []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        prefills.append(cfg.prompt_tokens / (time.perf_counter() - t0))
        _, ttft, dec = decode_loop(model, ids, cfg.new_tokens + 1)
        ttfts.append(ttft)
        decodes.append(cfg.new_tokens / dec)
    return _result(prefills, ttfts, decodes, cfg, next(model.parameters()).dtype, load_time_s)


@torch.inference_mode()
def measure_fast(fm, cfg: EfficiencyConfig = EfficiencyConfig(), load_time_s: float | None = None) -> EfficiencyResult:
    """Measure slmkit's fast path (:mod:`slmkit.runtime.generate`): prefill of ``prompt_tokens`` into a
    fresh cache, then greedy decode steps one token at a time, as ``generate --fast`` and the server run
    (the fused decode step where the model has one). ``fm`` is a FastModel (``build`` / ``build_gguf``)."""
    from slmkit.runtime.generate import decode_one_token, prefill

    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, fm.vocab, (cfg.prompt_tokens,), generator=g)
    ctx = cfg.prompt_tokens + cfg.new_tokens + 1

    def run(n_new: int) -> tuple[float, float, float]:
        cache = fm.new_cache(context=ctx)
        t0 = time.perf_counter()
        logits = prefill(fm, ids, cache)
        t1 = time.perf_counter()
        tok = int(logits.argmax())
        for _ in range(n_new):
            tok = int(decode_one_token(fm, tok, cache).argmax())
        t2 = time.perf_counter()
        return t1 - t0, t1 - t0, t2 - t1

    run(4)  # warm-up (kernel build, first-touch of the weights)
    prefills, ttfts, decodes = [], [], []
    for _ in range(cfg.repeats):
        pre, ttft, dec = run(cfg.new_tokens)
        prefills.append(cfg.prompt_tokens / pre)
        ttfts.append(ttft)
        decodes.append(cfg.new_tokens / dec)
    return _result(prefills, ttfts, decodes, cfg, fm.dtype, load_time_s)


def fast_logits_fn(fm):
    """``window (1, T) -> logits (T, V)`` through the fast path (a fresh cache per window), for
    :func:`slmkit.eval.perplexity.perplexity`'s ``logits_fn``: scores exactly what the fast path runs."""
    from slmkit.runtime.generate import Segment, forward

    @torch.inference_mode()
    def fn(window: torch.Tensor) -> torch.Tensor:
        ids = window[0]
        cache = fm.new_cache(context=int(ids.numel()))
        return forward(fm, [Segment(ids, cache, all_logits=True)])[0]

    return fn

