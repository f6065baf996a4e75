"""``accelerate launch --multi_gpu --num_processes 2 -m slmkit distill ...`` on a CPU: DDP over gloo, tiny random models.

Checked: the run exits 0 and writes one artefact (one manifest, one weights file, no leftovers), and it
equals a single-process run with the same global batch (2 processes x batch 2 against 1 process x
batch 2 x 2 accumulation steps, equal-length blocks): weights within 1e-5 absolute, training loss
within 1e-5 relative (the two differ only in float summation order of the gradient all-reduce).
The same for a 2-process run stopped after step 2 and resumed, and for `slmkit sft --lora` (TRL's
trainer; adapter weights within 1e-5). All in one launch: each costs ~15 s of start-up here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ACCELERATE = Path(sys.executable).with_name("accelerate")
pytestmark = pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's launcher not installed")


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory):
    from slmkit.models.tiny import save_tiny, tiny_llama_config, tiny_model, tiny_corpus

    model, tok = tiny_llama
    root = tmp_path_factory.mktemp("accel")
    student = save_tiny(model, tok, root / "student")
    teacher = save_tiny(tiny_model(tiny_llama_config(tok), seed=1), tok, root / "teacher")
    data = root / "data.txt"
    data.write_text("\n\n".join(tiny_corpus(120)) + "\n")
    return student, teacher, data


def _flags(student, teacher, data, output, batch: int, accum: int) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data), "--loss", "fkl",
            "--max-steps", "3", "--batch-size", str(batch), "--grad-accum", str(accum), "--block-size", "16",
            "--max-examples", "16", "--lr", "1e-3", "--save-steps", "2", "--seed", "0", "--output", str(output), "--json"]


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_two_gloo_processes_write_one_artefact_equal_to_one_process(models, tmp_path):
    from slmkit.cli import main

    student, teacher, data = models
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", SLMKIT_PROGRESS="0",
               PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    two, resumed = tmp_path / "two", tmp_path / "resumed"
    script = tmp_path / "both.py"  # one launch (each costs ~15 s here): the CLI run, then a stopped and resumed library run
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": f"Where is the cat {i}?", "completion": f"{i} steps away."}) + "\n"
                                for i in range(8)))
    sft_two = tmp_path / "sft-two"
    script.write_text(RESUMED.format(student=student, teacher=teacher, data=data, output=resumed,
                                     sft=_sft_flags(student, sft_data, sft_two, batch=1, accum=1)))
    # accelerate 1.x: `--cpu` starts N processes only through MPI (--mpirun_hostfile); its torchrun launcher
    # (--multi_gpu) starts them on one machine, and slmkit trains on the CPU (gloo) since the models load there
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(script), *_flags(student, teacher, data, two, batch=2, accum=1)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(b) for b in _json_objects(proc.stdout)]
    assert len(reports) == 4 and all(r["steps"] == (3 if "loss" in r else 2) for r in reports)  # each process reports
    assert proc.stdout.count("RESUMED 2 -> 3") == 2, proc.stdout + proc.stderr[-6000:]

    one = tmp_path / "one"
    assert main(_flags(student, teacher, data, one, batch=2, accum=2)) == 0

    names = sorted(p.name for p in two.iterdir())
    assert names == sorted(p.name for p in one.iterdir())
    assert names.count("slmkit.json") == 1 and names.count("model.safetensors") == 1
    assert not [p for p in two.rglob("*") if p.name.startswith((".tmp-", ".old-")) or p.suffix == ".tmp"]
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    moved = max((a[k] - _weights(student)[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # training changed the weights, so equal weights mean equal training
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    c = _weights(resumed)  # stopped after step 2 (checkpoint), resumed to step 3: the same weights
    assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-5
    la = json.loads((one / "slmkit.json").read_text())["metrics"]["train_loss"]
    lb = json.loads((two / "slmkit.json").read_text())["metrics"]["train_loss"]
    assert lb == pytest.approx(la, rel=1e-5)

    sft_one = tmp_path / "sft-one"  # SFT (TRL's trainer, LoRA): one adapter, equal to one process's
    assert main(_sft_flags(student, sft_data, sft_one, batch=1, accum=2)) == 0
    assert sorted(p.name for p in sft_two.iterdir()) == sorted(p.name for p in sft_one.iterdir())
    assert not (tmp_path / "sft-two.checkpoints").exists()
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (sft_one, sft_two))
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # B starts at 0: it was trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    shutil.rmtree(tmp_path)


def _sft_flags(student, data, output, batch: int, accum: int) -> list[str]:
    return ["sft", str(student), "--data", str(data), "--lora", "--max-steps", "2", "--batch-size", str(batch),
            "--grad-accum", str(accum), "--no-packing", "--lr", "1e-2", "--output", str(output), "--json"]


RESUMED = """
import sys
from pathlib import Path

from slmkit.cli import main
from slmkit.models import load
from slmkit.train.data import DataConfig
from slmkit.train.distill import DistillConfig, distill
from slmkit.train.losses import LossConfig

if main(sys.argv[1:]) != 0:
    sys.exit(1)
cfg = DistillConfig(loss=LossConfig(loss="fkl"), data=DataConfig(block_size=16, max_examples=16), max_steps=3, batch_size=2,
                    learning_rate=1e-3, save_steps=2, seed=0, logging_steps=1)
(s, tok), (t, _) = load("{student}"), load("{teacher}")
part = distill(s, tok, "{data}", "{output}", cfg, teacher=t, stop_after=2)
(s, tok) = load("{student}")
done = distill(s, tok, "{data}", "{output}", cfg, teacher=t, resume=True)
sys.stdout.write(f"RESUMED {{part.steps}} -> {{done.steps}}\\n")  # one write: the launcher runs both processes unbuffered
sys.stdout.flush()
sys.exit(main({sft}))
"""


def _json_objects(text: str) -> list[str]:
    """The top-level JSON objects printed one after another (one per process)."""
    out, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                out.append(text[start : i + 1])
    return out
