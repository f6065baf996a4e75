"""The report of a run directory: ``report.json`` and a self-contained ``report.html``.

Everything comes from the run directory alone: ``recipe.yaml`` (the exact
recipe, shown verbatim) and each stage's ``stage.json``. The teacher->student
table comes from the last ``eval`` stage, trust scores from the last ``audit``
stage and the speculative-decoding numbers from the last ``speculative`` stage.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from slmkit.artefact import jsonable, atomic_file
from slmkit.errors import ConfigError
from slmkit.report import charts
from slmkit.report.page import esc, figure, page, section, table

log = logging.getLogger(__name__)


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _finite(obj):
    """NaN and infinities become null, so report.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def collect(run_dir: str | Path) -> dict:
    """The report's data, read from ``run_dir`` (``recipe.yaml`` and every ``stage.json``)."""
    from slmkit.pipeline.recipe import parse_text
    from slmkit.pipeline.state import plan, read_record

    run_dir = Path(run_dir)
    rpath = run_dir / "recipe.yaml"
    if not rpath.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no recipe.yaml)", "pass the --output directory of `slmkit build`")
    text = rpath.read_text(encoding="utf-8")
    recipe = parse_text(text, str(rpath))
    stages = []
    last: dict[str, dict] = {}
    for spec, key, state in plan(recipe, run_dir):
        rec = read_record(run_dir / spec.dirname) if state == "done" else None
        entry = {"index": spec.index, "name": spec.name, "kind": spec.kind, "dir": spec.dirname, "key": key,
                 "state": "finished" if rec else ("interrupted" if state == "partial" else "not run"),
                 "config": jsonable(spec.config)}
        if rec:
            entry.update(seconds=rec.get("seconds"), cpu_seconds=rec.get("cpu_seconds"), outputs=rec.get("outputs", {}), metrics=rec.get("metrics", {}),
                         finished=rec.get("finished"), resumed=rec.get("resumed", False))
            last[spec.kind] = entry
        stages.append(entry)
    data = {
        "run_dir": str(run_dir),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": {"name": recipe.name, "source": recipe.source, "teacher": recipe.teacher, "seed": recipe.seed,
                   "dtype": recipe.dtype, "text": text},
        "complete": all(s["state"] == "finished" for s in stages),
        "build_seconds": sum(s.get("seconds") or 0.0 for s in stages),
        "build_cpu_seconds": sum(s.get("cpu_seconds") or 0.0 for s in stages),
        "stages": stages,
        "table": [],
        "summary": {},
        "candidates": [],
        "recommended": None,
        "warnings": [],
    }
    if "eval" in last:
        m = last["eval"]["metrics"]
        data["table"] = m.get("models", [])
        data["summary"] = dict(m.get("summary", {}))
        data["eval"] = {k: m.get(k) for k in ("text", "tokens", "context", "threads", "fit_context")}
    if "audit" in last and last["audit"]["metrics"].get("scores"):
        m = last["audit"]["metrics"]
        data["trust"] = {"scores": m.get("scores", {}), "dimensions": m.get("dimensions", {}), "skipped": m.get("skipped", {})}
        for row in data["table"]:
            scores = m.get("scores", {}).get(row["role"] if row["role"] == "teacher" else "student")
            if scores and row["role"] in ("teacher", "student"):
                row["trust"] = scores
    if "candidates" in last:
        m = last["candidates"]["metrics"]
        data["candidates"] = m.get("candidates", [])
        data["recommended"] = m.get("recommended")
        data["recommendation"] = m.get("recommendation", {})
        data["comparison"] = {k: m.get(k) for k in ("scorer", "scorer_what", "maker", "maker_what", "text", "tokens_scored",
                                                    "context", "chunks", "threads", "speed", "notes", "versus_reference", "tasks")}
        data["warnings"] += data["recommendation"].get("warnings", [])
        if (m.get("tasks") or {}).get("skipped"):
            data["warnings"].append(m["tasks"]["skipped"])
        best = next((c for c in data["candidates"] if c["name"] == data["recommended"]), None)
        if best is not None:
            data["summary"].update(recommended=best["name"], recommended_bytes=best["bytes"],
                                   recommended_kl_divergence=best.get("kl_divergence"),
                                   recommended_perplexity=best.get("perplexity"),
                                   recommended_decode_tokens_per_s=best.get("decode_tokens_per_s"))
            vs = m.get("versus_reference") or {}
            if vs.get("baseline") and not vs.get("recommended_is_baseline"):
                data["summary"].update(reference_baseline=vs["baseline"], dominates_reference=vs.get("dominates"),
                                       kl_divergence_ratio_to_reference=vs.get("kl_divergence_ratio"))
    if "speculative" in last:
        data["speculative"] = last["speculative"]["metrics"]
        sp = data["speculative"]
        for k in ("speedup", "acceptance_rate"):
            if k in sp:
                data["summary"][f"speculative_{k}"] = sp[k]
    return data


def _pareto_plots(data: dict) -> list[tuple[str, str, str]]:
    """Quality (KL divergence to the teacher) against size and against decode speed, one point per candidate."""
    rows = [r for r in data["candidates"] if r.get("kl_divergence") is not None]
    if not rows:
        return []
    cmp = data.get("comparison", {})
    rec = data.get("recommendation", {})
    why = f" Recommended: {rec['reason']}" if rec.get("reason") and data.get("recommended") else ""

    def pts(xkey, scale=1.0):
        return [{"label": r["name"], "x": r[xkey] * scale, "y": r["kl_divergence"], "yerr": r.get("kl_divergence_err"),
                 "baseline": r.get("baseline"), "recommended": r.get("recommended")}
                for r in rows if r.get(xkey)]

    ylabel = "mean KL divergence to the teacher (lower is better)"
    out = [("plot-pareto-size", f"Quality against file size on {cmp.get('text')}; bars: one standard error.{why}",
            charts.pareto(pts("bytes", 1e-6), "file size (MB)", ylabel, "Quality vs size"))]
    speed = pts("decode_tokens_per_s")
    if speed:
        out.append(("plot-pareto-speed", "Quality against decode speed on slmkit's fast path (batch 1, "
                    f"{cmp.get('threads')} threads of a shared machine).{why}",
                    charts.pareto(speed, "decode tokens/s (higher is better)", ylabel, "Quality vs speed", higher_x=True)))
    return out


def _kl(v) -> str:
    return "-" if v is None else f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _public(path) -> str:
    """A file name fit for a shared page: its last two components, never the machine's directories."""
    if path is None:
        return "-"
    parts = Path(str(path)).parts
    return "/".join(parts[-2:]) if len(parts) > 1 and Path(str(path)).is_absolute() else str(path)


def _plots(data: dict) -> list[tuple[str, str, str]]:
    """(id, caption, svg) for every plot the data allows."""
    out = _pareto_plots(data)
    rows = [r for r in data["table"] if r.get("perplexity") is not None]
    if rows:
        pts = [(r["label"], r["weight_memory_bytes"] / 1e6, r["perplexity"]) for r in rows]
        out.append(("plot-quality-size", f"Perplexity on {_public(data.get('eval', {}).get('text'))} against weight memory, one point per stage",
                    charts.scatter(pts, "weight memory (MB)", "perplexity (lower is better)", "Quality vs size across stages")))
    speed = [r for r in data["table"] if r.get("decode_tokens_per_s")]
    if speed:
        labels = [r["label"] for r in speed]
        vals = [r["decode_tokens_per_s"] for r in speed]
        sp = data.get("speculative", {})
        if sp.get("tokens_per_s") and sp.get("baseline_tokens_per_s"):
            labels += ["teacher alone\n(spec. run)", "teacher + student\ndraft"]
            vals += [sp["baseline_tokens_per_s"], sp["tokens_per_s"]]
        base = vals[0]
        out.append(("plot-speed", "Greedy decode tokens/s (batch 1, same run; the machine was shared, so compare ratios)",
                    charts.bars(labels, vals, "tokens/s", "Decode speed", [f"{v:.1f} ({v / base:.2f}x)" for v in vals])))
    scores = data.get("trust", {}).get("scores", {})
    if scores.get("teacher") and scores.get("student"):
        out.append(("plot-trust-radar", "Trust dimensions, 1 = best (see the audit section for the raw metrics)",
                    charts.radar({"teacher": scores["teacher"], "student": scores["student"]}, "Trust: teacher vs student")))
    return out


def _table_html(data: dict) -> str:
    rows = data["table"]
    if not rows:
        return '<p class="note">No eval stage has finished in this run, so there is nothing to compare yet.</p>'
    dims = sorted({d for r in rows for d in (r.get("trust") or {})})
    headers = ["model", "role", "parameters", "on disk", "memory (weights + KV)", "decode tokens/s", "perplexity",
               "agreement with teacher", *[f"trust: {d}" for d in dims]]
    body = []
    for r in rows:
        body.append([
            r["label"], r["role"], _fmt(r.get("parameters")), _fmt_bytes(r.get("bytes")), _fmt_bytes(r.get("memory_bytes")),
            _fmt(r.get("decode_tokens_per_s")), _fmt(r.get("perplexity")),
            "-" if r.get("agreement") is None else f"{100 * r['agreement']:.1f}%",
            *[_fmt((r.get("trust") or {}).get(d)) for d in dims],
        ])
    ev = data.get("eval", {})
    note = (f'<p class="note">Perplexity and agreement (top-1 next-token agreement with the teacher) on {esc(_public(ev.get("text")))}, '
            f'{esc(ev.get("tokens"))} tokens, windows of {esc(ev.get("context"))}. Memory: weights in the format the model is run in '
            f'plus a KV cache for the context in the eval settings. Speed on {esc(ev.get("threads"))} threads of a shared machine.</p>')
    return table(headers, body, "models") + note


def _fit_html(data: dict) -> str:
    rows = [r for r in data["table"] if r.get("fit")]
    if not rows:
        return ""
    presets = list(rows[0]["fit"])
    body = []
    for r in rows:
        cells = []
        for p in presets:
            f = r["fit"][p]
            cells.append(f"yes, up to {f['max_context']:,} tokens" if f["fits"] else f"no: needs {_fmt_bytes(f['total_bytes'])} of {_fmt_bytes(f['memory_bytes'])}")
        body.append([r["label"], r.get("precision", "-"), *cells])
    note = (f'<p class="note">slmkit.runtime.fit at a {esc(data.get("eval", {}).get("fit_context"))}-token context: weights at the '
            "precision shown + KV cache + activations + PyTorch runtime overhead, against the memory one app may use on each device.</p>")
    return section("Device fit", table(["model", "precision", *presets], body, "fit") + note, "fit")


def _pm(v, err, digits: int = 3, pct: bool = False, kl: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%" + (f" \u00b1 {100 * err:.1f}" if err else "")
    if kl and v and abs(v) >= 1e-3:
        return f"{v:.4f}" + (f" \u00b1 {err:.4f}" if err else "")
    return _fmt(v, digits) + (f" \u00b1 {_fmt(err, 2)}" if err else "")


def _speed(v) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _acc_ci(t: dict | None) -> str:
    if not t or t.get("acc") is None:
        return "-"
    lo, hi = t["ci95"]
    return f"{100 * t['acc']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _tasks_html(data: dict) -> str:
    """Downstream tasks: each candidate against the reference baseline on the same items, and what the intervals say."""
    tk = (data.get("comparison") or {}).get("tasks") or {}
    if not tk.get("tasks"):
        return ""
    names = list(tk["tasks"])
    ref = tk.get("reference")
    headers = ["candidate", *[h for n in names for h in (f"{n}: acc_norm", f"{n}: \u0394 acc vs {ref or 'reference'} [95% CI], p",
                                                        f"{n}: same answer as the teacher")]]
    body = []
    for r in data["candidates"]:
        cells = [r["name"]]
        for n in names:
            t = (r.get("tasks") or {}).get(n) or {}
            vs = t.get("vs_reference")
            cells += [_acc_ci({"acc": t.get("acc_norm"), "ci95": t.get("ci95_norm")}) if t else "-",
                      "reference" if r["name"] == ref else "-" if not vs else
                      f"{100 * vs['diff']:+.1f} [{100 * vs['ci95'][0]:+.1f}, {100 * vs['ci95'][1]:+.1f}], p={vs['p_value']:.2f}",
                      "-" if t.get("agreement_with_teacher") is None else f"{100 * t['agreement_with_teacher']:.0f}%"]
        body.append(cells)
    what = "; ".join(f"{n}: {v['items']} of {v['of']:,} items of {v['source']}, as {v['follows']} poses it, chance "
                     f"{100 * v['chance']:.1f}%" for n, v in tk["tasks"].items())
    note = (f'<p class="note">Downstream tasks, scored the lm-evaluation-harness way (log-likelihood of each choice; acc_norm '
            f'divides it by the choice\'s length in characters) on every file loaded dequantised: {esc(what)}. Accuracy in the '
            "candidates table with its 95% Wilson interval; \u0394: accuracy minus the reference's on the same items, with "
            "Newcombe's paired 95% interval and McNemar's exact p-value (a paired test resolves smaller differences than two "
            "overlapping intervals).</p>")
    return (f'<div class="wide">{table(headers, body, "tasks")}</div>' + note
            + "".join(f'<p class="note">{esc(n)}</p>' for n in tk.get("notes") or []))


def _candidates_html(data: dict) -> str:
    rows = data["candidates"]
    cmp = data.get("comparison", {})
    task_names = list(((cmp.get("tasks") or {}).get("tasks")) or {})
    headers = ["", "candidate", "kind", "type", "file", "bits/weight", "KL divergence", "perplexity", "top-1 agreement",
               "decode tokens/s", "prefill tokens/s", "peak memory", *[f"{n} acc [95% CI]" for n in task_names],
               "meets target", "Pareto front"]
    body = []
    for r in rows:
        body.append([
            "\u2605" if r.get("recommended") else "", r["name"], r["role"], r.get("file_type") or "-", _fmt_bytes(r.get("bytes")),
            _fmt(r.get("bits_per_weight")), _pm(r.get("kl_divergence"), r.get("kl_divergence_err"), 3, kl=True),
            _pm(r.get("perplexity"), r.get("perplexity_err"), 4), _pm(r.get("top1_agreement"), r.get("top1_agreement_err"), pct=True),
            _speed(r.get("decode_tokens_per_s")), _speed(r.get("prefill_tokens_per_s")), _fmt_bytes(r.get("peak_memory_bytes")),
            *[_acc_ci((r.get("tasks") or {}).get(n)) for n in task_names],
            "yes" if r.get("meets_target") else ("no: " + "; ".join(r.get("misses") or []) or "no"),
            "yes" if r.get("pareto") else "",
        ])
    speed = cmp.get("speed") or {}
    note = (f'<p class="note">Quality: {esc(cmp.get("scorer_what"))}, against the teacher (F32), on {esc(cmp.get("text"))}: '
            f'{esc(cmp.get("chunks"))} windows of {esc(cmp.get("context"))} tokens, the second half of each scored '
            f'({esc(cmp.get("tokens_scored"))} tokens per candidate); \u00b1 is one standard error. Baselines made by '
            f'{esc(cmp.get("maker_what"))}. ')
    if speed:
        note += (f'Speed: slmkit\'s fast path on each file\'s own blocks (the F32 teacher on its fp32 weights), a '
                 f'{speed.get("prompt_tokens")}-token prefill then {speed.get("new_tokens")} greedy decode steps; all files in one '
                 f'process, round-robin, {speed.get("repeats")} rounds each, the best round (medians in report.json; files of '
                 'the same tensor types run the same kernels, so a gap between them is the noise of the machine), '
                 f'{esc(cmp.get("threads"))} threads of a shared machine; peak memory: the resident peak of a fresh process '
                 'running the file (interpreter and PyTorch included).')
    note += "</p>"
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in cmp.get("notes") or [])
    return f'<div class="wide">{table(headers, body, "candidates")}</div>' + note + notes + _tasks_html(data)


def _recommendation_html(data: dict) -> str:
    rec = data.get("recommendation") or {}
    parts = []
    if data.get("recommended"):
        best = next(c for c in data["candidates"] if c["name"] == data["recommended"])
        parts.append(f'<p class="recommended"><strong>Recommended: {esc(best["name"])}</strong> '
                     f'(<code>{esc(best["path"])}</code>). {esc(rec.get("reason"))}</p>')
        vs = (data.get("comparison") or {}).get("versus_reference") or {}
        if vs.get("baseline") and not vs.get("recommended_is_baseline"):
            speed = vs.get("decode_speed_ratio")
            verdict = "dominates" if vs.get("dominates") else "does not dominate"
            parts.append(
                f'<p>Against {esc(vs["baseline"])}: the recommendation {verdict} it: file {vs["bytes_ratio"]:.3f}x its size, '
                f'decode {"-" if speed is None else f"{speed:.2f}x"} its speed, KL divergence {_kl(vs["kl_divergence"])} against '
                f'{_kl(vs["baseline_kl_divergence"])} ({vs["kl_divergence_ratio"]:.2f}x'
                + (f', a difference of {vs["kl_difference_in_se"]:.1f} standard errors' if vs.get("kl_difference_in_se") is not None else "")
                + ').</p>')
    parts += [f'<p class="warning">Warning: {esc(w)}</p>' for w in data.get("warnings") or []]
    parts.append(f'<p class="note">Target{" " + esc(rec.get("target_name")) if rec.get("target_name") else ""}: {esc(rec.get("target"))}.</p>')
    return "".join(parts)


def render_html(data: dict) -> str:
    r = data["recipe"]
    parts = []
    if data.get("candidates"):
        parts.append(section("Recommendation", _recommendation_html(data), "recommendation"))
    elif data.get("warnings"):
        parts.append(section("Warnings", "".join(f'<p class="warning">{esc(w)}</p>' for w in data["warnings"]), "warnings"))
    summ = data.get("summary", {})
    if summ:
        parts.append(section("Summary", table(["measure", "value"], [[k.replace("_", " "), _fmt(v)] for k, v in summ.items()], "summary"), "summary"))
    if data.get("candidates"):
        parts.append(section("Candidates and baselines", _candidates_html(data), "candidates"))
    if data["table"] or not data.get("candidates"):
        parts.append(section("Teacher \u2192 student", _table_html(data), "models"))
    fit = _fit_html(data)
    if fit:
        parts.append(fit)
    plots = _plots(data)
    body = "".join(figure(svg, cap, ident) for ident, cap, svg in plots) or '<p class="note">No plots: no eval stage finished.</p>'
    parts.append(section("Plots", f'<div class="plots">{body}</div>', "plots"))
    if data.get("trust"):
        dims = data["trust"]["dimensions"]
        who = list(dims)  # teacher (when audited) and student
        keys = list(dict.fromkeys((d, k) for per in dims.values() for d, ms in per.items() for k in ms))
        rows = [[d, k, *[_fmt(dims[w].get(d, {}).get(k)) for w in who]] for d, k in keys]
        skipped = data["trust"].get("skipped") or {}
        note = "".join(f'<p class="note">{esc(d)} skipped: {esc(why)}</p>' for d, why in skipped.items())
        parts.append(section("Trust audit", table(["dimension", "metric", *who], rows, "trust") + note, "trust"))
    if data.get("speculative"):
        sp = data["speculative"]
        rows = [[k.replace("_", " "), _fmt(v)] for k, v in sp.items() if isinstance(v, (int, float, str))]
        what = sp.get("draft_what") or "the run's student model"
        parts.append(section(f"Speculative decoding (draft: {what})", table(["measure", "value"], rows, "spec"), "speculative"))
    srows = [[s["index"], s["name"], s["kind"], s["state"], "-" if s.get("seconds") is None else f"{s['seconds']:.1f} s",
              "-" if s.get("cpu_seconds") is None else f"{s['cpu_seconds']:.1f} s", "yes" if s.get("resumed") else "", s["key"]]
             for s in data["stages"]]
    parts.append(section("Stages", table(["#", "stage", "kind", "state", "wall time", "CPU time", "resumed", "key"], srows, "stages"), "stages"))
    parts.append(section("Recipe", f'<p class="note">{esc(_public(r["source"]))}</p><pre>{esc(r["text"])}</pre>', "recipe"))
    status = "complete" if data["complete"] else "incomplete (some stages have not finished)"
    return page(f"slmkit build report: {r['name']}", parts,
                f"teacher {_public(r['teacher'])} - {status} - generated {data['generated']} from run directory {Path(data['run_dir']).name}")


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.json`` and ``report.html`` into ``run_dir``; return the HTML path."""
    run_dir = Path(run_dir)
    data = collect(run_dir)
    html = render_html(data)
    with atomic_file(run_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(_finite(jsonable(data)), indent=2, allow_nan=False))
    with atomic_file(run_dir / "report.html") as tmp:
        tmp.write_text(html, encoding="utf-8")
    log.info("report written to %s", run_dir / "report.html")
    return run_dir / "report.html"
