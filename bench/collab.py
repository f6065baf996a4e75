"""Benchmark of the small/large collaboration on the default model (CPU).

1. Speculative decoding: the default model (target, 30 layers) drafted by a copy of its
   first N layers, and by prompt lookup; against the target alone (transformers
   ``generate``, and our own cached loop) and transformers' assisted generation
   (``assistant_model=``, ``prompt_lookup_num_tokens=``), all in the same run; ``spec_ours_fr``
   is the same draft scoring only the first ``--draft-vocab`` token ids (FR-Spec),
   ``spec_ours_int4`` drafts with the target's own int4 copy on slmkit's fast path (fused q4
   kernel; transformers has no equivalent assistant), methods interleaved per prompt. Speed is a ratio to the target alone from the same run.
2. Cascade on rag-qa (question + its passage; answer checked by containment): the same
   truncated copy answers first, low mean-log-prob answers escalate to the default
   model; quality kept vs share escalated, against random routing at the same rate.
4. Retrieval filter on rag-qa: each question's gold passage among ``--rag-k - 1`` random
   distractors; the filter keeps passages whose yes/no relevance margin is positive; the
   default model answers from all passages vs the kept ones (quality, prompt length).
3. Hallucination detection on TruthfulQA (best answer vs first incorrect answer): AUROC
   of the default model's token-probability risk.

Usage: PYTHONPATH=src python bench/collab.py [--prompts 3] [--tokens 48] [--draft-layers 10] [--draft-vocab 8192]
       [--qa 40] [--tqa 60] [--threads 1]
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


def truncated(model, n: int):
    """A draft sharing the model's first ``n`` decoder blocks, embeddings, norm and head."""
    from slmkit.collab.drafters import layer_draft

    return layer_draft(model, n)


_LOADED: dict = {}


def small_model(model, spec: str | None, layers: int):
    """``spec`` (a model directory, e.g. a distilled student) when given, else the first ``layers`` blocks."""
    if not spec:
        return truncated(model, layers)
    if spec not in _LOADED:
        from slmkit.models import load

        _LOADED[spec] = load(spec)[0]
    return _LOADED[spec]


PROMPTS = [
    "Write a short story about a cat who learns to fly.",
    "Explain how photosynthesis works in simple terms.",
    "List five tips for staying productive when working from home.",
    "Describe the water cycle step by step.",
    "What are the main differences between Python lists and tuples?",
    "Write a polite e-mail asking a colleague to review a document.",
]


def _hf(model, ids, n, **kw):
    t0 = time.perf_counter()
    out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=n, do_sample=False,
                         temperature=None, top_p=None, top_k=None, **kw)
    return out[0, ids.shape[0]:].tolist(), time.perf_counter() - t0


def bench_speculative(model, tok, args) -> dict:
    from slmkit.collab.drafters import ModelDrafter, frequent_vocab, quantised_draft
    from slmkit.collab.speculative import SpecConfig, autoregressive, speculate

    draft = small_model(model, args.draft, args.draft_layers)
    fr_draft = ModelDrafter(draft, frequent_vocab(tok, args.draft_vocab))
    q_draft = quantised_draft(model, "int4")  # the target's own int4 copy on the fast path (self-speculation)
    eos = (tok.eos_token_id,)
    cfg = SpecConfig(max_new_tokens=args.tokens, eos_token_ids=eos)
    stats = {m: {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "identical": 0}
             for m in ("target_hf", "target_ours", "assisted_hf", "spec_ours", "spec_ours_fr", "spec_ours_int4", "lookup_hf", "lookup_ours")}
    n_prompts = 0
    for i, p in enumerate(PROMPTS[: args.prompts]):
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
        if i == 0:  # warm-up, off the clock
            _hf(model, ids, 4)
            _hf(model, ids, 4, assistant_model=draft)
            speculate(model, draft, ids, SpecConfig(max_new_tokens=4))
            speculate(model, q_draft, ids, SpecConfig(max_new_tokens=4))
        ref, dt = _hf(model, ids, args.tokens)
        stats["target_hf"]["tokens"] += len(ref)
        stats["target_hf"]["seconds"] += dt
        runs = [
            ("target_ours", lambda: autoregressive(model, ids, cfg)),
            ("spec_ours", lambda: speculate(model, draft, ids, cfg)),
            ("spec_ours_fr", lambda: speculate(model, fr_draft, ids, cfg)),
            ("spec_ours_int4", lambda: speculate(model, q_draft, ids, cfg)),
            ("lookup_ours", lambda: speculate(model, "lookup", ids, cfg)),
        ]
        for name, fn in runs:
            o = fn()
            s = stats[name]
            s["tokens"] += len(o.tokens)
            s["seconds"] += o.seconds
            s["drafted"] += o.drafted
            s["accepted"] += o.accepted
            s["identical"] += int(o.tokens == ref)
        for name, kw in (("assisted_hf", {"assistant_model": draft}), ("lookup_hf", {"prompt_lookup_num_tokens": 10})):
            toks, dt = _hf(model, ids, args.tokens, **kw)
            stats[name]["tokens"] += len(toks)
            stats[name]["seconds"] += dt
            stats[name]["identical"] += int(toks == ref)
        stats["target_hf"]["identical"] += 1
        n_prompts += 1
        print(f"  prompt {i}: done", file=sys.stderr, flush=True)
    base = stats["target_hf"]["tokens"] / stats["target_hf"]["seconds"]
    rows = {}
    for name, s in stats.items():
        tps = s["tokens"] / s["seconds"]
        rows[name] = {
            "tokens_per_s": tps,
            "speedup_vs_target_hf": tps / base,
            "acceptance_rate": (s["accepted"] / s["drafted"]) if s["drafted"] else None,
            "identical_to_target": f"{s['identical']}/{n_prompts}",
            "tokens": s["tokens"],
        }
    for name in ("spec_ours", "spec_ours_fr", "spec_ours_int4"):
        rows[name]["vs_assisted_hf"] = rows[name]["tokens_per_s"] / rows["assisted_hf"]["tokens_per_s"]
    rows["lookup_ours"]["vs_lookup_hf"] = rows["lookup_ours"]["tokens_per_s"] / rows["lookup_hf"]["tokens_per_s"]
    return rows


def bench_cascade(model, tok, args) -> dict:
    from slmkit.backends import HFBackend
    from slmkit.collab.cascade import CascadeConfig, run_cascade
    from slmkit.data import data_file, read_jsonl

    passages = {r["id"]: r["text"] for r in read_jsonl(data_file("rag-qa/passages.jsonl"))}
    qs = read_jsonl(data_file("rag-qa/questions.jsonl"))
    rng = random.Random(0)
    rng.shuffle(qs)  # questions come grouped by passage; shuffle once (seeded) so both splits see all kinds
    rows = [{"question": q["question"], "answer": q["answer"], "context": passages[q["passage_id"]]} for q in qs[: args.qa]]
    if args.cascade_large:  # e.g. Gemma 3 270M: another tokenizer; the cascade only passes text between the two
        small, large = HFBackend(model, tok), HFBackend.from_spec(args.cascade_large)
    else:
        small, large = HFBackend(small_model(model, args.small, args.small_layers), tok), HFBackend(model, tok)
    cfg = CascadeConfig(signal="logprob", escalate=0.3, max_new_tokens=args.answer_tokens, calib_fraction=0.5)
    rep = run_cascade(small, large, rows, cfg)
    rep.pop("answers")
    return rep


def bench_judge(model, tok, args) -> dict:
    from slmkit.backends import HFBackend
    from slmkit.collab.judge import JudgeConfig, auroc, judge, truthfulqa_items
    from slmkit.data import data_file

    items = truthfulqa_items(data_file("truthfulqa/TruthfulQA.csv"), limit=args.tqa)
    labels = [it.label for it in items]
    out = {"pairs": len(items)}
    small_name = args.small or f"first {args.small_layers} layers"
    for name, m in (("default", model), (small_name, small_model(model, args.small, args.small_layers))):
        risk = judge(HFBackend(m, tok), items, JudgeConfig(method="logprob"))
        out[f"auroc_logprob_{name}"] = auroc(risk, labels)
    if args.tqa_consistency:
        sub = items[: 2 * args.tqa_consistency]
        risk = judge(HFBackend(model, tok), sub, JudgeConfig(method="consistency", samples=3, max_new_tokens=16))
        out["auroc_consistency_default"] = auroc(risk, [it.label for it in sub])
        out["consistency_pairs"] = len(sub)
    return out


def bench_retrieval(model, tok, args) -> dict:
    """Gold passage + distractors (a noisy top-k); the filter keeps passages with a positive
    yes/no relevance margin; the reader answers from all passages vs the kept ones."""
    from slmkit.backends import GenParams, HFBackend
    from slmkit.collab.cascade import answer_correct
    from slmkit.collab.retrieval import FilterConfig, filter_passages
    from slmkit.data import data_file, read_jsonl

    passages = {r["id"]: r["text"] for r in read_jsonl(data_file("rag-qa/passages.jsonl"))}
    qs = read_jsonl(data_file("rag-qa/questions.jsonl"))
    rng = random.Random(1)
    rng.shuffle(qs)
    reader = HFBackend(model, tok)
    scorer = HFBackend(model if args.filter_layers == 0 else truncated(model, args.filter_layers), tok)
    ids = sorted(passages)
    res = {"all": [0, 0], "filtered": [0, 0]}
    kept_gold = kept = 0
    n = 0
    prompts: dict[str, list] = {"all": [], "filtered": []}
    golds = []
    for q in qs[: args.rag]:
        others = rng.sample([i for i in ids if i != q["passage_id"]], args.rag_k - 1)
        cand = others + [q["passage_id"]]
        rng.shuffle(cand)
        texts = [passages[i] for i in cand]
        keep, _ = filter_passages(scorer, q["question"], texts, FilterConfig(threshold=0.0, min_keep=1))
        kept += len(keep)
        kept_gold += int(cand.index(q["passage_id"]) in keep)
        for name, chosen in (("all", texts), ("filtered", [texts[i] for i in keep])):
            ctx = "\n\n".join(chosen)
            prompt = [{"role": "user", "content": f"Context: {ctx}\n\nQuestion: {q['question']}\nAnswer in a few words."}]
            res[name][1] += len(tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids)
            prompts[name].append(prompt)
        golds.append(q["answer"])
        n += 1
    for name in ("all", "filtered"):  # the reader answers every question in batches
        answers = reader.generate(prompts[name], GenParams(max_new_tokens=args.answer_tokens))
        res[name][0] = sum(int(answer_correct(a.text, g)) for a, g in zip(answers, golds))
    return {
        "questions": n, "k": args.rag_k, "filter": "default" if args.filter_layers == 0 else f"first {args.filter_layers} layers",
        "quality_all": res["all"][0] / n, "quality_filtered": res["filtered"][0] / n,
        "prompt_tokens_all": res["all"][1] / n, "prompt_tokens_filtered": res["filtered"][1] / n,
        "prompt_length_ratio": res["filtered"][1] / res["all"][1],
        "passages_kept": kept / n, "gold_recall": kept_gold / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--draft-layers", type=int, default=10)
    ap.add_argument("--draft-vocab", type=int, default=8192, help="FR-Spec draft head: the first N token ids")
    ap.add_argument("--small-layers", type=int, default=20)
    ap.add_argument("--draft", default=None, help="draft model directory (e.g. a distilled student); default: the first --draft-layers blocks")
    ap.add_argument("--small", default=None, help="cascade/judge small model directory; default: the first --small-layers blocks")
    ap.add_argument("--cascade-large", default=None,
                    help="cascade: this MODEL is the large one and the default model the small one (e.g. the Gemma 3 270M GGUF: a cross-tokenizer pair)")
    ap.add_argument("--qa", type=int, default=40)
    ap.add_argument("--answer-tokens", type=int, default=12)
    ap.add_argument("--tqa", type=int, default=60)
    ap.add_argument("--tqa-consistency", type=int, default=0)
    ap.add_argument("--rag", type=int, default=20, help="rag-qa questions for the retrieval filter")
    ap.add_argument("--rag-k", type=int, default=3, help="passages per question (gold + distractors)")
    ap.add_argument("--filter-layers", type=int, default=0, help="filter scorer: 0 = the default model, N = its first N layers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", default="spec,cascade,judge,retrieval")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from slmkit.models import load

    model, tok = load("default")
    info = {"device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch thread(s), {os.cpu_count()} cores",
            "torch": torch.__version__, "args": vars(args)}
    print(json.dumps(info), flush=True)
    parts = args.parts.split(",")
    if "spec" in parts:
        rows = bench_speculative(model, tok, args)
        print("\n## speculative decoding (greedy, fp32)")
        print(f"{'method':<14}{'tok/s':>8}{'vs target':>11}{'accept':>8}{'same':>7}")
        for name, r in rows.items():
            acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
            print(f"{name:<14}{r['tokens_per_s']:>8.2f}{r['speedup_vs_target_hf']:>10.2f}x{acc:>8}{r['identical_to_target']:>7}")
        print(json.dumps({"speculative": rows}), flush=True)
    if "cascade" in parts:
        rep = bench_cascade(model, tok, args)
        print("\n## cascade on rag-qa (logprob signal, target escalation 0.3)")
        print(f"{'escalated':>9}{'quality':>9}{'kept':>7}{'random':>8}{'rnd kept':>9}")
        for r in rep.get("curve", []):
            print(f"{r['escalated']:>9.2f}{r['quality']:>9.3f}{r['quality_kept']:>7.2f}{r['random_quality']:>8.3f}{r['random_quality_kept']:>9.2f}")
        print(json.dumps({"cascade": {k: v for k, v in rep.items()}}, default=str), flush=True)
    if "judge" in parts:
        rep = bench_judge(model, tok, args)
        print("\n## hallucination detection on TruthfulQA pairs")
        print(json.dumps({"judge": rep}), flush=True)
    if "retrieval" in parts:
        rep = bench_retrieval(model, tok, args)
        print("\n## retrieval filter on rag-qa (gold passage + distractors)")
        print(json.dumps({"retrieval": rep}), flush=True)


if __name__ == "__main__":
    main()
