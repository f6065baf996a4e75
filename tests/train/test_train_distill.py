"""Distillation trainer on tiny models: loss goes down, kill + resume == uninterrupted, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from slmkit.errors import ConfigError, DataError, UnsupportedModelError
from slmkit.models.tiny import tiny_corpus, tiny_llama_config, tiny_model, tiny_tokenizer
from slmkit.train.data import DataConfig, load_examples
from slmkit.train.distill import (
    CHECKPOINTS,
    DistillConfig,
    DistillTrainer,
    check_same_tokenizer,
    distill,
    last_complete_checkpoint,
)
from slmkit.train.losses import IGNORE_INDEX, LossConfig, token_divergence


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "train.txt"
    p.write_text("\n".join(tiny_corpus(120, seed=3)))
    return p


@pytest.fixture(scope="module")
def teacher(tiny_tok):
    # a sharper-than-random teacher: scale the output embedding so its distributions are peaked
    m = tiny_model(tiny_llama_config(tiny_tok, layers=2), seed=11)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(8.0)
    return m


def _student(tok, seed=5):
    return tiny_model(tiny_llama_config(tok, layers=1), seed=seed)


def _cfg(**kw):
    base = dict(loss=LossConfig("fkl"), data=DataConfig(block_size=24, prompt_tokens=6), max_steps=6, batch_size=2,
                learning_rate=3e-3, save_steps=2, logging_steps=2, seed=0)
    base.update(kw)
    return DistillConfig(**base)


def _divergence(teacher, student, tok, text_file):
    ex, _ = load_examples(text_file, tok, DataConfig(block_size=24))
    ids = torch.tensor([e["input_ids"] for e in ex[:8] if len(e["input_ids"]) == 24])
    with torch.no_grad():
        t, s = teacher(ids).logits, student(ids).logits
    return float(token_divergence(t.flatten(0, 1), s.flatten(0, 1), LossConfig("fkl")).mean())


def test_train_distill_reduces_divergence_and_writes_artefact(tiny_tok, teacher, text_file, tmp_path):
    student = _student(tiny_tok)
    before = _divergence(teacher, student, tiny_tok, text_file)
    res = distill(student, tiny_tok, text_file, tmp_path / "out", _cfg(max_steps=12, save_steps=6), teacher=teacher,
                  source={"teacher": "t", "student": "s"})
    after = _divergence(teacher, student, tiny_tok, text_file)
    assert after < 0.8 * before
    assert res.steps == 12 and res.data_kind == "text"
    man = json.loads((tmp_path / "out" / "slmkit.json").read_text())
    assert man["stages"][-1]["stage"] == "distill" and man["stages"][-1]["config"]["loss"]["loss"] == "fkl"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (k, a), b in zip(student.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "out" / CHECKPOINTS / "checkpoint-12").is_dir()


def test_train_distill_bf16_autocast_keeps_fp32_weights_and_learns(tiny_tok, teacher, text_file, tmp_path):
    from slmkit.models.load import cpu_has_bf16

    if not cpu_has_bf16() and not torch.cuda.is_available():
        pytest.skip("this CPU has no bf16 support (AVX512-BF16 / AMX)")
    student = _student(tiny_tok)
    before = _divergence(teacher, student, tiny_tok, text_file)
    distill(student, tiny_tok, text_file, tmp_path / "out", _cfg(max_steps=12, save_steps=6, bf16=True), teacher=teacher)
    assert all(p.dtype == torch.float32 for p in student.parameters())  # mixed precision: fp32 master weights
    assert _divergence(teacher, student, tiny_tok, text_file) < 0.8 * before


class _Crash(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_train_distill_kill_and_resume_matches_uninterrupted(tiny_tok, teacher, text_file, tmp_path):
    cfg = _cfg(max_steps=6, save_steps=2)
    ref_student = _student(tiny_tok)
    ref = distill(ref_student, tiny_tok, text_file, tmp_path / "ref", cfg, teacher=teacher)
    # killed while running step 6 (after the checkpoint at step 4 and one more step)
    s = _student(tiny_tok)
    with pytest.raises(KeyboardInterrupt):
        distill(s, tiny_tok, text_file, tmp_path / "run", cfg, teacher=teacher, callbacks=[_Crash(5)])
    assert not (tmp_path / "run" / "slmkit.json").exists()
    # a half-written checkpoint (killed while saving) must be skipped, not resumed from
    half = tmp_path / "run" / CHECKPOINTS / "checkpoint-6"
    half.mkdir()
    (half / "trainer_state.json").write_text('{"global_st')
    assert last_complete_checkpoint(tmp_path / "run" / CHECKPOINTS).name == "checkpoint-4"
    assert not half.exists()
    fresh = _student(tiny_tok, seed=99)  # the resumed weights come from the checkpoint, not this init
    res = distill(fresh, tiny_tok, text_file, tmp_path / "run", cfg, teacher=teacher, resume=True)
    assert res.resumed_from.endswith("checkpoint-4")
    assert res.seen_idx == ref.seen_idx[4:]  # steps 5 and 6 see the same examples
    for (k, a), b in zip(ref_student.state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_train_distill_run_directory_errors(tiny_tok, teacher, text_file, tmp_path):
    cfg = _cfg(max_steps=2, save_steps=2)
    distill(_student(tiny_tok), tiny_tok, text_file, tmp_path / "a", cfg, teacher=teacher, stop_after=1)
    with pytest.raises(ConfigError, match="already holds a training run"):
        distill(_student(tiny_tok), tiny_tok, text_file, tmp_path / "a", cfg, teacher=teacher)
    with pytest.raises(ConfigError, match="holds a different run.*config"):
        distill(_student(tiny_tok), tiny_tok, text_file, tmp_path / "a", _cfg(max_steps=2, loss=LossConfig("rkl")),
                teacher=teacher, resume=True)
    # --resume where no run was written yet (killed before its run.json) starts one
    res = distill(_student(tiny_tok), tiny_tok, text_file, tmp_path / "b", cfg, teacher=teacher, resume=True)
    assert res.resumed_from is None and res.steps == 2 and (tmp_path / "b" / "slmkit.json").is_file()


def test_train_distill_tokenizer_mismatch_is_clear(tiny_tok):
    other = tiny_tokenizer(vocab_size=300)
    check_same_tokenizer(tiny_tok, tiny_tokenizer())
    with pytest.raises(UnsupportedModelError, match="tokenizers differ.*384.*300"):
        check_same_tokenizer(tiny_tok, other)


def test_train_distill_data_errors_name_file_and_line(tiny_tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty.txt is empty"):
        load_examples(empty, tiny_tok)
    bad = tmp_path / "bad.jsonl"
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    bad.write_text(json.dumps(ok) + "\n\n{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:3: not valid JSON"):
        load_examples(bad, tiny_tok)
    noreply = tmp_path / "noreply.jsonl"
    noreply.write_text(json.dumps(ok) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="noreply.jsonl:2: no assistant message"):
        load_examples(noreply, tiny_tok)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match="wrong.jsonl:1: expected an object with 'messages'"):
        load_examples(wrong, tiny_tok)


def test_train_distill_chat_labels_only_assistant_tokens(tiny_tok, tmp_path):
    p = tmp_path / "chat.jsonl"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sees"},
            {"role": "assistant", "content": "the old book"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "a bright star"}]
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    (ex,), kind = load_examples(p, tiny_tok, DataConfig(block_size=200))
    assert kind == "chat"
    labelled = [t for t in ex["labels"] if t != IGNORE_INDEX]
    text = tiny_tok.decode(labelled)
    assert text == "the old book<|im_end|>\na bright star<|im_end|>\n"
    # the on-policy prompt ends with the last assistant header
    assert tiny_tok.decode(ex["input_ids"][: ex["prompt_len"]]).endswith("and?<|im_end|>\n<|im_start|>assistant\n")


def test_train_distill_on_policy_samples_mask_the_prompt(tiny_tok, teacher, text_file, tmp_path):
    from transformers import TrainingArguments

    cfg = _cfg(lmbda=1.0, max_new_tokens=5)
    tr = DistillTrainer(model=_student(tiny_tok), args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                        processing_class=tiny_tok, teacher=teacher, distill_config=cfg)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "prompt_len": torch.tensor([3, 4])}
    torch.manual_seed(0)
    out = tr._sample(tr.model, batch)
    for i, p in enumerate([3, 4]):
        assert out["input_ids"][i, :p].tolist() == ids[i, :p].tolist()
        assert (out["labels"][i, :p] == IGNORE_INDEX).all()
        n = int(out["attention_mask"][i].sum())
        assert 0 < n - p <= 5
        assert out["labels"][i, p:n].tolist() == out["input_ids"][i, p:n].tolist()
    # the coin is a function of (seed, step, micro-batch): a resumed run flips the same coins
    a = [tr._coin(), tr._coin()]
    tr.state.global_step = 1
    b = tr._coin()
    tr2 = DistillTrainer(model=tr.model, args=tr.args, processing_class=tiny_tok, teacher=teacher, distill_config=cfg)
    tr2.state.global_step = 1  # as after resuming at step 1
    assert tr2._coin() == b and a[0] != a[1]
