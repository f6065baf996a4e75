"""Stage cache keys include the contents of input files named in the config, and a stage counts
as done only while the outputs it recorded in its own directory exist (issue 17)."""

from __future__ import annotations

import os

from pipeline_helpers import EXPORT, GEN, STUDENT, tiny_recipe

from slmkit.pipeline import build, parse_text, plan
from slmkit.pipeline.state import input_files
from slmkit.pipeline.stages.data import GenDataConfig


def test_input_files_hash_contents_not_names(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Say hi.\nSay bye.\n")
    a = input_files(GenDataConfig(prompts=str(f)))
    assert list(a) == [str(f)] and len(a[str(f)]) == 64
    assert input_files(GenDataConfig()) == {}  # "packaged" is a keyword, not a file
    os.utime(f, ns=(1, 1))  # touched, same bytes: same hash
    assert input_files(GenDataConfig(prompts=str(f))) == a
    f.write_text("Say hi.\nSay farewell.\n")
    assert input_files(GenDataConfig(prompts=str(f))) != a


def test_editing_an_input_file_reruns_its_stage_and_what_follows(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a colour.\nName a fruit.\nName a city.\nName a tree.\n")
    gen = GEN.format(n=2, tokens=4) + f"    prompts: {prompts}\n"
    recipe = parse_text(tiny_recipe(tiny_dir, STUDENT, gen), "a.yaml")
    run = tmp_path / "run"
    assert [s["status"] for s in build(recipe, run, report=False).stages] == ["ran", "ran"]
    assert [state for _, _, state in plan(recipe, run)] == ["done", "done"]
    os.utime(prompts)  # same contents: still cached
    assert [state for _, _, state in plan(recipe, run)] == ["done", "done"]
    prompts.write_text("Name a river.\nName a bird.\nName a tool.\nName a song.\n")  # same path, new contents
    assert [state for _, _, state in plan(recipe, run)] == ["done", "todo"]
    again = build(recipe, run, report=False)
    assert [s["status"] for s in again.stages] == ["cached", "ran"]
    rows = (run / "02-gen-data").glob("*.jsonl")
    text = "".join(p.read_text() for p in rows)
    assert "river" in text or "bird" in text or "tool" in text or "song" in text


def test_a_stage_whose_outputs_are_gone_runs_again(tiny_dir, tmp_path, caplog):
    recipe = parse_text(tiny_recipe(tiny_dir, STUDENT, EXPORT.format(type="F32")), "a.yaml")
    run = tmp_path / "run"
    first = build(recipe, run, report=False)
    gguf = run / first.stages[1]["outputs"]["gguf"]
    assert gguf.is_file()
    gguf.unlink()  # e.g. deleted by hand, or lost with a disk
    with caplog.at_level("WARNING"):
        assert [state for _, _, state in plan(recipe, run)] == ["done", "todo"]
    assert "recorded outputs are missing" in caplog.text
    again = build(recipe, run, report=False)
    assert [s["status"] for s in again.stages] == ["cached", "ran"]
    assert gguf.is_file()
    assert [state for _, _, state in plan(recipe, run)] == ["done", "done"]
