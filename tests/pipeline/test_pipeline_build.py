"""Run directory: unchanged stages are not rerun, changed ones rerun with what follows, a killed build resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_helpers import EVAL, EXPORT, GEN, STUDENT, tiny_recipe

from slmkit.pipeline import build, parse_text, plan

SRC = str(Path(__file__).resolve().parents[2] / "src")


def record(run_dir: Path, dirname: str) -> dict:
    return json.loads((run_dir / dirname / "stage.json").read_text())


def mtimes(run_dir: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("*/stage.json")}


def test_unchanged_stages_are_not_rerun_and_changes_rerun_downstream(tiny_dir, tmp_path):
    stages = [STUDENT, EXPORT.format(type="F32"), EXPORT.format(type="F16").replace("export\n", "export\n    name: export16\n")]
    r1 = parse_text(tiny_recipe(tiny_dir, *stages), "a.yaml")
    run = tmp_path / "run"
    first = build(r1, run, report=False)
    assert [s["status"] for s in first.stages] == ["ran", "ran", "ran"]
    before = mtimes(run)

    again = build(r1, run, report=False)
    assert [s["status"] for s in again.stages] == ["cached", "cached", "cached"]
    assert mtimes(run) == before  # no record rewritten

    # changing stage 2 reruns stage 2 and the stage after it (its input changed), not stage 1
    r2 = parse_text(tiny_recipe(tiny_dir, stages[0], EXPORT.format(type="Q8_0"), stages[2]), "a.yaml")
    assert [state for _, _, state in plan(r2, run)] == ["done", "todo", "todo"]
    third = build(r2, run, report=False)
    assert [s["status"] for s in third.stages] == ["cached", "ran", "ran"]
    after = mtimes(run)
    assert after["01-student"] == before["01-student"]
    assert after["02-export"] != before["02-export"] and after["03-export16"] != before["03-export16"]
    assert record(run, "02-export")["metrics"]["type"] == "Q8_0"
    # the GGUF really is Q8_0: smaller than the F32 file the first build wrote
    assert record(run, "02-export")["metrics"]["bytes"] < first.stages[1]["metrics"]["bytes"]
    assert record(run, "02-export")["key"] != first.stages[1]["key"]
    assert record(run, "03-export16")["key"] != first.stages[2]["key"]


def test_one_build_at_a_time_and_python_recipes_round_trip(tiny_dir, tmp_path):
    from dataclasses import replace

    from slmkit.errors import SlmkitError
    from slmkit.pipeline.runner import _locked, recipe_yaml

    r = parse_text(tiny_recipe(tiny_dir, STUDENT, EXPORT.format(type="F16")), "c.yaml")
    run = tmp_path / "run"
    run.mkdir()
    with _locked(run):
        with pytest.raises(SlmkitError, match="another build is running"):
            build(r, run, report=False)
    assert not (run / "01-student").exists()
    # a recipe made in Python (no YAML text) is written as YAML that parses back to the same stages
    again = parse_text(recipe_yaml(replace(r, text="")), "x.yaml")
    assert again.stages == r.stages and again.teacher == r.teacher


def test_failed_stage_keeps_finished_ones(tiny_dir, tmp_path):
    # the eval text file disappears after validation: the eval stage fails, the export stays finished
    text_file = tmp_path / "t.txt"
    text_file.write_text("The cat sees the house. " * 30)
    ev = EVAL.format(eff="false") + f"    text: {text_file}\n"
    r = parse_text(tiny_recipe(tiny_dir, STUDENT, EXPORT.format(type="F16"), ev), "b.yaml")
    run = tmp_path / "run"
    text_file.unlink()
    with pytest.raises(Exception, match="t.txt"):
        build(r, run, report=False)
    assert [state for _, _, state in plan(r, run)] == ["done", "done", "partial"]
    kept = mtimes(run)
    text_file.write_text("The cat sees the house. " * 30)
    res = build(r, run, report=False)
    # the text file's contents are part of the eval stage's key (issue 17): a file that now exists is a new
    # input, so the stage runs afresh instead of resuming; the finished stages stay cached
    assert [s["status"] for s in res.stages] == ["cached", "cached", "ran"]
    assert {k: v for k, v in mtimes(run).items() if k != "03-eval"} == kept
    assert res.stages[2]["metrics"]["models"][0]["perplexity"] > 1


DISTILL = "  - stage: distill\n    max_steps: {steps}\n    batch_size: 2\n    block_size: 128\n    save_steps: 2\n"


def _checkpoint(stage_dir: Path):
    """A complete distillation checkpoint, if any; read-only (the build is writing them meanwhile)."""
    from slmkit.train.distill import CHECKPOINTS, _complete

    ckpts = stage_dir / "model" / CHECKPOINTS
    found = [p for p in ckpts.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()] if ckpts.is_dir() else []
    return next((p for p in found if _complete(p)), None)


def test_sigkill_mid_distillation_then_rerun_resumes(tiny_dir, tmp_path):
    """Kill `slmkit build` with SIGKILL in the middle of distillation; the same command resumes and finishes."""
    steps = 20  # long enough that the kill lands before distillation ends, even on a fast machine
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tiny_dir, GEN.format(n=6, tokens=12), STUDENT, DISTILL.format(steps=steps),
                                  EXPORT.format(type="F16")))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "slmkit", "build", str(recipe), "--output", str(run), "--json"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while _checkpoint(run / "03-distill") is None:
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "distillation never wrote a checkpoint"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "03-distill" / "stage.json").exists()  # killed mid-stage
    before = mtimes(run)
    assert set(before) == {"01-gen-data", "02-student"}

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [s["status"] for s in out["stages"]] == ["cached", "cached", "resumed", "ran"]
    after = mtimes(run)
    assert {k: after[k] for k in before} == before  # finished stages were not recomputed
    dist = record(run, "03-distill")
    assert dist["resumed"] is True and dist["metrics"]["resumed_from"] is not None
    assert "checkpoint-" in dist["metrics"]["resumed_from"]
    assert dist["metrics"]["steps"] == steps
    assert (run / "04-export" / "model.gguf").is_file() and (run / "report.html").is_file()
    assert "resuming" in (run / "build.log").read_text()


def test_lowrank_stage_goes_through_the_library_entry_point(tiny_dir, tmp_path):
    """The lowrank stage saves what `slmkit lowrank` saves (compress.entry.lowrank_to_dir): factorised, smaller."""
    from slmkit.artefact import Manifest
    from slmkit.models import load

    text = tiny_recipe(tiny_dir, STUDENT, "  - stage: lowrank\n    ratio: 0.6\n    method: plain\n")
    res = build(parse_text(text, "r.yaml"), tmp_path / "run", report=False)
    rec = res.stages[-1]
    assert rec["metrics"]["parameters"] < rec["metrics"]["parameters_before"]
    path = tmp_path / "run" / rec["outputs"]["model"]
    model, _ = load(str(path))
    assert model.config.slmkit_lowrank and Manifest.read(path).stages[-1]["stage"] == "lowrank"
