"""Runtime benchmark on the default model (SmolLM2-135M-Instruct).

Sections (all by default; pick with --sections):
  decode  tokens/s of model.generate vs the fast path (fp32, bf16, int8 and int4 weights), runs interleaved,
          and the memory-bandwidth bound measured in the same run (weight bytes per token / read GB/s)
  prefill prompt processing time (16..512 tokens): the int4 path vs torch's int4 kernel, bf16 weights and
          transformers' forward (the model's own prefill), best of --repeats
  kv      perplexity vs KV memory for each policy on wikitext-2 (2k+ tokens, token-by-token decoding)
  fit     the fit planner's estimate vs the resident memory of a real run (fresh subprocess each)
  server  `slmkit serve` throughput and p50/p95 latency at 1, 4, 16 concurrent clients,
          then a streaming load test (16 clients for --load-seconds): failures and RSS over time

Every speed is a ratio against a baseline from the same run: the machine may be shared.
    PYTHONPATH=src python bench/runtime.py [--sections decode,kv,fit,server] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch


def _median(xs):
    return statistics.median(xs)


def read_bandwidth(mb: int = 512, repeats: int = 3) -> float:
    """Bytes/s of a streaming read (sum over a buffer much larger than the caches)."""
    buf = torch.ones(mb * 1024 * 1024 // 4)
    buf.sum()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        buf.sum()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return buf.numel() * 4 / _median(wall), buf.numel() * 4 / _median(cpu)


def bench_decode(model, tok, args) -> dict:
    from slmkit.runtime import decoding as D
    from slmkit.runtime import generate as G

    ids = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    n = args.new_tokens
    variants = {
        "fast fp32": G.build(model, G.FastConfig()),
        "fast bf16": G.build(model, G.FastConfig(dtype="bf16")),
        "fast int8": G.build(model, G.FastConfig(weights="int8")),
        "fast int4": G.build(model, G.FastConfig(weights="int4")),  # slmkit's q4 kernel + fused step where it builds
        "fast int4 torch": G.build(model, G.FastConfig(weights="int4", kernel="torch")),  # torch's int4pack kernel
    }
    compile_s = {}
    if args.compile:  # torch.compile of the decode step: compile time is reported, not counted in tokens/s
        for k, w in (("fast int4 compiled", "int4"),):
            t0 = time.perf_counter()
            variants[k] = fm = G.build(model, G.FastConfig(weights=w, compile=True))
            G.decode_one_token(fm, int(ids[0, 0]), fm.new_cache(context=4))  # compiles
            compile_s[k] = time.perf_counter() - t0

    def hf():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        return out[0, ids.shape[1]:].tolist()

    def fast(fm):
        cache = fm.new_cache(context=ids.shape[1] + n)
        logits = G.prefill(fm, ids[0], cache)
        out = []
        for _ in range(n):  # no EOS stop: always n tokens, like min_new_tokens above
            out.append(D.sample(logits, 0.0, 1.0, None))  # the library's greedy pick, as users get it
            logits = G.decode_one_token(fm, out[-1], cache)
        return out

    ref = hf()
    same = {k: fast(fm) == ref for k, fm in variants.items()}
    names = ["model.generate", *variants]
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    bw, bw_cpu = [], []
    for _ in range(args.repeats):  # interleaved so that load from other users hits every variant alike
        w, c = read_bandwidth()
        bw.append(w)
        bw_cpu.append(c)
        for k in names:
            t0, c0 = time.perf_counter(), time.process_time()
            hf() if k == "model.generate" else fast(variants[k])
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    bandwidth, bandwidth_cpu = _median(bw), _median(bw_cpu)
    base = n / _median(times["model.generate"])
    base_cpu = n / _median(cpu["model.generate"])
    rows = []
    for k in names:
        tps, tps_cpu = n / _median(times[k]), n / _median(cpu[k])
        fm = variants.get(k)
        wbytes = (fm or variants["fast fp32"]).weight_bytes_per_token()
        bound, bound_cpu = bandwidth / wbytes, bandwidth_cpu / wbytes
        rows.append({"variant": k, "tokens_per_s": tps, "speedup_vs_generate": tps / base, "weight_mb_per_token": wbytes / 1e6,
                     "bandwidth_bound_tokens_per_s": bound, "fraction_of_bound": tps / bound,
                     "tokens_per_cpu_s": tps_cpu, "speedup_vs_generate_cpu": tps_cpu / base_cpu,
                     "fraction_of_bound_cpu": tps_cpu / bound_cpu,
                     "greedy_equal_to_generate": same.get(k, True), "compile_s": compile_s.get(k)})
    quality = []
    if args.quality_tokens:  # what the int4 kernels cost in perplexity, read token by token (the decode path)
        from slmkit.data import data_file

        text = open(data_file("wikitext-2/test.txt"), encoding="utf-8").read()
        qids = torch.tensor(tok(text[: 40 * args.quality_tokens]).input_ids[: args.quality_tokens])
        for k in ("fast fp32", "fast int4 torch", "fast int4"):
            t0 = time.perf_counter()
            nll, scored, _ = D.policy_nll(variants[k], qids, "full", chunk=512 if k == "fast fp32" else 1)
            quality.append({"variant": k, "ppl": math.exp(nll), "tokens": scored, "chunk": 512 if k == "fast fp32" else 1,
                            "seconds": time.perf_counter() - t0})
    return {"new_tokens": n, "prompt_tokens": int(ids.shape[1]), "read_bandwidth_gb_s": bandwidth / 1e9,
            "read_bandwidth_gb_per_cpu_s": bandwidth_cpu / 1e9, "repeats": args.repeats, "rows": rows,
            "q4_kernel": G.q4kernel.why_unavailable() or "built", "quality": quality}


def bench_prefill(model, tok, args) -> dict:
    from slmkit.data import data_file
    from slmkit.runtime import generate as G

    text = open(data_file("wikitext-2/test.txt"), encoding="utf-8").read()
    ids = torch.tensor(tok(text[:40000]).input_ids[: max(args.prefill_tokens)])
    variants = {
        "fast int4": G.build(model, G.FastConfig(weights="int4")),
        "fast int4 torch": G.build(model, G.FastConfig(weights="int4", kernel="torch")),
        "fast bf16": G.build(model, G.FastConfig(dtype="bf16")),
    }
    rows = []
    for n in args.prefill_tokens:
        x = ids[:n]
        row = {"tokens": n}
        with torch.inference_mode():
            model(input_ids=x[None])  # warm-up
            t = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model(input_ids=x[None], logits_to_keep=1)
                t.append(time.perf_counter() - t0)
        row["transformers fp32"] = min(t)
        for k, fm in variants.items():
            G.prefill(fm, x, fm.new_cache(context=n))  # warm-up
            t = []
            for _ in range(args.repeats):
                cache = fm.new_cache(context=n)
                t0 = time.perf_counter()
                G.prefill(fm, x, cache)
                t.append(time.perf_counter() - t0)
            row[k] = min(t)
        rows.append(row)
    return {"rows": rows, "repeats": args.repeats}


def bench_kv(model, tok, args) -> dict:
    from slmkit.data import data_file
    from slmkit.runtime import decoding as D
    from slmkit.runtime import generate as G

    text = open(data_file("wikitext-2/test.txt"), encoding="utf-8").read()
    ids = torch.tensor(tok(text[:40000]).input_ids[: args.kv_tokens])
    fm = G.build(model, G.FastConfig(dtype=args.kv_dtype))
    budget = args.kv_budget
    rows = []
    for name, b in [("full", None), ("int8", None), ("int4", None), ("streaming", budget), ("h2o", budget)]:
        t0 = time.perf_counter()
        nll, count, peak = D.policy_nll(fm, ids, name, budget=b, chunk=args.kv_chunk)
        rows.append({"policy": name, "budget_tokens": b, "tokens": count, "perplexity": math.exp(nll), "kv_mb": peak / 1e6,
                     "seconds": time.perf_counter() - t0})
    full = rows[0]
    for r in rows:
        r["ppl_vs_full"] = r["perplexity"] / full["perplexity"]
        r["memory_vs_full"] = r["kv_mb"] / full["kv_mb"]
    return {"tokens": int(len(ids)), "chunk": args.kv_chunk, "dtype": args.kv_dtype, "rows": rows}


FIT_CHILD = r"""
import ctypes, json, sys, torch, psutil
torch.set_num_threads(1)
from slmkit.models import load
from slmkit.runtime import generate as G
precision, context, kv = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model, tok = load("default", dtype="bf16" if precision == "bf16" else "fp32")
fm = G.build(model, G.FastConfig(dtype=precision))
ctypes.CDLL("libc.so.6").malloc_trim(0)
cache = fm.new_cache(kv, context=context, budget=1024 if kv in ("streaming", "h2o") else None)
ids = torch.randint(0, fm.vocab, (context - 8,), generator=torch.Generator().manual_seed(0))
logits = None
for b in range(0, len(ids), 512):
    logits = G.prefill(fm, ids[b:b + 512], cache)
for _ in range(8):
    logits = G.decode_one_token(fm, int(logits.argmax()), cache)
print(json.dumps({"rss": psutil.Process().memory_info().rss}))
"""


def bench_fit(args) -> dict:
    from slmkit.runtime.fit import FitConfig, plan

    rows = []
    env = {**os.environ, "PYTHONPATH": "src"}
    for precision, context, kv in [("fp32", 1024, "full"), ("bf16", 8192, "full"), ("bf16", 8192, "int8")]:
        res = plan("default", FitConfig.parse(memory="100GB", context=context, precision=precision, kv=kv))
        out = subprocess.run([sys.executable, "-c", FIT_CHILD, precision, str(context), kv], capture_output=True, text=True,
                             env=env, timeout=900)
        if out.returncode != 0:
            rows.append({"precision": precision, "context": context, "kv": kv, "error": out.stderr[-300:]})
            continue
        rss = json.loads(out.stdout.strip().splitlines()[-1])["rss"]
        rows.append({"precision": precision, "context": context, "kv": kv, "predicted_mb": res.total_bytes / 1e6,
                     "measured_rss_mb": rss / 1e6, "error_pct": 100 * (res.total_bytes - rss) / rss,
                     "weights_mb": res.weights_bytes / 1e6, "kv_mb": res.kv_bytes / 1e6, "activations_mb": res.activation_bytes / 1e6})
    return {"rows": rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client_loop(url, body, stop_at, lat, fails, stream):
    import httpx

    async with httpx.AsyncClient(timeout=300) as c:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                if stream:
                    got = False
                    async with c.stream("POST", url, json={**body, "stream": True}) as r:
                        if r.status_code != 200:
                            raise RuntimeError(f"HTTP {r.status_code}")
                        async for line in r.aiter_lines():
                            if line == "data: [DONE]":
                                got = True
                            elif line.startswith("data: ") and '"error"' in line[:20]:
                                raise RuntimeError(line)
                    if not got:
                        raise RuntimeError("stream ended without [DONE]")
                else:
                    r = await c.post(url, json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}")
                lat.append(time.perf_counter() - t0)
            except Exception as err:  # count every failure, keep going
                fails.append(repr(err)[:200])


def _run_clients(url, body, clients, seconds, stream):
    lat, fails = [], []
    stop_at = time.monotonic() + seconds

    async def main():
        await asyncio.gather(*(_client_loop(url, body, stop_at, lat, fails, stream) for _ in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(main())
    return lat, fails, time.perf_counter() - t0


def bench_server(args) -> dict:
    import threading

    import httpx
    import psutil

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": "src", "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "slmkit", "serve", "default", "--port", str(port), "--name", "default", "--max-batch", "16"]
    if args.server_int8:
        cmd.append("--int8")
    if args.server_int4:
        cmd.append("--int4")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-500:])
            time.sleep(0.25)
        body = {"model": "default", "messages": [{"role": "user", "content": "Tell me about the sea."}],
                "max_tokens": args.server_tokens, "temperature": 0}
        chat_url = url + "/v1/chat/completions"
        httpx.post(chat_url, json=body, timeout=300)  # warm-up
        rows = []
        for clients in (1, 4, 16):
            lat, fails, wall = _run_clients(chat_url, body, clients, args.level_seconds, stream=False)
            lat.sort()
            rows.append({"clients": clients, "requests": len(lat), "failures": len(fails),
                         "tokens_per_s": len(lat) * args.server_tokens / wall,
                         "p50_s": lat[len(lat) // 2] if lat else None, "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None})
        base = rows[0]["tokens_per_s"]
        for r in rows:
            r["throughput_vs_1_client"] = r["tokens_per_s"] / base if base else None
        # load test: 16 streaming clients for --load-seconds, RSS sampled every second
        ps = psutil.Process(proc.pid)
        rss = []
        done = threading.Event()

        def sample():
            while not done.is_set():
                rss.append(ps.memory_info().rss / 1e6)
                done.wait(1.0)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        sbody = {**body, "max_tokens": args.load_tokens}
        lat, fails, wall = _run_clients(chat_url, sbody, 16, args.load_seconds, stream=True)
        done.set()
        th.join()
        q = len(rss) // 4 or 1
        load = {"clients": 16, "seconds": wall, "requests": len(lat), "failures": len(fails), "failure_examples": fails[:3],
                "rss_mb_first_quarter": _median(rss[:q]), "rss_mb_last_quarter": _median(rss[-q:]), "rss_mb_max": max(rss),
                "p50_s": sorted(lat)[len(lat) // 2] if lat else None}
        alive = httpx.get(url + "/health", timeout=5).status_code == 200
        return {"max_tokens": args.server_tokens, "level_seconds": args.level_seconds, "rows": rows, "load": load, "alive_after": alive}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="decode,kv,fit,server")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for every variant (default 1: shared machine)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="also time the int4 path with torch.compile'd decode steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill-tokens", type=lambda v: [int(t) for t in v.split(",")], default=[16, 32, 64, 128, 512])
    ap.add_argument("--quality-tokens", type=int, default=1024, help="wikitext-2 tokens for the int4 perplexity check (0: skip)")
    ap.add_argument("--kv-tokens", type=int, default=2048)
    ap.add_argument("--kv-budget", type=int, default=256)
    ap.add_argument("--kv-chunk", type=int, default=16, help="tokens per step when reading the text (1 = exact token-by-token decoding)")
    ap.add_argument("--kv-dtype", default="bf16")
    ap.add_argument("--server-tokens", type=int, default=32)
    ap.add_argument("--server-int8", action="store_true")
    ap.add_argument("--server-int4", action="store_true", help="serve with int4 weights (slmkit's q4 kernel, fused decode steps)")
    ap.add_argument("--level-seconds", type=float, default=30)
    ap.add_argument("--load-seconds", type=float, default=60)
    ap.add_argument("--load-tokens", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    out = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)",
           "load_average_at_start": os.getloadavg()}
    model = tok = None
    if {"decode", "kv", "prefill"} & set(sections):
        from slmkit.models import load

        model, tok = load("default")
    if "decode" in sections:
        out["decode"] = r = bench_decode(model, tok, args)
        print(f"\n## decode: {r['new_tokens']} new tokens after a {r['prompt_tokens']}-token prompt, median of {r['repeats']} interleaved runs; "
              f"read bandwidth {r['read_bandwidth_gb_s']:.2f} GB/s")
        print(f"(CPU-time columns: tokens per CPU-second of this process, bound from bandwidth per CPU-second: {r['read_bandwidth_gb_per_cpu_s']:.2f} GB)")
        print(f"{'variant':18} {'tok/s':>7} {'x generate':>10} {'MB/token':>9} {'bound tok/s':>11} {'of bound':>8} "
              f"{'tok/cpu-s':>9} {'x gen (cpu)':>11} {'of bound (cpu)':>14} greedy==generate")
        for x in r["rows"]:
            print(f"{x['variant']:18} {x['tokens_per_s']:7.2f} {x['speedup_vs_generate']:10.2f} {x['weight_mb_per_token']:9.1f} "
                  f"{x['bandwidth_bound_tokens_per_s']:11.2f} {x['fraction_of_bound']:8.2f} {x['tokens_per_cpu_s']:9.2f} "
                  f"{x['speedup_vs_generate_cpu']:11.2f} {x['fraction_of_bound_cpu']:14.2f} {x['greedy_equal_to_generate']}"
                  + (f"  (compile {x['compile_s']:.0f} s)" if x.get("compile_s") else ""))
        print(f"q4 kernel: {r['q4_kernel']}")
        for x in r["quality"]:
            print(f"perplexity {x['variant']:18} {x['ppl']:8.3f} ({x['tokens']} wikitext-2 tokens, {x['chunk']} per step, {x['seconds']:.0f} s)")
    if "prefill" in sections:
        out["prefill"] = r = bench_prefill(model, tok, args)
        names = [k for k in r["rows"][0] if k != "tokens"]
        print(f"\n## prefill: milliseconds per prompt (best of {r['repeats']}), and x transformers fp32")
        print(f"{'tokens':>6} " + " ".join(f"{k:>22}" for k in names))
        for x in r["rows"]:
            base = x["transformers fp32"]
            print(f"{x['tokens']:>6} " + " ".join(f"{x[k] * 1e3:12.1f} ({base / x[k]:5.2f}x)" for k in names))
    if "kv" in sections:
        out["kv"] = r = bench_kv(model, tok, args)
        print(f"\n## KV policies: wikitext-2 test, {r['tokens']} tokens, {r['dtype']}, chunk {r['chunk']}")
        print(f"{'policy':10} {'budget':>6} {'ppl':>8} {'x full':>7} {'KV MB':>8} {'x full':>7}")
        for x in r["rows"]:
            print(f"{x['policy']:10} {str(x['budget_tokens'] or '-'):>6} {x['perplexity']:8.3f} {x['ppl_vs_full']:7.3f} {x['kv_mb']:8.2f} {x['memory_vs_full']:7.3f}")
    del model
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    if "fit" in sections:
        out["fit"] = r = bench_fit(args)
        print("\n## fit planner vs measured RSS (fresh process, prefill + 8 decode steps)")
        for x in r["rows"]:
            if "error" in x:
                print(x)
                continue
            print(f"{x['precision']:5} ctx {x['context']:5} kv {x['kv']:5} predicted {x['predicted_mb']:7.1f} MB  measured {x['measured_rss_mb']:7.1f} MB  "
                  f"error {x['error_pct']:+.1f}%")
    if "server" in sections:
        out["server"] = r = bench_server(args)
        print(f"\n## server: chat completions, {r['max_tokens']} tokens each, {r['level_seconds']:.0f} s per level")
        for x in r["rows"]:
            print(f"clients {x['clients']:2}: {x['requests']:4} requests, {x['failures']} failed, {x['tokens_per_s']:7.2f} tok/s "
                  f"(x{x['throughput_vs_1_client']:.2f} of 1 client), p50 {x['p50_s']:.2f} s, p95 {x['p95_s']:.2f} s")
        ld = r["load"]
        print(f"load test: 16 streaming clients for {ld['seconds']:.0f} s: {ld['requests']} requests, {ld['failures']} failed; "
              f"RSS first/last quarter {ld['rss_mb_first_quarter']:.0f}/{ld['rss_mb_last_quarter']:.0f} MB (max {ld['rss_mb_max']:.0f}); "
              f"alive after: {r['alive_after']}")
    out["load_average_at_end"] = os.getloadavg()
    print(f"\nload average start/end: {out['load_average_at_start']} / {out['load_average_at_end']} (shared machine)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
