"""Hallucination signals on TruthfulQA: AUROC with 95% intervals, same items, same run.

Each question gives two labelled pairs (its best answer = 0, its first incorrect answer = 1;
:func:`slmkit.collab.judge.truthfulqa_items`). Three risks of the judging model, all on the
same pairs:

* ``logprob`` (max-prob): minus the mean token log-probability of the answer;
* ``consistency``: SelfCheckGPT unigram variant (Manakul et al. 2023), ``--samples`` sampled
  answers per question, risk = 1 - mean token F1 of the answer against them;
* ``probe``: a linear probe on the hidden states (Azaria & Mitchell 2023), scored out of fold:
  ``--folds`` folds grouped by question, so no question is in the probe's training rows.

* ``text_only`` (control, no model): logistic regression on TF-IDF word uni/bigrams of the answer
  alone, same grouped folds. TruthfulQA's best and incorrect answers differ in wording ("Nothing
  happens", "There is no ..."), so a probe must be read against what the words alone give.

logprob and consistency are not trained, so every score of theirs is already held out. The
interval is a percentile bootstrap over pairs (1000 resamples). ``--layers`` adds the probe at
other layers as a diagnostic (one extra forward pass for all of them; chosen on the same folds, so
not a held-out selection).

Usage: PYTHONPATH=src python bench/hallucination.py [--model default] [--limit 0] [--samples 4]
       [--max-new-tokens 24] [--folds 5] [--layer N] [--layers 5,10,20] [--threads 2]
       [--save-probe FILE] [--skip consistency]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def text_only_risk(items, folds: int) -> list[float]:
    """Out-of-fold P(wrong) from the answer's words alone (TF-IDF uni/bigrams, logistic regression)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    y = np.array([it.label for it in items])
    txt = [it.answer for it in items]
    risk = np.zeros(len(y))
    for tr, te in GroupKFold(folds).split(txt, y, [it.question for it in items]):
        vec = TfidfVectorizer(ngram_range=(1, 2)).fit([txt[i] for i in tr])
        m = LogisticRegression(max_iter=2000).fit(vec.transform([txt[i] for i in tr]), y[tr])
        risk[te] = m.predict_proba(vec.transform([txt[i] for i in te]))[:, 1]
    return risk.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=0, help="first N TruthfulQA questions (0 = all 817)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--layer", type=int, default=None, help="probe layer (default: the middle block)")
    ap.add_argument("--layers", default="", help="comma-separated extra probe layers (diagnostic)")
    ap.add_argument("--save-probe", default=None, help="write the probe fitted on all pairs here")
    ap.add_argument("--skip", default="", help="comma-separated signals to skip (text_only, logprob, consistency, probe)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from slmkit.backends import HFBackend
    from slmkit.collab.judge import JudgeConfig, auroc, auroc_ci, judge, probe_and_risk, truthfulqa_items
    from slmkit.collab.probe import ProbeConfig, save_probe
    from slmkit.data import data_file
    from slmkit.models import load

    model, tok = load(args.model)
    backend = HFBackend(model, tok, name=args.model)
    items = truthfulqa_items(data_file("truthfulqa/TruthfulQA.csv"), limit=args.limit)
    labels = [it.label for it in items]
    info = {"device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch thread(s), {os.cpu_count()} cores",
            "torch": torch.__version__, "model": args.model, "pairs": len(items), "questions": len(items) // 2, "args": vars(args)}
    print(json.dumps(info), flush=True)
    skip = set(filter(None, args.skip.split(",")))
    pcfg = ProbeConfig(layer=args.layer, folds=args.folds, seed=args.seed)
    runs = [("probe", JudgeConfig(method="probe", probe_cfg=pcfg, seed=args.seed)),  # cheapest first, the costly sampling last
            ("logprob", JudgeConfig(method="logprob")),
            ("consistency", JudgeConfig(method="consistency", samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed))]
    extra = [int(x) for x in args.layers.split(",") if x.strip()]
    results = {}
    if "text_only" not in skip:
        risk = text_only_risk(items, args.folds)
        lo, hi = auroc_ci(risk, labels, seed=args.seed)
        results["text_only"] = {"auroc": auroc(risk, labels), "ci95": [lo, hi], "control": True}
        print(json.dumps({"text_only": results["text_only"]}), flush=True)
    for name, cfg in runs:
        if name.split("_")[0] in skip:
            continue
        t0 = time.perf_counter()
        if cfg.method == "probe":
            risk, probe = probe_and_risk(backend, items, cfg)
            if name == "probe" and args.save_probe:
                probe.meta.update(data="truthfulqa/TruthfulQA.csv", limit=args.limit)
                save_probe(probe, args.save_probe)
            extra_info = {"layer": probe.layer, "C": probe.meta.get("C")}
        else:
            risk, extra_info = judge(backend, items, cfg), {}
        a = auroc(risk, labels)
        lo, hi = auroc_ci(risk, labels, seed=args.seed)
        results[name] = {"auroc": a, "ci95": [lo, hi], "seconds": round(time.perf_counter() - t0, 1), **extra_info}
        print(json.dumps({name: results[name]}), flush=True)
    if extra and "probe" not in skip:
        from slmkit.collab.judge import question_context
        from slmkit.collab.probe import cross_val_risk, hidden_features_at, resolve_layer

        t0 = time.perf_counter()
        idx = {n: resolve_layer(model, n) for n in extra}
        feats = hidden_features_at(model, tok, [question_context(backend, it.question) for it in items],
                                   [it.answer for it in items], sorted(set(idx.values())), pcfg.pool)
        for n, layer in idx.items():
            risk = cross_val_risk(feats[layer], labels, [it.question for it in items], pcfg, layer)
            lo, hi = auroc_ci(risk.tolist(), labels, seed=args.seed)
            results[f"probe_layer{layer}"] = {"auroc": auroc(risk.tolist(), labels), "ci95": [lo, hi], "layer": layer,
                                              "seconds": round(time.perf_counter() - t0, 1), "diagnostic": True}
            print(json.dumps({f"probe_layer{layer}": results[f"probe_layer{layer}"]}), flush=True)
    print(f"\n## hallucination detection on TruthfulQA: {len(items)} pairs ({len(items) // 2} questions), model {args.model}")
    print(f"{'signal':<16}{'AUROC':>7}  {'95% CI':<15}{'s':>7}")
    for name, r in results.items():
        print(f"{name:<16}{r['auroc']:>7.3f}  [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]{r.get('seconds', 0.0):>7.1f}")
    print(json.dumps({"hallucination": results}), flush=True)


if __name__ == "__main__":
    main()
