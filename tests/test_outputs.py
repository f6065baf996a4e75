"""--output safety: what slmkit did not write is refused (exit 2) and left byte-identical; --force replaces it.

Also: symlinked outputs, recipe names that are not one plain path component, leftovers of
killed runs, permissions under the umask, and exports whose validation fails.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from slmkit.artefact import MANIFEST, Manifest, atomic_dir, atomic_file, check_output, save_model
from slmkit.cli import main
from slmkit.errors import OutputExistsError
from slmkit.pipeline import RecipeError, parse_text

DEAD_PID = 99_999_999  # above any pid_max: no such process


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (and ``root`` itself): file bytes hashed, link targets, directory names."""
    root = Path(root)
    out = {}
    for p in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
        rel = str(p.relative_to(root)) if p != root else "."
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", sorted(c.name for c in p.iterdir()))
        else:
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return out


def foreign_dir(path: Path) -> Path:
    (path / "notes").mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work\n")
    (path / "notes" / "a.md").write_text("# keep me\n")
    (path / ".hidden").write_bytes(b"\x00\x01")
    return path


@pytest.fixture
def umask():
    """Set the process umask for one test, restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small valid input files for verbs that read data before they write."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "sft.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello there"}]}) + "\n")
    (d / "pairs.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a b", "rejected": "c d"}) + "\n")
    (d / "text.txt").write_text("The cat sees the house. A dog likes green apples.\n" * 4)
    (d / "prompts.txt").write_text("Say hello.\nName a colour.\n")
    return d


# every verb with --output: (args before --output, the kind of output)
VERBS = {
    "prune": (["prune", "TINY", "--method", "magnitude"], "dir"),
    "lowrank": (["lowrank", "TINY", "--ratio", "0.5", "--method", "plain"], "dir"),
    "quantize": (["quantize", "TINY", "--method", "rtn", "--bits", "4"], "dir"),
    "export-safetensors": (["export", "TINY", "--format", "safetensors"], "dir"),
    "export-gguf": (["export", "TINY", "--format", "gguf", "--type", "F32"], "file"),
    "sft": (["sft", "TINY", "--data", "IN/sft.jsonl"], "dir"),
    "dpo": (["dpo", "TINY", "--data", "IN/pairs.jsonl"], "dir"),
    "distill": (["distill", "--student", "TINY", "--data", "IN/text.txt", "--loss", "ce"], "dir"),
    "gen-data": (["gen-data", "TINY", "--prompts", "IN/prompts.txt"], "file"),
    "audit": (["audit", "TINY"], "dir"),
    "build": (["build"], "dir"),
    "invert": (["invert", "TINY", "--train", "IN/pairs.jsonl"], "dir"),
}


def _args(verb, tiny_dir, inputs):
    args, kind = VERBS[verb]
    return [a.replace("TINY", str(tiny_dir)).replace("IN", str(inputs)) for a in args], kind


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_foreign_output_is_refused_and_left_byte_identical(capsys, tmp_path, tiny_dir, inputs, verb):
    args, kind = _args(verb, tiny_dir, inputs)
    if kind == "dir":
        dest = foreign_dir(tmp_path / "mine")
    else:
        dest = tmp_path / "mine.txt"
        dest.write_text("not slmkit's\n")
    before = snapshot(tmp_path)
    code, out, err = run(capsys, *args, "--output", dest)
    assert code == 2, err
    assert str(dest) in err and "--force" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2
    assert snapshot(tmp_path) == before


def test_force_replaces_a_foreign_directory(capsys, tmp_path, tiny_dir):
    dest = foreign_dir(tmp_path / "mine")
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--output", dest, "--force")
    assert code == 0, err
    assert (dest / MANIFEST).is_file() and not (dest / "thesis.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary or old directory left


def test_an_output_slmkit_wrote_is_replaced_without_force(capsys, tmp_path, tiny_dir):
    dest = tmp_path / "pruned"
    assert run(capsys, "prune", tiny_dir, "--method", "magnitude", "--sparsity", "0.3", "--output", dest)[0] == 0
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--sparsity", "0.6", "--output", dest)
    assert code == 0, err
    assert Manifest.read(dest).stages[-1]["config"]["sparsity"] == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_an_empty_directory_is_fine(capsys, tmp_path, tiny_dir):
    dest = tmp_path / "empty"
    dest.mkdir()
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--output", dest)
    assert code == 0, err and (dest / MANIFEST).is_file()


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("target", ["foreign", "slmkit"])
def test_a_symlinked_output_is_refused(capsys, tmp_path, tiny_dir, target, force):
    real = tmp_path / "real"
    if target == "foreign":
        foreign_dir(real)
    else:
        real.mkdir()
        (real / MANIFEST).write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--output", link, *(["--force"] if force else []))
    assert code == 2 and "symbolic link" in err
    assert snapshot(tmp_path) == before


def test_a_symlinked_file_output_is_refused(capsys, tmp_path, tiny_dir, tiny_gguf):
    real = tmp_path / "real.gguf"
    real.write_bytes(tiny_gguf.read_bytes())
    link = tmp_path / "link.gguf"
    link.symlink_to(real)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "export", tiny_dir, "--format", "gguf", "--type", "F32", "--output", link, "--force")
    assert code == 2 and "symbolic link" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["../escape", "a/b", "/tmp/abs", "..", ".", "two words", ""])
def test_recipe_name_must_be_one_plain_path_component(tiny_dir, name):
    text = f"name: {json.dumps(name)}\nteacher: {tiny_dir}\nstages:\n  - stage: student\n"
    with pytest.raises(RecipeError, match="'name'"):
        parse_text(text, "r.yaml")


def test_build_with_a_traversal_name_exits_2_and_writes_nothing(capsys, tmp_path, tiny_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    recipe = tmp_path / "work" / "r.yaml"
    recipe.write_text(f"name: ../outside\nteacher: {tiny_dir}\nstages:\n  - stage: student\n")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "build", recipe)
    assert code == 2 and "'name'" in err
    assert snapshot(tmp_path) == before


def test_plain_recipe_names_pass(tiny_dir):
    for name in ("my-student", "v1.2_final", "A"):
        assert parse_text(f"name: {name}\nteacher: {tiny_dir}\nstages:\n  - stage: student\n", "r.yaml").name == name


def test_a_failed_block_leaves_the_previous_output_untouched(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        (tmp / MANIFEST).write_text("{}")
        (tmp / "w").write_text("good")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / MANIFEST).write_text("{}")
            raise RuntimeError("validation failed")
    assert snapshot(tmp_path) == before


def test_stale_leftovers_of_killed_runs_are_cleaned(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        (tmp / MANIFEST).write_text("{}")
    dead_tmp = tmp_path / f".out.tmp-{DEAD_PID}-abc123"
    dead_old = tmp_path / f".out.old-{DEAD_PID}"
    legacy = tmp_path / ".out.tmp-k3j_x9q2"  # an older slmkit's random name
    live = tmp_path / f".out.tmp-{os.getppid()}-zzz"  # a writer still running: kept
    other = tmp_path / f".outer.tmp-{DEAD_PID}-abc"  # another destination's: kept
    for d in (dead_tmp, dead_old, legacy, live, other):
        d.mkdir()
        (d / "x").write_text("partial")
    stale_file = tmp_path / f".f.json.tmp-{DEAD_PID}-q.json"
    stale_file.write_text("{")
    with atomic_dir(dest) as tmp:
        (tmp / MANIFEST).write_text("{}")
    with atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("{}")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", "f.json", live.name, other.name])


def test_a_run_killed_between_the_renames_gets_its_previous_output_back(tmp_path):
    old = tmp_path / f".out.old-{DEAD_PID}-abc"  # the previous output, moved aside; then the run died
    old.mkdir()
    (old / MANIFEST).write_text("{}")
    (old / "w").write_text("previous")
    (tmp_path / f".out.tmp-{DEAD_PID}-def").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out"):
            raise RuntimeError("this run fails too")
    assert (tmp_path / "out" / "w").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_permissions_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / MANIFEST).write_text("{}")
    with atomic_file(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_check_output_rules(tmp_path):
    assert check_output(tmp_path / "new") == tmp_path / "new"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        check_output(f, force=True)
    with pytest.raises(OutputExistsError, match="is a directory"):
        check_output(tmp_path, force=True, kind="file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    check_output(empty, kind="file", owned=lambda p: False)
    check_output(f, kind="file", owned=lambda p: True)
    check_output(f, kind="file", owned=lambda p: False, force=True)


def test_gguf_output_replaced_only_if_it_is_gguf(capsys, tmp_path, tiny_dir, tiny_gguf):
    dest = tmp_path / "m.gguf"
    dest.write_text("my notes, not a model\n")
    code, _, err = run(capsys, "export", tiny_dir, "--format", "gguf", "--type", "F32", "--output", dest,
                       "--no-loader-check")
    assert code == 2 and dest.read_text() == "my notes, not a model\n"
    dest.write_bytes(tiny_gguf.read_bytes()[:100])  # a GGUF (even a broken one) may be replaced
    code, _, err = run(capsys, "export", tiny_dir, "--format", "gguf", "--type", "F32", "--output", dest,
                       "--no-loader-check")
    assert code == 0, err and dest.read_bytes()[:4] == b"GGUF" and dest.stat().st_size > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_failed_gguf_validation_keeps_the_previous_export(tmp_path, tiny_llama, monkeypatch):
    import slmkit.export.gguf as g

    model, tok = tiny_llama
    dest = tmp_path / "m.gguf"
    g.export_gguf_validated(model, tok, dest, "F32", check_loader=False)
    before = snapshot(tmp_path)
    real = g.read_gguf_weights

    def corrupted(path, config):
        back = real(path, config)
        name = next(iter(back))
        back[name] = back[name] + 1.0
        return back

    monkeypatch.setattr(g, "read_gguf_weights", corrupted)
    with pytest.raises(RuntimeError, match="differ on read-back"):
        g.export_gguf_validated(model, tok, dest, "F16", check_loader=False)
    assert snapshot(tmp_path) == before


def test_failed_safetensors_validation_keeps_the_previous_export(tmp_path, tiny_llama, monkeypatch):
    import safetensors.torch

    from slmkit.export.safetensors import export_safetensors

    model, tok = tiny_llama
    dest = tmp_path / "st"
    export_safetensors(model, tok, dest, check_loader=False)
    before = snapshot(tmp_path)
    real = safetensors.torch.load_file

    def corrupted(path, *a, **kw):
        out = real(path, *a, **kw)
        name = next(iter(out))
        out[name] = out[name] + 1.0
        return out

    monkeypatch.setattr(safetensors.torch, "load_file", corrupted)
    with pytest.raises(RuntimeError, match="differ after reading back"):
        export_safetensors(model, tok, dest, check_loader=False)
    assert snapshot(tmp_path) == before


def test_gen_data_output_rules(tmp_path):
    from slmkit.data.synth import check_synth_output, generate_dataset

    mine = tmp_path / "data.jsonl"
    mine.write_text('{"id": "p1", "messages": []}\n')
    check_synth_output(mine)  # its own output: resumable
    notes = tmp_path / "notes.txt"
    notes.write_text("half a line without a newline")  # would have been truncated as a "half-written row"
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="--force"):
        generate_dataset(None, [], notes)
    assert snapshot(tmp_path) == before
    rep = generate_dataset(None, [], notes, force=True)  # --force: starts afresh
    assert rep.accepted == 0 and notes.read_text() == ""


def test_rag_index_into_a_foreign_directory_is_refused(tmp_path):
    from slmkit.rag.index import build_index

    dest = foreign_dir(tmp_path / "idx")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="--force"):
        build_index([tmp_path / "idx" / "thesis.txt"], dest, embedder=None)
    assert snapshot(tmp_path) == before


def test_save_model_refuses_then_forces(tmp_path, tiny_llama):
    model, tok = tiny_llama
    dest = foreign_dir(tmp_path / "m")
    with pytest.raises(OutputExistsError):
        save_model(model, tok, dest, Manifest(source="t"))
    save_model(model, tok, dest, Manifest(source="t"), force=True)
    assert Manifest.read(dest).source == "t" and not (dest / "thesis.txt").exists()
