"""Decode speed of a model in fp32 and bf16 vs. plain ``model.generate`` and the memory-bandwidth bound.

For each dtype, in one process:
  * slmkit's efficiency measure (``slmkit.eval.measure``: greedy KV-cache loop, median of repeats);
  * the baseline: ``model.generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)`` timed as a whole,
    minus the prefill time measured separately, so both are decode tokens/s;
  * the bound: weight bytes read per decoded token / measured memory read bandwidth.
    Every weight matrix is read once per token (the tied output head included; the
    input embedding is a row lookup and is not counted).

Usage: python bench/efficiency.py [--model default] [--new-tokens 64] [--prompt-tokens 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from slmkit.eval import EfficiencyConfig, measure
from slmkit.models import load


def read_bandwidth_gb_s(mb: int = 1024, repeats: int = 5) -> float:
    """Memory read bandwidth: time to sum a tensor much larger than the caches."""
    x = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_token(model) -> int:
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if p is emb and (out is None or out.weight is not emb):
            continue  # untied input embedding: one row per token
        total += p.numel() * p.element_size()
    return total


@torch.inference_mode()
def generate_baseline(model, ids, new_tokens: int, repeats: int) -> float:
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    mask = torch.ones_like(ids)
    model.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=pad)
    speeds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, **kw)
        total = time.perf_counter() - t0
        speeds.append(new_tokens / max(total - prefill, 1e-9))
    return sorted(speeds)[len(speeds) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    bw = read_bandwidth_gb_s()
    rows = []
    for dtype in ("fp32", "bf16"):
        model, _ = load(args.model, dtype=dtype)
        cfg = EfficiencyConfig(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats)
        ours = measure(model, cfg)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        base = generate_baseline(model, ids, args.new_tokens, args.repeats)
        wbytes = weight_bytes_per_token(model)
        bound = bw * 1e9 / wbytes
        rows.append({
            "dtype": dtype,
            "decode_tokens_per_s": ours.decode_tokens_per_s,
            "generate_tokens_per_s": base,
            "ratio_vs_generate": ours.decode_tokens_per_s / base,
            "weight_bytes_per_token": wbytes,
            "bandwidth_bound_tokens_per_s": bound,
            "fraction_of_bound": ours.decode_tokens_per_s / bound,
            "prefill_tokens_per_s": ours.prefill_tokens_per_s,
            "time_to_first_token_s": ours.time_to_first_token_s,
        })
        del model
    meta = {"model": args.model, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "read_bandwidth_gb_s": bw, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return
    print(f"model={args.model} threads={meta['threads']} read bandwidth={bw:.1f} GB/s "
          f"prompt={args.prompt_tokens} new={args.new_tokens}")
    print(f"{'dtype':6} {'slmkit tok/s':>13} {'generate tok/s':>15} {'ratio':>6} {'bound tok/s':>12} {'of bound':>9} {'MB/token':>9}")
    for r in rows:
        print(f"{r['dtype']:6} {r['decode_tokens_per_s']:13.1f} {r['generate_tokens_per_s']:15.1f} {r['ratio_vs_generate']:6.2f} "
              f"{r['bandwidth_bound_tokens_per_s']:12.1f} {r['fraction_of_bound']:9.2f} {r['weight_bytes_per_token'] / 1e6:9.1f}")


if __name__ == "__main__":
    main()
