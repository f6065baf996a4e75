"""Trust verb: audit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from slmkit.cli._common import DEVICE_HELP, FORCE_HELP, RegistryHelpCommand, console, print_json, registry_names
from slmkit.cli.progress import with_progress
from slmkit.progress import step


def register(app: typer.Typer) -> None:
    app.command("audit", cls=RegistryHelpCommand)(with_progress("audit")(audit))


def audit(
    model: str = typer.Argument(..., help="default | hub id | directory | file.gguf | http(s)://endpoint[#model]"),
    compare_with: Optional[str] = typer.Option(None, "--compare", help="a second model, audited on the same examples"),
    dimensions: Optional[str] = typer.Option(None, "--dimensions", help="comma-separated, of: " + registry_names("slmkit.trust.suite", "DIMENSIONS") + " (default: all)"),
    limit: int = typer.Option(0, "--limit", min=0, help="first N examples of each data set (0 = all)"),
    output: Optional[Path] = typer.Option(None, "--output", help="directory for report.json and report.html"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="folder holding truthfulqa/, bbq/, ... "
                                            "(default: $SLMKIT_DATA or ../shared/data)"),
    dtype: str = typer.Option("auto", "--dtype", help="compute dtype: auto (bf16 on a CPU with native bf16, "
                              "about 2.7x faster here; else fp32; bf16 on a GPU), fp32 or bf16"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " (local models)"),
    seed: int = typer.Option(0, "--seed"),
    toxicity_samples: int = typer.Option(2, "--toxicity-samples", min=1, help="continuations per toxicity prompt"),
    no_memorisation: bool = typer.Option(False, "--no-memorisation", help="skip the canary fine-tune"),
    canary_candidates: int = typer.Option(1000, "--canary-candidates", min=2, help="random PINs each canary is "
                                          "ranked among (exposure is at most log2 of this)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="for http(s) endpoints"),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="requests in flight at once to an http(s) endpoint"),
    json_out: bool = typer.Option(False, "--json", help="print JSON: one object per dimension"),
) -> None:
    """Audit MODEL on robustness, privacy, reliability, safety and fairness (optionally against --compare)."""
    from slmkit.backends import check_concurrency, from_spec
    from slmkit.models.device import resolve_device, resolve_dtype
    from slmkit.artefact import check_output
    from slmkit.trust.report import is_audit_dir, report_json, write_report
    from slmkit.trust.suite import AuditConfig, AuditContext, audit as run_audit, compare, parse_dimensions

    check_concurrency(concurrency, model, compare_with)
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    if data_dir is not None and not data_dir.is_dir():
        from slmkit.errors import DataError

        raise DataError(f"--data-dir {data_dir} is not a directory")
    if output is not None:
        check_output(output, force, owned=is_audit_dir)  # before the audit runs
    cfg = AuditConfig(dimensions=parse_dimensions(dimensions), limit=limit, seed=seed,
                      data_dir=None if data_dir is None else str(data_dir), toxicity_samples=toxicity_samples,
                      memorisation=not no_memorisation, canary_candidates=canary_candidates)
    ctx = AuditContext(cfg.data_dir, seed)

    dims = list(cfg.dimensions)

    def progress(who: str):
        # a bar over the dimensions (slmkit.cli.progress: on stderr, on a terminal, not with --json)
        return lambda dim: step(f"{who} dimensions", dims.index(dim) if dim in dims else 0, len(dims))

    backend = from_spec(model, dtype=dtype, api_key=api_key, concurrency=concurrency, device=dev)
    backend.name = model
    a = run_audit(backend, cfg, ctx, progress(model))
    step(f"{model} dimensions", len(dims), len(dims))
    b = None
    if compare_with is not None:
        del backend
        other = from_spec(compare_with, dtype=dtype, api_key=api_key, concurrency=concurrency, device=dev)
        other.name = compare_with if compare_with != model else f"{compare_with} (B)"
        b = run_audit(other, cfg, ctx, progress(other.name))
        step(f"{other.name} dimensions", len(dims), len(dims))
    diffs = compare(a, b) if b is not None else None
    paths = write_report(output, a, b, diffs, force=force) if output is not None else None
    if json_out:
        data = report_json(a, b, diffs)
        if paths:
            data["report"] = {"json": str(paths[0]), "html": str(paths[1])}
        print_json(data)
        return
    _print_summary(a, b, diffs)
    if paths:
        sys.stdout.write(f"report: {paths[1]}\n")


def _print_summary(a, b, diff_list) -> None:
    from rich.table import Table

    diffs = {(d.dimension, d.group, d.metric): d for d in diff_list or []}
    t = Table(title=f"trust audit: {a.model}" + (f" vs {b.model}" if b else ""), title_justify="left")
    for col in ("dimension", "metric", a.model, "95% CI", "n"):
        t.add_column(col)
    if b is not None:
        t.add_column(b.model)
        t.add_column("p")
    for dim, r in a.dimensions.items():
        t.add_row(f"[bold]{dim}[/bold]", "score", _f(r.score), "", "",
                  *([_f(b.dimensions[dim].score), ""] if b is not None else []))
        for g in r.groups:
            for m in g.metrics.values():
                if not m.headline:
                    continue
                row = ["", f"{g.name}.{m.name}", _f(m.value), "-" if m.ci is None else f"{_f(m.ci[0])}-{_f(m.ci[1])}",
                       str(m.n)]
                if b is not None:
                    d = diffs.get((dim, g.name, m.name))
                    row += [_f(d.b) if d else "-",
                            "-" if d is None or d.p_value is None else f"{d.p_value:.3g}{'*' if d.significant else ''}"]
                t.add_row(*row)
    console.print(t)


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else (f"{v:.3f}" if isinstance(v, float) else str(v))
