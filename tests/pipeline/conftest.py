"""Pipeline fixtures: recipes over the tiny test model, and one finished tiny build shared by the report tests."""

from __future__ import annotations

from pathlib import Path

import pytest


def tiny_recipe(teacher: Path, *stages: str, name: str = "tiny") -> str:
    """A recipe text over the tiny model; each stage is a YAML block (already indented by 2)."""
    return f"name: {name}\nteacher: {teacher}\nseed: 0\nstages:\n" + "".join(stages)


GEN = "  - stage: gen-data\n    n: {n}\n    max_new_tokens: {tokens}\n    temperature: 1.0\n    holdout: 0.25\n"
STUDENT = "  - stage: student\n"
EXPORT = "  - stage: export\n    format: gguf\n    type: {type}\n"
EVAL = "  - stage: eval\n    max_tokens: 96\n    context: 32\n    efficiency: {eff}\n    prompt_tokens: 8\n    new_tokens: 4\n"


@pytest.fixture(scope="session")
def finished_run(tiny_dir, tmp_path_factory):
    """A complete tiny build (gen-data, student, GGUF F16 export, eval with efficiency) and its report."""
    from slmkit.pipeline import build, parse_text

    text = tiny_recipe(tiny_dir, GEN.format(n=8, tokens=12), STUDENT, EXPORT.format(type="F16"), EVAL.format(eff="true"))
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    result = build(parse_text(text, "tiny.yaml"), run_dir)
    return run_dir, result
