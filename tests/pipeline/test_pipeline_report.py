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
    assert data["complete"] and [s["state"] for s in data["stages"]] == ["finished"] * 7
    rows = {r["label"]: r for r in data["table"]}
    assert [r["label"] for r in data["table"]] == ["teacher", "prune", "quantize", "export (gguf)"]
    assert [r["role"] for r in data["table"]] == ["teacher", "stage", "student", "export"]
    text = (run_dir / "01-gen-data" / "eval.txt").read_text()
    pcfg = PerplexityConfig(context=32, stride=32, max_tokens=96)
    teacher, tok = load(str(tiny_dir))
    direct = perplexity(teacher, tok, text, pcfg)
    assert rows["teacher"]["perplexity"] == pytest.approx(direct.perplexity, rel=1e-5)
    assert rows["teacher"]["agreement"] == 1.0
    assert rows["teacher"]["parameters"] == sum(p.numel() for p in teacher.parameters())
    # the pruned model on disk has the parameters the report says, and fewer than the teacher
    pruned, _ = load(str(run_dir / "03-prune" / "model"))
    assert rows["prune"]["parameters"] == sum(p.numel() for p in pruned.parameters()) < rows["teacher"]["parameters"]
    # GPTQ codes on the Q4_0 grid are written into the GGUF exactly: same weights, same perplexity
    assert result.stages[4]["metrics"]["codes_kept_exactly"] and result.stages[4]["metrics"]["max_abs_diff"] == 0.0
    gg = rows["export (gguf)"]
    assert gg["perplexity"] == pytest.approx(rows["quantize"]["perplexity"], rel=1e-4)
    gmodel, _ = load(str(run_dir / "05-export" / "model.gguf"))
    assert gg["perplexity"] == pytest.approx(perplexity(gmodel, tok, text, pcfg).perplexity, rel=1e-5)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:96]
    assert gg["agreement"] == pytest.approx(agreement(next_token_argmax(gmodel, ids, 32), next_token_argmax(teacher, ids, 32)))
    assert gg["bytes"] == gg["weight_memory_bytes"] == (run_dir / "05-export" / "model.gguf").stat().st_size
    assert gg["bytes"] < rows["teacher"]["bytes"] / 4  # 4.5 bits per weight against fp32
    assert rows["teacher"]["decode_tokens_per_s"] > 0 and rows["quantize"]["decode_tokens_per_s"] > 0
    assert data["summary"]["parameter_ratio"] == pytest.approx(rows["prune"]["parameters"] / rows["teacher"]["parameters"])
    # device fit from slmkit.runtime.fit: the Q4_0 GGUF is planned at int4, the teacher at fp32
    from slmkit.models import describe_model
    from slmkit.runtime.fit import FitConfig, Sizes, plan_sizes

    assert gg["precision"] == "int4" and rows["teacher"]["precision"] == "fp32"
    want = plan_sizes(Sizes.of(describe_model(gmodel)), FitConfig.parse("phone-4gb", context=2048, precision="int4"))
    assert gg["fit"]["phone-4gb"] == {"fits": want.fits, "total_bytes": want.total_bytes, "memory_bytes": want.memory_bytes,
                                      "max_context": want.max_context}
    # speculative check: the student drafts, greedy output is exactly the teacher's
    spec = data["speculative"]
    assert spec["exact"] is True and spec["identical_to_teacher"] == spec["prompts"] == 2
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["speedup"] > 0
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
    for label in ("teacher", "prune", "quantize", "export (gguf)"):
        assert f"<td>{label}</td>" in dom
    assert dom.count("<svg") >= 2  # quality vs size, speed
    assert 'id="speculative"' in dom and 'id="fit"' in dom
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


def test_audit_stage_scores_teacher_and_student_and_draws_the_radar(tiny_dir, shared_data, tmp_path):
    from pipeline_helpers import STUDENT, tiny_recipe

    from slmkit.pipeline import build, parse_text

    audit = "  - stage: audit\n    dimensions: [reliability, fairness]\n    limit: 2\n"
    run = tmp_path / "run"
    build(parse_text(tiny_recipe(tiny_dir, STUDENT, audit), "a.yaml"), run)
    data = json.loads((run / "report.json").read_text())
    scores = data["trust"]["scores"]
    assert set(scores) == {"teacher", "student"} and set(scores["teacher"]) == {"reliability", "fairness"}
    assert all(0.0 <= v <= 1.0 for v in scores["teacher"].values())
    # the student is the teacher here: the same model audited twice gives the same scores
    assert scores["student"] == scores["teacher"]
    html = (run / "report.html").read_text()
    assert 'id="plot-trust-radar"' in html and 'id="trust"' in html
