"""Benchmark of the build pipeline: run a packaged recipe on the default model and print the
teacher -> student table with ratios against the teacher measured in the same run.

    PYTHONPATH=src python bench/pipeline.py [--target default|phone-4gb|fastest-draft|max-quality-4bit] [--output DIR]

The build is cached: rerunning with the same --output only rewrites the table.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from slmkit.pipeline import build, collect, packaged_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="default")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    recipe = packaged_recipe(args.target)
    run_dir = args.output or f"runs/bench-{recipe.name}"
    build(recipe, run_dir)
    data = collect(run_dir)
    print(f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"recipe {recipe.name}: build wall {data['build_seconds']:.0f} s, CPU {data['build_cpu_seconds']:.0f} s")
    for s in data["stages"]:
        print(f"  {s['index']:>2} {s['name']:<10} wall {s.get('seconds') or 0:7.1f} s   CPU {s.get('cpu_seconds') or 0:7.1f} s")
    rows = data["table"]
    t = rows[0]
    print(f"{'model':<16}{'params':>12}{'x':>7}{'bytes':>12}{'x':>7}{'ppl':>9}{'x':>7}{'agree':>8}{'tok/s':>8}{'x':>7}")
    for r in rows:
        tok = r.get("decode_tokens_per_s")
        print(f"{r['label']:<16}{r['parameters']:>12,}{r['parameters'] / t['parameters']:>7.2f}{r['bytes']:>12,}"
              f"{r['bytes'] / t['bytes']:>7.2f}{r['perplexity']:>9.2f}{r['perplexity'] / t['perplexity']:>7.2f}"
              f"{100 * (r['agreement'] or 0):>7.1f}%"
              + (f"{tok:>8.1f}{tok / t['decode_tokens_per_s']:>7.2f}" if tok else f"{'-':>8}{'-':>7}"))


if __name__ == "__main__":
    main()
