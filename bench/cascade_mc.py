"""Cascade vs random routing on multiple-choice rag-qa (issue 20, item 3): quality numbers, paired intervals.

Task: each rag-qa question (``SLMKIT_DATA/rag-qa``) with its gold passage in the prompt,
``"{passage}\\n\\nQuestion: {question}\\nAnswer:"``, and four options: the gold answer and three
distractors, first the other answers of questions on the same passage (spans of that same passage,
so the passage alone does not give the answer away), then, when the passage has too few, answers of
questions on other passages drawn at random (``--seed``); ``--distractors other``: all three from other
passages (an easier task: the gold answer is the one option in the passage). A distractor whose normalised words
equal, contain or are contained in the gold answer's is skipped; the option order is shuffled with
the same seeded generator. Scored by log-likelihood, no generation (:func:`slmkit.eval.tasks.loglikelihoods`,
lm-eval's delimiter " "); a model picks the option with the best ``--norm`` score (``chars``: log-likelihood
per character, lm-eval's ``acc_norm``).

Pair: large = ``--model`` (the default model), small = each of ``--smalls``: ``first:N`` (its first N
decoder blocks, shared weights, no healing: :func:`slmkit.collab.drafters.layer_draft`), ``depth:N``
(N blocks kept by ShortGPT block influence, un-healed: ``slmkit prune --method depth``) or a model directory.
The primary pair, fixed before any routing number is looked at, is the first small in ``--smalls``
whose accuracy is at least ``--min-gap`` below the large model's; every pair is reported.

Signals of the small model's confidence (:mod:`slmkit.collab.cascade_curve`): ``margin`` (best minus
second option score), ``maxprob`` (max softmax over the option scores), and ``probe`` (a linear probe
on the small model's hidden states over the passage, question and its chosen option, trained on the
small model's correctness, scored out of fold: ``--folds`` folds grouped by passage,
:func:`slmkit.collab.probe.cross_val_risk`). Curve at escalation 0, 10, ..., 100%: the cascade sends the
least confident questions to the large model; random routing's expected accuracy at that rate; the
oracle (escalate exactly where only the large model is right) as the ceiling; percentile bootstrap
intervals (``--resamples``), paired over questions (:func:`slmkit.collab.cascade_curve.routing_curve`).

Usage: PYTHONPATH=src python bench/cascade_mc.py [--model default] [--smalls first:27,first:24,first:20,depth:24] [--limit 0]
       [--signals margin,maxprob,probe] [--norm chars] [--resamples 1000] [--min-gap 0.10] [--threads 2]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import torch

PROMPT = "{passage}\n\nQuestion: {question}\nAnswer:"


def _distinct(a: str, b: str) -> bool:
    from slmkit.collab.cascade import normalize_answer

    x, y = f" {normalize_answer(a)} ", f" {normalize_answer(b)} "
    return bool(x.strip()) and bool(y.strip()) and x not in y and y not in x


def mc_items(passages: dict, questions: list[dict], n_options: int, seed: int, same_passage: bool = True) -> tuple[list, list[int], dict]:
    """``(items, passage ids, counts)``: one :class:`~slmkit.eval.tasks.MCItem` per question (see the module docstring);
    ``same_passage=False`` draws every distractor from other passages."""
    from slmkit.eval.tasks import MCItem

    rng = random.Random(seed)
    by_passage: dict[int, list[str]] = {}
    for q in questions:
        by_passage.setdefault(q["passage_id"], []).append(q["answer"])
    items, groups, counts = [], [], {"same_passage": 0, "other_passage": 0}
    for q in questions:
        gold = q["answer"]
        options = [gold]
        for cand in [*(by_passage[q["passage_id"]] if same_passage else []), None]:
            if cand is None or len(options) == n_options:
                break
            if all(_distinct(cand, o) for o in options):
                options.append(cand)
                counts["same_passage"] += 1
        while len(options) < n_options:
            other = rng.choice(questions)
            if other["passage_id"] != q["passage_id"] and all(_distinct(other["answer"], o) for o in options):
                options.append(other["answer"])
                counts["other_passage"] += 1
        rng.shuffle(options)
        context = PROMPT.format(passage=passages[q["passage_id"]], question=q["question"])
        items.append(MCItem(context, tuple(options), options.index(gold), delimiter=" "))
        groups.append(q["passage_id"])
    return items, groups, counts


def small_model(model, tok, spec: str):
    """``first:N`` | ``depth:N`` | a model directory (see the module docstring)."""
    kind, _, n = spec.partition(":")
    if kind == "first":
        from slmkit.collab.drafters import layer_draft

        return layer_draft(model, int(n)).eval()
    if kind == "depth":
        import copy

        from slmkit.compress.calibrate import CalibConfig, calibration_ids
        from slmkit.compress.structured import prune_depth
        from slmkit.data import data_file

        ids = calibration_ids(model, tok, CalibConfig(n_samples=8, seq_len=128, source=str(data_file("wikitext-2/test.txt"))))
        return prune_depth(copy.deepcopy(model), ids, int(n)).eval()
    from slmkit.models import load

    return load(spec)[0].eval()


def score(model, tok, items, norm: str) -> dict:
    """Option scores, pick, correctness and seconds of ``model`` on ``items``."""
    from slmkit.backends import HFBackend
    from slmkit.collab.cascade_curve import option_scores
    from slmkit.eval.tasks import loglikelihoods

    t0 = time.perf_counter()
    lls = loglikelihoods(HFBackend(model, tok), items)
    scores = option_scores(lls, [it.choices for it in items], norm)
    picks = [max(range(len(s)), key=s.__getitem__) for s in scores]
    ok = [float(p in it.golds) for p, it in zip(picks, items)]
    return {"scores": scores, "picks": picks, "ok": ok, "seconds": round(time.perf_counter() - t0, 1)}


def probe_conf(model, tok, items, picks, ok, groups, folds: int, seed: int) -> list[float]:
    """1 - out-of-fold P(wrong) of a probe on ``model``'s hidden states over each context and its picked option."""
    from slmkit.collab.probe import ProbeConfig, cross_val_risk, hidden_features, resolve_layer

    cfg = ProbeConfig(folds=folds, seed=seed)
    layer = resolve_layer(model, cfg.layer)
    feats = hidden_features(model, tok, [it.context for it in items], [it.continuations[p] for it, p in zip(items, picks)],
                            layer, cfg.pool, cfg.batch_size, cfg.max_tokens)
    risk = cross_val_risk(feats, [1 - int(o) for o in ok], groups, cfg, layer)
    return (1.0 - risk).tolist()


def _ci(v) -> str:
    return f"[{v[0]:.3f}, {v[1]:.3f}]" if v else ""


def print_curve(title: str, rep: dict) -> None:
    print(f"\n## {title}")
    print(f"small {rep['acc_small']:.3f} {_ci(rep['acc_small_ci'])}, large {rep['acc_large']:.3f} {_ci(rep['acc_large_ci'])}, n={rep['n']}")
    print(f"{'esc':>5}{'cascade':>9} {'95% CI':<17}{'random':>8} {'95% CI':<17}{'ratio':>7}{'diff CI':>20}{'oracle':>8}{'kept':>7}{'sep':>5}")
    for r in rep["rows"]:
        ratio = r["cascade"] / r["random"] if r["random"] > 0 else float("nan")
        print(f"{r['rate']:>5.1f}{r['cascade']:>9.3f} {_ci(r.get('cascade_ci')):<17}{r['random']:>8.3f} {_ci(r.get('random_ci')):<17}"
              f"{ratio:>7.3f}{_ci(r.get('diff_ci')):>20}{r['oracle']:>8.3f}{r['kept']:>7.3f}{'yes' if r['separated'] else 'no':>5}")
    b = rep["best_kept"]
    print(f"beats random at every rate: {rep['beats_random_everywhere']}; intervals separated at every rate: {rep['separated_everywhere']}; "
          f"best kept at <= 50%: {b['kept']:.3f} {_ci(b['kept_ci'])} at {b['rate']:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="the large model")
    ap.add_argument("--smalls", default="first:27,first:24,first:20,depth:24",
                    help="comma list of small models, closest first: first:N | depth:N | DIR")
    ap.add_argument("--limit", type=int, default=0, help="first N rag-qa questions (0 = all 400)")
    ap.add_argument("--options", type=int, default=4)
    ap.add_argument("--distractors", default="passage", choices=["passage", "other"],
                    help="passage: other answers on the same passage first; other: answers of other passages only")
    ap.add_argument("--norm", default="chars", choices=["chars", "none"])
    ap.add_argument("--signals", default="margin,maxprob,probe")
    ap.add_argument("--folds", type=int, default=5, help="probe: out-of-fold folds, grouped by passage")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--min-gap", type=float, default=0.10, help="the primary pair: the first small at least this far below the large")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from slmkit.collab.cascade_curve import CurveConfig, option_confidence, routing_curve
    from slmkit.collab.judge import auroc, auroc_ci
    from slmkit.data import data_dir, read_jsonl
    from slmkit.models import load

    root = data_dir()
    if root is None or not (root / "rag-qa" / "questions.jsonl").exists():
        print(f"skipped: rag-qa not found under {root or 'SLMKIT_DATA (unset)'}; set SLMKIT_DATA to the shared data folder", file=sys.stderr)
        sys.exit(0)
    passages = {r["id"]: r["text"] for r in read_jsonl(root / "rag-qa" / "passages.jsonl")}
    questions = read_jsonl(root / "rag-qa" / "questions.jsonl", limit=args.limit)
    items, groups, counts = mc_items(passages, questions, args.options, args.seed, args.distractors == "passage")
    info = {"command": "PYTHONPATH=src python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch thread(s), {os.cpu_count()} cores",
            "torch": torch.__version__, "questions": len(items), "distractors": counts, "args": vars(args)}
    print(json.dumps(info), flush=True)
    model, tok = load(args.model)
    model.eval()
    large = score(model, tok, items, args.norm)
    print(json.dumps({"large": args.model, "acc": sum(large["ok"]) / len(items), "seconds": large["seconds"]}), flush=True)
    ccfg = CurveConfig(resamples=args.resamples, seed=args.seed)
    signals = [s for s in args.signals.split(",") if s]
    pairs, primary = {}, None
    for spec in [s for s in args.smalls.split(",") if s]:
        small = small_model(model, tok, spec)
        sm = score(small, tok, items, args.norm)
        conf = option_confidence(sm["scores"])
        t0 = time.perf_counter()
        if "probe" in signals:
            conf["probe"] = probe_conf(small, tok, items, sm["picks"], sm["ok"], groups, args.folds, args.seed)
        curves = {s: routing_curve(conf[s], sm["ok"], large["ok"], ccfg) for s in signals}
        wrong = [1 - int(o) for o in sm["ok"]]
        detect = {s: {"auroc": auroc([-c for c in conf[s]], wrong), "ci95": list(auroc_ci([-c for c in conf[s]], wrong, seed=args.seed))}
                  for s in signals}  # how well each signal tells the small model's wrong picks from its right ones
        gap = (sum(large["ok"]) - sum(sm["ok"])) / len(items)
        pairs[spec] = {"acc_small": sum(sm["ok"]) / len(items), "gap": gap, "seconds": sm["seconds"],
                       "probe_seconds": round(time.perf_counter() - t0, 1), "auroc_small_wrong": detect, "curves": curves,
                       "per_question": {"small_ok": sm["ok"], **{s: conf[s] for s in signals}}}
        if primary is None and gap >= args.min_gap:
            primary = spec
        print(json.dumps({"small": spec, "acc": pairs[spec]["acc_small"], "gap": gap, "seconds": sm["seconds"], "auroc_small_wrong": detect}),
              flush=True)
    for spec, p in pairs.items():
        for s in signals:
            mark = " (primary pair)" if spec == primary else ""
            print_curve(f"small {spec} -> large {args.model}, signal {s}{mark}", p["curves"][s])
    out = {**info, "acc_large": sum(large["ok"]) / len(items), "large_seconds": large["seconds"], "primary": primary, "pairs": pairs,
           "large_ok": large["ok"]}
    print(f"\nprimary pair (first small with a gap >= {args.min_gap:.2f}): {primary}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
