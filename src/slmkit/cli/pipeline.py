"""Pipeline verbs: build, report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slmkit.cli._common import FORCE_HELP, console, err_console, print_json


def register(app: typer.Typer) -> None:
    app.command("build")(build)
    app.command("report")(report)


def build(
    recipe: Optional[Path] = typer.Argument(None, help="recipe YAML (default: the packaged default recipe)"),
    output: Optional[Path] = typer.Option(None, "--output", help="run directory (default: runs/<recipe name>)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    target: Optional[str] = typer.Option(None, "--target", help="a packaged preset: phone-4gb, fastest-draft, max-quality-4bit"),
    check: bool = typer.Option(False, "--check", help="validate the recipe and show the plan; run nothing"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Run a recipe of stages (cached and resumable); writes RUN_DIR/report.html."""
    from slmkit.errors import ConfigError
    from slmkit.pipeline import build as run_build
    from slmkit.pipeline import collect, load_recipe, packaged_recipe, plan
    from slmkit.pipeline.progress import LogView, RichView

    if recipe is not None and target is not None:
        raise ConfigError("pass either RECIPE.yaml or --target, not both")
    rec = load_recipe(recipe) if recipe is not None else packaged_recipe(target or "default")
    run_dir = output or Path("runs") / rec.name
    if check:
        steps = [{"index": s.index, "name": s.name, "kind": s.kind, "dir": s.dirname, "key": k, "state": st}
                 for s, k, st in plan(rec, run_dir)]
        if json_out:
            print_json({"recipe": rec.name, "run_dir": str(run_dir), "stages": steps})
        else:
            for s in steps:
                console.print(f"{s['index']:>2}  {s['name']:<14} {s['kind']:<12} {s['state']}")
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the build's own view shows progress
    view = LogView() if json_out else RichView(err_console)
    result = run_build(rec, run_dir, view=view, force=force)
    data = collect(run_dir)
    for w in data.get("warnings", []):
        err_console.print(f"warning: {w}", markup=False, highlight=False)
    if json_out:
        print_json({
            "recipe": rec.name,
            "run_dir": str(run_dir),
            "report": str(result.report),
            "seconds": result.seconds,
            "stages": [{k: s.get(k) for k in ("index", "name", "kind", "status", "seconds", "key", "outputs")} for s in result.stages],
            "summary": data["summary"],
            "models": data["table"],
            "candidates": data["candidates"],
            "recommended": data["recommended"],
            "warnings": data["warnings"],
        })
        return
    if data.get("recommended"):
        console.print(f"recommended: {data['recommended']} - {data['recommendation'].get('reason', '')}", markup=False, highlight=False)
    for k, v in data["summary"].items():
        console.print(f"{k.replace('_', ' ')}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    console.print(f"report: {result.report}")


def report(
    run_dir: Path = typer.Argument(..., help="a run directory made by `slmkit build`"),
    json_out: bool = typer.Option(False, "--json", help="print the report's JSON"),
) -> None:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/report.json."""
    import json

    from slmkit.pipeline import write_report

    path = write_report(run_dir)
    if json_out:
        print_json(json.loads((Path(run_dir) / "report.json").read_text()))
    else:
        console.print(f"report: {path}")
