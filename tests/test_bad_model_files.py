"""Bad model files exit 2 with at most two lines naming the file (issue 17).

Table-driven: :mod:`badmodels` makes 60 malformed models from the tiny one (25 GGUF files with a
damaged header, key/value, tensor info or cut short; 19 safetensors files with a bogus header
length, non-JSON or non-object header, unknown dtype, shape/offsets that disagree with the data,
no tensors, a shape wrong for the model; 16 config.json files: not JSON, not UTF-8, deep nesting,
unknown architecture, sizes of the wrong type, negative, inconsistent or absurd: 10^12 vocab,
10^8 layers). Each runs against every command that reads a model, in process through the CLI's
``main``; a few run as real processes too, where transformers' own stderr output would show.
Also: calibration jsonl nested past the recursion limit, and the trust data sets' gzip reader.
"""

from __future__ import annotations

import gzip
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import badmodels
from slmkit.cli import main

WEIGHTS_ONLY = {"st_wrong_shape_for_model"}  # consistent files that only a weight load can find wrong


@pytest.fixture(scope="module")
def cases(tiny_llama, tmp_path_factory):
    from slmkit.export.gguf import export_gguf
    from slmkit.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("badmodels")
    model, tok = tiny_llama
    good = save_tiny(model, tok, root / "good")
    gguf_file = export_gguf(model, tok, root / "good.gguf", "Q8_0")
    (root / "text.txt").write_text("the cat sat on the mat. " * 200)
    return root, badmodels.make_all(good, gguf_file, root / "cases")


COMMANDS = {  # {M}: the bad model, {T}: a text file, {O}: an output path
    "info": ["info", "{M}"],
    "generate": ["generate", "{M}", "hi", "--max-new-tokens", "2"],
    "eval": ["eval", "{M}", "--perplexity", "{T}", "--max-tokens", "64"],
    "quantize": ["quantize", "{M}", "--method", "rtn", "--bits", "4", "--output", "{O}"],
    "export": ["export", "{M}", "--format", "gguf", "--type", "F32", "--output", "{O}.gguf"],
    "prune": ["prune", "{M}", "--method", "magnitude", "--sparsity", "0.5", "--output", "{O}"],
    "lowrank": ["lowrank", "{M}", "--ratio", "0.5", "--calib", "{T}", "--output", "{O}"],
    "fit": ["fit", "{M}", "--memory", "4GB"],
    "speculate": ["speculate", "--draft", "lookup", "--target", "{M}", "hello", "--max-new-tokens", "2"],
    "serve": ["serve", "{M}", "--port", "1"],  # startup: the model is refused before anything listens
}


def test_at_least_50_malformed_models(cases):
    _, made = cases
    kinds = {n.split("_")[0] for n in made}
    assert len(made) >= 50 and kinds == {"gguf", "st", "cfg"}, sorted(made)


def _run(capsys, args: list[str], needle: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main(args)
    _, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "it/s]" not in ln]  # transformers' progress bars aside
    assert code == 2, (args, err)
    assert 1 <= len(lines) <= 2 and "Traceback" not in err and "internal error" not in err, err
    assert needle in err, err
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB: no allocation for a bogus size
    assert grown < 512 * 1024, f"peak RSS grew by {grown >> 10} MB"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_malformed_model_exits_2_on_every_command(capsys, cases, tmp_path, monkeypatch, command):
    from slmkit.runtime import servecore

    monkeypatch.setattr(servecore, "run", lambda *a, **k: pytest.fail("serve started on a malformed model"))
    root, made = cases
    failures = []
    for name, path in made.items():
        if command in ("info", "fit") and name in WEIGHTS_ONLY:
            continue
        args = [a.replace("{M}", str(path)).replace("{T}", str(root / "text.txt")).replace("{O}", str(tmp_path / f"out-{name}"))
                for a in COMMANDS[command]]
        try:
            _run(capsys, args, str(path))
        except AssertionError as err:
            failures.append(f"{name}: {str(err)[:300]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", ["gguf_tensor_count_huge", "st_header_len_huge", "st_wrong_shape_for_model", "cfg_layers_huge"])
def test_real_process_stderr_is_at_most_two_lines(cases, name):
    """As a user sees it: nothing that transformers or logging would print beyond the error."""
    _, made = cases
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "slmkit", "generate", str(made[name]), "hi", "--max-new-tokens", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and 1 <= len(lines) <= 2 and str(made[name]) in r.stderr, r.stderr


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("data,needle", [
    ('{"text": ' + DEEP + "}\n", ":1: JSON nested too deeply"),
    ('{"text": 1' + "0" * 5000 + "}\n", ":1: not valid JSON"),
    ('{"text": "ok"}\n{"text": NaN, \n', ":2: not valid JSON"),
])
def test_bad_calibration_jsonl_exits_2(capsys, tiny_dir, tmp_path, data, needle):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(data)
    for cmd in (["quantize", str(tiny_dir), "--method", "gptq", "--bits", "4"], ["prune", str(tiny_dir), "--method", "wanda", "--sparsity", "0.5"],
                ["lowrank", str(tiny_dir), "--ratio", "0.5"]):
        _run(capsys, [*cmd, "--calib", str(calib), "--output", str(tmp_path / "out")], f"{calib}{needle}")


def _bad_gzips() -> dict[str, bytes]:
    good = gzip.compress(b'{"prompt": {"text": "hello"}}\n' * 100)
    return {"not_gzip": b"plain text, not gzip\n", "cut": good[: len(good) // 2], "flipped": good[:20] + bytes([good[20] ^ 0xFF]) + good[21:],
            "not_utf8": gzip.compress(b'{"prompt": "\xff\xfe"}\n')}


@pytest.mark.parametrize("kind", list(_bad_gzips()))
@pytest.mark.parametrize("reader,rel", [
    ("toxicity", "decodingtrust/toxicity_toxic_prompts.jsonl.gz"),
    ("stereotype", "decodingtrust/stereotype_user_prompts.csv.gz"),
    ("ood", "decodingtrust/ood_knowledge.json.gz"),
    ("hate", "hate-speech/labeled_data.csv.gz"),
])
def test_trust_data_sets_with_a_corrupt_gzip_raise_data_error(tmp_path, kind, reader, rel):
    from slmkit.errors import DataError
    from slmkit.trust import datasets as D

    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(_bad_gzips()[kind])
    call = {"toxicity": lambda: D.toxicity_prompts("toxic", tmp_path), "stereotype": lambda: D.stereotype_prompts(tmp_path),
            "ood": lambda: D.ood_knowledge(tmp_path), "hate": lambda: D.hate_speech(tmp_path)}[reader]
    with pytest.raises(DataError) as info:
        call()
    msg = str(info.value)
    assert str(path) in msg and len(msg.splitlines()) <= 2, msg
