"""Parity of slmkit's lm-eval model (``--model slmkit``) with lm-eval's own ``hf`` model on the default model.

    pip install 'slmkit[lmeval]'
    PYTHONPATH=src python bench/lm_eval_parity.py --limit 20 --wikitext-docs 3 --workdir /tmp/lm-eval-parity

Both run the same two local tasks (src/slmkit/eval/lm_eval_tasks: ``slmkit_truthfulqa_mc1``, the
six-shot MC1 prompt on truthfulqa/TruthfulQA.csv; ``slmkit_wikitext2``, rolling log-likelihood of
WikiText-2 test articles) through lm-eval's ``simple_evaluate``, offline: slmkit loads the spec
``default``, lm-eval's ``hf`` loads the same weights saved as a plain fp32 Hugging Face directory.
Printed: each metric from both, the largest per-request |log-likelihood difference| and whether each
is within the tolerance (per request 1e-3 nats; accuracy equal; perplexities 1e-4 relative), and
the wall time of each side, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

TOL_REQUEST = 1e-3  # nats per request: same fp32 weights, only batching/padding differ
TOL_PPL_REL = 1e-4


def run(model, tasks: dict[str, int], **model_args) -> tuple[dict, dict, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from slmkit.eval.lmeval import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    results, samples, t0 = {}, {}, time.perf_counter()
    for task, limit in tasks.items():  # one call per task: each its own --limit
        res = simple_evaluate(model=model, model_args=model_args or None, tasks=[task], task_manager=manager, limit=limit,
                              log_samples=True, bootstrap_iters=0, batch_size=8, device="cpu" if model_args else None)
        results[task] = {k.removesuffix(",none"): v for k, v in res["results"][task].items() if isinstance(v, float)}
        samples[task] = [s["resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]
    return results, samples, time.perf_counter() - t0


def first_float(x) -> float:
    while isinstance(x, (list, tuple)):
        x = x[0]
    return float(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=20, help="TruthfulQA MC1 questions (first N)")
    ap.add_argument("--wikitext-docs", type=int, default=3, help="WikiText-2 test articles (first N)")
    ap.add_argument("--workdir", default="/tmp/lm-eval-parity")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from slmkit.eval.lmeval import SlmkitLM
    from slmkit.models import load

    work = Path(args.workdir)
    model_dir = work / "default_hf"
    if not (model_dir / "config.json").exists():
        m, tok = load("default")
        m.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del m
    tasks = {"slmkit_truthfulqa_mc1": args.limit, "slmkit_wikitext2": args.wikitext_docs}
    ours, ours_s, t_ours = run(SlmkitLM(model="default", batch_size=8), tasks)
    print("slmkit:", json.dumps(ours), f"({t_ours:.1f} s)", flush=True)
    theirs, theirs_s, t_theirs = run("hf", tasks, pretrained=str(model_dir), dtype="float32")
    print("lm-eval hf:", json.dumps(theirs), f"({t_theirs:.1f} s)", flush=True)

    worst = {t: max(abs(first_float(a) - first_float(b)) for ra, rb in zip(ours_s[t], theirs_s[t]) for a, b in zip(ra, rb))
             for t in tasks}
    rows = []
    for task, metrics in theirs.items():
        for k, v in metrics.items():
            mine = ours[task].get(k)
            ok = mine == v if k == "acc" else mine is not None and abs(mine - v) <= TOL_PPL_REL * abs(v)
            rows.append({"task": task, "metric": k, "slmkit": mine, "lm_eval_hf": v, "ok": bool(ok)})
    print(f"\n{'task':24s}{'metric':18s}{'slmkit':>12s}{'lm-eval hf':>12s}  ok")
    for r in rows:
        print(f"{r['task']:24s}{r['metric']:18s}{r['slmkit']:12.5f}{r['lm_eval_hf']:12.5f}  {'yes' if r['ok'] else 'NO'}")
    for t, w in worst.items():
        print(f"{t}: largest per-request |diff| {w:.2e} nats (tolerance {TOL_REQUEST:g}): {'yes' if w <= TOL_REQUEST else 'NO'}")
    out = {"limit": args.limit, "wikitext_docs": args.wikitext_docs, "rows": rows, "max_request_diff": worst,
           "seconds": {"slmkit": t_ours, "lm_eval_hf": t_theirs}, "torch_threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "tolerance": {"request_nats": TOL_REQUEST, "ppl_rel": TOL_PPL_REL}}
    (work / "comparison.json").write_text(json.dumps(out, indent=2))
    print(f"written {work / 'comparison.json'}")


if __name__ == "__main__":
    main()
