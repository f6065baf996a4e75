"""Resume only from complete checkpoints (issue 17): a ``checkpoint-N`` half-written by a kill
during a save (or half-deleted by a kill during checkpoint rotation) is skipped and removed, and
SFT / DPO resume from the previous complete one (or start fresh) to the uninterrupted weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from slmkit.models.tiny import tiny_llama_config, tiny_model
from slmkit.train.checkpoints import incomplete_reason, last_complete_checkpoint, safetensors_whole


def _fake(path, step, *, state=True, weights=True, optimizer=True):
    path.mkdir(parents=True)
    if weights:
        save_file({"w": torch.arange(64, dtype=torch.float32)}, str(path / "model.safetensors"))
    if optimizer:
        (path / "optimizer.pt").write_bytes(b"x" * 16)
        (path / "scheduler.pt").write_bytes(b"x" * 16)
    if state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


BROKEN = {
    "no trainer state (killed before it was written)": lambda p: (p / "trainer_state.json").unlink(),
    "half-written trainer state": lambda p: (p / "trainer_state.json").write_text('{"global_st'),
    "trainer state of another step": lambda p: (p / "trainer_state.json").write_text('{"global_step": 3}'),
    "no weights (deleted during rotation)": lambda p: (p / "model.safetensors").unlink(),
    "truncated weights": lambda p: _truncate(p / "model.safetensors", 100),
    "weights with a truncated header": lambda p: _truncate(p / "model.safetensors", 6),
    "no optimizer": lambda p: (p / "optimizer.pt").unlink(),
    "empty scheduler": lambda p: (p / "scheduler.pt").write_bytes(b""),
    "empty directory": lambda p: [f.unlink() for f in p.iterdir()],
}


@pytest.mark.parametrize("damage", list(BROKEN), ids=list(BROKEN))
def test_incomplete_checkpoint_is_skipped_and_removed(tmp_path, damage, caplog):
    good = _fake(tmp_path / "checkpoint-2", 2)
    bad = _fake(tmp_path / "checkpoint-4", 4)
    assert incomplete_reason(bad) is None
    BROKEN[damage](bad)
    assert incomplete_reason(bad) is not None
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint: ignored, left alone
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(tmp_path) == good
    assert "incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert not bad.exists() and good.exists() and (tmp_path / "checkpoint-x").exists()


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    _fake(tmp_path / "checkpoint-2", 2, state=False)
    assert last_complete_checkpoint(tmp_path, remove=False) is None
    assert (tmp_path / "checkpoint-2").exists()
    assert last_complete_checkpoint(tmp_path) is None
    assert not (tmp_path / "checkpoint-2").exists()


def test_sharded_and_adapter_weights(tmp_path):
    ck = _fake(tmp_path / "checkpoint-6", 6, weights=False)
    for i in (1, 2):
        save_file({f"w{i}": torch.ones(8)}, str(ck / f"model-0000{i}-of-00002.safetensors"))
    index = {"weight_map": {"w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    assert incomplete_reason(ck) is None
    (ck / "model-00002-of-00002.safetensors").unlink()
    assert "weights" in incomplete_reason(ck)
    ad = _fake(tmp_path / "checkpoint-8", 8, weights=False)
    save_file({"lora": torch.ones(4)}, str(ad / "adapter_model.safetensors"))
    assert incomplete_reason(ad) is None
    _truncate(ad / "adapter_model.safetensors", (ad / "adapter_model.safetensors").stat().st_size - 1)
    assert not safetensors_whole(ad / "adapter_model.safetensors")


# ---------------------------------------------------------------------------- real trainers


class _Stop(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            raise KeyboardInterrupt


def _half_written(ckpt_dir, src, step):
    """What a kill in the middle of saving checkpoint-``step`` leaves: weights cut short, no state."""
    half = ckpt_dir / f"checkpoint-{step}"
    half.mkdir()
    for f in src.iterdir():
        if f.name.endswith(".safetensors"):
            (half / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return half


def _same(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_sft_resumes_past_a_half_written_checkpoint(tiny_tok, tmp_path):
    from slmkit.train.sft import SFTConfig, sft

    convs = [[{"role": "user", "content": f"Where is item {i}?"},
              {"role": "assistant", "content": f"Item {i} is {i} steps away."}] for i in range(4)]
    cfg = SFTConfig(max_steps=4, save_steps=2, learning_rate=1e-3, batch_size=1, max_length=32)
    straight = sft(tiny_model(tiny_llama_config(tiny_tok), seed=2), tiny_tok, convs, cfg, tmp_path / "a").model
    with pytest.raises(KeyboardInterrupt):
        sft(tiny_model(tiny_llama_config(tiny_tok), seed=2), tiny_tok, convs, cfg, tmp_path / "b", callbacks=[_Stop()])
    half = _half_written(tmp_path / "b", tmp_path / "b" / "checkpoint-2", 4)
    res = sft(tiny_model(tiny_llama_config(tiny_tok), seed=2), tiny_tok, convs, cfg, tmp_path / "b", resume=True)
    assert res.steps == 4 and (half / "trainer_state.json").is_file()  # step 4 saved again, whole
    _same(straight, res.model)
    # a kill while rotation deleted the only checkpoint's weights: start from step 0, same result
    shutil.rmtree(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        sft(tiny_model(tiny_llama_config(tiny_tok), seed=2), tiny_tok, convs, cfg, tmp_path / "b", callbacks=[_Stop()])
    (tmp_path / "b" / "checkpoint-2" / "model.safetensors").unlink()
    res = sft(tiny_model(tiny_llama_config(tiny_tok), seed=2), tiny_tok, convs, cfg, tmp_path / "b", resume=True)
    assert res.steps == 4
    _same(straight, res.model)


def test_dpo_resumes_past_a_half_written_checkpoint(tiny_tok, tmp_path):
    from slmkit.train.dpo import PreferenceConfig, preference_train
    from slmkit.train.sft import LoraSettings

    pairs = [{"prompt": [{"role": "user", "content": f"Is {s} near?"}],
              "chosen": [{"role": "assistant", "content": f"Yes, {s} is near."}],
              "rejected": [{"role": "assistant", "content": f"No, {s} is blue."}]}
             for s in ("the cat", "a dog", "my friend", "the river")]
    cfg = PreferenceConfig(max_steps=4, save_steps=2, learning_rate=8e-3, batch_size=1, logging_steps=1,
                           lora=LoraSettings(r=4, alpha=8))
    straight = preference_train(tiny_model(tiny_llama_config(tiny_tok), seed=3), tiny_tok, pairs, cfg, tmp_path / "a").model
    with pytest.raises(KeyboardInterrupt):
        preference_train(tiny_model(tiny_llama_config(tiny_tok), seed=3), tiny_tok, pairs, cfg, tmp_path / "b",
                         callbacks=[_Stop()])
    ck2 = tmp_path / "b" / "checkpoint-2"
    assert incomplete_reason(ck2) is None and (ck2 / "adapter_model.safetensors").is_file()
    _half_written(tmp_path / "b", ck2, 4)
    res = preference_train(tiny_model(tiny_llama_config(tiny_tok), seed=3), tiny_tok, pairs, cfg, tmp_path / "b",
                           resume=True)
    assert res.steps == 4
    _same(straight, res.model)
