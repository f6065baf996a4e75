"""Healing a depth-pruned student: plain fine-tuning vs distillation with each divergence vs TRL's GKDTrainer.

Teacher: the default model (SmolLM2-135M-Instruct, 30 blocks). Student: the teacher
depth-pruned to 20 blocks (ShortGPT block influence, slmkit.compress.structured.prune_depth)
on calibration text from the training split. Every method trains the same student for
the same number of optimizer steps on the same token chunks in the same order (equal
budget in steps and tokens; wall time is reported per method).

Data (all WikiText-2 test.txt, split by characters, disjoint):
  evaluation: perplexity on the first --eval-tokens tokens (context 512, stride 512);
  training / calibration: the text after the evaluation part.
Agreement: top-1 agreement of student and teacher next-token argmax on held-out text
the teacher generated (greedy) for the first --agree-prompts Vicuna-bench questions.

Usage (CPU, shared machine; run in the background; one torch thread is fastest when the cores are oversubscribed):
  OMP_NUM_THREADS=1 PYTHONPATH=src nohup python bench/distill.py --steps 8 --batch 2 --block 128 --lr 2e-4 \
      --eval-tokens 2048 --agree-prompts 4 --gen-tokens 32 --losses ce,fkl,rkl,jsd > /tmp/issue4-bench.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from slmkit.backends import GenParams, HFBackend
from slmkit.backends.hf import render_prompt
from slmkit.data import data_file
from slmkit.eval import PerplexityConfig, perplexity
from slmkit.models import load
from slmkit.train.data import DataConfig, load_examples
from slmkit.train.distill import DistillConfig, distill
from slmkit.train.losses import LossConfig


def split_text(tok, text: str, eval_tokens: int) -> tuple[str, str]:
    """Cut ``text`` at a line boundary after at least ``eval_tokens`` tokens."""
    cut = 0
    while True:
        nxt = text.find("\n", cut + 20000)
        cut = len(text) if nxt < 0 else nxt
        if len(tok(text[:cut], add_special_tokens=False).input_ids) >= eval_tokens or cut == len(text):
            return text[:cut], text[cut:]


@torch.no_grad()
def agreement_set(teacher, tok, prompts: list[str], max_new: int):
    """(ids (1, L), prompt_len, teacher argmax over the response positions) per prompt."""
    be = HFBackend(teacher, tok)
    rows = []
    for q in prompts:
        msgs = [{"role": "user", "content": q}]
        c = be.generate([msgs], GenParams(max_new_tokens=max_new))[0]
        p_ids = tok(render_prompt(tok, msgs), add_special_tokens=False).input_ids
        r_ids = tok(c.text, add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + r_ids])
        P = len(p_ids)
        t_arg = teacher(ids).logits[0, P - 1 : -1].argmax(-1)
        rows.append((ids, P, t_arg))
    return rows


@torch.no_grad()
def agreement(model, rows) -> float:
    hit = tot = 0
    for ids, P, t_arg in rows:
        s_arg = model(ids).logits[0, P - 1 : -1].argmax(-1)
        hit += int((s_arg == t_arg).sum())
        tot += t_arg.numel()
    return hit / max(tot, 1)


def evaluate(model, tok, eval_text, eval_tokens, rows) -> dict:
    model.eval()
    ppl = perplexity(model, tok, eval_text, PerplexityConfig(context=512, stride=512, max_tokens=eval_tokens))
    return {"ppl": ppl.perplexity, "ppl_tokens": ppl.tokens, "agree": agreement(model, rows)}


def run_gkd(student, teacher, tok, train_file: Path, args, out: Path) -> float:
    """TRL's GKDTrainer (defaults: lambda 0.5 on-policy, beta 0.5, sampling temperature 0.9) on the same chunks."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    examples, _ = load_examples(train_file, tok, DataConfig(block_size=args.block, prompt_tokens=args.prompt_tokens))
    ds = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    pad = tok.pad_token_id

    def collate(feats):
        L = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), L), pad)
        att = torch.zeros((len(feats), L), dtype=torch.long)
        for i, f in enumerate(feats):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            att[i, : len(f["input_ids"])] = 1
        lab = ids.clone()
        lab[att == 0] = -100
        P = args.prompt_tokens
        return {"input_ids": ids, "attention_mask": att, "labels": lab,
                "prompts": ids[:, :P], "prompt_attention_mask": att[:, :P]}

    cfg = GKDConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="constant", logging_steps=10, save_strategy="no", report_to="none", seed=0, data_seed=0,
        max_new_tokens=args.gen_tokens, disable_tqdm=True, dataloader_pin_memory=False, bf16=args.bf16,
        use_cpu=args.bf16 and not torch.cuda.is_available(),
    )
    tr = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
                    data_collator=collate)
    t0 = time.perf_counter()
    tr.train()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per method")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=128, help="tokens per training chunk")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--keep-layers", type=int, default=20)
    ap.add_argument("--calib-seqs", type=int, default=8, help="256-token calibration sequences for block influence")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--agree-prompts", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=64, help="teacher generation length (agreement) and GKD sample length")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="GKD on-policy prompt length (tokens of a chunk)")
    ap.add_argument("--losses", default="ce,fkl,rkl,jsd,skl,srkl,tvd",
                    help="methods run through slmkit distill; NAME+ceW mixes in cross-entropy: (1-W) NAME + W ce")
    ap.add_argument("--no-gkd", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision) for every method, GKD included")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded shared machine)")
    ap.add_argument("--work", default="/tmp/issue4-bench", help="scratch directory (deleted runs)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_all = time.perf_counter()

    teacher, tok = load("default")
    text = data_file("wikitext-2/test.txt").read_text(encoding="utf-8")
    eval_text, train_text = split_text(tok, text, args.eval_tokens)
    train_file = work / "train.txt"
    train_file.write_text(train_text)
    questions = [json.loads(line)["turns"][0] for line in data_file("mt-bench/vicuna_bench_question.jsonl").read_text().splitlines()[: args.agree_prompts]]
    rows = agreement_set(teacher, tok, questions, args.gen_tokens)
    results: dict[str, dict] = {"teacher": evaluate(teacher, tok, eval_text, args.eval_tokens, rows)}
    print(f"teacher: {results['teacher']}", flush=True)

    # the student: teacher depth-pruned to keep_layers blocks (block influence on training-split calibration text)
    from slmkit.compress.structured import prune_depth

    calib = torch.tensor(tok(train_text[:100000], add_special_tokens=False).input_ids[: args.calib_seqs * 256]).view(args.calib_seqs, 256)
    student, _ = load("default")
    t0 = time.perf_counter()
    prune_depth(student, calib, args.keep_layers, method="block_influence")
    prune_s = time.perf_counter() - t0
    pruned_dir = work / "pruned"
    student.save_pretrained(pruned_dir)
    tok.save_pretrained(pruned_dir)
    results["pruned (no healing)"] = evaluate(student, tok, eval_text, args.eval_tokens, rows)
    print(f"pruned: {results['pruned (no healing)']} ({prune_s:.0f}s)", flush=True)
    del student

    for name in [x for x in args.losses.split(",") if x]:
        student, _ = load(str(pruned_dir))
        div, _, w = name.partition("+ce")  # "fkl+ce0.5": (1 - 0.5) fkl + 0.5 cross-entropy on the data
        cfg = DistillConfig(
            loss=LossConfig(loss=div, ce_weight=float(w) if w else 0.0),
            data=DataConfig(block_size=args.block, prompt_tokens=args.prompt_tokens),
            max_steps=args.steps, batch_size=args.batch, learning_rate=args.lr, save_steps=args.steps,
            save_total_limit=1, logging_steps=10, seed=0, bf16=args.bf16,
        )
        out = work / f"run-{name}"
        res = distill(student, tok, train_file, out, cfg, teacher=None if name == "ce" else teacher,
                      source={"teacher": "default", "student": "pruned"})
        label = "plain fine-tuning (ce)" if name == "ce" else f"distill {name}"
        results[label] = {**evaluate(student, tok, eval_text, args.eval_tokens, rows), "train_s": res.seconds}
        print(f"{label}: {results[label]}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        del student

    if not args.no_gkd:
        student, _ = load(str(pruned_dir))
        secs = run_gkd(student, teacher, tok, train_file, args, work / "gkd")
        results["TRL GKDTrainer (jsd 0.5, lambda 0.5)"] = {**evaluate(student, tok, eval_text, args.eval_tokens, rows), "train_s": secs}
        print(f"gkd: {results['TRL GKDTrainer (jsd 0.5, lambda 0.5)']}", flush=True)
        shutil.rmtree(work / "gkd", ignore_errors=True)

    base = results.get("plain fine-tuning (ce)")
    total_min = (time.perf_counter() - t_all) / 60
    print(f"\ndevice: CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores; total {total_min:.1f} min")
    print(f"budget per method: {args.steps} steps x {args.batch} x {args.block} tokens = {args.steps * args.batch * args.block} tokens, "
          f"lr {args.lr}, {'bf16 autocast' if args.bf16 else 'fp32'}")
    print(f"perplexity: WikiText-2 test, first {results['teacher']['ppl_tokens']} scored tokens; agreement: {args.agree_prompts} prompts x <= {args.gen_tokens} teacher tokens")
    hdr = f"{'model':40s} {'ppl':>9s} {'ppl/ce':>7s} {'agree':>7s} {'agree-ce':>9s} {'train s':>8s}"
    print(hdr)
    for k, v in results.items():
        r = f"{v['ppl'] / base['ppl']:.3f}" if base else "-"
        d = f"{100 * (v['agree'] - base['agree']):+.1f}pt" if base else "-"
        ts = f"{v['train_s']:.0f}" if "train_s" in v else "-"
        print(f"{k:40s} {v['ppl']:9.2f} {r:>7s} {100 * v['agree']:6.1f}% {d:>9s} {ts:>8s}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "total_min": total_min}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
