"""Benchmark of prompt inversion on the default model (CPU): how much of a prompt its output leaks.

Pairs come from the 175 Self-Instruct seed tasks (../shared/data/instructions): prompt = the
instruction plus the first instance's input, output = that instance's reference output, or, with
``--generate``, the default model's own greedy reply to the prompt. A seeded shuffle splits them
into disjoint held-out and training pairs. On the held-out pairs, in the same run, the script
scores (token F1 and exact match after SQuAD normalisation) three reconstructions of the prompt:

* ``first_sentence``: the first sentence of the output (the trivial baseline);
* ``zero_shot``: the default model, untrained, asked "Here is a model's reply. Write the prompt
  that produced it.";
* ``inverter``: the default model after LoRA SFT on the training pairs (``slmkit.collab.inversion``,
  through ``slmkit.train.sft.sft``) for a fixed number of optimizer steps; the wall-clock minutes
  of training are measured and printed.

With ``--source hh-rlhf`` the prompts are instead the first human turns of Anthropic's hh-rlhf
harmless-base test split (../shared/data/hh-rlhf, deduplicated, at most ``--pairs``), and the outputs
are always the default model's replies; ``--int4`` collects them through the fast path with int4
weights (slmkit's q4 kernel: a deployment's outputs at several times the speed of HF generate).

Usage: PYTHONPATH=src python bench/collab_inversion.py [--train-pairs 0] [--eval-pairs 25] [--steps 150]
       [--generate] [--source seed|hh-rlhf] [--pairs 1000] [--int4] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import sys
import tempfile
import time

import torch


def split(pairs, eval_pairs: int, train_pairs: int, seed: int):
    """Disjoint (train, held-out) lists after a seeded shuffle; ``train_pairs`` 0 = all the rest."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = [pairs[i] for i in order[:eval_pairs]]
    rest = [pairs[i] for i in order[eval_pairs:]]
    train = rest[:train_pairs] if train_pairs else rest
    assert not {p.prompt for p in held} & {p.prompt for p in train}, "a prompt is in both splits"
    return train, held


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-pairs", type=int, default=0, help="training pairs (0 = all not held out)")
    ap.add_argument("--eval-pairs", type=int, default=25, help="held-out pairs")
    ap.add_argument("--steps", type=int, default=150, help="LoRA optimizer steps (the training budget)")
    ap.add_argument("--lr", type=float, default=None, help="default: SFTConfig's LoRA default (2e-4)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512, help="tokens per packed training row")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="longest reconstructed prompt")
    ap.add_argument("--generate", action="store_true", help="outputs = the default model's replies, not the data's")
    ap.add_argument("--gen-tokens", type=int, default=96, help="with --generate: longest reply")
    ap.add_argument("--examples", type=int, default=3, help="reconstructions printed per method")
    ap.add_argument("--source", choices=("seed", "hh-rlhf"), default="seed", help="where the prompts come from")
    ap.add_argument("--pairs", type=int, default=1000, help="with --source hh-rlhf: prompts used (train + held out)")
    ap.add_argument("--int4", action="store_true", help="collect replies with the fast path at int4 (q4 kernel)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from datasets.utils.logging import disable_progress_bar

    from slmkit.backends import GenParams, HFBackend
    from slmkit.collab.inversion import InvertConfig, collect_pairs, evaluate, read_pairs, train_inverter
    from slmkit.data import data_file
    from slmkit.models import load
    from slmkit.train.sft import LoraSettings, SFTConfig

    disable_progress_bar()
    if args.source == "hh-rlhf":
        import gzip

        from slmkit.collab.inversion import Pair

        path = data_file("hh-rlhf/harmless-base-test.jsonl.gz")
        seen, pairs = set(), []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                first = json.loads(line)["chosen"].split("\n\nHuman: ", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
                if first and first not in seen and len(first) < 400:
                    seen.add(first)
                    pairs.append(Pair(first, "", f"{path}:{len(pairs)}"))
                if len(pairs) >= args.pairs:
                    break
        args.generate = True  # no reference replies: the outputs are the model's
    else:
        path = data_file("instructions/self_instruct_seed_tasks.jsonl")
        pairs = read_pairs(path)
    train, held = split(pairs, args.eval_pairs, args.train_pairs, args.seed)
    model, tok = load("default")
    info = {"device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch thread(s), shared machine",
            "torch": torch.__version__, "model": "default (SmolLM2-135M-Instruct)", "data": str(path), "args": vars(args)}
    print(json.dumps(info), flush=True)

    gen_seconds = None
    if args.generate:
        t0 = time.perf_counter()
        if args.int4:
            from slmkit.runtime.backend import FastBackend
            from slmkit.runtime.generate import FastConfig

            be = FastBackend(model, tok, FastConfig(weights="int4"), name="default-int4")
        else:
            be = HFBackend(model, tok, name="default")
        gp = GenParams(max_new_tokens=args.gen_tokens)
        train, held = collect_pairs(be, [p.prompt for p in train], gp), collect_pairs(be, [p.prompt for p in held], gp)
        train, held = [p for p in train if p.output], [p for p in held if p.output]  # an empty reply leaks nothing to invert
        gen_seconds = time.perf_counter() - t0

    cfg = InvertConfig(max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    before = evaluate(held, {"zero_shot": HFBackend(model, tok, name="default")}, cfg, examples=args.examples)
    zero_shot_seconds = time.perf_counter() - t0

    sft_cfg = SFTConfig(lora=LoraSettings(r=args.lora_r, alpha=2.0 * args.lora_r), max_steps=args.steps,
                        learning_rate=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                        save_steps=0, logging_steps=max(1, args.steps // 10), seed=args.seed)
    with tempfile.TemporaryDirectory() as ck:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            res = train_inverter(model, tok, train, sft_cfg, f"{ck}/checkpoints", cfg)
        train_minutes = (time.perf_counter() - t0) / 60
    t0 = time.perf_counter()
    after = evaluate(held, {"inverter": HFBackend(res.model, tok, name="inverter")}, cfg, examples=args.examples)
    inverter_seconds = time.perf_counter() - t0
    methods = {**before, **after}  # first_sentence, zero_shot, inverter

    outputs = ("the default model's greedy replies" + (" (int4 fast path)" if args.int4 else "")) if args.generate else "the data's reference outputs"
    source = "hh-rlhf first-turn" if args.source == "hh-rlhf" else "Self-Instruct"
    print(f"\n## prompt inversion: {len(held)} held-out {source} pairs ({outputs}; generation {gen_seconds or 0:.0f} s)")
    print(f"inverter: LoRA r={args.lora_r} on the default model, {res.steps} steps x batch {args.batch_size} "
          f"on {len(train)} training pairs, {train_minutes:.2f} min (train loss {res.train_loss:.3f})")
    print(f"{'method':<16}{'token F1':>10}{'exact':>8}")
    for name, r in methods.items():
        print(f"{name:<16}{r['token_f1']:>10.3f}{r['exact_match']:>8.3f}")
    for name, r in methods.items():
        for ex in r["examples"]:
            print(f"  [{name}] prompt={ex['prompt'][:70]!r} -> {ex['reconstruction'][:70]!r}")
    print(json.dumps({"inversion": {
        "held_out": len(held), "train_pairs": len(train), "outputs": "generated" if args.generate else "reference",
        "steps": res.steps, "train_minutes": round(train_minutes, 3), "train_loss": res.train_loss,
        "generate_seconds": None if gen_seconds is None else round(gen_seconds, 1),
        "zero_shot_seconds": round(zero_shot_seconds, 1), "inverter_seconds": round(inverter_seconds, 1),
        "methods": {k: {f: v[f] for f in ("token_f1", "exact_match", "n")} for k, v in methods.items()},
    }}), flush=True)


if __name__ == "__main__":
    main()
