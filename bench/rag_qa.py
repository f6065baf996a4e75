"""RAG that answers (issue 23, and the retrieval filter of issue 20) on ../shared/data/rag-qa.

Split (fixed, stated): questions on passages with an **odd** ``passage_id`` are the held-out split
(192 questions); questions on even passages are the dev split (208). Nothing is tuned on held-out
questions: the retrieval settings (RRF k = 60, hybrid depth, rerank depth, span threshold) are
defaults chosen before this script saw them, and the RAG-tuned adapter trains on dev questions only
(their passages are disjoint from the held-out ones). The index holds all 95 passages.

Parts (``--parts``):

* ``recall``: recall@1/2/4/10 of the gold passage for the dense, bm25 and hybrid retrievers, and with
  ``--rerank`` recall@4 of ``--retriever`` reranked by the answering model (query likelihood, UPR;
  ``--rerank-all``: every retriever). Reranking costs about 12 passage scorings per question.
* ``answer``: token F1 and exact match (SQuAD normalisation, ``[n]`` citations removed) of
  ``generation`` (k = 0 and k = K), ``extractive`` (k = K; also its best span when never abstaining)
  and ``adapter`` (LoRA trained with ``sft --rag`` conversations on the dev split; k = 0 and k = K; its extractive
  mode too when ``extractive`` is among ``--modes``).
* ``filter``: generation at k = K with all top-K passages vs with the small model's retrieval filter
  (``rag ask --filter``): F1, passages kept, prompt tokens.

Usage (the recorded run; a subset with ``--questions N``, the first N of the split in file order)::

    SLMKIT_DATA=../shared/data PYTHONPATH=src python bench/rag_qa.py --model default --split heldout \\
        --parts recall,answer,filter --rerank --sft-steps 60 --json-out rag_qa.json

Tiny smoke run (random model, seconds): ``--model tiny --questions 6 --sft-steps 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def table(title, header, rows):
    log(f"\n{title}")
    log(" | ".join(header))
    for r in rows:
        log(" | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in r))


def split_rows(rows, split):
    if split == "all":
        return rows
    odd = split == "heldout"
    return [r for r in rows if (r["passage_id"] % 2 == 1) == odd]


def passage_of(hit) -> int:
    return int(hit.doc.rsplit("#", 1)[1])


def scores(preds, rows):
    from slmkit.collab.cascade import normalize_answer, token_f1

    clean = [re.sub(r"\[\d+\]", " ", p) if p is not None else "" for p in preds]
    each = [token_f1(p, r["answer"]) for p, r in zip(clean, rows)]
    em = sum(normalize_answer(p) == normalize_answer(r["answer"]) for p, r in zip(clean, rows)) / len(rows)
    return {"f1": sum(each) / len(rows), "exact_match": em, "n": len(rows), "f1_each": each}


def gains(res: dict) -> dict:
    """F1 gain from retrieval of each mode at k = K over the same model at k = 0 (the base model for generation
    and extractive answers, the adapter for the adapter's modes), with a paired bootstrap 95% interval."""
    from slmkit.trust.stats import bootstrap_ci

    out = {}
    for name, r in res.items():
        if "f1_each" not in r or name.endswith("k=0"):
            continue
        base = res.get("adapter k=0" if name.startswith("adapter") else "generation k=0")
        if base is None:
            continue
        diff = [a - b for a, b in zip(r["f1_each"], base["f1_each"])]
        lo, hi = bootstrap_ci(diff, lambda v: sum(v) / len(v), n_boot=2000)
        out[name] = {"gain": sum(diff) / len(diff), "ci95": [lo, hi], "over": "adapter k=0" if name.startswith("adapter")
                     else "generation k=0"}
    return out


def build_indexes(workdir, embedder):
    from slmkit.data import data_file
    from slmkit.rag.index import VectorIndex, build_index
    from slmkit.rag.retrieve import RetrieverConfig

    passages = data_file("rag-qa/passages.jsonl")
    out = {}
    for method in ("dense", "bm25", "hybrid"):
        build_index([passages], Path(workdir) / method, embedder, retriever=RetrieverConfig(method=method))
        out[method] = VectorIndex.open(Path(workdir) / method)
    return out


def bench_recall(args, indexes, embedder, backend, qs, out):
    from slmkit.rag.answer import retrieve
    from slmkit.rag.retrieve import RerankConfig, rank

    ks = (1, 2, 4, 10)
    res = {}
    for method, index in indexes.items():
        ranked = rank(index, embedder, [q["question"] for q in qs], max(ks), index.retriever)
        res[method] = {k: sum(any(passage_of(h) == q["passage_id"] for h in hs[:k]) for q, hs in zip(qs, ranked)) / len(qs)
                       for k in ks}
        if args.rerank and backend is not None and (args.rerank_all or method == args.retriever):
            t0 = time.perf_counter()
            cfg = RerankConfig(method=args.rerank_method, depth=args.rerank_depth)
            rr = retrieve(index, embedder, [q["question"] for q in qs], 4, backend, cfg)
            res[f"{method}+rerank"] = {4: sum(any(passage_of(h) == q["passage_id"] for h in hs) for q, hs in zip(qs, rr)) / len(qs),
                                       "seconds": time.perf_counter() - t0}
    out["recall"] = res
    table(f"recall@k, {len(qs)} {args.split} questions", ["retriever", *[f"@{k}" for k in ks]],
          [[m, *[r.get(k, "") for k in ks]] for m, r in res.items()])


def train_adapter(args, model, tok, index, embedder, workdir):
    """LoRA on ``sft --rag`` conversations built from the dev split (never the held-out one)."""
    from slmkit.data import data_file
    from slmkit.rag.train import RAGTrainConfig, rag_conversations, read_qa, training_rows
    from slmkit.train.sft import LoraSettings, SFTConfig, sft

    if args.adapter:  # a run's saved adapter: evaluate without training again
        from peft import PeftModel

        return PeftModel.from_pretrained(model, args.adapter), {"adapter": args.adapter}
    dev = split_rows(read_qa(data_file("rag-qa/questions.jsonl")), "dev")
    rows, added = training_rows(dev, index, args.sft_cloze, seed=0)  # cloze from dev passages only
    built = rag_conversations(rows, index, embedder, RAGTrainConfig(k=args.k, seed=0))
    cfg = SFTConfig(lora=LoraSettings(r=16, alpha=32.0), max_steps=args.sft_steps, batch_size=args.sft_batch,
                    learning_rate=args.sft_lr, max_length=args.sft_max_length, packing=False, save_steps=0, seed=0,
                    bf16=args.sft_precision == "bf16")
    info = {"conversations": len(built.conversations), "cloze": added, "skipped": built.skipped,
            "precision": args.sft_precision}
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        res = sft(model, tok, built.conversations, cfg, Path(workdir) / "sft-checkpoints")
    if args.save_adapter:
        res.model.save_pretrained(args.save_adapter)
    return res.model, info | {"steps": res.steps, "train_loss": res.train_loss, "seconds": time.perf_counter() - t0}


def bench_answers(args, model, tok, index, embedder, qs, out, workdir):
    from slmkit.backends import HFBackend
    from slmkit.rag.answer import RAGConfig, answer
    from slmkit.rag.extract import ExtractConfig

    questions = [q["question"] for q in qs]
    base = HFBackend(model, tok)
    res = {}

    def run(name, backend, cfg):
        t0 = time.perf_counter()
        ans = answer(backend, index if cfg.k else None, embedder, questions, cfg)
        r = scores([a.answer for a in ans], qs) | {"seconds": time.perf_counter() - t0}
        modes = [a.mode for a in ans]
        r["modes"] = {m: modes.count(m) for m in sorted(set(modes))}
        if cfg.extractive is not None:
            r["best_span_never_abstain"] = scores([a.candidate["text"] if a.candidate else a.answer for a in ans], qs)
        r["examples"] = [{"q": a.question, "gold": q["answer"], "pred": a.answer, "span": a.span} for a, q in list(zip(ans, qs))[:3]]
        res[name] = r
        extra = ""
        if "best_span_never_abstain" in r:
            extra = f"; best span, never abstaining: F1 {r['best_span_never_abstain']['f1']:.3f}"
        log(f"  {name}: F1 {r['f1']:.3f} EM {r['exact_match']:.3f} modes {r['modes']}{extra} ({r['seconds']:.0f} s)")
        for e in r["examples"]:
            log(f"    gold {e['gold']!r} pred {e['pred']!r}")

    if "generation" in args.modes:
        run("generation k=0", base, RAGConfig(k=0, max_new_tokens=args.max_new_tokens))
        run(f"generation k={args.k}", base, RAGConfig(k=args.k, max_new_tokens=args.max_new_tokens))
    def extractive(prefix, backend):  # each --extractive-method at k = K
        for method in args.extractive_method.split(","):
            run(f"{prefix}extractive ({method}) k={args.k}", backend, RAGConfig(
                k=args.k, max_new_tokens=args.max_new_tokens, extractive=ExtractConfig(method=method, min_score=args.min_span_score)))

    if "extractive" in args.modes:
        extractive("", base)
    if args.modes & {"adapter", "adapter-extractive"}:
        tuned, info = train_adapter(args, model, tok, index, embedder, workdir)
        res["adapter_training"] = info
        tuned.eval()
        ad = HFBackend(tuned, tok)
        run("adapter k=0", ad, RAGConfig(k=0, max_new_tokens=args.max_new_tokens))
        if "adapter" in args.modes:
            run(f"adapter k={args.k}", ad, RAGConfig(k=args.k, max_new_tokens=args.max_new_tokens))
        if args.modes & {"extractive", "adapter-extractive"}:
            extractive("adapter ", ad)
        with contextlib.suppress(AttributeError):
            tuned.unload()  # back to the base weights for later parts
    out["answers"] = res
    table(f"answers, {len(qs)} {args.split} questions", ["mode", "F1", "EM"],
          [[m, r["f1"], r["exact_match"]] for m, r in res.items() if "f1" in r])
    out["gains"] = gains(res)
    table("F1 gain from retrieval (paired bootstrap 95% interval)", ["mode", "over", "gain", "interval"],
          [[m, g["over"], g["gain"], f"[{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]"] for m, g in out["gains"].items()])


def bench_filter(args, model, tok, index, embedder, qs, out):
    from slmkit.backends import HFBackend
    from slmkit.collab.retrieval import FilterConfig
    from slmkit.models import load
    from slmkit.rag.answer import RAGConfig, answer

    base = HFBackend(model, tok)
    small = base if args.filter_model == args.model else HFBackend(*load(args.filter_model))
    questions = [q["question"] for q in qs]
    res = {}
    for name, cfg in (("all top-k", RAGConfig(k=args.k, max_new_tokens=args.max_new_tokens)),
                      ("filtered", RAGConfig(k=args.k, max_new_tokens=args.max_new_tokens, filter=FilterConfig()))):
        ans = answer(base, index, embedder, questions, cfg, small=small)
        gold_kept = sum(any(passage_of(h) == q["passage_id"] for h in a.sources) for a, q in zip(ans, qs)) / len(qs)
        res[name] = scores([a.answer for a in ans], qs) | {
            "passages": sum(len(a.sources) for a in ans) / len(ans), "gold_among_passages": gold_kept,
            "prompt_tokens": sum(a.prompt_tokens or 0 for a in ans) / len(ans)}
    out["filter"] = res
    table(f"retrieval filter ({args.filter_model}), k={args.k}, {len(qs)} questions",
          ["passages", "F1", "EM", "passages/question", "gold kept", "prompt tokens"],
          [[n, r["f1"], r["exact_match"], r["passages"], r["gold_among_passages"], r["prompt_tokens"]] for n, r in res.items()])


def load_model(spec):
    from slmkit.models import load

    if spec == "tiny":
        from slmkit.models.tiny import tiny_llama_config, tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        return tiny_model(tiny_llama_config(tok, max_position_embeddings=8192)), tok
    return load(spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="answering model (tiny: a random model, for smoke runs)")
    ap.add_argument("--filter-model", default=None, help="small filtering model (default: --model)")
    ap.add_argument("--embedder", default="all-MiniLM-L6-v2")
    ap.add_argument("--split", default="heldout", choices=("heldout", "dev", "all"))
    ap.add_argument("--questions", type=int, default=0, help="first N questions of the split (0 = all)")
    ap.add_argument("--offset", type=int, default=0, help="skip the split's first N questions (e.g. a fresh half after a sweep)")
    ap.add_argument("--parts", default="recall,answer")
    ap.add_argument("--modes", default="generation,extractive,adapter",
                    help="generation, extractive, adapter (its generation, and its extractive modes with extractive), "
                         "adapter-extractive (the adapter's k=0 baseline and extractive modes only)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rerank", action="store_true")
    ap.add_argument("--rerank-method", default="query-likelihood")
    ap.add_argument("--rerank-all", action="store_true", help="rerank every retriever (default: --retriever only)")
    ap.add_argument("--rerank-depth", type=int, default=12)
    ap.add_argument("--retriever", default="hybrid", choices=("dense", "bm25", "hybrid"), help="retriever for the answer parts")
    ap.add_argument("--min-span-score", type=float, default=-2.5)
    ap.add_argument("--extractive-method", default="score", help="comma-separated: score (rank candidate spans), decode, decode-each (constrained copy)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--sft-batch", type=int, default=4)
    ap.add_argument("--sft-lr", type=float, default=2e-4)
    ap.add_argument("--sft-cloze", type=int, default=0, help="blanked-phrase questions per dev passage chunk (sft --rag-cloze)")
    ap.add_argument("--sft-precision", default="bf16", choices=("fp32", "bf16"),
                    help="adapter training: bf16 autocast (~2x faster on AVX512-BF16/AMX CPUs) or fp32 (the first runs)")
    ap.add_argument("--save-adapter", default=None, help="write the trained adapter here")
    ap.add_argument("--adapter", default=None, help="evaluate this saved adapter instead of training one")
    ap.add_argument("--sft-max-length", type=int, default=1024, help="tokens per training conversation (4 sources: ~900)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    args.filter_model = args.filter_model or args.model
    args.modes = set(args.modes.split(","))
    parts = set(args.parts.split(","))

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from slmkit.data import data_file
    from slmkit.rag.embed import Embedder
    from slmkit.train.records import iter_rows

    workdir = args.workdir or tempfile.mkdtemp(prefix="rag-qa-")
    qs = split_rows([r for _, r in iter_rows(data_file("rag-qa/questions.jsonl"))], args.split)
    qs = qs[args.offset:]
    if args.questions:
        qs = qs[: args.questions]
    out = {"device": f"{platform.machine()} CPU, torch {torch.__version__}, {args.threads} threads", "model": args.model,
           "embedder": args.embedder, "split": args.split, "questions": len(qs), "k": args.k, "args": {
               k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    embedder = Embedder.load(args.embedder)
    indexes = build_indexes(workdir, embedder)
    model, tok = load_model(args.model) if parts & {"answer", "filter"} or args.rerank else (None, None)
    backend = None
    if model is not None:
        from slmkit.backends import HFBackend

        backend = HFBackend(model, tok)
    if "recall" in parts:
        bench_recall(args, indexes, embedder, backend, qs, out)
    if "answer" in parts:
        bench_answers(args, model, tok, indexes[args.retriever], embedder, qs, out, workdir)
    if "filter" in parts:
        bench_filter(args, model, tok, indexes[args.retriever], embedder, qs, out)
    out["seconds"] = time.perf_counter() - t0
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
