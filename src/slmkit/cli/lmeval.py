"""lm-eval verb: lm-evaluation-harness tasks on any slmkit model spec or endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slmkit.cli._common import console, print_json


def register(app: typer.Typer) -> None:
    app.command("lm-eval")(lm_eval)


def lm_eval(
    model: str = typer.Argument(..., help="default | hub id | directory | packed quantised DIR | file.gguf | http(s)://endpoint (URL#model picks a model)"),
    tasks: str = typer.Option(..., "--tasks", help="comma-separated lm-eval task names (slmkit's local ones: "
                              "slmkit_truthfulqa_mc1, slmkit_wikitext2; or any under --include-path)"),
    include_path: Optional[list[Path]] = typer.Option(None, "--include-path", help="a folder of task YAML files (repeatable)"),
    limit: int = typer.Option(0, "--limit", min=0, help="first N documents of each task (0 = all)"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="few-shot examples (default: the task's)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 or bf16 (default fp32; with --fast on a quantised "
                                        "file or packed DIR the default runs its own codes)"),
    fast: bool = typer.Option(False, "--fast", help="generate on the fast CPU path (scoring uses the dequantised weights)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="sequences per forward pass"),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=2, help="tokens per window (default: the model's context)"),
    seed: int = typer.Option(1234, "--seed"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="for http(s) endpoints"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Run lm-evaluation-harness TASKS on MODEL (offline with slmkit's local task files; needs the lmeval extra)."""
    from slmkit.errors import ConfigError

    try:
        from slmkit.eval.lmeval import LMEvalConfig, SlmkitLM, evaluate
    except ImportError as err:
        raise ConfigError(f"slmkit lm-eval needs lm-evaluation-harness ({err})", "pip install 'slmkit[lmeval]'") from None
    cfg = LMEvalConfig(tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                       include_path=tuple(str(p) for p in include_path or ()), limit=limit, num_fewshot=num_fewshot, seed=seed)
    lm = SlmkitLM(model=model, dtype=dtype, fast=fast, batch_size=batch_size, max_length=max_length, api_key=api_key)
    res = evaluate(lm, cfg)
    if json_out:
        print_json(res)
        return
    from rich.table import Table

    t = Table(title=f"lm-eval on {model}" + (f" (first {limit} per task)" if limit else ""), title_justify="left")
    for col in ("task", "metric", "value", "n"):
        t.add_column(col)
    for task, metrics in res["tasks"].items():
        for k, v in metrics.items():
            t.add_row(task, k, f"{v:.4f}" if isinstance(v, float) else str(v), str(res["n_samples"].get(task, "")))
    console.print(t)
