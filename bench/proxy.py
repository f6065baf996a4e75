"""Proxy-tuning on rag-qa: how much of a tuning gap does the tuned small model's logit shift close?

Setting (Liu et al. 2024, arXiv:2401.08565, Sec. 3): the large model is ``--model`` (default:
the default model); the untuned small model is its first ``--keep-layers`` blocks
(``slmkit prune --method depth``); the tuned small model is that copy after ``--steps`` of full
SFT on rag-qa; the reference is the large model itself tuned the same way (LoRA, merged). Train
and evaluation questions come from disjoint passages (passage id % 4 == 0 is held out), so no
evaluation passage is seen in tuning. ``slmkit proxy --eval`` then scores base, tuned, untuned,
proxy and reference by containment and token F1 of the gold answer, and reports the fraction
of the base -> reference gap that proxy-tuning closes.

Each step is the CLI verb a user would run (printed before it runs); artefacts go to --workdir
and are reused when present (delete the folder to redo them).

Usage: PYTHONPATH=src python bench/proxy.py [--model default] [--keep-layers 15] [--steps 150]
       [--eval-limit 100] [--alpha 1.0] [--workdir /tmp/slmkit-proxy] [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def build_splits(workdir: Path) -> tuple[Path, Path]:
    """rag-qa as SFT rows (train passages) and evaluation rows (held-out passages)."""
    from slmkit.collab.cascade import qa_prompt
    from slmkit.data import data_file, read_jsonl

    passages = {int(p["id"]): p["text"] for p in read_jsonl(data_file("rag-qa/passages.jsonl"))}
    train, held = [], []
    for q in read_jsonl(data_file("rag-qa/questions.jsonl")):
        pid, ctx = int(q["passage_id"]), passages[int(q["passage_id"])]
        if pid % 4 == 0:
            held.append({"question": q["question"], "context": ctx, "answer": q["answer"]})
        else:
            msgs = qa_prompt(q["question"], ctx, chat=True)
            train.append({"messages": [*msgs, {"role": "assistant", "content": q["answer"]}]})
    workdir.mkdir(parents=True, exist_ok=True)
    tr, ev = workdir / "train.jsonl", workdir / "eval.jsonl"
    tr.write_text("".join(json.dumps(r) + "\n" for r in train))
    ev.write_text("".join(json.dumps(r) + "\n" for r in held))
    return tr, ev


def slmkit(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "slmkit", *args]
    print("$ slmkit " + " ".join(args), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return res.stdout or ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--keep-layers", type=int, default=15)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--workdir", default="/tmp/slmkit-proxy")
    ap.add_argument("--no-reference", action="store_true", help="skip tuning the large model (no reference gap)")
    args = ap.parse_args()
    w = Path(args.workdir)
    train, held = build_splits(w)
    print(json.dumps({"device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores",
                      "args": vars(args), "train_rows": sum(1 for _ in open(train)), "eval_rows": sum(1 for _ in open(held))}), flush=True)
    small, tuned, ref = w / "small", w / "small_tuned", w / "large_tuned"
    if not small.exists():
        slmkit("prune", args.model, "--method", "depth", "--keep-layers", str(args.keep_layers), "--output", str(small))
    if not tuned.exists():
        slmkit("sft", str(small), "--data", str(train), "--max-steps", str(args.steps), "--output", str(tuned))
    if not args.no_reference and not ref.exists():
        slmkit("sft", args.model, "--data", str(train), "--lora", "--merge", "--max-steps", str(args.steps), "--output", str(ref))
    flags = ["--base", args.model, "--tuned", str(tuned), "--untuned", str(small), "--eval", str(held),
             "--limit", str(args.eval_limit), "--alpha", str(args.alpha), "--max-new-tokens", str(args.max_new_tokens), "--json"]
    if not args.no_reference:
        flags += ["--reference", str(ref)]
    rep = json.loads(slmkit("proxy", *flags, capture=True))
    rep.pop("examples", None)
    print(f"\n## proxy-tuning on rag-qa: {rep['n']} held-out questions, alpha {rep['alpha']}")
    print(f"{'system':<11}{'contains':>9}{'F1':>7}")
    for name, m in rep["metrics"].items():
        print(f"{name:<11}{m['correct']:>9.3f}{m['f1']:>7.3f}")
    print(json.dumps({"proxy": rep}), flush=True)


if __name__ == "__main__":
    main()
