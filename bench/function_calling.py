"""Function-calling benchmark (issue 22): held-out calls, free vs constrained, before vs after a LoRA SFT.

The set is slmkit.eval.toolcalls's (generated in code from a seed): ten functions, each request offering
four of them (the right one among three others); train and test requests come from disjoint templates
and values. Measured on the test split (greedy, transformers path): share of replies holding a valid call,
right function, right function and arguments (exact after JSON normalisation, Wilson 95% interval), and
per-argument accuracy, each decoded
  * free: the functions in the prompt only (the server's rendering: the chat template's tool support,
    or slmkit's fallback system prompt), the reply parsed for a <tool_call> block,
  * constrained: under the tool-call grammar of tool_choice "required" (slmkit.runtime.tools),
before and after a LoRA SFT (slmkit.train.sft, loss on the assistant's call only) on training rows made by
  * gold: the train split's known calls (templated synthetic data),
  * teacher: slmkit gen-data --tools's pipeline (slmkit.data.toolsynth): a teacher (--teacher, default the
    model itself) calls a function for each train request under the grammar; its rows' exact accuracy
    against the gold calls is reported as the data's quality.

    PYTHONPATH=src python bench/function_calling.py [--model default] [--train 200] [--test 100] [--steps 50]
        [--data gold,teacher] [--teacher default] [--threads 2] [--json out.json]
    PYTHONPATH=src python bench/function_calling.py --tiny      (a random tiny model: checks the script runs)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def _row(r) -> dict:
    return {"valid": r.valid, "function": r.function_accuracy, "exact": r.exact_accuracy,
            "exact_ci95": [round(x, 4) for x in r.exact_ci95], "arguments": r.argument_accuracy}


def evaluate_both(model, tok, test, max_new: int, timings: dict, tag: str) -> dict:
    from slmkit.backends.hf import HFBackend
    from slmkit.eval.toolcalls import evaluate

    backend = HFBackend(model, tok, name=tag)
    out = {}
    for constrained in (False, True):
        t0 = time.perf_counter()
        res = evaluate(backend, test, constrained=constrained, max_new_tokens=max_new)
        key = "constrained" if constrained else "free"
        timings[f"eval {tag} {key}"] = round(time.perf_counter() - t0, 1)
        out[key] = {**_row(res), "samples": res.samples[:2]}
    return out


def teacher_rows(teacher_spec: str, model, tok, train, work: Path, max_new: int, timings: dict) -> tuple[list, float]:
    """gen-data --tools's pipeline over the train requests (grouped by offered functions); rows and their exact accuracy."""
    from slmkit.backends.hf import HFBackend
    from slmkit.data.synth import PromptItem
    from slmkit.data.toolsynth import ToolSynthConfig, check_tools, generate_tool_dataset
    from slmkit.eval.toolcalls import score_reply
    from slmkit.runtime.tools import format_call
    from slmkit.train.records import read_sft

    t0 = time.perf_counter()
    teacher = HFBackend(model, tok, name="self") if teacher_spec == "self" else HFBackend.from_spec(teacher_spec)
    out = work / "teacher.jsonl"
    groups: dict[tuple, list] = {}
    for ex in train:
        groups.setdefault(ex.tools, []).append(ex)
    asked = 0
    for exs in groups.values():  # one call per set of offered functions, all appending to one file
        asked += len(exs)  # n counts the rows in the file, earlier groups' included
        generate_tool_dataset(teacher, [PromptItem(ex.id, ex.messages()) for ex in exs], check_tools(exs[0].offered(), "tools"),
                              out, ToolSynthConfig(n=asked, max_new_tokens=max_new))
    rows = read_sft(out)
    by_id = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    gold = {ex.id: ex for ex in train}
    right = 0
    for rid, row in by_id.items():
        call = row["messages"][-1]["tool_calls"][0]["function"]
        right += score_reply(format_call(call["name"], json.loads(call["arguments"])), gold[rid]).exact
    timings["teacher data"] = round(time.perf_counter() - t0, 1)
    return rows, right / max(len(by_id), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--tiny", action="store_true", help="a random tiny llama instead of --model (checks the script, not the numbers)")
    ap.add_argument("--train", type=int, default=200, help="training requests")
    ap.add_argument("--test", type=int, default=100, help="held-out requests")
    ap.add_argument("--offered", type=int, default=4, help="functions offered per request (0 = all ten)")
    ap.add_argument("--data", default="gold,teacher", help="training rows: gold, teacher, or both")
    ap.add_argument("--teacher", default="self", help="gen-data teacher for --data teacher (self = the model itself)")
    ap.add_argument("--steps", type=int, default=50, help="LoRA SFT steps (50 x 2 packed rows of 1024 tokens: about one pass over 200 requests)")
    ap.add_argument("--batch-size", type=int, default=2, help="packed rows per step")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from slmkit.eval.toolcalls import make_split, sft_rows
    from slmkit.train.records import check_tool_conversation
    from slmkit.train.sft import LoraSettings, SFTConfig, sft

    if a.tiny:
        from slmkit.models.tiny import tiny_llama_config, tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_model(tiny_llama_config(tok, initializer_range=0.2, max_position_embeddings=2048), seed=1)
        name = "tiny (random)"
        # the tiny tokenizer's tokens are a character or two: a call needs more of them
        a.train, a.test, a.steps, a.max_new_tokens = min(a.train, 16), min(a.test, 10), min(a.steps, 4), max(a.max_new_tokens, 128)
    else:
        from slmkit.models import load

        model, tok = load(a.model)
        name = a.model
    train = make_split("train", a.train, a.seed, a.offered)
    test = make_split("test", a.test, a.seed, a.offered)
    timings: dict = {}
    out = {"model": name, "train": a.train, "test": a.test, "offered": a.offered, "steps": a.steps, "lora_r": a.lora_r,
           "lr": a.lr, "threads": torch.get_num_threads(), "device": platform.processor() or platform.machine(),
           "before": evaluate_both(model, tok, test, a.max_new_tokens, timings, "before"), "after": {}}
    cfg = SFTConfig(lora=LoraSettings(r=a.lora_r, alpha=2.0 * a.lora_r), max_steps=a.steps, learning_rate=a.lr,
                    batch_size=a.batch_size, max_length=1024, save_steps=0, logging_steps=max(1, min(10, a.steps)), seed=a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind in [k.strip() for k in a.data.split(",") if k.strip()]:
            if kind == "gold":
                rows = [check_tool_conversation(r, f"gold row {r['id']}") for r in sft_rows(train)]
            elif kind == "teacher":
                rows, quality = teacher_rows(a.teacher, model, tok, train, work, a.max_new_tokens, timings)
                out["teacher_data"] = {"teacher": a.teacher if a.teacher != "self" else name, "rows": len(rows),
                                       "exact_vs_gold": quality}
            else:
                raise SystemExit(f"--data: unknown kind {kind!r} (gold, teacher)")
            t0 = time.perf_counter()
            res = sft(copy.deepcopy(model), tok, rows, cfg, work / f"ck-{kind}")
            timings[f"sft {kind}"] = round(time.perf_counter() - t0, 1)
            out["after"][kind] = {"train_loss": res.train_loss, **evaluate_both(res.model, tok, test, a.max_new_tokens, timings, kind)}
    out["seconds"] = timings
    print(f"{name}: {a.test} held-out calls ({a.offered or 10} functions offered each), greedy, {torch.get_num_threads()} threads; "
          f"LoRA r={a.lora_r}, {a.steps} steps on {a.train} training requests")
    print(f"  {'':24s} {'valid':>7s} {'function':>9s} {'exact':>7s} {'95% CI':>15s} {'args':>7s}")
    runs = [("before", out["before"])] + [(f"after SFT ({k})", v) for k, v in out["after"].items()]
    for label, r in runs:
        for mode in ("free", "constrained"):
            m = r[mode]
            ci = f"[{m['exact_ci95'][0]:.2f}, {m['exact_ci95'][1]:.2f}]"
            print(f"  {label + ' ' + mode:24s} {m['valid']:7.2f} {m['function']:9.2f} {m['exact']:7.2f} {ci:>15s} {m['arguments']:7.2f}")
    if "teacher_data" in out:
        print(f"  teacher rows: {out['teacher_data']['rows']}, exact vs gold {out['teacher_data']['exact_vs_gold']:.2f}")
    print("  seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
