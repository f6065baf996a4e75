"""`sft` / `dpo --resume` continue only their own run (issue 17): OUTPUT.checkpoints carries the run's
identity (``run.json``: starting weights, data, settings), as distill's output does; a resume with
another model, data or settings exits 2 naming what differs and leaves the checkpoints as they were."""

from __future__ import annotations

import json

import pytest
from transformers import TrainerCallback

from slmkit.cli import main
from slmkit.errors import ConfigError
from slmkit.models import load
from slmkit.models.tiny import save_tiny, tiny_llama_config, tiny_model
from slmkit.train.checkpoints import RUN_FILE, finish_run, prepare_run


class _Stop(TrainerCallback):
    """Simulates a kill after step 2 (its checkpoint is saved)."""

    def on_save(self, args, state, control, **kw):
        if state.global_step == 2:
            raise KeyboardInterrupt("simulated kill")


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def sft_data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Where is the cat {i}?"},
                          {"role": "assistant", "content": f"The cat is {i} steps away."}]} for i in range(6)]
    p = tmp_path / "chats.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _partial_sft(tiny_dir, data, output):
    """What a killed `slmkit sft TINY --data DATA --output OUTPUT --max-steps 4 --save-steps 2 --batch-size 2` leaves."""
    from slmkit.train.records import read_sft
    from slmkit.train.sft import SFTConfig, checkpoint_dir, sft

    m, tok = load(str(tiny_dir))
    cfg = SFTConfig(max_steps=4, save_steps=2, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        sft(m, tok, read_sft(data), cfg, checkpoint_dir(output), callbacks=[_Stop()])
    return checkpoint_dir(output)


def test_sft_resume_refuses_another_runs_checkpoints(capsys, tiny_dir, tiny_tok, sft_data, tmp_path):
    out = tmp_path / "out"
    ckpts = _partial_sft(tiny_dir, sft_data, out)
    assert (ckpts / RUN_FILE).is_file() and (ckpts / "checkpoint-2").is_dir()
    before = _tree(ckpts)
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(sft_data.read_text().replace("cat", "dog"))
    other_model = save_tiny(tiny_model(tiny_llama_config(tiny_tok), seed=5), tiny_tok, tmp_path / "other-model")
    flags = ["--output", out, "--max-steps", 4, "--save-steps", 2, "--batch-size", 2, "--resume"]
    for model, data, extra, named in [(tiny_dir, other_data, [], "data_sha256"),
                                      (tiny_dir, sft_data, ["--lr", "1e-3"], "config.learning_rate"),
                                      (tiny_dir, sft_data, ["--max-length", 64], "config.max_length"),
                                      (other_model, sft_data, [], "model_sha256")]:
        code, _, err = _run(capsys, "sft", model, "--data", data, *flags, *extra)
        assert code == 2, err
        assert "holds a different run" in err and named in err and "Traceback" not in err
        lines = err.strip().splitlines()
        assert lines[-2].startswith("error:") and lines[-1].lstrip().startswith("hint:")
        assert _tree(ckpts) == before and not out.exists()
    # the same command continues the run (a longer --max-steps is allowed: the budget is not identity)
    code, out_json, err = _run(capsys, "sft", tiny_dir, "--data", sft_data, *flags, "--json")
    assert code == 0, err
    assert json.loads(out_json)["steps"] == 4 and not ckpts.exists()


def test_sft_resume_refuses_checkpoints_without_identity(capsys, tiny_dir, sft_data, tmp_path):
    out = tmp_path / "out"
    ckpts = _partial_sft(tiny_dir, sft_data, out)
    (ckpts / RUN_FILE).unlink()  # e.g. written by an slmkit before run.json, or by hand
    code, _, err = _run(capsys, "sft", tiny_dir, "--data", sft_data, "--output", out, "--max-steps", 4,
                        "--save-steps", 2, "--batch-size", 2, "--resume")
    assert code == 2 and f"without a {RUN_FILE}" in err and (ckpts / "checkpoint-2").is_dir()


def test_dpo_resume_refuses_other_settings(capsys, tiny_dir, tmp_path):
    from slmkit.train.dpo import PreferenceConfig, preference_train
    from slmkit.train.records import read_preferences
    from slmkit.train.sft import LoraSettings, checkpoint_dir

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Is the cat {i} near?", "chosen": f"Yes, {i} steps.", "rejected": "No."})
                            + "\n" for i in range(4)))
    out = tmp_path / "out"
    m, tok = load(str(tiny_dir))
    cfg = PreferenceConfig(lora=LoraSettings(r=8, alpha=16.0), max_steps=4, save_steps=2, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        preference_train(m, tok, read_preferences(data), cfg, checkpoint_dir(out), callbacks=[_Stop()])
    before = _tree(checkpoint_dir(out))
    flags = ["--data", data, "--output", out, "--lora", "--max-steps", 4, "--save-steps", 2, "--resume"]
    code, _, err = _run(capsys, "dpo", tiny_dir, *flags, "--beta", "0.3")
    assert code == 2 and "holds a different run" in err and "config.beta" in err
    code, _, err = _run(capsys, "dpo", tiny_dir, *flags, "--method", "simpo")
    assert code == 2 and "config.method" in err and "kind" in err
    assert _tree(checkpoint_dir(out)) == before
    code, _, err = _run(capsys, "dpo", tiny_dir, *flags)
    assert code == 0, err
    assert (out / "adapter_model.safetensors").is_file() and not checkpoint_dir(out).exists()


def test_prepare_run_fresh_resume_replace_and_finish(tmp_path, caplog):
    d = tmp_path / "ck"
    ident = {"model": "a", "config": {"lr": 1}}
    with caplog.at_level("WARNING"):
        assert prepare_run(d, ident, resume=True) is None  # nothing there yet: a new run
    assert "nothing to resume" in caplog.text and json.loads((d / RUN_FILE).read_text()) == ident
    (d / "checkpoint-2").mkdir()
    with pytest.raises(ConfigError, match="already holds a training run"):
        prepare_run(d, ident, resume=False)
    with pytest.raises(ConfigError, match=r"different run \(config.lr: '1' there, '2' now\)"):
        prepare_run(d, {"model": "a", "config": {"lr": 2}}, resume=True)
    assert prepare_run(d, {"model": "b"}, resume=False, existing="replace") is None  # a new run replaces the old
    assert not (d / "checkpoint-2").exists() and json.loads((d / RUN_FILE).read_text()) == {"model": "b"}
    (d / "checkpoint-2").mkdir()
    (d / "checkpoint-4").mkdir()
    finish_run(d)
    assert not d.exists()
