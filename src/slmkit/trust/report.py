"""The audit's report: ``report.json`` and a self-contained ``report.html`` (inline CSS and SVG, no network).

Built on the generic helpers of :mod:`slmkit.report` (page, table, section, radar
and bar charts), shared with the pipeline report.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from slmkit.artefact import atomic_file, check_output
from slmkit.report import charts
from slmkit.report.page import esc, figure, page, section, table
from slmkit.trust.suite import AuditResult, Difference, compare


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(ci) -> str:
    return "-" if ci is None else f"[{_f(ci[0])}, {_f(ci[1])}]"


def report_json(a: AuditResult, b: AuditResult | None = None, diffs: list[Difference] | None = None) -> dict:
    """The audit of ``a`` (dimensions at the top level); with ``b``, its audit under ``compare`` and the differences."""
    out = a.to_json()
    if b is not None:
        out["compare"] = b.to_json()
        diffs = diffs if diffs is not None else compare(a, b)
        tree: dict = {}
        for d in diffs:
            tree.setdefault(d.dimension, {}).setdefault(d.group, {})[d.metric] = {
                k: v for k, v in asdict(d).items() if k not in ("dimension", "group", "metric")}
        out["differences"] = tree
    return out


def _dimension_tables(a: AuditResult, b: AuditResult | None, diffs: list[Difference] | None) -> list[str]:
    dmap = {(d.dimension, d.group, d.metric): d for d in diffs or []}
    parts = []
    for dim, ra in a.dimensions.items():
        body = []
        for g in ra.groups:
            if b is None:
                rows = [[m.name, _f(m.value), m.n, _ci(m.ci), "yes" if m.headline else "", m.description]
                        for m in g.metrics.values()]
                head = ["metric", "value", "n", "95% CI", "headline", "definition"]
            else:
                rb = b.dimensions.get(dim)
                rows = []
                for m in g.metrics.values():
                    mb = rb.metric(g.name, m.name) if rb else None
                    d = dmap.get((dim, g.name, m.name))
                    sig = "-" if d is None or d.p_value is None else (
                        f"p={d.p_value:.3g}{' *' if d.significant else ''}")
                    rows.append([m.name, _f(m.value), _ci(m.ci), "-" if mb is None else _f(mb.value),
                                 "-" if mb is None else _ci(mb.ci), "-" if d is None else _f(d.diff),
                                 sig, "" if d is None or d.better is None else (a.model if d.better == "a" else b.model),
                                 m.n, m.description])
                head = ["metric", a.model, "95% CI", b.model, "95% CI", "difference (B - A)", "significance",
                        "better", "n", "definition"]
            body.append(f"<h3>{esc(g.name)}</h3><p class=\"note\">{esc(g.source)}</p>")
            body.append(table(head, rows, f"metrics {dim}-{g.name}"))
            for note in g.notes:
                body.append(f'<p class="note">{esc(note)}</p>')
            if g.examples:
                ex = [[e.metric, e.prompt[:400], e.output[:300], e.expected[:200]] for e in g.examples]
                body.append("<details><summary>example failures</summary>"
                            + table(["probe", "prompt", "model output", "expected"], ex, "examples") + "</details>")
        score = "-" if ra.score is None else f"{ra.score:.3f}"
        title = f"{dim.capitalize()} (score {score}, {ra.seconds:.0f} s)"
        parts.append(section(title, "".join(body), dim))
    return parts


def report_html(a: AuditResult, b: AuditResult | None = None, diffs: list[Difference] | None = None) -> str:
    names = list(a.dimensions)
    series = {a.model: {d: a.dimensions[d].score or 0.0 for d in names}}
    if b is not None:
        series[b.model if b.model != a.model else f"{b.model} (B)"] = {
            d: (b.dimensions[d].score or 0.0) if d in b.dimensions else 0.0 for d in names}
    plots = []
    if len(names) >= 3:
        plots.append(figure(charts.radar(series, "Trust dimensions (1 = best)"), "Mean 0-1 goodness of each "
                            "dimension's headline metrics (see the tables for the raw values)", "plot-radar"))
    else:
        vals = [a.dimensions[d].score or 0.0 for d in names]
        plots.append(figure(charts.bars(names, vals, "score (1 = best)", "Trust dimensions"), "dimension scores",
                            "plot-bars"))
    summary_rows = [[d, _f(a.dimensions[d].score), *([_f(b.dimensions[d].score) if d in b.dimensions else "-"]
                                                      if b is not None else [])] for d in names]
    heads = ["dimension", a.model, *([b.model] if b is not None else [])]
    parts = [section("Summary", table(heads, summary_rows, "summary") + f'<div class="plots">{"".join(plots)}</div>',
                     "summary")]
    parts += _dimension_tables(a, b, diffs if b is not None else None)
    sub = (f"limit {a.config.limit or 'all'} examples per data set, seed {a.config.seed}; "
           f"{a.model}: {a.seconds:.0f} s" + (f"; {b.model}: {b.seconds:.0f} s" if b is not None else "")
           + "; CIs: Wilson for proportions, percentile bootstrap (1000) otherwise; * = p < 0.05")
    title = f"Trust audit: {a.model}" + (f" vs {b.model}" if b is not None else "")
    return page(title, parts, sub)


def is_audit_dir(path: Path) -> bool:
    """True when ``path`` holds a report this module wrote (its ``report.json`` is an audit)."""
    try:
        data = json.loads((Path(path) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"model", "config", "scores"} <= data.keys()


def write_report(out_dir: str | Path, a: AuditResult, b: AuditResult | None = None,
                 diffs: list[Difference] | None = None, force: bool = False) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir``; returns their paths.

    A non-empty ``out_dir`` without an earlier audit is refused unless ``force``
    (then the two files are written into it, the rest left as it is).
    """
    out = Path(out_dir)
    check_output(out, force, owned=is_audit_dir)
    out.mkdir(parents=True, exist_ok=True)
    if b is not None and diffs is None:
        diffs = compare(a, b)
    data = report_json(a, b, diffs)
    jp, hp = out / "report.json", out / "report.html"
    with atomic_file(jp) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    with atomic_file(hp) as tmp:
        Path(tmp).write_text(report_html(a, b, diffs), encoding="utf-8")
    return jp, hp  # atomic_file gives both the umask's permissions
