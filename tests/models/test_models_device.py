"""--device auto|cpu|cuda|cuda:N: resolution, the dtype that follows it, and exit 2 naming the flag
when the device is not there (the GPU runs themselves are in tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from slmkit.cli import main
from slmkit.errors import ConfigError
from slmkit.models.device import resolve_device, resolve_dtype, training_device_check

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")


def test_not_a_device():
    with pytest.raises(ConfigError, match=r"--device tpu: not a device") as e:
        resolve_device("tpu")
    assert "auto | cpu | cuda | cuda:N" in str(e.value)
    with pytest.raises(ConfigError, match="cuda:x"):
        resolve_device("cuda:x")


@no_cuda
def test_cuda_without_cuda_names_the_flag():
    for spec in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(ConfigError, match=rf"--device {spec}: CUDA is not available here"):
            resolve_device(spec)


def test_dtype_follows_the_device():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == "fp32" and resolve_dtype("bf16", cpu) == "bf16"
    assert resolve_dtype("auto", cpu) == "auto"  # the CPU's own rule (bf16 where the CPU has it), in parse_dtype
    if torch.cuda.is_available():
        gpu = torch.device("cuda", 0)
        assert resolve_dtype(None, gpu) in ("bf16", "fp16") and resolve_dtype("fp32", gpu) == "fp32"


def test_training_on_another_gpu_says_how():
    training_device_check(torch.device("cpu"))
    training_device_check(torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=1"):
        training_device_check(torch.device("cuda", 1))


@no_cuda
@pytest.mark.parametrize("verb", [
    ["prune", "{tiny}", "--method", "magnitude", "--output", "{tmp}/p"],
    ["quantize", "{tiny}", "--method", "rtn", "--bits", "4", "--output", "{tmp}/q"],
    ["lowrank", "{tiny}", "--ratio", "0.5", "--output", "{tmp}/l"],
    ["sft", "{tiny}", "--data", "{tmp}/d.jsonl", "--output", "{tmp}/s"],
    ["dpo", "{tiny}", "--data", "{tmp}/d.jsonl", "--output", "{tmp}/o"],
    ["distill", "--student", "{tiny}", "--data", "{tmp}/d.txt", "--loss", "ce", "--output", "{tmp}/x"],
    ["gen-data", "{tiny}", "--prompts", "{tmp}/d.txt", "--output", "{tmp}/g.jsonl"],
    ["audit", "{tiny}", "--limit", "1"],
])
def test_verbs_exit_2_on_cuda_without_cuda(verb, tiny_dir, tmp_path, capsys):
    (tmp_path / "d.txt").write_text("hello world\n")
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    args = [a.format(tiny=tiny_dir, tmp=tmp_path) for a in verb]
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available here" in err and "Traceback" not in err


def test_generate_and_eval_take_device(tiny_dir, tmp_path, capsys):
    import json

    assert main(["generate", str(tiny_dir), "hi", "--max-new-tokens", "2", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] >= 1
    text = tmp_path / "t.txt"
    text.write_text("the cat sees the house by the river. " * 20)
    assert main(["eval", str(tiny_dir), "--perplexity", str(text), "--context", "32", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cpu" and out["dtype"] == "fp32"


def test_fast_path_refuses_a_gpu_device(tiny_dir, capsys):
    assert main(["generate", str(tiny_dir), "hi", "--fast", "--device", "tpu"]) == 2
    assert "--device tpu: not a device" in capsys.readouterr().err


@no_cuda
def test_generate_exits_2_on_cuda_without_cuda(tiny_dir, capsys):
    assert main(["generate", str(tiny_dir), "hi", "--device", "cuda:0"]) == 2
    assert "--device cuda:0: CUDA is not available here" in capsys.readouterr().err


@no_cuda
@pytest.mark.parametrize("verb", [["judge", "--data", "{tmp}/qa.jsonl", "--model", "{tiny}"],
                                  ["route", "--small", "{tiny}", "--large", "{tiny}", "--data", "{tmp}/qa.jsonl"]])
def test_collab_verbs_exit_2_on_cuda_without_cuda(verb, tiny_dir, tmp_path, capsys):
    (tmp_path / "qa.jsonl").write_text('{"question": "q?", "answer": "a", "label": 0}\n')
    assert main([*(a.format(tiny=tiny_dir, tmp=tmp_path) for a in verb), "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available here" in capsys.readouterr().err
