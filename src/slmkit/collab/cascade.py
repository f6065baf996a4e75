"""Cascade: the small model answers, and only low-confidence requests go to the large one.

The confidence signals follow the routing literature:

* ``logprob``: mean token log-probability of the small model's greedy answer
  (the "model confidence" baseline of FrugalGPT, Chen et al. 2023, arXiv:2305.05176).
* ``consistency``: agreement (token F1) between the greedy answer and ``samples``
  sampled answers (self-consistency as a confidence proxy, Wang et al. 2023;
  used for cascades by Yue et al. 2024, "LLM cascades with mixture of thought").
* ``margin``: top-1 minus top-2 token probability, averaged over the greedy answer's tokens
  (CoT-decoding's answer confidence, Wang & Zhou 2024, arXiv:2402.10200); on a one-token answer
  it is a multiple-choice option margin (see also :mod:`slmkit.collab.cascade_curve`).
* ``router``: a logistic regression on features of the query (its length, the small
  model's log-likelihood of the query, the share of digits) trained on a labelled
  calibration split to predict whether the small model answers correctly
  (a minimal RouteLLM-style router, Ong et al. 2024, arXiv:2406.18665).
* ``probe``: one minus the wrong-answer probability of a linear probe on the small
  model's hidden states over the prompt and its answer (Azaria & Mitchell 2023,
  arXiv:2304.13734; see :mod:`slmkit.collab.probe`): a probe file trained with
  ``slmkit judge --signal probe --save-probe FILE``, or, given labelled rows, one trained
  on the calibration split's correctness of the small model's answers.

Every signal scores the small model's greedy answers (generated once, with log-probs).

The escalation threshold is calibrated on held-out labelled (or unlabelled) data to a
target escalation rate, or to a target fraction of the large model's quality.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slmkit.backends.base import Backend, Completion, GenParams, Prompt
from slmkit.errors import BackendError, ConfigError, DataError
from slmkit.registry import Registry

log = logging.getLogger(__name__)

#: confidence signals: ``fn(small, prompts, questions, answers, cfg, train) -> confidences`` (higher = more
#: confident); ``answers`` are the small model's greedy completions (with log-probs), ``train`` is
#: ``(train_idx, small_ok)`` for a signal that learns from labelled rows, else None
SIGNALS: Registry[Callable] = Registry("confidence signal")


@dataclass(frozen=True)
class CascadeConfig:
    """Knobs of a small→large cascade."""

    signal: str = "logprob"  #: confidence signal: logprob | consistency | margin | router | probe
    escalate: float | None = None  #: target escalation rate in [0, 1] (default 0.25 when quality is None)
    quality: float | None = None  #: target fraction of the large model's quality in [0, 1] (needs labels)
    calib_fraction: float = 0.5  #: share of labelled rows used to calibrate, in (0, 1)
    max_new_tokens: int = 32  #: answer length (tokens)
    samples: int = 4  #: sampled answers per question (consistency signal)
    sample_temperature: float = 0.7  #: temperature of those samples
    timeout: float = 60.0  #: seconds per request to a large HTTP endpoint
    retries: int = 2  #: retries per request to a large HTTP endpoint
    concurrency: int = 1  #: requests in flight at once to a large HTTP endpoint
    fallback: bool = True  #: if the large model fails, answer from the small one and say so
    probe: str | None = None  #: probe signal: a probe file (safetensors) to use instead of training one
    seed: int = 0

    def __post_init__(self):
        if self.signal not in SIGNALS:
            SIGNALS.get(self.signal)  # raises ConfigError with near matches
        for name in ("escalate", "quality"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ConfigError(f"--{name} must be a fraction in [0, 1], got {v}")
        if self.escalate is not None and self.quality is not None:
            raise ConfigError("give either a target escalation rate or a target quality, not both")
        if not 0 < self.calib_fraction < 1:
            raise ConfigError(f"calib_fraction must be in (0, 1), got {self.calib_fraction}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.samples < 2:
            raise ConfigError(f"samples must be >= 2, got {self.samples}")
        if self.timeout <= 0 or self.retries < 0:
            raise ConfigError(f"timeout must be > 0 and retries >= 0, got {self.timeout}, {self.retries}")

    @property
    def target_rate(self) -> float:
        return 0.25 if self.escalate is None else float(self.escalate)


# --------------------------------------------------------------------------- answer checking


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or common == 0:
        return float(p == g)
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def answer_correct(pred: str, gold: str | Sequence[str]) -> bool:
    """True when a normalised gold answer occurs in the normalised prediction."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    p = f" {normalize_answer(pred)} "
    return any(normalize_answer(g) and f" {normalize_answer(g)} " in p for g in golds)


# --------------------------------------------------------------------------- calibration


def calibrate_rate(confidences: Sequence[float], rate: float) -> float:
    """Threshold t such that escalating ``conf < t`` sends a fraction ``rate`` of these items up."""
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"escalation rate must be in [0, 1], got {rate}")
    s = sorted(confidences)
    if not s:
        raise DataError("cannot calibrate a threshold on zero items")
    m = round(rate * len(s))
    return math.inf if m >= len(s) else s[m]


def cascade_quality(conf: Sequence[float], small_ok: Sequence[float], large_ok: Sequence[float], threshold: float) -> tuple[float, float]:
    """(quality, escalation rate) of the cascade at ``threshold`` (escalate when conf < threshold)."""
    esc = [c < threshold for c in conf]
    q = sum(lo if e else so for e, so, lo in zip(esc, small_ok, large_ok)) / len(esc)
    return q, sum(esc) / len(esc)


def calibrate_quality(conf, small_ok, large_ok, target: float) -> float:
    """Lowest-escalation threshold whose cascade keeps ``target`` of the large model's quality."""
    if not 0.0 <= target <= 1.0:
        raise ConfigError(f"target quality must be in [0, 1], got {target}")
    large_q = sum(large_ok) / len(large_ok)
    for t in [*sorted(set(conf)), math.inf]:
        q, _ = cascade_quality(conf, small_ok, large_ok, t)
        if q >= target * large_q - 1e-12:
            return t
    return math.inf


def quality_cost_curve(conf, small_ok, large_ok, rates: Sequence[float] = tuple(i / 10 for i in range(11))) -> list[dict]:
    """Quality kept vs share escalated, for the cascade and for random routing at the same rate.

    Random routing's quality is its expectation, ``(1 - r) * Q_small + r * Q_large``.
    """
    n = len(conf)
    qs, ql = sum(small_ok) / n, sum(large_ok) / n
    order = sorted(range(n), key=lambda i: conf[i])  # least confident first
    rows = []
    for r in rates:
        m = round(r * n)
        esc = set(order[:m])
        q = sum(large_ok[i] if i in esc else small_ok[i] for i in range(n)) / n
        rnd = (1 - m / n) * qs + (m / n) * ql
        rows.append({
            "escalated": m / n,
            "quality": q,
            "quality_kept": q / ql if ql > 0 else math.nan,
            "random_quality": rnd,
            "random_quality_kept": rnd / ql if ql > 0 else math.nan,
        })
    return rows


# --------------------------------------------------------------------------- signals


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else -math.inf


@SIGNALS.register("logprob")
def logprob_signal(small: Backend, prompts, questions, comps: Sequence[Completion], cfg: CascadeConfig, train=None):
    """Mean token log-probability of the greedy answer (higher = more confident)."""
    if any(c.logprobs is None for c in comps):
        comps = small.generate(prompts, GenParams(max_new_tokens=cfg.max_new_tokens, logprobs=True))
    return [_mean(c.logprobs or []) for c in comps]


@SIGNALS.register("consistency")
def consistency_signal(small: Backend, prompts, questions, comps: Sequence[Completion], cfg: CascadeConfig, train=None):
    """Mean token F1 between the greedy answer and ``cfg.samples`` sampled answers (SelfCheckGPT's
    unigram variant, Manakul et al. 2023, arXiv:2303.08896, Sec. 5.3)."""
    agree = [0.0] * len(prompts)
    for j in range(cfg.samples):
        gp = GenParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature, seed=cfg.seed + 1000 * (j + 1))
        for i, s in enumerate(small.generate(prompts, gp)):
            agree[i] += token_f1(s.text, comps[i].text) / cfg.samples
    return agree


def query_features(small: Backend, questions: Sequence[str]) -> torch.Tensor:
    """(N, 4) features of each query: log length, mean and min token log-prob under the small model, digit share."""
    scores = small.score(list(questions))
    rows = []
    for q, s in zip(questions, scores):
        lps = s.logprobs or [0.0]
        rows.append([math.log1p(len(lps)), _mean(lps), min(lps), sum(ch.isdigit() for ch in q) / max(1, len(q))])
    return torch.tensor(rows, dtype=torch.float64)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, steps: int = 200) -> Callable[[torch.Tensor], torch.Tensor]:
    """L2-regularised logistic regression (standardised features, LBFGS); returns a predict_proba."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")
    yy = y.double()

    def closure():
        opt.zero_grad()
        z = xs @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yy) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    wd = w.detach()
    return lambda q: torch.sigmoid(((q - mu) / sd) @ wd[:-1] + wd[-1])


@SIGNALS.register("router")
def router_signal(small: Backend, prompts, questions, comps: Sequence[Completion], cfg: CascadeConfig, train=None):
    """Predicted probability that the small model is right, from query features alone.

    ``train`` is ``(train_idx, small_ok)``: the router trains on those rows' correctness of
    the small model's answers.
    """
    if train is None:
        raise ConfigError("the router signal needs labelled data (an 'answer' field) to train on", "use --signal logprob")
    train_idx, small_ok = train
    feats = query_features(small, questions)
    y = torch.tensor([float(small_ok[i]) for i in train_idx])
    if y.min() == y.max():  # one class only: the router can only predict that rate
        return [float(y[0])] * len(prompts)
    predict = fit_logistic(feats[train_idx], y)
    return predict(feats).tolist()


@SIGNALS.register("probe")
def probe_signal(small: Backend, prompts, questions, comps: Sequence[Completion], cfg: CascadeConfig, train=None):
    """1 - P(wrong) of a linear probe on the small model's hidden states over prompt + answer.

    With ``cfg.probe``: that probe file. Otherwise ``train`` (``(train_idx, small_ok)``) trains
    one on the calibration rows (a wrong answer is label 1), as the router does.
    """
    from slmkit.backends.text import render_prompt
    from slmkit.collab.probe import ProbeConfig, fit_probe, hidden_features, load_probe, resolve_layer

    model, tok = getattr(small, "model", None), getattr(small, "tokenizer", None)
    if model is None or tok is None:
        raise ConfigError("the probe signal reads the small model's hidden states; the small model must be local")
    contexts = [render_prompt(tok, p) for p in prompts]
    answers = [c.text for c in comps]
    if cfg.probe is not None:
        probe = load_probe(cfg.probe)
        feats = hidden_features(model, tok, contexts, answers, probe.layer, probe.pool)
        return (1.0 - probe.risk(feats)).tolist()
    if train is None:
        raise ConfigError("the probe signal needs a probe file (--probe FILE) or labelled rows to train on",
                          "train one with: slmkit judge --data LABELLED --model SMALL --signal probe --save-probe FILE")
    train_idx, small_ok = train
    pcfg = ProbeConfig(seed=cfg.seed)
    layer = resolve_layer(model, pcfg.layer)
    feats = hidden_features(model, tok, contexts, answers, layer, pcfg.pool)
    wrong = [1 - int(small_ok[i]) for i in train_idx]
    if len(set(wrong)) < 2:  # one class only: the probe can only predict that rate
        return [1.0 - wrong[0]] * len(prompts)
    probe = fit_probe(feats[train_idx], wrong, pcfg, layer)
    return (1.0 - probe.risk(feats)).tolist()


@torch.inference_mode()
def answer_margins(model, tokenizer, contexts: Sequence[str], answers: Sequence[str], encode=None) -> list[float]:
    """Mean over each answer's tokens of ``p(top-1) - p(top-2)`` of the model's next-token distribution.

    CoT-decoding's answer confidence (Wang & Zhou 2024, arXiv:2402.10200, Sec. 2.2:
    ``Delta = mean_t p(x_t^1 | x_<t) - p(x_t^2 | x_<t)``); for a one-token answer (a choice letter)
    it is the option margin of a multiple-choice pick. An empty answer scores the next token after
    its context. ``encode(context, answer) -> (ids, start)`` (a backend's ``encode_pair``: its BOS rule and a
    context whose last token merges with the answer's first) replaces the plain tokenisation when given.
    """
    device = next(model.parameters()).device
    out = []
    for ctx, ans in zip(contexts, answers):
        if encode is not None:
            ids, start = encode(ctx, ans)
        else:
            start = len(tokenizer(ctx, add_special_tokens=False).input_ids)
            ids = tokenizer(ctx + ans, add_special_tokens=False).input_ids
        start = min(max(1, start), len(ids))  # positions start-1 .. len-2 predict the answer's tokens
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()  # (T, V)
        probs = torch.softmax(logits[start - 1 : max(start, len(ids) - 1)], dim=-1)  # (A, V)
        top2 = probs.topk(2, dim=-1).values  # (A, 2)
        out.append(float((top2[:, 0] - top2[:, 1]).mean()))
    return out


@SIGNALS.register("margin")
def margin_signal(small: Backend, prompts, questions, comps: Sequence[Completion], cfg: CascadeConfig, train=None):
    """Top-1 minus top-2 token probability, averaged over the small model's greedy answer (:func:`answer_margins`)."""
    from slmkit.backends.text import render_prompt

    model, tok = getattr(small, "model", None), getattr(small, "tokenizer", None)
    if model is None or tok is None:
        raise ConfigError("the margin signal reads the small model's next-token distributions; the small model must be local",
                          "use --signal logprob with a small model behind an endpoint")
    return answer_margins(model, tok, [render_prompt(tok, p) for p in prompts], [c.text for c in comps],
                          encode=getattr(small, "encode_pair", None))


#: signals that learn from labelled rows (the calibration split's correctness of the small model)
TRAINED_SIGNALS = ("router", "probe")


# --------------------------------------------------------------------------- running


@dataclass
class CascadeAnswer:
    question: str
    answer: str
    confidence: float
    escalated: bool  #: the large model answered
    source: str  #: "small", "large", or "small (large unreachable)"
    gold: list[str] | None = None
    correct: bool | None = None
    meta: dict = field(default_factory=dict)


def qa_prompt(question: str, context: str | None, chat: bool) -> Prompt:
    body = (f"Context: {context}\n\n" if context else "") + f"Question: {question}\nAnswer in a few words."
    return [{"role": "user", "content": body}] if chat else body + "\nAnswer:"


def wants_chat(backend) -> bool:
    tok = getattr(backend, "tokenizer", None)
    return tok is None or bool(getattr(tok, "chat_template", None))


def large_backend(spec: str, cfg: CascadeConfig, dtype: str = "fp32", device: str = "cpu") -> Backend:
    """The large model: an HTTP endpoint (with the config's timeout and retries) or a local model."""
    from slmkit.backends import from_spec

    return from_spec(spec, dtype=dtype, device=device, concurrency=cfg.concurrency, timeout=cfg.timeout,
                     retries=cfg.retries, backoff=0.2)


def _gold(row: dict) -> list[str] | None:
    a = row.get("answer", row.get("answers"))
    if a is None:
        return None
    return [a] if isinstance(a, str) else [str(x) for x in a]


def run_cascade(small: Backend, large: Backend | None, rows: Sequence[dict], cfg: CascadeConfig, large_error: str | None = None) -> dict:
    """Answer ``rows`` ({question, context?, answer?}) with the cascade and report quality and cost.

    With labels, the first ``calib_fraction`` of rows calibrate the threshold and the rest
    are the held-out evaluation; without labels, all rows calibrate (target rate only).
    ``large=None`` (unreachable) answers everything from the small model and says so.
    """
    if not rows:
        raise DataError("no rows to route")
    questions = [str(r["question"]) for r in rows]
    golds = [_gold(r) for r in rows]
    labelled = all(g for g in golds)
    if cfg.quality is not None and not labelled:
        raise ConfigError("a target quality needs labelled rows (an 'answer' field in every row)", "use --escalate F")
    n = len(rows)
    n_cal = max(1, min(n - 1, round(cfg.calib_fraction * n))) if labelled and n >= 2 else n
    cal = list(range(n_cal))
    ev = list(range(n_cal, n)) if n_cal < n else cal
    small_prompts = [qa_prompt(q, r.get("context"), wants_chat(small)) for q, r in zip(questions, rows)]
    small_ok: list[float] | None = None
    signal = SIGNALS.get(cfg.signal)
    comps = small.generate(small_prompts, GenParams(max_new_tokens=cfg.max_new_tokens, logprobs=True))
    if labelled:
        small_ok = [float(answer_correct(c.text, g)) for c, g in zip(comps, golds)]
    train = (cal, small_ok) if labelled and cfg.signal in TRAINED_SIGNALS and not (cfg.signal == "probe" and cfg.probe) else None
    if cfg.signal in TRAINED_SIGNALS and train is None and not (cfg.signal == "probe" and cfg.probe):
        raise ConfigError(f"the {cfg.signal} signal needs labelled data (an 'answer' field) to train on", "use --signal logprob")
    conf = signal(small, small_prompts, questions, comps, cfg, train)
    large_texts: dict[int, str] = {}

    def ask_large(idx: list[int]) -> None:
        nonlocal large, large_error
        todo = [i for i in idx if i not in large_texts]
        if large is None or not todo:
            return
        prompts = [qa_prompt(questions[i], rows[i].get("context"), wants_chat(large)) for i in todo]
        try:
            outs = large.generate(prompts, GenParams(max_new_tokens=cfg.max_new_tokens))
        except BackendError as err:
            if not cfg.fallback:
                raise
            large_error = str(err).splitlines()[0]
            log.warning("large model failed (%s); answering from the small model", large_error)
            large = None
            return
        large_texts.update({i: c.text for i, c in zip(todo, outs)})

    report: dict = {"signal": cfg.signal, "n_calib": len(cal), "n_eval": len(ev), "labelled": labelled}
    if cfg.quality is not None:
        ask_large(cal)
        if large is not None:
            large_ok_cal = [float(answer_correct(large_texts[i], golds[i])) for i in cal]
            threshold = calibrate_quality([conf[i] for i in cal], [small_ok[i] for i in cal], large_ok_cal, cfg.quality)
        else:
            threshold = -math.inf
        report["target_quality"] = cfg.quality
    else:
        threshold = calibrate_rate([conf[i] for i in cal], cfg.target_rate)
        report["target_escalation"] = cfg.target_rate
    escalate = [i for i in ev if conf[i] < threshold]
    ask_large(escalate)
    answers = []
    for i in ev:
        up = i in large_texts and conf[i] < threshold
        src = "large" if up else ("small (large unreachable)" if conf[i] < threshold else "small")
        text = large_texts[i] if up else comps[i].text
        answers.append(CascadeAnswer(questions[i], text, conf[i], up, src, golds[i], answer_correct(text, golds[i]) if golds[i] else None))
    report.update(
        threshold=threshold if math.isfinite(threshold) else ("inf" if threshold > 0 else "-inf"),
        escalation_rate=sum(a.escalated for a in answers) / len(answers),
        wanted_escalation_rate=len(escalate) / len(ev),
        large_error=large_error,
    )
    if labelled and ev:
        ask_large(ev)  # the large model's answers on every held-out row, for the quality-cost curve
        if large is not None or all(i in large_texts for i in ev):
            large_ok = [float(answer_correct(large_texts[i], golds[i])) for i in ev]
            s_ok = [small_ok[i] for i in ev]
            c_ev = [conf[i] for i in ev]
            q_cas = sum(a.correct for a in answers) / len(answers)
            q_large = sum(large_ok) / len(ev)
            rate = report["escalation_rate"]
            rnd = (1 - rate) * sum(s_ok) / len(ev) + rate * q_large
            report.update(
                quality_small=sum(s_ok) / len(ev), quality_large=q_large, quality_cascade=q_cas,
                quality_kept=q_cas / q_large if q_large > 0 else None,
                random_quality=rnd, random_quality_kept=rnd / q_large if q_large > 0 else None,
                curve=quality_cost_curve(c_ev, s_ok, large_ok),
            )
        else:
            report["quality_cascade"] = sum(a.correct for a in answers) / len(answers)
    report["answers"] = answers
    return report


def run_route(small_spec: str, large_spec: str, data: str | Path, cfg: CascadeConfig, limit: int = 0, dtype: str = "fp32",
              device: str = "cpu") -> dict:
    """The ``slmkit route`` verb: load both ends (local ones on ``device``), read ``data`` (jsonl), run the cascade."""
    from slmkit.backends import from_spec
    from slmkit.data import read_jsonl

    rows = read_jsonl(data, required=("question",), limit=limit)
    small = from_spec(small_spec, dtype=dtype, device=device)
    large_error = None
    try:
        large = large_backend(large_spec, cfg, dtype, device)
    except BackendError as err:
        if not cfg.fallback:
            raise
        large, large_error = None, str(err).splitlines()[0]
        log.warning("large model unreachable (%s); answering from the small model", large_error)
    report = run_cascade(small, large, rows, cfg, large_error)
    report.update(small=small_spec, large=large_spec, data=str(data))
    return report
