"""Progress reports (slmkit.progress) and the CLI's bars: drawn only on a terminal (or when forced
with SLMKIT_PROGRESS=1), never under --json; library loops and Trainer runs report their phases."""

from __future__ import annotations

import json

import pytest

from slmkit import progress
from slmkit.cli import main
from slmkit.cli.progress import show_progress


def test_step_without_a_listener_is_silent_and_scoped():
    seen = []
    progress.step("x", 1, 2)  # nobody listens: nothing happens
    with progress.reporting(lambda *a: seen.append(a)):
        assert progress.active()
        progress.step("layers", 1, 3)
        progress.callback("chunks")(5, None)
        with progress.reporting(lambda *a: seen.append(("inner", *a))):
            progress.step("layers", 2, 3)
        progress.step("layers", 3, 3)
    assert not progress.active()
    progress.step("x", 2, 2)
    assert seen == [("layers", 1, 3), ("chunks", 5, None), ("inner", "layers", 2, 3), ("layers", 3, 3)]


def test_show_progress_rules(monkeypatch):
    monkeypatch.delenv("SLMKIT_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert show_progress(False) and not show_progress(True)  # a terminal: on, except with --json
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert not show_progress(False)  # no terminal: off
    monkeypatch.setenv("SLMKIT_PROGRESS", "1")
    assert show_progress(False) and not show_progress(True)  # forced on; --json still wins
    monkeypatch.setenv("SLMKIT_PROGRESS", "0")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert not show_progress(False)


def _quantize(tiny_dir, out, *flags):
    return main(["quantize", str(tiny_dir), "--method", "rtn", "--bits", "4", "--group-size", "32", "--output", str(out), *flags])


def test_quantize_progress_silent_without_terminal_and_under_json(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLMKIT_PROGRESS", raising=False)
    assert _quantize(tiny_dir, tmp_path / "a") == 0
    assert "quantize: weights" not in capsys.readouterr().err
    monkeypatch.setenv("SLMKIT_PROGRESS", "1")
    assert _quantize(tiny_dir, tmp_path / "b", "--json") == 0
    out = capsys.readouterr()
    assert "quantize: weights" not in out.err and json.loads(out.out)


def test_quantize_progress_shown_when_forced(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLMKIT_PROGRESS", "1")
    assert _quantize(tiny_dir, tmp_path / "q") == 0
    err = capsys.readouterr().err
    assert "quantize: weights" in err and "14/14" in err and "ETA" in err  # 2 layers x 7 Linears


def test_lowrank_reports_blocks(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLMKIT_PROGRESS", "1")
    assert main(["lowrank", str(tiny_dir), "--ratio", "0.5", "--method", "plain", "--output", str(tmp_path / "l")]) == 0
    assert "lowrank: blocks" in capsys.readouterr().err


def test_self_generated_calibration_reports_tokens(tiny_llama):
    from slmkit.compress.calibrate import self_generate

    model, tok = tiny_llama
    seen = []
    with progress.reporting(lambda *a: seen.append(a)):
        ids = self_generate(model, tok, n=3, length=5, batch_size=2)
    assert ids.shape == (3, 5)
    assert seen[0] == ("self-generated calibration tokens", 0, 15) and seen[-1] == ("self-generated calibration tokens", 15, 15)
    done = [d for _, d, _ in seen]
    assert done == sorted(done)


def test_sft_reports_training_steps(tiny_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": f"hello {i}"}]}) + "\n" for i in range(4)))
    monkeypatch.setenv("SLMKIT_PROGRESS", "1")
    assert main(["sft", str(tiny_dir), "--data", str(data), "--max-steps", "2", "--batch-size", "2", "--max-length", "32",
                 "--save-steps", "0", "--output", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "sft: training steps" in err and "2/2" in err


def test_gen_data_reports_replies(tmp_path, capsys, monkeypatch):
    from fakeopenai import FakeOpenAI

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"question {i}\n" for i in range(5)))
    monkeypatch.setenv("SLMKIT_PROGRESS", "1")
    with FakeOpenAI() as fake:
        assert main(["gen-data", fake.url, "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "gen-data: accepted replies" in err and "5/5" in err


@pytest.mark.parametrize("forced", ["", "1"])
def test_gen_data_json_is_clean(tmp_path, capsys, monkeypatch, forced):
    from fakeopenai import FakeOpenAI

    prompts = tmp_path / "p.txt"
    prompts.write_text("question\n")
    monkeypatch.setenv("SLMKIT_PROGRESS", forced)
    with FakeOpenAI() as fake:
        assert main(["gen-data", fake.url, "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["accepted"] == 1 and "accepted replies" not in out.err
