"""Concurrent generation (issue 19, item 3): ``slmkit gen-data`` against ``slmkit serve`` at concurrency 1 vs N.

Starts ``slmkit serve MODEL --int4`` on 127.0.0.1 (or uses ``--url``), sends one warm-up request,
then runs the same ``slmkit gen-data URL --prompts FILE --n N --seed S`` command once per
concurrency level, each into a fresh output file, timing the whole command. Reports rows per
second and generated words per second at each level, the throughput ratio against the first
level (the same-run baseline), and whether the rows are identical (same ids, same replies in
the same order) whatever the concurrency. The server decodes concurrent requests together
(continuous batching, ``--max-batch``), which is where the speed-up comes from.

Usage: PYTHONPATH=src python bench/gen_concurrency.py [--model default] [--no-int4] [--n 64]
       [--concurrency 1,8] [--max-new-tokens 64] [--temperature 0.7] [--seed 0]
       [--prompts FILE] [--url http://127.0.0.1:8000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DATA = Path(os.environ.get("SLMKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, int4: bool, max_batch: int, log_path: Path) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    cmd = [sys.executable, "-m", "slmkit", "serve", model, "--port", str(port), "--max-batch", str(max_batch),
           "--name", "teacher", *(["--int4"] if int4 else [])]
    print("server:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit("server did not come up within 15 minutes")


def run_gen_data(url: str, prompts: Path, out: Path, n: int, concurrency: int, args) -> dict:
    cmd = [sys.executable, "-m", "slmkit", "gen-data", url, "--prompts", str(prompts), "--output", str(out),
           "--n", str(n), "--concurrency", str(concurrency), "--seed", str(args.seed), "--temperature", str(args.temperature),
           "--max-new-tokens", str(args.max_new_tokens), "--min-words", "1", "--near-dup", "1", "--json"]
    print("run:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"gen-data failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    words = sum(len(r["messages"][-1]["content"].split()) for r in rows)
    return {"concurrency": concurrency, "seconds": round(seconds, 2), "rows": len(rows), "words": words,
            "rows_per_s": round(len(rows) / seconds, 3), "words_per_s": round(words / seconds, 2),
            "report": json.loads(proc.stdout), "_rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--no-int4", dest="int4", action="store_false", help="serve without --int4")
    ap.add_argument("--url", help="use this running server instead of starting one")
    ap.add_argument("--prompts", type=Path, default=DATA / "instructions" / "self_instruct_seed_tasks.jsonl")
    ap.add_argument("--n", type=int, default=64, help="prompts (first N of the file)")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated levels; the first is the baseline")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="gen_concurrency_"))
    prompts = work / "prompts.jsonl"
    lines = [x for x in args.prompts.read_text().splitlines() if x.strip()][: args.n]
    if len(lines) < args.n:
        raise SystemExit(f"{args.prompts} has only {len(lines)} prompts, --n {args.n} asked")
    prompts.write_text("\n".join(lines) + "\n")
    proc = None
    url = args.url
    if url is None:
        url, proc = start_server(args.model, args.int4, args.max_batch, work / "server.log")
    try:
        httpx.post(url + "/v1/chat/completions", json={"model": "teacher", "max_tokens": 4,
                   "messages": [{"role": "user", "content": "warm up"}]}, timeout=600).raise_for_status()
        results = [run_gen_data(url, prompts, work / f"c{c}.jsonl", args.n, c, args) for c in levels]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    base = results[0]
    same = []
    for r in results:
        r["speedup"] = round(base["seconds"] / r["seconds"], 2)
        pairs = list(zip(base["_rows"], r["_rows"]))
        r["identical_rows"] = sum(a["id"] == b["id"] and a["messages"] == b["messages"] for a, b in pairs)
        same.append(len(base["_rows"]) == len(r["_rows"]) == r["identical_rows"])
    summary = {
        "model": args.model, "int4": args.int4, "url": url if args.url else "slmkit serve (started here)",
        "prompts": str(args.prompts), "n": args.n, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "seed": args.seed,
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "levels": [{k: v for k, v in r.items() if not k.startswith("_") and k != "report"} for r in results],
        "identical_outputs": all(same),
    }
    for r in summary["levels"]:
        print(f"concurrency {r['concurrency']:>3}: {r['seconds']:8.1f} s  {r['rows_per_s']:7.3f} rows/s  "
              f"{r['words_per_s']:8.1f} words/s  x{r['speedup']:.2f}  identical rows {r['identical_rows']}/{r['rows']}")
    print(f"identical outputs at every concurrency: {summary['identical_outputs']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
