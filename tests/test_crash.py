"""A CI sample of bench/crash.py (issue 17): every long verb SIGKILLed at 2 random moments on tiny
models; each rerun must exit 0, equal the uninterrupted run's output and leave no temp files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def _crash():
    spec = importlib.util.spec_from_file_location("bench_crash", ROOT / "bench" / "crash.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_compare_trees_and_leftovers_catch_what_they_must(tmp_path):
    crash = _crash()
    a, b = tmp_path / "a", tmp_path / "b"
    for d, w, created in ((a, 1.0, "2020"), (b, 1.0, "2030")):
        (d / "sub").mkdir(parents=True)
        save_file({"w": torch.full((4,), w)}, str(d / "model.safetensors"), metadata={"x": "1", "y": "2"})
        (d / "slmkit.json").write_text(json.dumps({"created": created, "metrics": {"seconds": 3, "loss": 0.5}}))
        (d / "sub" / "rows.jsonl").write_text('{"id": 1}\n')
    assert crash.compare_trees(a, b) == []  # timestamps and clocks are not results
    (b / "slmkit.json").write_text(json.dumps({"created": "2030", "metrics": {"seconds": 3, "loss": 0.6}}))
    save_file({"w": torch.full((4,), 1.0 + 2**-20)}, str(b / "model.safetensors"), metadata={"x": "1", "y": "2"})
    (b / "sub" / "rows.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    (b / "extra.txt").write_text("x")
    problems = crash.compare_trees(a, b)
    assert any("slmkit.json: /metrics/loss" in p for p in problems)
    assert any("model.safetensors: tensor w differs" in p for p in problems)
    assert any("rows.jsonl" in p for p in problems) and any("extra.txt: only in the rerun" in p for p in problems)
    (b / "sub" / ".model.tmp-123-x").mkdir()
    (b / "run.tmp").write_text("")
    assert crash.leftovers(b) == ["run.tmp", "sub/.model.tmp-123-x"]


def test_crash_sample_every_verb_two_kills(tmp_path):
    out = tmp_path / "crash.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "crash.py"), "--kills", "2", "--small", "--threads", "1",
                           "--budget-s", "600", "--keep", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    summaries = {s["verb"]: s for s in res["verbs"]}
    assert set(summaries) == {"build", "distill", "sft", "dpo", "gen-data", "rag-index", "quantize", "export"}
    assert res["pass"], json.dumps({"verbs": res["verbs"], "failures": res["failures"]}, indent=1)[:4000]
    for s in summaries.values():
        assert s["trials"] == 2 and s["ok"] == 2 and s["rerun_exit_1"] == 0, s
    assert proc.returncode == 0
