"""CLI contract: JSON names, exit codes, one-line errors without tracebacks."""

import json
import subprocess
import sys

import pytest

from slmkit.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json(capsys, tiny_dir):
    code, out, _ = run(capsys, "info", str(tiny_dir), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["parameters"] > 0 and data["kv_heads"] == 2 and data["tied_embeddings"] is True


def test_eval_json(capsys, tiny_dir, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The cat sees the house. A dog likes green apples. " * 20)
    code, out, _ = run(capsys, "eval", str(tiny_dir), "--perplexity", str(f), "--context", "32", "--efficiency", "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("perplexity", "decode_tokens_per_s", "prefill_tokens_per_s"):
        assert data[key] > 0


def test_generate_json(capsys, tiny_dir):
    code, out, _ = run(capsys, "generate", str(tiny_dir), "The cat", "--max-new-tokens", "4", "--raw", "--json")
    assert code == 0 and json.loads(out)["tokens"] == 4


@pytest.mark.parametrize(
    "args,needle",
    [
        (["info", "/no/such/model"], "no such file"),
        (["eval", "TINY", "--perplexity", "EMPTY"], "empty"),
        (["eval", "TINY"], "nothing to evaluate"),
        (["info", "TEXT"], "not a model"),
        (["info", "CUT"], "truncated"),
        (["generate", "TINY", "x", "--dtype", "int3"], "dtype"),
        (["eval", "TINY", "--perplexity", "EMPTY", "--stride", "9999"], "stride"),
    ],
)
def test_bad_input_exit_2(capsys, tmp_path, tiny_dir, tiny_gguf, args, needle):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes.txt").write_text("hello")
    data = tiny_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    subst = {"TINY": str(tiny_dir), "EMPTY": str(tmp_path / "empty.txt"), "TEXT": str(tmp_path / "notes.txt"), "CUT": str(tmp_path / "cut.gguf")}
    code, out, err = run(capsys, *[subst.get(a, a) for a in args])
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_unknown_hub_id_offline_subprocess(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "slmkit", "info", "nobody/missing-model"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "not in the local Hugging Face cache" in r.stderr and "Traceback" not in r.stderr


def test_usage_error_exit_2(capsys):
    code, _, err = run(capsys, "generate")
    assert code == 2 and "Missing argument" in err
