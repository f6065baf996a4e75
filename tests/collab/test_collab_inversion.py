"""Prompt inversion: metrics with known values, the first-sentence baseline, pair files, training, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.backends import Completion, HFBackend
from slmkit.collab.cascade import token_f1
from slmkit.collab.inversion import (
    InvertConfig,
    Pair,
    collect_pairs,
    conversations,
    evaluate,
    exact_match,
    first_sentence,
    invert,
    read_pairs,
    score,
    train_inverter,
)
from slmkit.errors import ConfigError, DataError
from slmkit.models.tiny import tiny_llama_config, tiny_model
from slmkit.train.sft import LoraSettings, SFTConfig

# prompts and outputs in the tiny tokenizer's vocabulary; an output does not restate its prompt
PAIRS = [
    Pair("The cat sees the house.", "It is 3 steps away, yes!"),
    Pair("A dog likes green apples.", "It is 12 steps away, maybe!"),
    Pair("My friend reads the old book.", "It is 40 steps away, no!"),
    Pair("Paris is near a bright star.", "It is 7 steps away, yes!"),
]
CFG = InvertConfig(instruction="Write the prompt.", max_new_tokens=12)


@pytest.fixture(autouse=True)
def one_thread():
    """Hidden size 64 gains nothing from a second thread; on a busy machine a second one costs 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_token_f1_and_exact_match_known_values():
    assert token_f1("The cat sees the house.", "the cat sees the HOUSE") == 1.0
    assert token_f1("a dog likes apples", "my friend reads books") == 0.0
    # normalised: [cat, sees, house] vs [cat, likes, green, apples]: P = 1/3, R = 1/4, F1 = 2/7
    assert token_f1("the cat sees the house", "The cat likes green apples.") == pytest.approx(2 / 7)
    assert exact_match("The Cat!", "cat") and not exact_match("the cat", "the cats")
    s = score(["the cat sees the house", "a dog"], ["The cat likes green apples.", "A dog!"])
    assert s == {"token_f1": pytest.approx((2 / 7 + 1) / 2), "exact_match": 0.5, "n": 2}
    with pytest.raises(ValueError):
        score(["x"], ["x", "y"])


@pytest.mark.parametrize("text, first", [
    ("Paris is the capital. It is big.", "Paris is the capital."),
    ("Yes! Of course.", "Yes!"),
    ('He said "go." Then he left.', 'He said "go."'),
    ("1. Preheat the oven. 2. Mix the flour.", "1. Preheat the oven."),
    ("\n  No end mark here\nSecond line.", "No end mark here"),
    ("Version 2.5 is out. Get it.", "Version 2.5 is out."),
    ("", ""),
])
def test_first_sentence(text, first):
    assert first_sentence(text) == first


def test_read_pairs_formats(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Where is the cat?", "output": "Near the house."},
        {"prompt": "Name a fruit.", "completion": "An apple."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Later"}]},
        {"instruction": "Sort the words.", "instances": [{"input": "b a", "output": "a b"}]},
        {"instruction": "Say yes.", "instances": [{"input": "", "output": "Yes."}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = read_pairs(path)
    assert [(p.prompt, p.output) for p in got] == [
        ("Where is the cat?", "Near the house."), ("Name a fruit.", "An apple."), ("Hi", "Hello."),
        ("Sort the words.\n\nb a", "a b"), ("Say yes.", "Yes."),
    ]
    assert got[2].where == f"{path}:3"
    assert read_pairs(path, role="system")[2].prompt == "Be brief."
    assert len(read_pairs(path, limit=2)) == 2
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text(json.dumps({"prompt": "Where is the cat?"}) + "\n")
    assert read_pairs(prompts_only, need_output=False) == [Pair("Where is the cat?", "", f"{prompts_only}:1")]
    with pytest.raises(ConfigError, match="role"):
        read_pairs(path, role="assistant")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q"}', "missing field 'output'"),
    ('{"prompt": "q", "output": "  "}', "output is empty"),
    ('{"prompt": "", "output": "a"}', "field 'prompt' is empty"),
    ('{"prompt": 3, "output": "a"}', "'prompt' must be a string"),
    ('{"text": "q"}', "missing field 'prompt'"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "no non-empty 'user' message"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', "role is 'bot'"),
    ('{"instruction": "q", "instances": []}', "'instances' must be a non-empty list"),
    ('{"prompt": "q", "output": "a"', "not valid JSON"),
])
def test_bad_pairs_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "output": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as err:
        read_pairs(path)
    assert f"{path}:2" in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_pairs(tmp_path / "empty.jsonl")


class Recorder:
    """A backend that answers every chat with a fixed reply and keeps what it was sent."""

    name = "recorder"

    def __init__(self, reply: str):
        self.reply, self.sent = reply, []

    def generate(self, prompts, params):
        self.sent.extend(prompts)
        return [Completion(f" {self.reply} ", 3, "stop") for _ in prompts]

    def score(self, texts, contexts=None):  # pragma: no cover - not used here
        raise NotImplementedError


def test_collect_pairs_sends_user_or_system_prompts():
    be = Recorder("Sure.")
    pairs = collect_pairs(be, ["Be a pirate.", "Be a cat."])
    assert [(p.prompt, p.output) for p in pairs] == [("Be a pirate.", "Sure."), ("Be a cat.", "Sure.")]
    assert be.sent[0] == [{"role": "user", "content": "Be a pirate."}]
    be = Recorder("Arr.")
    collect_pairs(be, ["Be a pirate."], user_turn="Hello")
    assert be.sent == [[{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hello"}]]


def test_conversations_and_invert_show_the_cut_output():
    cfg = InvertConfig(instruction="Guess.", max_output_chars=5, max_new_tokens=4)
    (conv,) = conversations([Pair("  The prompt. ", " abcdefgh")], cfg)
    assert conv == [{"role": "user", "content": "Guess.\n\nReply: abcde"}, {"role": "assistant", "content": "The prompt."}]
    be = Recorder("The prompt.")
    assert invert(be, [" abcdefgh"], cfg) == ["The prompt."]
    assert be.sent == [conv[:1]]
    rep = evaluate([Pair("The prompt.", "abcdefgh. More.")], {"inverter": be}, cfg)
    assert list(rep) == ["first_sentence", "inverter"]
    assert rep["inverter"]["exact_match"] == 1.0 and rep["first_sentence"]["token_f1"] == 0.0
    assert rep["first_sentence"]["examples"][0]["reconstruction"] == "abcdefgh."
    with pytest.raises(ConfigError):
        evaluate(PAIRS, {"first_sentence": be}, cfg)
    with pytest.raises(ConfigError):
        InvertConfig(max_output_chars=0)


def test_lora_inverter_learns_to_reconstruct_prompts(tiny_tok, tmp_path):
    """Overfit four pairs: reconstructions go from nothing to (nearly) the prompts, above the baseline."""
    model = tiny_model(tiny_llama_config(tiny_tok), seed=0)  # a fresh model: LoRA layers are injected in place
    before = evaluate(PAIRS, {"inverter": HFBackend(model, tiny_tok)}, CFG)
    cfg = SFTConfig(lora=LoraSettings(r=8, alpha=16), max_steps=100, learning_rate=5e-3, batch_size=4,
                    max_length=128, save_steps=0)
    res = train_inverter(model, tiny_tok, PAIRS * 4, cfg, tmp_path / "ck", CFG)
    after = evaluate(PAIRS, {"inverter": HFBackend(res.model, tiny_tok)}, CFG)
    assert res.steps == 100
    assert before["inverter"]["token_f1"] < 0.2
    assert before["first_sentence"]["token_f1"] < 0.2  # the outputs do not restate their prompts
    assert after["inverter"]["token_f1"] >= 0.75 and after["inverter"]["exact_match"] >= 0.5
    assert after["first_sentence"] == before["first_sentence"]


def _write(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p.prompt, "output": p.output}) + "\n" for p in pairs))
    return path


def test_cli_trains_evaluates_and_reloads_the_adapter(capsys, tiny_dir, tmp_path):
    from slmkit.artefact import Manifest
    from slmkit.cli import main

    train, held = _write(tmp_path / "train.jsonl", PAIRS * 4), _write(tmp_path / "held.jsonl", PAIRS)
    out = tmp_path / "inverter"
    code = main([
        "invert", str(tiny_dir), "--train", str(train), "--eval", str(held), "--output", str(out), "--max-steps", "100",
        "--lr", "5e-3", "--max-length", "128", "--max-new-tokens", "12", "--json",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rep = json.loads(captured.out)
    assert list(rep["methods"]) == ["first_sentence", "zero_shot", "inverter"] and rep["n"] == 4
    assert rep["kind"] == "adapter" and rep["steps"] == 100 and rep["train_pairs"] == 16
    assert rep["methods"]["inverter"]["token_f1"] > rep["methods"]["zero_shot"]["token_f1"]
    assert (out / "adapter_config.json").is_file() and not (tmp_path / "inverter.checkpoints").exists()
    man = Manifest.read(out)
    assert man.stages[0]["stage"] == "invert-train" and man.stages[0]["pairs"] == 16
    assert man.metrics["eval"]["inverter"]["token_f1"] == rep["methods"]["inverter"]["token_f1"]

    # the written adapter, loaded onto its base, reconstructs exactly as the trained model did
    code = main(["invert", str(tiny_dir), "--eval", str(held), "--adapter", str(out), "--max-new-tokens", "12", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    again = json.loads(captured.out)
    for name in ("zero_shot", "inverter"):
        assert again["methods"][name]["examples"] == rep["methods"][name]["examples"]
        assert again["methods"][name]["token_f1"] == rep["methods"][name]["token_f1"]


def test_cli_collects_pairs_from_a_target_and_rejects_bad_input(capsys, tiny_dir, tmp_path):
    from slmkit.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The cat sees"}) + "\n" + json.dumps({"prompt": "A dog likes"}) + "\n")
    saved = tmp_path / "pairs.jsonl"
    code = main(["invert", str(tiny_dir), "--eval", str(prompts), "--target", str(tiny_dir), "--target-tokens", "6",
                 "--save-pairs", str(saved), "--max-new-tokens", "4", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["n"] == 2
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [(r["prompt"], r["split"]) for r in rows] == [("The cat sees", "eval"), ("A dog likes", "eval")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "output": "a"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    code = main(["invert", str(tiny_dir), "--eval", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2: missing field 'output'" in err and "Traceback" not in err
    for args, message in [
        (["--train", str(bad)], "--train needs --output"),
        ([], "give --train DATA"),
        (["--eval", str(bad), "--save-pairs", str(saved)], "need --target"),
    ]:
        code = main(["invert", str(tiny_dir), *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
