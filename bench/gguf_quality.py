"""Deployable 4-bit: slmkit's calibrated GGUF files against llama.cpp's own, scored by llama.cpp.

One run on the default model (SmolLM2-135M-Instruct, fp32 as dequantised from its Q4_1 file):

* text: WikiText-2 test, split by lines: the first ``--calib-frac`` is calibration text, the rest
  evaluation text (disjoint by construction);
* reference: slmkit's F32 GGUF of the model; ``llama-perplexity`` saves its log-probabilities on
  ``--chunks`` windows of 512 tokens of the evaluation text (``--kl-divergence-base``);
* llama.cpp rows: ``llama-quantize`` of that F32 file at each ``--types`` mix, without and with an
  importance matrix made by ``llama-imatrix`` from the calibration text (``--calib-samples`` windows
  of 512 tokens: the same number of tokens slmkit calibrates on);
* slmkit rows: per ``--methods`` (rtn, imatrix, gptq, awq, qat) the model quantised on exactly the
  tensor types llama.cpp's file of the same name has (slmkit.export.gguf_mix reproduces
  llama-quantize's rules; checked per row), codes written unchanged into the GGUF blocks;
* every file scored by llama.cpp's ``llama-perplexity --kl-divergence`` against the reference:
  perplexity, mean KL divergence (base || file) and top-token agreement, each with llama.cpp's
  own +/- (one standard error), over the same tokens;
* the target ratio: each slmkit row's mean KL divergence over llama.cpp's imatrix file of the same
  name (the best file llama.cpp makes).

``--speed`` adds decode (tg 128) and prompt (pp 512) speed: ``llama-bench`` on every file and slmkit's
fast path on the same file where it runs the file's codes.

Files are kept in ``--work`` and reused when present (delete them to recompute).

Usage: python bench/gguf_quality.py [--types Q4_0,Q4_K_M,Q5_K_M] [--methods rtn,imatrix,gptq,awq]
       [--chunks 40] [--calib-samples 64] [--threads 2] [--work /tmp/gguf-bench] [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from slmkit.data import data_file
from slmkit.export import llamacpp


def split_text(src: Path, work: Path, frac: float) -> tuple[Path, Path]:
    lines = src.read_text(encoding="utf-8").split("\n")
    cut = int(len(lines) * frac)
    calib, evalf = work / "calib.txt", work / "eval.txt"
    calib.write_text("\n".join(lines[:cut]), encoding="utf-8")
    evalf.write_text("\n".join(lines[cut:]), encoding="utf-8")
    return calib, evalf


def slmkit_file(base, tok, ids, ftype: str, method: str, path: Path, args) -> dict:
    """Quantise a copy of ``base`` with ``method`` on the llama.cpp mix ``ftype`` and write ``path``."""
    from slmkit.compress.quantize import QUANTIZERS, gguf_grids, quantize
    from slmkit.export.gguf import export_gguf_validated

    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    calibrated = method != "rtn"
    grids = gguf_grids(model, ftype, imatrix=calibrated)
    if method == "qat":
        model, q = qat(model, tok, ids, ftype, path.parent, args)
    else:
        rec = QUANTIZERS.get(method)
        cfg = rec.config()
        q = quantize(model, method, cfg, ids if rec.needs_calibration else None, embeddings=True, grids=grids)
    export_gguf_validated(model, tok, path, ftype, q, check_loader=False, imatrix=calibrated)
    del model
    return {"seconds": round(time.perf_counter() - t0, 1)}


def qat(model, tok, ids, ftype: str, work: Path, args):
    """LLM-QAT on the mix's grids, distilled from the dense model on the calibration windows."""
    from slmkit.compress.quantize import RTNConfig, gguf_grids, rtn_model
    from slmkit.train.data import DataConfig
    from slmkit.train.distill import DistillConfig, distill
    from slmkit.train.losses import LossConfig

    teacher = copy.deepcopy(model).eval()
    data = work / f"qat-{ftype}.txt"
    data.write_text("\n\n".join(tok.decode(row) for row in ids.tolist()))
    cfg = DistillConfig(loss=LossConfig(loss="fkl"), data=DataConfig(block_size=ids.shape[1]),
                        max_steps=args.qat_steps, batch_size=4, learning_rate=args.qat_lr, qat=ftype,
                        save_steps=args.qat_steps, save_total_limit=1, logging_steps=10, seed=0, bf16=args.qat_bf16)
    res = distill(model, tok, data, work / f"qat-{ftype}", cfg, teacher=teacher,
                  source={"teacher": "default", "student": "default"}, force=True)
    print(f"# qat {ftype}: {res.steps} steps, train loss {res.train_loss:.4f}, {res.seconds:.0f} s", flush=True)
    from slmkit.compress.qstore import load_quantized

    model, q = load_quantized(work / f"qat-{ftype}")  # the codes training ended on
    grids = gguf_grids(model, ftype, imatrix=True)
    rest = [n for n in grids if n not in q.tensors]  # the embedding (and an untied head), as llama.cpp types them
    q.tensors.update(rtn_model(model, None, RTNConfig(), rest, grids.get))
    return model, q


def fast_speed(path: Path, tokens: int = 128, prompt: int = 512) -> dict:
    """slmkit's fast path on the file's own codes, shaped like llama-bench's tests: ``tg`` decodes
    ``tokens`` from an empty context, ``pp`` is one ``prompt``-token prefill (tokens/s, medians of 3)."""
    from slmkit.eval.efficiency import EfficiencyConfig, measure_fast
    from slmkit.runtime.gguffast import build_gguf

    fm = build_gguf(path)
    tg = measure_fast(fm, EfficiencyConfig(prompt_tokens=1, new_tokens=tokens, repeats=3)).decode_tokens_per_s
    pp = measure_fast(fm, EfficiencyConfig(prompt_tokens=prompt, new_tokens=1, repeats=3)).prefill_tokens_per_s
    return {"tg": tg, "pp": pp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q4_0,Q4_K_M,Q5_K_M")
    ap.add_argument("--methods", default="rtn,imatrix,gptq,awq")
    ap.add_argument("--chunks", type=int, default=40, help="evaluation windows of 512 tokens")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows of 512 tokens")
    ap.add_argument("--calib-frac", type=float, default=0.2)
    ap.add_argument("--qat-steps", type=int, default=100)
    ap.add_argument("--qat-lr", type=float, default=1e-5)
    ap.add_argument("--qat-bf16", action="store_true", help="QAT under bf16 autocast over fp32 weights (about 3x faster on AMX)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", action="store_true", help="also time every file (run on an idle machine)")
    ap.add_argument("--no-quality", action="store_true", help="skip the llama-perplexity scoring (with --speed)")
    ap.add_argument("--work", default="/tmp/gguf-bench")
    ap.add_argument("--out", default=None, help="append rows as JSON lines here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llamacpp.require()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    types = [t for t in args.types.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} threads={args.threads} chunks={args.chunks} "
          f"calib={args.calib_samples}x512 types={types} methods={methods}", flush=True)

    from slmkit.compress.calibrate import CalibConfig, calibration_ids
    from slmkit.export.gguf import export_gguf
    from slmkit.export.gguf_mix import bits_per_weight, types_from_gguf
    from slmkit.models import load

    calib, evalf = split_text(data_file("wikitext-2/test.txt"), work, args.calib_frac)
    base, tok = load("default")
    f32 = work / "f32.gguf"
    if not f32.exists():
        export_gguf(base, tok, f32, "F32")
    kld = work / f"base-{args.chunks}.kld"
    if not kld.exists():
        ref = llamacpp.perplexity(f32, evalf, chunks=args.chunks, save_base=kld, threads=args.threads)
        print(f"# reference F32: perplexity {ref.perplexity:.3f} +/- {ref.perplexity_err:.3f}", flush=True)
    imat = work / f"imatrix-{args.calib_samples}.gguf"
    if not imat.exists():
        llamacpp.imatrix(f32, calib, imat, ctx=512, chunks=args.calib_samples, threads=args.threads)

    files: list[tuple[str, str, str, Path, dict]] = []  # (name, ftype, method, path, extra)
    for t in types:
        for im in (False, True):
            p = work / f"llama-{t}{'-imatrix' if im else ''}.gguf"
            if not p.exists():
                llamacpp.quantize(f32, p, t, imatrix=imat if im else None, threads=args.threads)
            files.append((p.stem, t, "llama.cpp imatrix" if im else "llama.cpp", p, {}))
    ids = calibration_ids(base, tok, CalibConfig(n_samples=args.calib_samples, seq_len=512, seed=0, source=str(calib)))
    for t in types:
        for m in methods:
            p = work / f"slmkit-{m}-{t}.gguf"
            extra = {}
            if not p.exists():
                extra = slmkit_file(base, tok, ids, t, m, p, args)
                print(f"# wrote {p.name} in {extra['seconds']} s", flush=True)
            files.append((p.stem, t, m, p, extra))

    rows = []
    for name, t, method, p, extra in files:
        types_here = types_from_gguf(p)
        ref_name = work / f"llama-{t}{'' if method in ('rtn', 'llama.cpp') else '-imatrix'}.gguf"
        same = types_here == types_from_gguf(ref_name)
        row = {"name": name, "type": t, "method": method, "bytes": p.stat().st_size,
               "bpw": round(bits_per_weight(base.config, types_here), 3), "types_match_llama": same, **extra}
        if not args.no_quality:
            res = llamacpp.perplexity(p, kl_base=kld, threads=args.threads)
            row.update(perplexity=res.perplexity, perplexity_err=res.perplexity_err,
                       kl_divergence=res.kl_divergence, kl_divergence_err=res.kl_divergence_err,
                       top1_agreement=res.top1_agreement, top1_agreement_err=res.top1_agreement_err,
                       tokens=res.tokens)
        if args.speed:
            row["llama_bench"] = llamacpp.bench(p, tg=128, pp=512, threads=args.threads)
            row["slmkit_fast"] = fast_speed(p)
            row["decode_ratio"] = row["slmkit_fast"]["tg"] / row["llama_bench"]["tg"]
            row["prefill_ratio"] = row["slmkit_fast"]["pp"] / row["llama_bench"]["pp"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    best_llama = {r["type"]: r["kl_divergence"] for r in rows if r["method"] == "llama.cpp imatrix" and "kl_divergence" in r}
    print("\n| file | types as llama.cpp | MB | bpw | perplexity | mean KLD | top-1 agree | KLD / llama.cpp imatrix |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows if not args.no_quality else []:
        ratio = r["kl_divergence"] / best_llama[r["type"]] if r["type"] in best_llama else float("nan")
        print(f"| {r['name']} | {'yes' if r['types_match_llama'] else 'NO'} | {r['bytes'] / 1e6:.2f} | {r['bpw']:.3f} | "
              f"{r['perplexity']:.3f} ± {r['perplexity_err']:.3f} | {r['kl_divergence']:.4f} ± {r['kl_divergence_err']:.4f} | "
              f"{100 * r['top1_agreement']:.2f}% | {ratio:.2f} |")
    if args.speed:
        print("\n| file | llama.cpp tg128 | slmkit tg128 | ratio | llama.cpp pp512 | slmkit pp512 | ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            lb, sf = r["llama_bench"], r["slmkit_fast"]
            print(f"| {r['name']} | {lb['tg']:.1f} | {sf['tg']:.1f} | {r['decode_ratio']:.2f} | {lb['pp']:.1f} | "
                  f"{sf['pp']:.1f} | {r['prefill_ratio']:.2f} |")
    for t in types:
        ptq = [r for r in rows if r["type"] == t and r["method"] in ("rtn", "imatrix", "gptq", "awq") and "kl_divergence" in r]
        if ptq and t in best_llama:
            b = min(ptq, key=lambda r: r["kl_divergence"])
            print(f"# {t}: best slmkit post-training file {b['name']}: KLD {b['kl_divergence']:.4f} = "
                  f"{b['kl_divergence'] / best_llama[t]:.2f}x llama.cpp imatrix ({best_llama[t]:.4f}); target <= 0.80x")


if __name__ == "__main__":
    main()
