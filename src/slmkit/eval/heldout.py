"""Quality against a reference model on held-out text: perplexity, mean KL divergence, top-1 agreement.

Scored the way llama.cpp's ``llama-perplexity --kl-divergence`` scores a quantised file against
its base model: the text is cut into ``chunks`` windows of ``context`` tokens, and the second
half of each window is scored: the tokens at positions context/2 + 1 .. context - 1, each
predicted with at least context/2 tokens of history (``context / 2 - 1`` tokens per window). Per scored token t with reference distribution P_t and candidate distribution Q_t:

* perplexity = exp(mean_t -log Q_t(x_{t+1}));
* KL divergence = mean_t sum_v P_t(v) log(P_t(v) / Q_t(v))  (reference || candidate);
* top-1 agreement = mean_t [argmax P_t == argmax Q_t].

Each comes with its standard error over tokens (perplexity's by the delta method:
se(ppl) = ppl * se(nll)), as llama.cpp prints them. Tokens within one window are correlated, so
these intervals are a little narrow; differences between two files on the same tokens are
better resolved than the two intervals suggest (the errors are positively correlated).

Two scorers are registered in :data:`SCORERS`: ``llama.cpp`` (llama-perplexity on the GGUF files,
fast; needs the tools of :mod:`slmkit.export.llamacpp`) and ``slmkit`` (the files loaded
dequantised through transformers and scored with PyTorch; always available). One run uses one
scorer for every file.

:func:`split_lines` cuts a text into a calibration part and a disjoint evaluation part by lines.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import ConfigError, DataError
from slmkit.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreConfig:
    context: int = 512  #: tokens per window; the second half of each window is scored
    chunks: int = 20  #: windows scored (chunks * context / 2 tokens)
    threads: int | None = None  #: threads for the scorer (None: PyTorch's count)

    def __post_init__(self):
        if self.context < 4 or self.context % 2:
            raise ConfigError(f"context must be an even number >= 4, got {self.context}")
        if self.chunks < 1:
            raise ConfigError(f"chunks must be >= 1, got {self.chunks}")


@dataclass
class Quality:
    """One file's scores against the reference; ``*_err`` are standard errors."""

    perplexity: float
    perplexity_err: float | None = None
    kl_divergence: float | None = None
    kl_divergence_err: float | None = None
    top1_agreement: float | None = None
    top1_agreement_err: float | None = None
    tokens: int | None = None


@dataclass(frozen=True)
class Scorer:
    """``run(reference, files, text, cfg, work) -> (reference's Quality, [Quality per file])``."""

    run: Callable[[Path, Sequence[Path], Path, ScoreConfig, Path], tuple[Quality, list[Quality]]]
    available: Callable[[], bool]
    what: str  #: one line for the report


SCORERS: Registry[Scorer] = Registry("quality scorer")


def split_lines(text: str, calib_fraction: float) -> tuple[str, str]:
    """(calibration text, evaluation text): the first ``calib_fraction`` of the lines, and the rest."""
    if not 0 < calib_fraction < 1:
        raise ConfigError(f"calib_fraction must be in (0, 1), got {calib_fraction}")
    lines = text.split("\n")
    cut = int(len(lines) * calib_fraction)
    if cut < 1 or cut >= len(lines):
        raise DataError(f"the text has {len(lines)} lines: too few to split {calib_fraction:.0%} off for calibration")
    return "\n".join(lines[:cut]), "\n".join(lines[cut:])


def score_threads(cfg: ScoreConfig) -> int:
    import torch

    return cfg.threads or torch.get_num_threads()


def _llamacpp_perplexity(*args, tries: int = 12, **kw):
    """``llamacpp.perplexity``, run again when its statistics are missing from the output: llama.cpp's
    asynchronous logger (common/log.cpp, a worker thread never joined at exit) can drop the last lines
    of a run that exits right after printing them; seen in about half the runs on a tiny model, and
    in none of 18 on the default model, where freeing the model gives the logger time."""
    from slmkit.errors import SlmkitError
    from slmkit.export import llamacpp

    for i in range(tries):
        try:
            return llamacpp.perplexity(*args, **kw)
        except SlmkitError as err:
            if not err.problem.startswith("could not read a perplexity") or i == tries - 1:
                raise
            log.warning("llama-perplexity printed no statistics for %s; running it again", args[0])
    raise AssertionError("unreachable")


def llamacpp_scores(reference: Path, files: Sequence[Path], text: Path, cfg: ScoreConfig,
                    work: Path) -> tuple[Quality, list[Quality]]:
    """``llama-perplexity`` saves the reference's log-probabilities, then compares every file with them."""
    base = work / f"reference-{cfg.context}x{cfg.chunks}.kld"
    try:
        ref = _llamacpp_perplexity(reference, text, ctx=cfg.context, chunks=cfg.chunks, save_base=base,
                                  threads=score_threads(cfg))
        if ref.chunks is not None and ref.chunks < cfg.chunks:
            raise DataError(f"the evaluation text has only {ref.chunks} windows of {cfg.context} tokens; {cfg.chunks} asked",
                            "use a longer text or fewer chunks")
        out = []
        for f in files:
            r = _llamacpp_perplexity(f, kl_base=base, ctx=cfg.context, threads=score_threads(cfg))
            out.append(Quality(r.perplexity, r.perplexity_err, r.kl_divergence, r.kl_divergence_err,
                               r.top1_agreement, r.top1_agreement_err, cfg.chunks * (cfg.context // 2 - 1)))
            log.info("llama-perplexity %s: ppl %.3f, KLD %s", Path(f).name, r.perplexity, r.kl_divergence)
    finally:
        base.unlink(missing_ok=True)  # chunks * context/2 * vocab * 2 bytes (500 MB for 20 x 512 of a 49k vocab)
    return Quality(ref.perplexity, ref.perplexity_err, 0.0, 0.0, 1.0, 0.0, cfg.chunks * (cfg.context // 2 - 1)), out


def _windows(tokenizer, text: Path, cfg: ScoreConfig):
    import torch

    from slmkit.eval.perplexity import read_text

    ids = tokenizer(read_text(text), add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // cfg.context
    if n < cfg.chunks:
        raise DataError(f"the evaluation text has {ids.numel():,} tokens: {n} windows of {cfg.context}; {cfg.chunks} asked",
                        "use a longer text or fewer chunks")
    return ids[: cfg.chunks * cfg.context].view(cfg.chunks, cfg.context).to(torch.long)  # (C, T)


def _mean_se(xs) -> tuple[float, float]:
    n = xs.numel()
    mean = float(xs.mean())
    return mean, (float(xs.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0)


def slmkit_scores(reference: Path, files: Sequence[Path], text: Path, cfg: ScoreConfig,
                  work: Path) -> tuple[Quality, list[Quality]]:
    """Every file loaded dequantised (:func:`slmkit.models.load`) and scored in PyTorch, fp32.

    The reference's log-probabilities on the scored half of each window are kept in memory in fp32
    (chunks * context/2 * vocab * 4 bytes: 1 GB for 20 windows of 512 with a 49k vocabulary); 16-bit
    log-probabilities would move a KL divergence of 1e-3 by about as much.
    """
    import torch

    from slmkit.models import load

    half = cfg.context // 2
    torch.set_num_threads(score_threads(cfg))

    @torch.inference_mode()
    def logprobs(model, windows):
        for w in windows:  # positions half .. T-2 predict tokens half+1 .. T-1 (llama-perplexity's "first = n_ctx/2")
            yield torch.log_softmax(model(w[None]).logits[0, half:-1].float(), -1)  # (T/2 - 1, V)

    model, tok = load(str(reference))
    windows = _windows(tok, text, cfg)
    targets = windows[:, half + 1:]  # (C, T/2 - 1): token t+1 scored from position t
    ref_lp, ref_nll, ref_top = [], [], []
    for lp, tgt in zip(logprobs(model, windows), targets):
        ref_nll.append(-lp.gather(-1, tgt[:, None])[:, 0])
        ref_top.append(lp.argmax(-1))
        ref_lp.append(lp)
    del model
    nll = torch.cat(ref_nll)
    m, se = _mean_se(nll)
    ref_q = Quality(math.exp(m), math.exp(m) * se, 0.0, 0.0, 1.0, 0.0, int(nll.numel()))
    out = []
    for f in files:
        model, ftok = load(str(f))
        if len(ftok) != len(tok) or ftok.get_vocab() != tok.get_vocab():
            raise ConfigError(f"{Path(f).name} has another tokenizer than the reference; KL divergence needs the same vocabulary")
        nlls, kls, same = [], [], []
        for lp, tgt, p_lp, p_top in zip(logprobs(model, windows), targets, ref_lp, ref_top):
            p = p_lp
            nlls.append(-lp.gather(-1, tgt[:, None])[:, 0])
            kls.append((p.exp() * (p - lp)).sum(-1))  # KL(P || Q) per token
            same.append((lp.argmax(-1) == p_top).float())
        del model
        nll_f, kl_f, same_f = torch.cat(nlls), torch.cat(kls), torch.cat(same)
        m, se = _mean_se(nll_f)
        kl, kl_se = _mean_se(kl_f)
        agree, agree_se = _mean_se(same_f)
        out.append(Quality(math.exp(m), math.exp(m) * se, kl, kl_se, agree, agree_se, int(nll_f.numel())))
        log.info("slmkit scorer %s: ppl %.3f, KLD %.5f", Path(f).name, math.exp(m), kl)
    return ref_q, out


def _llamacpp_available() -> bool:
    from slmkit.export import llamacpp

    return llamacpp.tools() is not None


SCORERS.add("llama.cpp", Scorer(llamacpp_scores, _llamacpp_available,
                                "llama.cpp's llama-perplexity --kl-divergence on each GGUF file"))
SCORERS.add("slmkit", Scorer(slmkit_scores, lambda: True,
                             "slmkit: each GGUF file dequantised through transformers, scored in PyTorch (fp32)"))


def pick_scorer(name: str) -> str:
    """``auto`` -> ``llama.cpp`` where its tools are installed, else ``slmkit``; a named scorer must be available."""
    if name == "auto":
        return "llama.cpp" if SCORERS.get("llama.cpp").available() else "slmkit"
    if not SCORERS.get(name).available():
        from slmkit.export.llamacpp import HOW

        raise ConfigError(f"scorer {name!r} is not available here", HOW)
    return name


def score(reference: Path, files: Sequence[Path], text: Path, cfg: ScoreConfig, work: Path,
          scorer: str = "auto") -> tuple[str, Quality, list[Quality]]:
    """(scorer used, the reference's own Quality, one Quality per file), all on the same tokens of ``text``."""
    name = pick_scorer(scorer)
    ref, out = SCORERS.get(name).run(Path(reference), [Path(f) for f in files], Path(text), cfg, Path(work))
    return name, ref, out
