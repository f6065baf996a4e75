"""`slmkit prune` / `slmkit lowrank`: artefacts with manifests, JSON output, bad input = exit 2 and nothing on disk."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.artefact import Manifest
from slmkit.cli import main
from slmkit.compress.lowrank import LowRankLinear
from slmkit.models.tiny import tiny_corpus


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("\n".join(tiny_corpus(300, seed=5)))
    return p


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _calib(calib_file):
    return ["--calib", calib_file, "--calib-samples", "4", "--calib-len", "32"]


def test_prune_wanda_writes_a_sparse_artefact(capsys, tiny_dir, calib_file, tmp_path):
    from slmkit.models import load

    dest = tmp_path / "wanda"
    code, out, err = run(capsys, "prune", tiny_dir, "--method", "wanda", "--pattern", "2:4", *_calib(calib_file),
                         "--output", dest, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["sparsity"] == pytest.approx(0.5) and data["calibration_tokens"] == 128
    assert data["parameters"] == data["parameters_before"] and data["bytes"] > 0
    man = Manifest.read(dest)
    assert man.source == str(tiny_dir) and man.stages[-1]["stage"] == "prune"
    assert man.stages[-1]["config"]["pattern"] == "2:4" and man.stages[-1]["calibration"]["n_samples"] == 4
    m, _ = load(str(dest))
    w = m.model.layers[1].mlp.down_proj.weight
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()


def test_prune_magnitude_self_calibration_free_and_sparsegpt_self_calibrated(capsys, tiny_dir, tmp_path):
    code, out, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--sparsity", "0.3", "--output",
                         tmp_path / "mag", "--json")
    assert code == 0, err and json.loads(out)["calibration_tokens"] == 0
    assert json.loads(out)["sparsity"] == pytest.approx(0.3, abs=0.01)
    code, out, err = run(capsys, "prune", tiny_dir, "--method", "sparsegpt", "--calib-samples", "2", "--calib-len", "16",
                         "--output", tmp_path / "sgpt", "--json")
    assert code == 0, err
    assert json.loads(out)["calibration_tokens"] == 32 and json.loads(out)["sparsity"] == pytest.approx(0.5)


def test_prune_depth_and_width_shrink_the_model(capsys, tiny_dir, calib_file, tmp_path):
    from slmkit.models import load

    code, out, err = run(capsys, "prune", tiny_dir, "--method", "depth", "--keep-layers", "1", *_calib(calib_file),
                         "--output", tmp_path / "d", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert (d["layers_before"], d["layers"]) == (2, 1) and d["parameters"] < d["parameters_before"]
    assert load(str(tmp_path / "d"))[0].config.num_hidden_layers == 1
    code, out, err = run(capsys, "prune", tmp_path / "d", "--method", "width", "--ratio", "0.8", *_calib(calib_file),
                         "--output", tmp_path / "dw", "--json")
    assert code == 0, err
    w = json.loads(out)
    assert w["parameter_ratio"] == pytest.approx(0.8, abs=0.06) and w["intermediate_size"] < 128
    assert w["kv_heads"] == 1  # one of the two KV groups went
    code, out, err = run(capsys, "prune", tiny_dir, "--method", "width", "--ratio", "0.8", "--no-heads",
                         *_calib(calib_file), "--output", tmp_path / "w-mlp", "--json")
    assert code == 0, err
    assert json.loads(out)["kv_heads"] == 2 and json.loads(out)["intermediate_size"] < 128
    stages = [s["stage"] for s in Manifest.read(tmp_path / "dw").stages]
    assert stages == ["prune", "prune"]  # the depth stage carried over from the input artefact


def test_lowrank_verb(capsys, tiny_dir, calib_file, tmp_path):
    from slmkit.models import load

    dest = tmp_path / "lr"
    code, out, err = run(capsys, "lowrank", tiny_dir, "--ratio", "0.8", "--option", "batch_size=4", *_calib(calib_file),
                         "--output", dest, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["method"] == "whiten" and 0.75 < data["parameter_ratio"] <= 0.8 and data["factorised_layers"] == 14
    dense_bytes = sum(f.stat().st_size for f in tiny_dir.glob("*.safetensors"))
    assert data["bytes"] < 0.85 * dense_bytes
    m, tok = load(str(dest))
    assert isinstance(m.model.layers[0].mlp.up_proj, LowRankLinear)
    assert Manifest.read(dest).stages[-1]["stage"] == "lowrank"
    assert Manifest.read(dest).stages[-1]["config"]["batch_size"] == 4  # --option reaches LowRankConfig
    ids = tok("The cat sees the house", return_tensors="pt").input_ids
    assert torch.isfinite(m(ids).logits).all()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["prune", "TINY", "--method", "wanda", "--sparsity", "1.5"], "sparsity must be in (0, 1)"),
        (["prune", "TINY", "--method", "magnitude", "--sparsity", "0"], "sparsity must be in (0, 1)"),
        (["prune", "TINY", "--method", "sparsegpt", "--pattern", "4:2"], "impossible N:M"),
        (["prune", "TINY", "--method", "magnitude", "--pattern", "2:3"], "divisible by 3"),
        (["prune", "TINY", "--method", "wanda", "--calib", "SHORT", "--calib-samples", "8", "--calib-len", "256"], "needs 2,048"),
        (["prune", "TINY", "--method", "wanda", "--calib", "MISSING"], "does not exist"),
        (["prune", "GPT2", "--method", "magnitude"], "llama-like"),
        (["lowrank", "GPT2", "--ratio", "0.8", "--method", "plain"], "llama-like"),
        (["prune", "TINY", "--method", "magnitude", "--keep-layers", "1"], "--keep-layers does not apply"),
        (["prune", "TINY", "--method", "wanda", "--no-heads"], "--heads/--no-heads does not apply"),
        (["prune", "TINY", "--method", "depth"], "needs --keep-layers"),
        (["prune", "TINY", "--method", "depth", "--keep-layers", "2", "--calib", "CALIB", "--calib-samples", "4", "--calib-len", "32"], "below the model's 2"),
        (["prune", "TINY", "--method", "width", "--ratio", "1.0"], "in (0, 1)"),
        (["prune", "TINY", "--method", "sparse-gpt"], "did you mean"),
        (["lowrank", "TINY", "--ratio", "0.1", "--method", "plain"], "below the parameters outside"),
        (["lowrank", "TINY", "--ratio", "0.8", "--method", "svd"], "unknown low-rank method"),
        (["lowrank", "TINY", "--ratio", "0.8", "--option", "dampp=0.1"], "--option: unknown key 'dampp'; LowRankConfig takes"),
        (["lowrank", "TINY", "--ratio", "0.8", "--option", "ratio=0.5"], "--option ratio: use --ratio"),
    ],
)
def test_bad_input_exit_2_and_no_artefact(capsys, tmp_path, tiny_dir, calib_file, args, needle):
    from transformers import GPT2Config, GPT2LMHeadModel

    (tmp_path / "short.txt").write_text("The cat sees the house.")
    subst = {"TINY": str(tiny_dir), "SHORT": str(tmp_path / "short.txt"), "MISSING": str(tmp_path / "nope.txt"),
             "CALIB": str(calib_file)}
    if "GPT2" in args:
        gdir = tmp_path / "gpt2"
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=60, bos_token_id=0,
                                   eos_token_id=0)).save_pretrained(gdir)
        from slmkit.models.tiny import tiny_tokenizer

        tiny_tokenizer().save_pretrained(gdir)
        subst["GPT2"] = str(gdir)
    out_dir = tmp_path / "out" / "model"
    code, out, err = run(capsys, *[subst.get(a, a) for a in args], "--output", out_dir)
    assert code == 2, (out, err)
    assert needle in err and "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "it/s]" not in ln]  # transformers' progress bars
    assert len(lines) <= 2 and lines[0].startswith("error:")
    assert not out_dir.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_prune_option_sets_any_config_field(capsys, tiny_dir, calib_file, tmp_path):
    """--option KEY=VALUE reaches a field of the method's config that has no flag (SparseGPT's blocksize)."""
    dest = tmp_path / "sg"
    code, out, err = run(capsys, "prune", tiny_dir, "--method", "sparsegpt", "--sparsity", "0.5", "--option", "blocksize=16",
                         "--option", "damp=0.02", *_calib(calib_file), "--output", dest, "--json")
    assert code == 0, err
    cfg = Manifest.read(dest).stages[-1]["config"]
    assert cfg["blocksize"] == 16 and cfg["damp"] == 0.02
    for opt, message in [("blocksize=16", "--option blocksize does not apply to method magnitude"),
                         ("sparsity=0.3", "--option sparsity: use --sparsity")]:
        code, _, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--option", opt, "--output", tmp_path / "bad")
        assert code == 2 and message in err
    assert not (tmp_path / "bad").exists()
