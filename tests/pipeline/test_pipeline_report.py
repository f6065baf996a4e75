"""The build report: numbers match a from-scratch computation, and it renders in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from slmkit.cli import main
from slmkit.eval import PerplexityConfig, perplexity
from slmkit.models import load
from slmkit.pipeline.stages.measure import agreement, next_token_argmax

CHROMIUM = "/usr/bin/chromium"


def test_agreement_counts_equal_top1_choices():
    a = torch.tensor([1, 2, 3, 4])
    assert agreement(a, a) == 1.0
    assert agreement(a, torch.tensor([1, 0, 3, 0])) == 0.5


def test_report_numbers_match_direct_computation(finished_run, tiny_dir):
    run_dir, result = finished_run
    data = json.loads((run_dir / "report.json").read_text())
    assert data["complete"] and [s["state"] for s in data["stages"]] == ["finished"] * 4
    rows = {r["label"]: r for r in data["table"]}
    assert rows["teacher"]["role"] == "teacher" and rows["student (= teacher)"]["role"] == "student"
    assert rows["export (gguf)"]["role"] == "export"
    # perplexity of the teacher on the held-out generated text, computed here from scratch
    text = (run_dir / "01-gen-data" / "eval.txt").read_text()
    model, tok = load(str(tiny_dir))
    direct = perplexity(model, tok, text, PerplexityConfig(context=32, stride=32, max_tokens=96))
    assert rows["teacher"]["perplexity"] == pytest.approx(direct.perplexity, rel=1e-5)
    assert rows["teacher"]["agreement"] == 1.0
    # the F16 GGUF read back: nearly the same model, so nearly the same numbers
    gg = rows["export (gguf)"]
    assert gg["perplexity"] == pytest.approx(direct.perplexity, rel=1e-2)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:96]
    gmodel, _ = load(str(run_dir / "03-export" / "model.gguf"))
    assert gg["agreement"] == pytest.approx(agreement(next_token_argmax(gmodel, ids, 32), next_token_argmax(model, ids, 32)))
    assert gg["bytes"] == (run_dir / "03-export" / "model.gguf").stat().st_size
    assert gg["parameters"] == rows["teacher"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert rows["teacher"]["decode_tokens_per_s"] > 0
    assert data["summary"]["perplexity_ratio"] == pytest.approx(1.0)
    # the exact recipe is in the report
    assert data["recipe"]["text"] == (run_dir / "recipe.yaml").read_text()


def test_report_verb_rewrites_report(finished_run, capsys):
    run_dir, _ = finished_run
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (run_dir / "report.html").is_file() and out["recipe"]["name"] == "tiny"
    assert main(["report", str(run_dir.parent)]) == 2  # not a run directory


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless check needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium; .ci/run installs it)")
def test_report_renders_in_headless_chromium(finished_run, tmp_path):
    run_dir, _ = finished_run
    html = (run_dir / "report.html").read_text()
    # self-contained: nothing is fetched (no scripts, stylesheets, images or frames by URL)
    assert not re.search(r"<(script|link|img|iframe)\b", html) and "src=" not in html
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--dump-dom", (run_dir / "report.html").as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    assert "<table" in dom and 'class="models"' in dom
    for label in ("teacher", "export (gguf)"):
        assert f"<td>{label}</td>" in dom
    assert dom.count("<svg") >= 2  # quality vs size, speed
    assert 'id="plot-quality-size"' in dom and 'id="plot-speed"' in dom
    assert "stage: gen-data" in dom  # the exact recipe
    # and it paints: a screenshot is a real PNG
    shot = tmp_path / "shot.png"
    cmd2 = [c for c in cmd if c != "--dump-dom"]
    cmd2.insert(-1, f"--screenshot={shot}")
    cmd2.insert(-1, "--window-size=1200,2400")
    subprocess.run(cmd2, capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
