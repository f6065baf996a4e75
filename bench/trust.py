"""Trust audit of the default model and two compressed versions of it (GPTQ on the 4-bit Q4_0 grid, 50% Wanda).

    PYTHONPATH=src python bench/trust.py --limit 40 --output /tmp/trust-bench

Every model is audited on all five dimensions on the same first ``--limit``
examples of each data set; the table gives each metric for the three models, the
difference from the default model (the same-run baseline) with McNemar / bootstrap
significance, and each audit's wall and CPU time as a ratio to the baseline's.
The machine may be shared: CPU time is the steadier cost measure.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch


def compressed(kind: str, calib_file: str, calib_samples: int, calib_len: int):
    """The default model after ``kind`` ("gptq4" or "wanda50"), weights dequantised / masked in memory."""
    from slmkit.compress.calibrate import CalibConfig, calibration_ids
    from slmkit.models import load

    m, tok = load("default")
    ids = calibration_ids(m, tok, CalibConfig(n_samples=calib_samples, seq_len=calib_len, source=calib_file))
    if kind == "gptq4":
        from slmkit.compress.gptq import GPTQConfig
        from slmkit.compress.qgrid import Grid
        from slmkit.compress.quantize import quantize

        quantize(m, "gptq", GPTQConfig(grid=Grid.for_gguf("Q4_0")), ids)  # 4 bit, symmetric groups of 32: the GGUF Q4_0 grid
    elif kind == "wanda50":
        from slmkit.compress.prune import WandaConfig, prune

        prune(m, ids, "wanda", WandaConfig(sparsity=0.5))
    else:
        raise ValueError(kind)
    return m.eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=40, help="first N examples of each data set")
    ap.add_argument("--output", default="/tmp/trust-bench", help="reports go to OUTPUT/<model>/")
    ap.add_argument("--models", default="default,gptq4,wanda50")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--toxicity-samples", type=int, default=2)
    ap.add_argument("--canary-candidates", type=int, default=1000)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="compute dtype of every audited model (compression runs in fp32 first)")
    args = ap.parse_args()
    torch.manual_seed(0)

    from slmkit.backends import HFBackend
    from slmkit.data import data_file
    from slmkit.models import load
    from slmkit.trust import AuditConfig, AuditContext, audit, compare
    from slmkit.trust.report import write_report

    cfg = AuditConfig(limit=args.limit, toxicity_samples=args.toxicity_samples,
                      canary_candidates=args.canary_candidates)
    ctx = AuditContext()
    calib = str(data_file("wikitext-2/test.txt"))
    out = Path(args.output)
    results = {}
    prep = {}
    for name in args.models.split(","):
        t0, c0 = time.perf_counter(), time.process_time()
        m, tok = load("default") if name == "default" else compressed(name, calib, args.calib_samples, args.calib_len)
        if args.dtype == "bf16":
            m = m.to(torch.bfloat16)
        prep[name] = (time.perf_counter() - t0, time.process_time() - c0)
        res = audit(HFBackend(m, tok, name=name), cfg, ctx, progress=lambda d, n=name: print(f"[{n}] {d}", flush=True))
        results[name] = res
        write_report(out / name, res, results.get("default") if name != "default" else None)
        del m
        gc.collect()
    base = results.get("default")
    print(f"\ntrust audit, limit {args.limit} per data set, {args.dtype}, torch {torch.__version__}, {platform.processor() or platform.machine()},"
          f" {torch.get_num_threads()} threads (shared machine)")
    names = list(results)
    print(f"{'':28s}" + "".join(f"{n:>18s}" for n in names))
    print(f"{'audit wall s (ratio)':28s}" + "".join(
        f"{r.seconds:9.0f} ({r.seconds / base.seconds:4.2f})" if base else f"{r.seconds:18.0f}" for r in results.values()))
    cpu = {n: sum(d.cpu_seconds for d in r.dimensions.values()) for n, r in results.items()}
    print(f"{'audit CPU s (ratio)':28s}" + "".join(
        f"{cpu[n]:9.0f} ({cpu[n] / cpu['default']:4.2f})" if base else f"{cpu[n]:18.0f}" for n in names))
    for dim in cfg.dimensions:
        print(f"{dim + ' score':28s}" + "".join(f"{results[n].dimensions[dim].score:18.3f}" for n in names))
    diffs = {n: {(d.dimension, d.group, d.metric): d for d in compare(base, results[n])} for n in names if n != "default"}
    rows = []
    for dim, dr in base.dimensions.items():
        for g in dr.groups:
            for mname, m in g.metrics.items():
                if not m.headline:
                    continue
                cells = [f"{m.value:.3f}"]
                for n in names[1:]:
                    d = diffs[n].get((dim, g.name, mname))
                    cells.append("-" if d is None or d.b is None else
                                 f"{d.b:.3f} ({d.diff:+.3f}{'*' if d.significant else ''})")
                rows.append((f"{dim}.{g.name}.{mname}", m.n, cells))
    print("\nheadline metrics (value; in brackets the difference from default, * = p < 0.05)")
    for key, n, cells in rows:
        print(f"{key:48s} n={n:<5d}" + "".join(f"{c:>22s}" for c in cells))
    summary = {n: {"seconds": r.seconds, "cpu_seconds": cpu[n], "prepare_seconds": prep[n][0], "scores": r.scores()}
               for n, r in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
