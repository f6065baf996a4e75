"""Enhancement benchmark on the default model (SmolLM2-135M-Instruct), CPU.

(a) LoRA SFT on the Self-Instruct seed tasks (../shared/data/instructions) for a fixed step budget:
    held-out assistant loss and exact match on held-out short-answer tasks, before vs after.
(b) DPO (LoRA) on hh-rlhf harmless-base pairs: train on the first pairs, measure the last ones:
    implicit-reward accuracy / margin and log-likelihood preference accuracy, before vs after.
(c) RAG on ../shared/data/rag-qa: retrieval recall@k, and exact match / token F1 of answers with
    k = 0 (no retrieval, the baseline) and k = K, same model, same questions.
(d) Vector index libraries: exact numpy search vs faiss (flat, HNSW) and usearch (HNSW):
    build time, query time (ratio to numpy exact, same run) and recall@10 against exact search.

Every "before" / baseline number comes from the same run. The machine is shared, so times are
reported as ratios. Usage (defaults are the recorded run):

    PYTHONPATH=src python bench/enhance.py [--parts index,sft,dpo,rag] [--sft-steps 20] [--dpo-train 32] [--rag-questions 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- scoring (SQuAD-style)


def normalize(s: str) -> str:
    s = re.sub(r"\[\d+\]", " ", s.lower())
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact(pred: str, gold: str) -> float:
    return float(normalize(pred) == normalize(gold))


def f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if not p or not g or same == 0:
        return float(p == g)
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def contains(pred: str, gold: str) -> float:
    return float(normalize(gold) in normalize(pred)) if normalize(gold) else 0.0


def table(title, header, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |")


# ---------------------------------------------------------------------------- (a) SFT


def instruction_split(path):
    from slmkit.train.records import iter_rows

    rows = [r for _, r in iter_rows(path)]
    train, held, short_held = [], [], []
    n_short = 0
    for i, r in enumerate(rows):
        inst = r["instances"][0]
        user = r["instruction"] + (f"\n\n{inst['input']}" if inst["input"].strip() else "")
        conv = [{"role": "user", "content": user}, {"role": "assistant", "content": inst["output"]}]
        short = len(inst["output"].split()) <= 3
        if short:
            n_short += 1
            (short_held if n_short % 2 == 0 else train).append(conv)
        elif i % 6 == 0:
            held.append(conv)
        else:
            train.append(conv)
    return train, held + short_held, short_held


def exact_match_task(model, tok, convs, max_new_tokens=16):
    from slmkit.backends import GenParams, HFBackend

    be = HFBackend(model, tok)
    preds = [c.text.strip() for c in be.generate([c[:-1] for c in convs], GenParams(max_new_tokens=max_new_tokens))]
    golds = [c[-1]["content"] for c in convs]
    return {
        "exact_match": sum(exact(p, g) for p, g in zip(preds, golds)) / len(golds),
        "contains": sum(contains(p, g) for p, g in zip(preds, golds)) / len(golds),
        "examples": [{"gold": g, "pred": p} for p, g in list(zip(preds, golds))[:5]],
    }


def bench_sft(args, model, tok, out):
    from slmkit.data import data_file
    from slmkit.train.sft import LoraSettings, SFTConfig, assistant_loss, sft

    train, held, short = instruction_split(data_file("instructions/self_instruct_seed_tasks.jsonl"))
    log(f"[sft] train {len(train)} held-out {len(held)} (exact-match items {len(short)})")
    t0 = time.perf_counter()
    before = {"heldout_loss": assistant_loss(model, tok, held, max_length=args.max_length), **exact_match_task(model, tok, short)}
    eval_s = time.perf_counter() - t0
    cfg = SFTConfig(lora=LoraSettings(r=16, alpha=32), max_steps=args.sft_steps, learning_rate=args.sft_lr, batch_size=args.sft_batch,
                    max_length=args.max_length, save_steps=0, logging_steps=5)
    t0 = time.perf_counter()
    res = sft(model, tok, train, cfg, Path(args.workdir) / "sft-ck")
    train_s = time.perf_counter() - t0
    peft_model = res.model
    after = {"heldout_loss": assistant_loss(peft_model, tok, held, max_length=args.max_length),
             **exact_match_task(peft_model, tok, short)}
    out["sft"] = {"train_examples": len(train), "heldout_examples": len(held), "em_items": len(short), "steps": res.steps,
                  "train_tokens_budget": f"{cfg.max_steps} steps x {cfg.batch_size} packed rows x {cfg.max_length} tokens",
                  "train_seconds": train_s, "train_over_eval_time": train_s / eval_s, "before": before, "after": after,
                  "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad)}
    table("(a) LoRA SFT on Self-Instruct seed tasks", ["metric", "before (base)", "after LoRA SFT", "ratio after/before"],
          [["held-out assistant loss (nats/token)", before["heldout_loss"], after["heldout_loss"], after["heldout_loss"] / before["heldout_loss"]],
           [f"exact match ({len(short)} short-answer tasks)", before["exact_match"], after["exact_match"], "-"],
           [f"gold answer contained ({len(short)} tasks)", before["contains"], after["contains"], "-"]])
    peft_model.unload()  # give the base model back without adapters


# ---------------------------------------------------------------------------- (b) DPO


def bench_dpo(args, model, tok, out):
    from slmkit.data import data_file
    from slmkit.train.dpo import PreferenceConfig, pair_logps, preference_metrics, preference_train, read_hh
    from slmkit.train.sft import LoraSettings

    pairs = read_hh(data_file("hh-rlhf/harmless-base-test.jsonl.gz"))
    # keep pairs that fit the length budget, so truncation does not hide the answers
    fit = [p for p in pairs if len(tok.apply_chat_template(p["prompt"] + p["chosen"], tokenize=False)) < args.dpo_max_length * 3
           and len(tok.apply_chat_template(p["prompt"] + p["rejected"], tokenize=False)) < args.dpo_max_length * 3]
    train, held = fit[: args.dpo_train], fit[-args.dpo_eval :]
    log(f"[dpo] {len(pairs)} pairs parsed, {len(fit)} short enough; train {len(train)}, held-out {len(held)}")
    out["dpo"] = {"pairs_parsed": len(pairs), "pairs_fitting": len(fit), "train_pairs": len(train), "heldout_pairs": len(held), "methods": {}}
    rows = []
    for method in args.dpo_methods.split(","):
        cfg = PreferenceConfig(method=method, lora=LoraSettings(r=16, alpha=32), max_steps=args.dpo_steps,
                               learning_rate=args.dpo_lr, batch_size=2, max_length=args.dpo_max_length, save_steps=0, logging_steps=5)
        base_lp = pair_logps(model, tok, held, cfg.max_length)  # the reference: the model before training
        before = preference_metrics(model, tok, held, cfg, reference=base_lp, policy_logps=base_lp)
        t0 = time.perf_counter()
        res = preference_train(model, tok, train, cfg, Path(args.workdir) / f"{method}-ck")
        train_s = time.perf_counter() - t0
        after = preference_metrics(res.model, tok, held, cfg, reference=base_lp)
        out["dpo"]["methods"][method] = {"steps": res.steps, "beta": cfg.effective_beta, "train_seconds": train_s, "before": before, "after": after,
                                         "train_log": [h for h in res.log_history if "loss" in h]}
        rows += [[method, "implicit reward accuracy", before["reward_accuracy"], after["reward_accuracy"]],
                 [method, "implicit reward margin", before["reward_margin"], after["reward_margin"]],
                 [method, "log-likelihood preference accuracy", before["logp_accuracy"], after["logp_accuracy"]],
                 [method, "per-token log-likelihood preference accuracy", before["logp_per_token_accuracy"], after["logp_per_token_accuracy"]]]
        res.model.unload()
    table(f"(b) preference optimisation on hh-rlhf ({len(train)} train / {len(held)} held-out pairs)",
          ["method", "held-out metric", "before", "after"], rows)


# ---------------------------------------------------------------------------- (c) RAG


def bench_rag(args, model, tok, out, embedder, answers: bool):
    from slmkit.backends import HFBackend
    from slmkit.data import data_file
    from slmkit.rag.answer import RAGConfig, answer
    from slmkit.rag.index import VectorIndex, build_index
    from slmkit.train.records import iter_rows

    passages = data_file("rag-qa/passages.jsonl")
    qs = [r for _, r in iter_rows(data_file("rag-qa/questions.jsonl"))]
    idx_dir = Path(args.workdir) / "rag-index"
    t0 = time.perf_counter()
    stats = build_index([passages], idx_dir, embedder)
    index_s = time.perf_counter() - t0
    index = VectorIndex.open(idx_dir)

    def pid(hit):
        return int(hit.doc.rsplit("#", 1)[1])

    qv = embedder.embed([q["question"] for q in qs])
    ranked = index.search(qv, 10)
    recall = {k: sum(any(pid(h) == q["passage_id"] for h in hs[:k]) for q, hs in zip(qs, ranked)) / len(qs) for k in (1, 2, 4, 10)}
    out["rag"] = {"passages": 95, "chunks": stats.chunks_total, "index_seconds": index_s, "questions_recall": len(qs), "recall_at": recall}
    table(f"(c) RAG on rag-qa: retrieval recall over {len(qs)} questions", ["k", "recall@k"], [[k, v] for k, v in recall.items()])
    if not answers:
        return qv, index
    subset = qs[: args.rag_questions]
    be = HFBackend(model, tok)
    res = {}
    for k in (0, args.rag_k):
        t0 = time.perf_counter()
        ans = answer(be, index if k else None, embedder if k else None, [q["question"] for q in subset], RAGConfig(k=k, max_new_tokens=24))
        dt = time.perf_counter() - t0
        res[k] = {"exact_match": sum(exact(a.answer, q["answer"]) for a, q in zip(ans, subset)) / len(subset),
                  "f1": sum(f1(a.answer, q["answer"]) for a, q in zip(ans, subset)) / len(subset),
                  "contains": sum(contains(a.answer, q["answer"]) for a, q in zip(ans, subset)) / len(subset),
                  "cites_a_source": sum(bool(a.cited) for a in ans) / len(subset),
                  "seconds": dt, "examples": [{"q": q["question"], "gold": q["answer"], "pred": a.answer} for a, q in list(zip(ans, subset))[:4]]}
    out["rag"].update({"questions_answered": len(subset), "k": args.rag_k, "by_k": res,
                       "time_ratio_k_over_k0": res[args.rag_k]["seconds"] / res[0]["seconds"]})
    table(f"(c) RAG answers, first {len(subset)} questions", ["retrieval", "exact match", "token F1", "gold contained", "cites a source"],
          [[f"k={k}" + (" (baseline)" if k == 0 else ""), r["exact_match"], r["f1"], r["contains"], r["cites_a_source"]] for k, r in res.items()])
    return qv, index


# ---------------------------------------------------------------------------- (d) index libraries


def bench_index_libraries(args, out, real_queries, real_index):
    rng = np.random.default_rng(0)
    n, d, nq, k = args.synthetic_vectors, 384, 200, 10
    centers = rng.normal(size=(64, d)).astype(np.float32)
    data = centers[rng.integers(0, 64, n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = centers[rng.integers(0, 64, nq)] + 0.6 * rng.normal(size=(nq, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    results = {}
    for name, V, Q in (("synthetic", data, queries), ("rag-qa chunks", np.asarray(real_index.vectors), real_queries)):
        kk = min(k, len(V))
        rows = {}

        def exact_search(V=V, Q=Q, kk=kk):
            s = Q @ V.T
            return np.argpartition(-s, kk - 1, axis=1)[:, :kk]

        def timed(fn, repeats=5):
            best, res = float("inf"), None
            for _ in range(repeats):  # best of N: the machine is shared
                t0 = time.perf_counter()
                res = fn()
                best = min(best, time.perf_counter() - t0)
            return best, res

        base_q, truth = timed(exact_search)
        truth_sets = [set(r) for r in truth]
        rows["numpy exact"] = {"build_s": 0.0, "query_s": base_q, "recall": 1.0}
        try:
            import faiss

            for label, make in (("faiss IndexFlatIP", lambda: faiss.IndexFlatIP(d)),
                                ("faiss HNSW32", lambda: faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT))):
                t0 = time.perf_counter()
                ix = make()
                ix.add(np.ascontiguousarray(V))
                build = time.perf_counter() - t0
                q_s, (_, I) = timed(lambda ix=ix: ix.search(np.ascontiguousarray(Q), kk))
                rows[label] = {"build_s": build, "query_s": q_s, "recall": float(np.mean([len(set(a) & t) / kk for a, t in zip(I, truth_sets)]))}
        except ImportError:
            log("faiss-cpu not installed: skipped")
        try:
            from usearch.index import Index

            t0 = time.perf_counter()
            ix = Index(ndim=d, metric="ip", dtype="f32")
            ix.add(np.arange(len(V)), np.ascontiguousarray(V))
            build = time.perf_counter() - t0
            q_s, m = timed(lambda: ix.search(np.ascontiguousarray(Q), kk))
            keys = np.asarray(m.keys)
            rows["usearch HNSW"] = {"build_s": build, "query_s": q_s, "recall": float(np.mean([len(set(a.tolist()) & t) / kk for a, t in zip(keys, truth_sets)]))}
        except ImportError:
            log("usearch not installed: skipped")
        for r in rows.values():
            r["query_time_ratio_vs_numpy"] = r["query_s"] / base_q
        results[name] = {"vectors": len(V), "queries": len(Q), "k": kk, "rows": rows}
        table(f"(d) vector search, {name}: {len(V)} vectors x {d} dims, {len(Q)} queries, k={kk}",
              ["library", "build (s)", "query time / numpy exact", f"recall@{kk} vs exact"],
              [[lib, r["build_s"], r["query_time_ratio_vs_numpy"], r["recall"]] for lib, r in rows.items()])
    out["index_libraries"] = results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="sft,dpo,rag,index")
    ap.add_argument("--sft-steps", type=int, default=20)
    ap.add_argument("--sft-batch", type=int, default=2)
    ap.add_argument("--sft-lr", type=float, default=2e-4)
    ap.add_argument("--dpo-train", type=int, default=16)
    ap.add_argument("--dpo-eval", type=int, default=24)
    ap.add_argument("--dpo-steps", type=int, default=8)
    ap.add_argument("--dpo-lr", type=float, default=5e-5)
    ap.add_argument("--dpo-methods", default="dpo")
    ap.add_argument("--rag-questions", type=int, default=30)
    ap.add_argument("--rag-k", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--dpo-max-length", type=int, default=192)
    ap.add_argument("--synthetic-vectors", type=int, default=20000)
    ap.add_argument("--model", default="default", help="model spec (the recorded run uses the default model)")
    ap.add_argument("--workdir", default="/tmp/slmkit-bench-enhance")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    from slmkit.models import load

    parts = args.parts.split(",")
    out = {"device": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
           "torch_threads": torch.get_num_threads(), "model": args.model, "args": vars(args)}
    t_all = time.perf_counter()
    model, tok = load(args.model) if {"sft", "dpo", "rag"} & set(parts) else (None, None)
    if "sft" in parts:
        bench_sft(args, model, tok, out)
    if "dpo" in parts:
        bench_dpo(args, model, tok, out)
    if "rag" in parts or "index" in parts:
        from slmkit.rag.embed import Embedder

        emb = Embedder.load()
        qv, index = bench_rag(args, model, tok, out, emb, answers="rag" in parts)
        if "index" in parts:
            bench_index_libraries(args, out, qv, index)
    out["total_seconds"] = time.perf_counter() - t_all
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))
    log(f"done in {out['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
