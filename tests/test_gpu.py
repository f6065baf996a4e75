"""On a CUDA GPU: loading, generation, compression and training with --device cuda (tiny random models).

Skips without CUDA. Run it on a GPU machine: ``.venv/bin/pytest -q tests/test_gpu.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here (torch %s, CUDA build: %s): tests/test_gpu.py runs only on a machine with an NVIDIA GPU "
           "and torch's CUDA build" % (torch.__version__, torch.version.cuda is not None),
)

from slmkit.cli import main  # noqa: E402


def test_gpu_load_defaults_to_bf16_and_generates_like_the_cpu(tiny_dir):
    from slmkit.backends import GenParams, from_spec
    from slmkit.models import load
    from slmkit.models.device import default_dtype, resolve_device

    dev = resolve_device("auto")
    assert dev.type == "cuda"
    model, _ = load(str(tiny_dir), dtype=default_dtype(dev), device="auto")
    p = next(model.parameters())
    assert p.device.type == "cuda" and p.dtype in (torch.bfloat16, torch.float16)
    params = GenParams(max_new_tokens=8)
    gpu = from_spec(str(tiny_dir), dtype="fp32", device="cuda").generate(["The cat sees"], params)[0]
    cpu = from_spec(str(tiny_dir), dtype="fp32", device="cpu").generate(["The cat sees"], params)[0]
    assert gpu.text == cpu.text  # fp32 greedy on a tiny model: same tokens


def test_gpu_logits_match_the_cpu(tiny_dir):
    from slmkit.models import load

    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    cpu, _ = load(str(tiny_dir), dtype="fp32", device="cpu")
    gpu, _ = load(str(tiny_dir), dtype="fp32", device="cuda")
    with torch.no_grad():
        a = cpu(ids).logits
        b = gpu(ids.cuda()).logits.cpu()
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_gpu_quantize_saves_a_loadable_model(method, tiny_dir, tmp_path):
    from slmkit.models import load

    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sees the house by the river. " * 200)
    out = tmp_path / method
    flags = ["--calib", str(calib), "--calib-samples", "4", "--calib-len", "32"] if method == "gptq" else []
    assert main(["quantize", str(tiny_dir), "--method", method, "--bits", "4", "--group-size", "32", *flags,
                 "--device", "cuda", "--output", str(out)]) == 0
    model, _ = load(str(out))
    assert next(model.parameters()).device.type == "cpu"


def test_gpu_prune_wanda(tiny_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sees the house by the river. " * 200)
    assert main(["prune", str(tiny_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib),
                 "--calib-samples", "4", "--calib-len", "32", "--device", "cuda", "--output", str(tmp_path / "p"), "--json"]) == 0


def _chats(path, n=8):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                     {"role": "assistant", "content": f"answer number {i}"}]}) + "\n"
                            for i in range(n)))
    return path


def test_gpu_sft_trains_on_cuda(tiny_dir, tmp_path, capsys):
    data = _chats(tmp_path / "chat.jsonl")
    assert main(["sft", str(tiny_dir), "--data", str(data), "--max-steps", "3", "--batch-size", "2", "--max-length", "32",
                 "--save-steps", "0", "--device", "cuda", "--output", str(tmp_path / "s"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 3 and out["train_loss"] == out["train_loss"]  # finite


def test_gpu_distill_trains_on_cuda(tiny_dir, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("the cat sees the house by the river.\n" * 50)
    assert main(["distill", "--teacher", str(tiny_dir), "--student", str(tiny_dir), "--data", str(data), "--loss", "fkl",
                 "--max-steps", "3", "--batch-size", "2", "--block-size", "32", "--device", "cuda",
                 "--output", str(tmp_path / "d"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 3


def test_gpu_pretrain_bf16_on_cuda(tiny_dir, tmp_path, capsys):
    from slmkit.models.tiny import tiny_corpus

    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(tiny_corpus(200)) + "\n")
    assert main(["pretrain", "--data", str(data), "--tokenizer", str(tiny_dir), "--layers", "4", "--hidden", "64",
                 "--heads", "4", "--kv-heads", "2", "--share-blocks", "2", "--block-size", "32", "--max-steps", "20",
                 "--batch-size", "4", "--save-steps", "10", "--device", "cuda", "--output", str(tmp_path / "p"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"].startswith("cuda") and out["bf16"] is torch.cuda.is_bf16_supported()  # auto: bf16 autocast
    assert out["steps"] == 20 and out["last_logged_loss"] < out["first_logged_loss"]
    assert main(["generate", str(tmp_path / "p"), "the cat", "--max-new-tokens", "4", "--device", "cuda"]) == 0
