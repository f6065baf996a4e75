"""The fast path's batched decode step: time per step and tokens/s for M sequences decoding together.

What a continuous-batching server gains from concurrency is bounded by this step: ``forward`` over M
one-token segments (each with its own KV cache, ``--context`` tokens already read), the call
``slmkit serve``'s engine makes once per decode step. The baseline is M = 1 in the same run; each row
prints its throughput ratio against it.

Usage: PYTHONPATH=src python bench/batch_step.py [--model default] [--weights int4] [--batches 1,2,4,8,16]
       [--context 40] [--steps 30] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--weights", default="int4", choices=("native", "int8", "int4"))
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--context", type=int, default=40, help="tokens in each sequence's cache before timing")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from slmkit.runtime.backend import FastBackend
    from slmkit.runtime.generate import Segment, forward

    fm = FastBackend.from_spec(args.model, weights=args.weights).fm
    rows = []
    for m in [int(b) for b in args.batches.split(",")]:
        caches = [fm.new_cache("full", context=args.context + args.steps + 8) for _ in range(m)]
        prompt = torch.randint(100, 1000, (args.context,), generator=torch.Generator().manual_seed(0))
        for c in caches:
            forward(fm, [Segment(prompt, c)])
        tok = [torch.tensor([5]) for _ in range(m)]
        times = []
        with torch.inference_mode():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                forward(fm, [Segment(t, c) for t, c in zip(tok, caches)])
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        rows.append({"batch": m, "ms_per_step": round(step * 1e3, 2), "tokens_per_s": round(m / step, 1)})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio"] = round(r["tokens_per_s"] / base, 2)
        print(f"M={r['batch']:>3}: {r['ms_per_step']:7.2f} ms/step  {r['tokens_per_s']:8.1f} tok/s  x{r['ratio']:.2f} vs M={rows[0]['batch']}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "weights": args.weights, "threads": args.threads,
                                         "context": args.context, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
