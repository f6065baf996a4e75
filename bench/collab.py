"""Benchmark of the small/large collaboration on the default model (CPU).

1. Speculative decoding (greedy, fp32 target), methods interleaved per prompt, every speed a ratio to
   the target alone in the same run: transformers ``generate`` (``target_hf``) and slmkit's fast path
   (``target_fast``, the engine that verifies). ``spec_int4``: the target's own int4 copy on the fast
   path drafts, prompt lookup drafts when the context repeats, the draft length (0 = plain decoding)
   chosen from measured costs (``slmkit speculate --draft int4``); ``spec_int4_only`` without lookup;
   ``spec_ours``/``spec_ours_fr``: the first ``--draft-layers`` blocks (FR-Spec head: the first
   ``--draft-vocab`` ids); ``assisted_hf``/``lookup_hf``: transformers' assisted generation and prompt
   lookup; ``spec_poor_depth``: an un-healed ``--poor-layers``-of-30-block depth-pruned copy (the
   controller must fall back to plain decoding: compare with ``target_fast``), as ``speculate`` runs it (int4
   on the fast path, the controller's estimates kept across calls), ``_cold`` without that memory (every call
   tries the draft), ``_hf`` also drafting with transformers' forward (the engine before). A second table runs
   chat prompts that ask for text of the prompt again, a third raw completions whose continuation copies the
   prompt (prompt lookup's cases).
2. Cascade on rag-qa (question + its passage; answer checked by containment): the same
   truncated copy answers first, low mean-log-prob answers escalate to the default
   model; quality kept vs share escalated, against random routing at the same rate.
4. Retrieval filter on rag-qa: each question's gold passage among ``--rag-k - 1`` random
   distractors; the filter keeps passages whose yes/no relevance margin is positive; the
   default model answers from all passages vs the kept ones (quality, prompt length).
3. Hallucination detection on TruthfulQA (best answer vs first incorrect answer): AUROC
   of the default model's token-probability risk.

Usage: PYTHONPATH=src python bench/collab.py [--prompts 3] [--tokens 48] [--draft-layers 10] [--draft-vocab 8192]
       [--repeat-prompts 2] [--poor-layers 10] [--spec-methods LIST] [--qa 40] [--tqa 60] [--threads 1]
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


REPEAT_PROMPTS = [
    "Here is a paragraph:\n\nThe water cycle describes how water evaporates from oceans, lakes and rivers, rises into the "
    "atmosphere, cools and condenses into clouds, and falls back to the surface as rain or snow. Some of it soaks into the "
    "ground and some flows back to the sea, where the cycle begins again.\n\nRepeat the paragraph above word for word.",
    "Here is a function:\n\ndef mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n\n"
    "Rewrite the function above with a docstring, keeping the code the same.",
    "Here is a list: apples, oranges, bananas, pears, plums, cherries, grapes, lemons, limes, peaches.\n\n"
    "Write the list above again, one item per line, in the same order.",
]

_PARAGRAPH = ("The water cycle describes how water evaporates from oceans, lakes and rivers, rises into the atmosphere, "
              "cools and condenses into clouds, and falls back to the surface as rain or snow. Some of it soaks into the "
              "ground and some flows back to the sea, where the cycle begins again.")
_CODE = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n\n\n"
         "def variance(values):\n    m = mean(values)\n    total = 0\n    for v in values:\n        total += (v - m) ** 2\n"
         "    return total / len(values)\n")
#: raw completions (no chat template) whose natural continuation copies text of the prompt: the editing, logging
#: and code cases prompt lookup was made for; the chat prompts above ask for a copy, which this model paraphrases
REPEAT_RAW = [
    f"Original text:\n{_PARAGRAPH}\n\nCopy of the text:\n",
    f"# utils.py (version 1)\n{_CODE}\n\n# utils.py (version 2, unchanged)\n",
]


def depth_pruned(model, tok, keep: int):
    """An un-healed copy of ``model`` keeping its ``keep`` most important blocks (``slmkit prune --method depth``'s
    block-influence ranking on 8 wikitext-2 windows): the poor draft the controller must not lose time to."""
    import copy

    from slmkit.compress.calibrate import CalibConfig, calibration_ids
    from slmkit.compress.structured import prune_depth
    from slmkit.data import data_file

    ids = calibration_ids(model, tok, CalibConfig(n_samples=8, seq_len=128, source=str(data_file("wikitext-2/test.txt"))))
    return prune_depth(copy.deepcopy(model), ids, keep).eval()


def _chat_ids(tok, text):
    return torch.tensor(tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False).input_ids)


def _spec_table(model, prompts, runs, args) -> dict:
    """Each of ``runs`` (name -> fn(ids) -> (tokens, seconds, SpecOutput or None)) on every prompt, interleaved per
    prompt, after one warm-up call each; identity is against transformers ``generate`` (``target_hf``)."""
    stats = {name: {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "lookup": 0, "plain": 0, "steps": 0, "identical": 0}
             for name in runs}
    for i, ids in enumerate(prompts):
        if i == 0:
            for fn in runs.values():
                fn(ids, 4)  # warm-up, off the clock
        ref = None
        for name, fn in runs.items():
            toks, dt, o = fn(ids, args.tokens)
            ref = toks if ref is None else ref  # the first run is target_hf
            s = stats[name]
            s["tokens"] += len(toks)
            s["seconds"] += dt
            s["identical"] += int(toks == ref)
            if o is not None:
                s["drafted"] += o.drafted
                s["accepted"] += o.accepted
                s["lookup"] += o.lookup_drafted
                s["plain"] += o.draft_lengths.count(0)
                s["steps"] += len(o.draft_lengths)
        print(f"  prompt {i}: done", file=sys.stderr, flush=True)
    tps = {name: s["tokens"] / s["seconds"] for name, s in stats.items()}
    rows = {}
    for name, s in stats.items():
        rows[name] = {
            "tokens_per_s": tps[name],
            "speedup_vs_target_hf": tps[name] / tps["target_hf"],
            "speedup_vs_target_fast": tps[name] / tps["target_fast"] if "target_fast" in tps else None,
            "acceptance_rate": (s["accepted"] / s["drafted"]) if s["drafted"] else None,
            "lookup_share": (s["lookup"] / s["drafted"]) if s["drafted"] else None,
            "plain_steps": (s["plain"] / s["steps"]) if s["steps"] else None,
            "identical_to_target": f"{s['identical']}/{len(prompts)}",
            "tokens": s["tokens"],
        }
    return rows


def bench_speculative(model, tok, args) -> dict:
    """Ordinary chat prompts: the target alone (transformers ``generate``, slmkit's fast path, slmkit's transformers
    loop), the int4 self-draft with and without prompt lookup, a first-N-blocks draft (plain and FR-Spec),
    transformers' assisted generation and prompt lookup, and a poor draft (an un-healed depth-pruned copy); then
    prompts with text to repeat: the target alone, prompt lookup and the int4 self-draft (with lookup)."""
    from dataclasses import replace

    from slmkit.collab.drafters import ModelDrafter, frequent_vocab, quantised_draft
    from slmkit.collab.speculative import SpecConfig, autoregressive, hf_generate, speculate

    eos = (tok.eos_token_id,)
    cfg = SpecConfig(max_new_tokens=args.tokens, eos_token_ids=eos)
    q_draft = quantised_draft(model, "int4", lookup=True)  # the target's own int4 copy on the fast path (self-speculation)
    q_only = quantised_draft(model, "int4")

    def spec(draft, **kw):
        def run(ids, n):
            o = speculate(model, draft, ids, replace(cfg, max_new_tokens=n, **kw))
            return o.tokens, o.seconds, o
        return run

    def alone(fast):
        def run(ids, n):
            o = autoregressive(model, ids, replace(cfg, max_new_tokens=n, fast_target=fast))
            return o.tokens, o.seconds, None
        return run

    def hf(**kw):
        def run(ids, n):
            if not kw:
                o = hf_generate(model, ids, replace(cfg, max_new_tokens=n))
                return o.tokens, o.seconds, None
            return _hf(model, ids, n, **kw) + (None,)
        return run

    wanted = set(args.spec_methods.split(",")) if args.spec_methods else None
    runs = {"target_hf": hf(), "target_fast": alone(True), "target_ours": alone(False),
            "spec_int4": spec(q_draft), "spec_int4_only": spec(q_only), "lookup_ours": spec("lookup"), "lookup_hf": hf(prompt_lookup_num_tokens=10)}
    if wanted is None or wanted & {"spec_ours", "spec_ours_fr", "assisted_hf"}:
        draft = small_model(model, args.draft, args.draft_layers)
        runs.update({"spec_ours": spec(draft), "spec_ours_fr": spec(ModelDrafter(draft, frequent_vocab(tok, args.draft_vocab))),
                     "assisted_hf": hf(assistant_model=draft)})
    if args.poor_layers and (wanted is None or wanted & {"spec_poor_depth", "spec_poor_depth_cold", "spec_poor_depth_hf"}):
        poor = depth_pruned(model, tok, args.poor_layers)
        runs["spec_poor_depth"] = spec(poor)  # int4 on the fast path; the controller remembers it across calls
        runs["spec_poor_depth_cold"] = spec(poor, remember=False)  # every call measures the draft afresh
        runs["spec_poor_depth_hf"] = spec(poor, remember=False, draft_weights="hf")  # transformers' forward, afresh
    keep = {"target_hf", "target_fast"} | (wanted if wanted is not None else set(runs))
    runs = {k: v for k, v in runs.items() if k in keep}
    out = {"ordinary": _spec_table(model, [_chat_ids(tok, p) for p in PROMPTS[: args.prompts]], runs, args)}
    if args.repeat_prompts:
        rep = {k: runs[k] for k in ("target_hf", "target_fast", "lookup_ours", "lookup_hf", "spec_int4") if k in runs}
        out["repeated"] = _spec_table(model, [_chat_ids(tok, p) for p in REPEAT_PROMPTS[: args.repeat_prompts]], rep, args)
    if args.repeat_raw:
        rep = {k: runs[k] for k in ("target_hf", "target_fast", "lookup_ours", "spec_int4") if k in runs}
        raw = [torch.tensor(tok(p).input_ids) for p in REPEAT_RAW[: args.repeat_raw]]
        out["repeated_raw"] = _spec_table(model, raw, rep, args)
    return out


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


def _f2(v) -> str:
    return "" if v is None else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--draft-layers", type=int, default=10)
    ap.add_argument("--draft-vocab", type=int, default=8192, help="FR-Spec draft head: the first N token ids")
    ap.add_argument("--repeat-prompts", type=int, default=2, help="prompts with text to repeat (prompt lookup's case), 0 = none")
    ap.add_argument("--repeat-raw", type=int, default=2, help="raw completions whose continuation copies the prompt, 0 = none")
    ap.add_argument("--poor-layers", type=int, default=10, help="the poor draft: an un-healed depth-pruned copy keeping N blocks (0 = skip)")
    ap.add_argument("--spec-methods", default="", help="comma list of speculative rows to run (target_hf and target_fast always run); empty = all")
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
        tables = bench_speculative(model, tok, args)
        for title, rows in tables.items():
            print(f"\n## speculative decoding, {title} prompts (greedy, fp32 target)")
            print(f"{'method':<16}{'tok/s':>8}{'vs hf':>8}{'vs fast':>9}{'accept':>8}{'lookup':>8}{'plain':>7}{'same':>7}")
            for name, r in rows.items():
                print(f"{name:<16}{r['tokens_per_s']:>8.2f}{r['speedup_vs_target_hf']:>7.2f}x{r['speedup_vs_target_fast']:>8.2f}x"
                      f"{_f2(r['acceptance_rate']):>8}{_f2(r['lookup_share']):>8}{_f2(r['plain_steps']):>7}{r['identical_to_target']:>7}")
        print(json.dumps({"speculative": tables}), flush=True)
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
