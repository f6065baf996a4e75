"""``slmkit pretrain``: a fresh student trained on a streamed, packed corpus; resume; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slmkit.errors import ConfigError, DataError
from slmkit.models.student import StudentConfig
from slmkit.models.tiny import tiny_corpus
from slmkit.train.pretrain import PretrainConfig, pretrain
from slmkit.train.stream import PackedTextStream, check_corpus, corpus_files, token_pass

ARCH = StudentConfig(layers=4, hidden=32, heads=4, kv_heads=2, intermediate=64, share=2, max_positions=64)


def _cfg(**kw) -> PretrainConfig:
    base = dict(student=ARCH, block_size=16, max_steps=8, batch_size=4, learning_rate=5e-3, save_steps=4,
                logging_steps=2, lr_scheduler="constant", weight_decay=0.0)
    return PretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("\n".join(tiny_corpus(200)) + "\n")
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(50, seed=3)))
    (root / "held.txt").write_text("\n".join(tiny_corpus(30, seed=7)) + "\n")
    return root


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_train_pretrain_stream_packs_documents_into_blocks(tiny_tok, corpus):
    files = corpus_files([corpus / "a.txt", corpus / "b.jsonl"])
    stream = list(token_pass(files, tiny_tok))
    eos = tiny_tok.eos_token_id
    assert stream.count(eos) == 1 + 50  # one text file + one per jsonl row
    assert stream[:5] == tiny_tok(tiny_corpus(200)[0], add_special_tokens=False).input_ids[:5]
    it = iter(PackedTextStream(files, tiny_tok, 16))
    n = len(stream) // 16 + 3  # past the end of one pass: the stream runs on into the next
    blocks = [next(it) for _ in range(n)]
    flat = torch.cat([b["input_ids"] for b in blocks]).tolist()
    assert all(b["input_ids"].shape == (16,) and torch.equal(b["input_ids"], b["labels"]) for b in blocks)
    assert flat == (stream + stream)[: 16 * n]  # contiguous, nothing dropped at a pass boundary
    assert corpus_files([corpus]) == sorted(corpus.glob("*.*"))  # a directory: its corpus files by name


def test_train_pretrain_learns_and_writes_a_loadable_model(tiny_tok, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from slmkit.artefact import Manifest
    from slmkit.models import load

    held = (corpus / "held.txt").read_text()
    res = pretrain(tiny_tok, [corpus / "a.txt"], tmp_path / "out", _cfg(max_steps=12), eval_text=held)
    assert res.steps == 12 and res.tokens == 12 * 4 * 16
    assert res.last_loss < res.first_loss - 0.5
    assert res.heldout["after"]["perplexity"] < 0.5 * res.heldout["before"]["perplexity"]
    out = tmp_path / "out"
    assert not (tmp_path / "out.checkpoints").exists()  # removed once the model is written
    man = Manifest.read(out)
    assert man.stages[0]["stage"] == "pretrain" and man.stages[0]["sharing"]["share"] == 2
    assert man.metrics["heldout_perplexity_after"] == res.heldout["after"]["perplexity"]
    assert not (out / "chat_template.jinja").exists() and tiny_tok.chat_template  # the caller's tokenizer keeps its own
    ids = torch.tensor([tiny_tok("the cat sees a dog").input_ids])
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # every block stored: plain transformers loads it
    ours, _ = load(str(out))
    assert ours.model.layers[1].mlp.up_proj.weight is ours.model.layers[0].mlp.up_proj.weight  # re-tied
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ours(ids).logits, atol=1e-6)


def test_train_pretrain_resume_equals_uninterrupted(tiny_tok, corpus, tmp_path):
    data = [corpus / "a.txt", corpus / "b.jsonl"]
    whole = pretrain(tiny_tok, data, tmp_path / "whole", _cfg())
    part = pretrain(tiny_tok, data, tmp_path / "split", _cfg(), stop_after=4)  # "killed" after step 4
    assert part.steps == 4 and not (tmp_path / "split").exists()
    with pytest.raises(ConfigError, match="already holds a training run"):
        pretrain(tiny_tok, data, tmp_path / "split", _cfg())  # without --resume: refused, checkpoints kept
    with pytest.raises(ConfigError, match="different run"):
        pretrain(tiny_tok, data, tmp_path / "split", _cfg(learning_rate=1e-3), resume=True)
    res = pretrain(tiny_tok, data, tmp_path / "split", _cfg(), resume=True)
    assert res.resumed_from.endswith("checkpoint-4") and res.steps == 8
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:  # same data order (the stream skips the trained batches), RNG and optimizer state: bit for bit
        assert torch.equal(a[k], b[k]), k
    assert res.train_loss == pytest.approx(whole.train_loss, rel=1e-6)


def test_train_pretrain_corpus_errors(tiny_tok, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    (tmp_path / "short.txt").write_text("the cat\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="missing.txt: no such file"):
        corpus_files([tmp_path / "missing.txt"])
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        corpus_files([tmp_path / "empty.txt"])
    with pytest.raises(DataError, match="holds no corpus files"):
        corpus_files([tmp_path / "sub"])
    with pytest.raises(DataError, match="holds no text"):
        check_corpus(corpus_files([tmp_path / "blank.txt"]), tiny_tok, 16)
    with pytest.raises(DataError, match="fewer than one block of 16"):
        check_corpus(corpus_files([tmp_path / "short.txt"]), tiny_tok, 16)
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string 'text'"):
        check_corpus(corpus_files([tmp_path / "bad.jsonl"]), tiny_tok, 16)
    with pytest.raises(ConfigError, match="block_size must be in"):
        _cfg(block_size=128)  # longer than the student's max_positions
    with pytest.raises(ConfigError, match="unknown lr_scheduler"):
        _cfg(lr_scheduler="zigzag")


def _cli(args, capsys):
    from slmkit.cli import main

    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_pretrain_cli_runs_and_generates(tiny_dir, corpus, tmp_path, capsys):
    flags = ["pretrain", "--data", str(corpus / "a.txt"), "--tokenizer", str(tiny_dir), "--preset", "tiny-deep",
             "--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--intermediate", "64",
             "--block-size", "16", "--max-steps", "4", "--batch-size", "2", "--save-steps", "2", "--device", "cpu",
             "--eval-data", str(corpus / "held.txt"), "--eval-tokens", "64", "--output", str(tmp_path / "m"), "--json"]
    code, out, err = _cli(flags, capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["steps"] == 4 and rep["tokens"] == 4 * 2 * 16 and rep["bf16"] is False
    assert rep["heldout_perplexity_after"] < rep["heldout_perplexity_before"]
    code, out, err = _cli(["generate", str(tmp_path / "m"), "the cat", "--max-new-tokens", "4", "--seed", "0"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("extra, needle", [
    (["--data", "MISSING"], "--data MISSING: no such file"),
    (["--data", "EMPTY"], "EMPTY: the file is empty"),
    (["--data", "OK", "--hidden", "100", "--heads", "3"], "hidden 100 is not divisible by heads 3"),
    (["--data", "OK", "--layers", "5", "--share-blocks", "2"], "--share-blocks"),
    (["--data", "OK", "--preset", "huge"], "--preset huge: unknown"),
    (["--data", "OK", "--precision", "fp8"], "--precision fp8"),
    (["--data", "OK", "--device", "tpu"], "--device tpu"),
    (["--data", "OK", "--block-size", "100000"], "fewer than one block of 100000"),
    (["--data", "OK", "--tokenizer", "NOWHERE"], "--tokenizer NOWHERE: "),
    (["--data", "OK", "--eval-data", "OK", "--eval-tokens", "1"], "--eval-tokens"),
])
def test_train_pretrain_cli_bad_input_exits_2(tiny_dir, corpus, tmp_path, capsys, extra, needle):
    (tmp_path / "empty.txt").write_text("")
    subst = {"MISSING": str(tmp_path / "missing.txt"), "EMPTY": str(tmp_path / "empty.txt"),
             "OK": str(corpus / "a.txt"), "NOWHERE": str(tmp_path / "nowhere")}
    for k, v in subst.items():
        needle = needle.replace(k, v)
    args = ["pretrain", "--tokenizer", str(tiny_dir), "--output", str(tmp_path / "o")] + [subst.get(a, a) for a in extra]
    code, _, err = _cli(args, capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_train_pretrain_streams_real_text(shared_file, tiny_tok):
    """WikiText-2 streams through the packer without being read whole (a few blocks only)."""
    files = corpus_files([shared_file("wikitext-2/test.txt")])
    it = iter(PackedTextStream(files, tiny_tok, 64))
    blocks = [next(it) for _ in range(4)]
    assert all(b["input_ids"].shape == (64,) for b in blocks)


def test_train_pretrain_two_gloo_processes_equal_one(tiny_dir, corpus, tmp_path):
    """``accelerate launch --num_processes 2 -m slmkit pretrain`` (DDP over gloo, shared blocks): one artefact, equal
    to one process with the same global batch (2 x batch 2 against batch 2 x 2 accumulation steps): the main
    process reads the stream and hands each process its batch, so both runs see the same blocks in the same
    order; weights within 1e-5 (they differ only in the float order of the gradient all-reduce)."""
    import os
    import subprocess
    import sys

    from slmkit.cli import main

    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("accelerate's launcher not installed")
    flags = ["pretrain", "--data", str(corpus / "a.txt"), "--tokenizer", str(tiny_dir), "--layers", "4", "--hidden", "32",
             "--heads", "4", "--kv-heads", "2", "--intermediate", "64", "--share-blocks", "2", "--block-size", "16",
             "--max-steps", "3", "--save-steps", "2", "--lr", "5e-3", "--device", "cpu", "--json", "--batch-size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", SLMKIT_PROGRESS="0",
               PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "slmkit", *flags, "--output", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(flags + ["--grad-accum", "2", "--output", str(tmp_path / "one")]) == 0
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names.count("model.safetensors") == 1 and not (tmp_path / "two.checkpoints").exists()
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_train_pretrain_cli_progress_and_foreign_output(tiny_dir, corpus, tmp_path, capsys, monkeypatch):
    flags = ["pretrain", "--data", str(corpus / "a.txt"), "--tokenizer", str(tiny_dir), "--layers", "2", "--hidden", "32",
             "--heads", "4", "--kv-heads", "2", "--intermediate", "64", "--block-size", "16", "--max-steps", "2",
             "--batch-size", "2", "--device", "cpu"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    code, _, err = _cli(flags + ["--output", str(foreign)], capsys)
    assert code == 2 and "--force" in err and "Traceback" not in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and not (tmp_path / "foreign.checkpoints").exists()
    monkeypatch.setenv("SLMKIT_PROGRESS", "1")
    code, _, err = _cli(flags + ["--output", str(tmp_path / "p")], capsys)
    assert code == 0, err
    assert "pretrain: training steps" in err and "2/2" in err
