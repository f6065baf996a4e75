"""Pipeline fixtures: one finished tiny build shared by the report tests."""

from __future__ import annotations

import pytest
from pipeline_helpers import EVAL, EXPORT, GEN, PRUNE, QUANT, SPEC, STUDENT, tiny_recipe


@pytest.fixture(scope="session")
def finished_run(tiny_dir, tmp_path_factory):
    """A complete tiny build (gen-data, student, width prune, GPTQ on Q4_0, GGUF Q4_0, eval, speculative check) and its report."""
    from slmkit.pipeline import build, parse_text

    text = tiny_recipe(tiny_dir, GEN.format(n=8, tokens=12), STUDENT, PRUNE, QUANT, EXPORT.format(type="Q4_0"),
                       EVAL.format(eff="true"), SPEC)
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    result = build(parse_text(text, "tiny.yaml"), run_dir)
    return run_dir, result
