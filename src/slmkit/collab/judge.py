"""Judge and hallucination guard: a small model scores (question, answer) pairs.

Two risk scores, higher = more likely hallucinated:

* ``logprob``: minus the mean token log-probability of the answer given the question
  under the judging model (token-probability confidence; Kadavath et al. 2022 and the
  grey-box baselines of Manakul et al. 2023).
* ``consistency``: SelfCheckGPT (Manakul et al. 2023, arXiv:2303.08896), with unigram
  overlap as the consistency measure: sample ``samples`` answers to the question and
  take ``1 - mean_i F1(answer, sample_i)``; an answer the model cannot reproduce
  under sampling is flagged (the n-gram variant of Sec. 5.3, without NLI or QA models).
* ``probe``: the wrong-answer probability of a linear probe on the judging model's hidden
  states over question + answer (Azaria & Mitchell 2023, arXiv:2304.13734; see
  :mod:`slmkit.collab.probe`): a trained probe file, or, on labelled rows, out-of-fold
  scores of probes trained on the other questions (so every score is held out).

Detection quality is the AUROC of the risk against hallucination labels, with a percentile
bootstrap interval over items (Efron & Tibshirani 1993, Ch. 13); the labelled
set here is built from TruthfulQA (Lin et al. 2022): for each question its best correct
answer (label 0) and its first incorrect answer (label 1).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.backends.base import Backend, GenParams
from slmkit.collab.cascade import wants_chat, token_f1
from slmkit.collab.probe import Probe, ProbeConfig, cross_val_risk, fit_probe, hidden_features, load_probe, resolve_layer
from slmkit.data.readers import Lines
from slmkit.errors import ConfigError, DataError
from slmkit.registry import Registry

log = logging.getLogger(__name__)

#: risk scorers: ``fn(backend, items, cfg) -> list[float]`` (higher = more likely hallucinated)
JUDGES: Registry[Callable] = Registry("judge method")


@dataclass(frozen=True)
class JudgeConfig:
    method: str = "logprob"  #: logprob | consistency | probe
    samples: int = 4  #: sampled answers per question (consistency)
    max_new_tokens: int = 24  #: length of each sampled answer (tokens)
    temperature: float = 0.8  #: temperature of the samples
    threshold: float | None = None  #: flag items whose risk exceeds this (None: report scores only)
    probe: str | None = None  #: probe method: a trained probe file (None: cross-validate on labelled rows)
    probe_cfg: ProbeConfig = field(default_factory=ProbeConfig)  #: probe method: layer, pooling, folds
    seed: int = 0

    def __post_init__(self):
        if self.method not in JUDGES:
            JUDGES.get(self.method)
        if self.samples < 2:
            raise ConfigError(f"samples must be >= 2, got {self.samples}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for sampling, got {self.temperature}")


@dataclass(frozen=True)
class QAItem:
    question: str
    answer: str
    label: int | None = None  #: 1 = hallucinated / incorrect, 0 = correct


def question_context(backend: Backend, question: str) -> str:
    """The text an answer is scored after: the question in the chat template, or ``Question: ... Answer: ``."""
    return _context(backend, question)


def _context(backend: Backend, question: str) -> str:
    tok = getattr(backend, "tokenizer", None)
    if tok is not None and getattr(tok, "chat_template", None):
        from slmkit.backends.text import render_prompt

        return render_prompt(tok, [{"role": "user", "content": question}])
    return f"Question: {question}\nAnswer: "


@JUDGES.register("logprob")
def logprob_risk(backend: Backend, items: Sequence[QAItem], cfg: JudgeConfig) -> list[float]:
    """Minus the mean log-probability of the answer's tokens given the question."""
    scores = backend.score([it.answer for it in items], [_context(backend, it.question) for it in items])
    return [-(sum(s.logprobs) / len(s.logprobs)) if s.logprobs else 0.0 for s in scores]


@JUDGES.register("consistency")
def consistency_risk(backend: Backend, items: Sequence[QAItem], cfg: JudgeConfig) -> list[float]:
    """SelfCheckGPT-style: 1 - mean unigram F1 between the answer and sampled answers."""
    questions = sorted({it.question for it in items})
    chat = wants_chat(backend)
    prompts = [[{"role": "user", "content": q}] if chat else _context(backend, q) for q in questions]
    samples: dict[str, list[str]] = {q: [] for q in questions}
    for j in range(cfg.samples):
        gp = GenParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed + 7919 * j)
        for q, c in zip(questions, backend.generate(prompts, gp)):
            samples[q].append(c.text)
    return [1.0 - sum(token_f1(it.answer, s) for s in samples[it.question]) / cfg.samples for it in items]


@JUDGES.register("probe")
def probe_risk(backend: Backend, items: Sequence[QAItem], cfg: JudgeConfig) -> list[float]:
    """P(wrong) from a linear probe on the judging model's hidden states (held out when cross-validated)."""
    return probe_and_risk(backend, items, cfg)[0]


def probe_and_risk(backend: Backend, items: Sequence[QAItem], cfg: JudgeConfig) -> tuple[list[float], Probe]:
    """The probe's risks and the probe: ``cfg.probe``'s file, or (labelled rows) out-of-fold risks,
    grouped by question, plus a probe fitted on all rows (to save)."""
    model, tok = getattr(backend, "model", None), getattr(backend, "tokenizer", None)
    contexts = [_context(backend, it.question) for it in items]
    answers = [it.answer for it in items]
    if cfg.probe is not None:
        probe = load_probe(cfg.probe)
        feats = hidden_features(model, tok, contexts, answers, probe.layer, probe.pool, cfg.probe_cfg.batch_size, cfg.probe_cfg.max_tokens)
        return probe.risk(feats).tolist(), probe
    labels = [it.label for it in items]
    if any(lab is None for lab in labels):
        raise ConfigError("the probe judge needs a probe file (--probe FILE) or labelled rows (a 'label' in every row) to train on")
    pc = cfg.probe_cfg
    layer = resolve_layer(model, pc.layer) if model is not None else 0
    feats = hidden_features(model, tok, contexts, answers, layer, pc.pool, pc.batch_size, pc.max_tokens)
    groups = [it.question for it in items]
    risk = cross_val_risk(feats, labels, groups, pc, layer)
    probe = fit_probe(feats, labels, pc, layer, groups)
    probe.meta.update(model=getattr(backend, "name", ""), n_questions=len(set(groups)), folds=pc.folds,
                      cv_auroc=auroc(risk.tolist(), labels))
    return risk.tolist(), probe


def auroc_ci(scores: Sequence[float], labels: Sequence[int], n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`auroc` (items resampled with replacement)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):  # a resample needs both classes
            vals.append(roc_auc_score(y[idx], s[idx]))
    if not vals:
        raise DataError("AUROC needs both positive (1) and negative (0) labels")
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (1 = positive); ties count one half."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    if not pos or not neg:
        raise DataError("AUROC needs both positive (1) and negative (0) labels")
    # Mann-Whitney U via ranks with average ranks for ties
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = sum(r for r, y in zip(ranks, labels) if y == 1)
    return (r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def truthfulqa_items(path: str | Path, limit: int = 0) -> list[QAItem]:
    """Labelled pairs from TruthfulQA.csv: best answer (0) and first incorrect answer (1) per question."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    items: list[QAItem] = []
    with Lines(path) as fh:  # encoding errors name the line
        reader = csv.DictReader(fh)
        need = {"Question", "Best Answer", "Incorrect Answers"}
        try:
            if not need <= set(reader.fieldnames or ()):
                raise DataError(f"{path}: expected TruthfulQA columns {sorted(need)}, got {reader.fieldnames}")
            for n, row in enumerate(reader):
                if limit and n >= limit:
                    break
                if any(not isinstance(row.get(k), str) for k in need):
                    raise DataError(f"{path}:{fh.lineno}: a row with missing columns")
                wrong = [a.strip() for a in row["Incorrect Answers"].split(";") if a.strip()]
                if not row["Best Answer"].strip() or not wrong:
                    continue
                items.append(QAItem(row["Question"], row["Best Answer"].strip(), 0))
                items.append(QAItem(row["Question"], wrong[0], 1))
        except csv.Error as err:
            raise DataError(f"{path}:{fh.lineno}: not valid CSV ({err})") from None
    if not items:
        raise DataError(f"{path} holds no usable TruthfulQA rows")
    return items


def read_items(path: str | Path, limit: int = 0) -> list[QAItem]:
    """TruthfulQA.csv, or jsonl rows {question, answer, label?}."""
    path = Path(path)
    if path.suffix == ".csv":
        return truthfulqa_items(path, limit)
    from slmkit.data import read_jsonl

    rows = read_jsonl(path, required=("question", "answer"), limit=limit)
    out = []
    for r in rows:
        lab = r.get("label")
        if lab is not None and lab not in (0, 1, True, False):
            raise DataError(f"{path}: label must be 0 or 1, got {lab!r}")
        out.append(QAItem(str(r["question"]), str(r["answer"]), None if lab is None else int(lab)))
    return out


def judge(backend: Backend, items: Sequence[QAItem], cfg: JudgeConfig) -> list[float]:
    """Hallucination risk of each item (higher = more likely wrong)."""
    return JUDGES.get(cfg.method)(backend, items, cfg)


def judge_file(model: str, data: str | Path, cfg: JudgeConfig, limit: int = 0, dtype: str = "fp32",
               save_probe: str | Path | None = None, concurrency: int = 1, device: str = "cpu") -> dict:
    """The ``slmkit judge`` verb: risks per item, flags, and AUROC (with its 95% bootstrap interval)
    when every item is labelled; with ``save_probe``, the probe fitted on all rows is written there.
    ``concurrency``: requests in flight at once when ``model`` is an http(s) endpoint; ``device``: where a local one runs."""
    from slmkit.backends import from_spec

    if save_probe is not None and (cfg.method != "probe" or cfg.probe is not None):
        raise ConfigError("--save-probe trains a probe: use it with --signal probe and without --probe")
    items = read_items(data, limit)
    backend = from_spec(model, dtype=dtype, concurrency=concurrency, device=device)
    report: dict = {"model": model, "data": str(data), "method": cfg.method, "n": len(items)}
    if cfg.method == "probe":
        risk, probe = probe_and_risk(backend, items, cfg)
        report["held_out"] = cfg.probe is None  # out-of-fold scores, grouped by question
        if save_probe is not None:
            from slmkit.collab.probe import save_probe as write_probe

            probe.meta.update(data=str(data), dtype=dtype)
            report["probe"] = str(write_probe(probe, save_probe))
    else:
        risk = judge(backend, items, cfg)
    labels = [it.label for it in items]
    if all(lab is not None for lab in labels) and len(set(labels)) == 2:
        report["auroc"] = auroc(risk, labels)
        report["auroc_ci95"] = list(auroc_ci(risk, labels, seed=cfg.seed))
    report["items"] = [
        {"question": it.question, "answer": it.answer, "label": it.label, "risk": r,
         **({"flagged": r > cfg.threshold} if cfg.threshold is not None else {})}
        for it, r in zip(items, risk)
    ]
    return report
