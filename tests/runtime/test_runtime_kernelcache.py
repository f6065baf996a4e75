"""The kernel cache (issue 17): owner-only directory, libraries checked against their record before
loading, rebuilt when zero-length or foreign, concurrent builds, no kernel on a CPU without its
instructions, per-thread scratch freed with the thread."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from slmkit.errors import ConfigError
from slmkit.runtime import kernelcache as KC
from slmkit.runtime import q4kernel as Q

HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "g++"))
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler")
CAN_BUILD = Q.cpu_supported()[0] and HAS_CC
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason=f"kernel cannot be built here: {Q.cpu_supported()[1] or 'no C compiler'}")


def _recipe(tmp_path: Path, value: int = 42, name: str = "tiny") -> KC.Recipe:
    src = tmp_path / f"{name}{value}.c"
    src.write_text(f"int answer(void) {{ return {value}; }}\n")
    return KC.Recipe(name, (src,), (), ("-O1", "-shared", "-fPIC"))


def _only_library(d: Path) -> Path:
    libs = sorted(d.glob("*.so"))
    assert len(libs) == 1, libs
    return libs[0]


def test_cache_directory_is_created_owner_only(tmp_path):
    old = os.umask(0o002)  # a permissive umask must not leak into the cache
    try:
        d = KC.private_dir(tmp_path / "a" / "kernels")
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_directory_writable_by_others_is_refused(tmp_path, mode):
    d = tmp_path / "kernels"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(KC.UnsafeCacheError, match=rf"{d} is writable by group or others \(mode {mode:03o}\).*chmod 700"):
        KC.ensure(_recipe(tmp_path), d)
    assert list(d.iterdir()) == []  # nothing built or locked there


def test_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    d = KC.private_dir(tmp_path / "kernels")
    me = os.getuid()
    monkeypatch.setattr(KC.os, "getuid", lambda: me + 1)
    with pytest.raises(KC.UnsafeCacheError, match=rf"{d} belongs to uid {me}, not to you"):
        KC.private_dir(d)


def test_a_file_where_the_directory_should_be_is_refused(tmp_path):
    (tmp_path / "kernels").write_text("x")
    with pytest.raises(KC.UnsafeCacheError, match="cannot create|not a directory"):
        KC.private_dir(tmp_path / "kernels")


@needs_cc
def test_built_library_has_its_record_and_loads(tmp_path):
    d = tmp_path / "kernels"
    lib = KC.load(_recipe(tmp_path), d)
    assert lib.answer() == 42
    so = _only_library(d)
    record = json.loads(so.with_name(so.name + ".json").read_text())
    assert so.name == f"tiny-{record['key'][:16]}.so" and len(record["sha256"]) == 64
    assert stat.S_IMODE(so.stat().st_mode) & 0o022 == 0
    assert not list(d.glob(".tmp-*"))


def _damage_zero_length(so: Path, tmp_path: Path) -> None:
    so.write_bytes(b"")


def _damage_foreign(so: Path, tmp_path: Path) -> None:  # another valid library, put in its place
    other = KC.ensure(_recipe(tmp_path, 7, "other"), tmp_path / "elsewhere")
    os.close(other[0])
    shutil.copyfile(other[1], so)


def _damage_garbage(so: Path, tmp_path: Path) -> None:
    so.write_bytes(b"\x7fELF" + b"\0" * 100)


def _damage_symlink(so: Path, tmp_path: Path) -> None:
    target = tmp_path / "planted.so"
    shutil.copyfile(so, target)
    so.unlink()
    so.symlink_to(target)


def _damage_no_record(so: Path, tmp_path: Path) -> None:
    so.with_name(so.name + ".json").unlink()


def _damage_stale_record(so: Path, tmp_path: Path) -> None:
    rec = so.with_name(so.name + ".json")
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "key": "0" * 64}))


def _damage_group_writable(so: Path, tmp_path: Path) -> None:
    so.chmod(0o777)


@needs_cc
@pytest.mark.parametrize("damage", [_damage_zero_length, _damage_foreign, _damage_garbage, _damage_symlink,
                                    _damage_no_record, _damage_stale_record, _damage_group_writable])
def test_bad_library_in_the_cache_is_rebuilt(tmp_path, caplog, damage):
    d = tmp_path / "kernels"
    fd, so = KC.ensure(_recipe(tmp_path), d)
    os.close(fd)
    good = so.read_bytes()
    damage(so, tmp_path)
    with caplog.at_level(logging.WARNING, logger=KC.__name__):
        fd, so2 = KC.ensure(_recipe(tmp_path), d)
    os.close(fd)
    assert so2 == so and not so.is_symlink() and so.read_bytes() == good
    assert f"rebuilding {so}" in caplog.text
    assert (tmp_path / "planted.so").exists() or damage is not _damage_symlink  # the link's target is left alone
    assert ctypes.CDLL(str(so)).answer() == 42


@needs_cc
def test_a_killed_build_leaves_a_temp_file_that_the_next_build_removes(tmp_path):
    d = KC.private_dir(tmp_path / "kernels")
    (d / ".tmp-abc123.so").write_bytes(b"half")
    fd, _ = KC.ensure(_recipe(tmp_path), d)
    os.close(fd)
    assert not list(d.glob(".tmp-*"))


@needs_cc
def test_failed_build_leaves_nothing(tmp_path):
    src = tmp_path / "broken.c"
    src.write_text("int answer(void) { return }\n")
    d = tmp_path / "kernels"
    with pytest.raises(RuntimeError, match="failed"):
        KC.ensure(KC.Recipe("broken", (src,), (), ("-shared", "-fPIC")), d)
    assert sorted(p.name for p in d.iterdir()) == [".lock"]


_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from slmkit.runtime import kernelcache as KC
    r = json.loads(sys.argv[1])
    recipe = KC.Recipe(r["name"], tuple(map(Path, r["sources"])), tuple(map(Path, r["headers"])), tuple(r["flags"]))
    lib = KC.load(recipe, Path(sys.argv[2]))
    print(lib.slmkit_gg_row_bytes(2, 64))
""")


@needs_cc
def test_eight_processes_building_at_once_all_succeed(tmp_path):
    """The real kernel sources and flags, a fresh cache, 8 processes started together: one compiles, all load."""
    log = tmp_path / "cc.log"
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\ncase " $* " in *" -o "*) echo "$$" >> {log};; esac\nexec {shutil.which("cc") or shutil.which("gcc")} "$@"\n')
    cc.chmod(0o755)
    r = Q.recipe(Q.choose())
    spec = json.dumps({"name": r.name, "sources": [str(p) for p in r.sources], "headers": [str(p) for p in r.headers], "flags": list(r.flags)})
    d = tmp_path / "cache" / "kernels"
    env = {**os.environ, "CC": str(cc), "PYTHONPATH": str(Path(KC.__file__).parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, spec, str(d)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert all(rc == 0 and out.strip() == "36" for out, err, rc in results), results  # Q4_0: 2 blocks of 18 bytes
    assert len(log.read_text().split()) == 1  # built once
    so = _only_library(d)
    assert sorted(p.name for p in d.iterdir()) == sorted([".lock", so.name, so.name + ".json"])


def _reset_q4(monkeypatch):
    for name, value in (("_tried", False), ("_lib", None), ("_why", None)):
        monkeypatch.setattr(Q, name, value)


def test_a_forced_variant_the_cpu_lacks_never_compiles_or_loads(tmp_path, monkeypatch):
    """Fake /proc/cpuinfo without AVX512-VNNI and SLMKIT_KERNEL=avx512: a ConfigError naming the variant and
    the missing flag; no compiler runs, no library is opened, nothing is created."""
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma f16c avx512f avx512bw avx512vl avx512dq\n")
    monkeypatch.setattr(Q, "CPUINFO", fake)
    monkeypatch.setattr(Q.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLMKIT_KERNEL", "avx512")
    _reset_q4(monkeypatch)

    def forbidden(*a, **k):
        raise AssertionError(f"called on a CPU without the instructions: {a}")

    monkeypatch.setattr(KC, "ensure", forbidden)
    monkeypatch.setattr(KC.subprocess, "run", forbidden)
    monkeypatch.setattr(ctypes, "CDLL", forbidden)
    with pytest.raises(ConfigError, match=r"SLMKIT_KERNEL=avx512 cannot run here: CPU lacks avx512_vnni \(needed by the avx512 kernel\)"):
        Q.load()
    with pytest.raises(ConfigError, match="SLMKIT_KERNEL=avx512"):
        Q.matmul(torch.zeros(1, 64), *Q.pack(torch.randn(8, 64)))
    assert not (tmp_path / "cache").exists()
    monkeypatch.setenv("SLMKIT_KERNEL", "avx3")
    with pytest.raises(ConfigError, match="'avx3' is not a kernel variant"):
        Q.load()
    monkeypatch.delenv("SLMKIT_KERNEL")
    assert Q.choose() == "avx2"  # what the CPU has, unforced


def test_choice_follows_the_cpu_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("SLMKIT_KERNEL", raising=False)
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma", "avx2"}
    assert Q.choose(avx512, "x86_64") == "avx512"
    assert Q.choose({"avx2", "fma", "f16c"}, "x86_64") == "avx2"
    assert Q.choose({"avx", "sse4_2"}, "x86_64") == "portable"
    assert Q.choose({"fp", "asimd", "asimddp"}, "aarch64") == "neon"
    assert Q.choose({"fp", "asimd"}, "aarch64") == "portable"  # a Raspberry Pi 4 (Cortex-A72: no dot product)
    assert Q.choose(avx512, "aarch64") == "portable"
    monkeypatch.setenv("SLMKIT_KERNEL", "AVX2")  # case-insensitive
    assert Q.choose(avx512, "x86_64") == "avx2"
    monkeypatch.setenv("SLMKIT_KERNEL", "neon")
    with pytest.raises(ConfigError, match="neon kernel is for aarch64"):
        Q.choose(avx512, "x86_64")
    monkeypatch.setattr(Q, "CPUINFO", tmp_path / "missing")  # unreadable flags: only the portable build is safe
    monkeypatch.delenv("SLMKIT_KERNEL")
    assert Q.choose(machine="x86_64") == "portable"


def test_unsafe_cache_directory_disables_the_kernel_with_a_warning(tmp_path, monkeypatch, caplog):
    d = tmp_path / "kernels"
    d.mkdir()
    d.chmod(0o777)
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(Q, "cpu_supported", lambda: (True, ""))
    _reset_q4(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=Q.__name__):
        assert Q.load() is None
    assert f"kernel cache {d} is writable by group or others" in Q.why_unavailable()
    assert any(r.levelno == logging.WARNING and str(d) in r.getMessage() for r in caplog.records)
    assert list(d.iterdir()) == []


def test_fast_generate_with_an_unsafe_cache_warns_and_runs_dequantised(tmp_path, monkeypatch, capsys, caplog, tiny_llama):
    """A quantised GGUF with --fast: the refused cache is named in a warning (with the fix), nothing is built
    there, and the file runs dequantised (gguffast's documented fallback when the kernel is unavailable)."""
    from slmkit.cli import main
    from slmkit.export.gguf import export_gguf

    gguf_file = export_gguf(*tiny_llama, tmp_path / "tiny-q4_0.gguf", "Q4_0")
    d = tmp_path / "kernels"
    d.mkdir()
    d.chmod(0o757)
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(Q, "cpu_supported", lambda: (True, ""))
    _reset_q4(monkeypatch)
    with caplog.at_level(logging.WARNING):
        code = main(["generate", str(gguf_file), "hi", "--fast", "--max-new-tokens", "2"])
    assert code == 0, capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(d) in r.getMessage()]
    assert warned and all("chmod 700" in w for w in warned)
    assert list(d.iterdir()) == []


@needs_kernel
def test_zero_length_kernel_in_the_cache_is_rebuilt_and_used(tmp_path, monkeypatch):
    """The q4 kernel used to dlopen whatever sat at its path; a zero-length file made int4 fall back to torch for good."""
    d = KC.private_dir(tmp_path / "kernels")
    r = Q.recipe(Q.choose())
    key = KC.build_key(r, KC.compiler())
    so = d / f"{r.name}-{key[:16]}.so"
    so.write_bytes(b"")
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path))
    _reset_q4(monkeypatch)
    assert Q.load() is not None, Q.why_unavailable()
    assert so.stat().st_size > 0
    x, w = torch.randn(3, 128), torch.randn(16, 128)
    y = Q.matmul(x, *Q.pack(w))
    ref = x @ Q.unpack(*Q.pack(w)).T
    assert (y - ref).norm() < 0.02 * ref.norm()  # int8 activations


@needs_kernel
def test_scratch_is_freed_when_a_thread_exits():
    """Each request thread's scratch used to stay allocated for ever (__thread pointers, never freed)."""
    assert Q.load() is not None
    q, s, m = Q.pack(torch.randn(64, 4096))
    qg = torch.randint(0, 256, (64, 4096 // 32 * 18), dtype=torch.uint8)
    Q.require().slmkit_scratch_release()  # this (main) thread's, from earlier tests
    before = Q.scratch_live_bytes()
    during = []

    def work():
        Q.matmul(torch.randn(16, 4096), q, s, m)
        Q.matmul(torch.randn(8, 4096, dtype=torch.bfloat16), q, s, m)
        from slmkit.runtime import ggmlkernel

        ggmlkernel.matmul(torch.randn(4, 4096), 2, qg, 4096)
        during.append(Q.scratch_live_bytes())

    for _ in range(3):
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert min(during) >= before + 16 * 4096  # the counter sees the threads' buffers...
    # ...and every one of them is gone with its thread (join returns when Python is done with the thread,
    # a moment before the OS thread runs its key destructors)
    deadline = time.monotonic() + 5
    while Q.scratch_live_bytes() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert Q.scratch_live_bytes() == before
    Q.matmul(torch.randn(16, 4096), q, s, m)  # this thread's own, freed on request
    assert Q.scratch_live_bytes() > before
    Q.require().slmkit_scratch_release()
    assert Q.scratch_live_bytes() == before


@needs_cc
def test_kernel_flags_refuse_stack_arrays_sized_by_input(tmp_path):
    """-Werror=vla is in the kernel's flags: a variable-length array (decode.c had one of the batch size) fails the build."""
    src = tmp_path / "vla.c"
    src.write_text("int f(int n) { float a[n]; a[0] = 1; return (int)a[n - 1]; }\n")
    flags = tuple(f for f in Q.recipe("portable").flags if not f.startswith("-m") and f != "-fopenmp")
    with pytest.raises(RuntimeError, match="vla|variable length"):
        KC.ensure(KC.Recipe("vla", (src,), (), flags), tmp_path / "kernels")
    for f in Q.SOURCES:  # and the sources hold none (alloca included)
        assert "alloca" not in f.read_text()


@needs_kernel
def test_a_large_batch_goes_through_the_fused_step(lively):
    """64 sequences in one fused call (their score offsets now live on the heap): each gets the logits it gets alone."""
    from slmkit.runtime import generate as G

    model, tok = lively
    fm = G.build(model, G.FastConfig(weights="int4"))
    prompt = tok("The cat sees the", return_tensors="pt").input_ids[0]
    caches = [fm.new_cache(context=len(prompt) + 4) for _ in range(64)]
    for c in caches:
        G.prefill(fm, prompt, c)
    alone = G.forward(fm, [G.Segment(torch.tensor([7]), caches[0])])[0]
    together = G.forward(fm, [G.Segment(torch.tensor([7]), c) for c in caches[1:]])
    assert len(together) == 63
    assert all(torch.equal(together[0], t) for t in together)
    # the 63 rows may take another path than one row (q4kernel.dequant_from_tokens): agreement to bf16 rounding
    assert (alone - together[0]).abs().max() < 0.02 * alone.abs().max()
