"""Preference optimisation: DPO and SimPO lower their loss and widen the reward margin; hh-rlhf parsing."""

from __future__ import annotations

import json

import pytest

from slmkit.errors import ConfigError, DataError
from slmkit.models.tiny import tiny_llama_config, tiny_model
from slmkit.train.dpo import PreferenceConfig, hh_turns, preference_metrics, preference_train, split_hh
from slmkit.train.records import read_preferences
from slmkit.train.sft import LoraSettings

SUBJECTS = ["the cat", "a dog", "my friend", "the model", "the river", "a teacher"]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"Is {s} near the house?"}],
        "chosen": [{"role": "assistant", "content": f"Yes, {s} is near the house."}],
        "rejected": [{"role": "assistant", "content": f"No, {s} likes green apples."}],
    }
    for s in SUBJECTS
]


@pytest.mark.parametrize("method,loss_key", [("dpo", "dpo_loss"), ("simpo", "simpo_loss")])
def test_preference_loss_drops_and_margin_grows(tiny_tok, tmp_path, method, loss_key):
    model = tiny_model(tiny_llama_config(tiny_tok), seed=3)
    cfg = PreferenceConfig(method=method, max_steps=4, learning_rate=8e-3, batch_size=2, save_steps=0, logging_steps=1,
                           lora=LoraSettings(r=4, alpha=8))
    before = preference_metrics(model, tiny_tok, PAIRS, cfg, reference=None)
    res = preference_train(model, tiny_tok, PAIRS, cfg, tmp_path / "ck")
    after = preference_metrics(res.model, tiny_tok, PAIRS, cfg, reference="adapters-off")
    assert res.steps == 4
    if method == "dpo":  # policy == reference before training: every reward is exactly 0, the loss log(2)
        assert before["reward_margin"] == 0 and abs(before[loss_key] - 0.6931) < 1e-3
    assert after[loss_key] < before[loss_key] - 0.05
    assert after["reward_margin"] > before["reward_margin"]
    assert after["reward_accuracy"] == 1.0
    logged = [h["loss"] for h in res.log_history if "loss" in h]
    assert logged[-1] < logged[0]


def test_hh_rlhf_dialogues_split_into_prompt_and_answers():
    chosen = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how to bake bread?\n\nAssistant: Mix flour and water."
    rejected = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how to bake bread?\n\nAssistant: No idea."
    assert hh_turns(chosen)[:2] == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]
    pair = split_hh(chosen, rejected)
    assert pair["prompt"][-1] == {"role": "user", "content": "how to bake bread?"} and len(pair["prompt"]) == 3
    assert pair["chosen"] == [{"role": "assistant", "content": "Mix flour and water."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "No idea."}]
    assert split_hh(chosen, "\n\nHuman: other\n\nAssistant: x") is None  # different prompts


def test_hh_rlhf_shared_file_parses(shared_data):
    from slmkit.train.dpo import read_hh

    pairs = read_hh(shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz", limit=50)
    assert len(pairs) == 50
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"] for p in pairs)


def test_bad_preference_data_names_line_and_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:2: missing field 'rejected'"):
        read_preferences(f)
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    assert read_preferences(f)[0]["chosen"] == [{"role": "assistant", "content": "a"}]
    with pytest.raises(ConfigError, match="unknown preference method 'dpp'"):
        PreferenceConfig(method="dpp")
