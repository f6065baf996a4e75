"""`rag index` takes an exclusive lock on its output (issue 17): a second run on the same index
exits 2 at once, naming the holder, and touches nothing; a killed holder leaves no stale lock;
a first run killed before its first commit can be rerun without --force."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from slmkit.cli import main
from slmkit.rag.chunk import ChunkConfig
from slmkit.rag.index import LOCK, META, IndexBusyError, VectorIndex, build_index, index_lock


class HashEmbedder:
    """A deterministic stand-in: unit vectors from a hash of the text (no model to load)."""

    dim = 8

    def identity(self) -> dict:
        return {"spec": "hash", "dim": self.dim}

    def embed(self, texts):
        out = np.stack([np.frombuffer(hashlib.sha256(t.encode()).digest()[:32], dtype=np.uint8)[: self.dim]
                        .astype(np.float32) + 1 for t in texts])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture
def docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(3):
        (d / f"doc{i}.txt").write_text(f"Document {i} talks about topic {i}.\n\nA second paragraph, number {i}.")
    return d


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK}


def test_second_run_on_a_locked_index_exits_at_once_and_touches_nothing(docs, tmp_path):
    out = tmp_path / "idx"
    build_index([docs], out, HashEmbedder(), ChunkConfig(max_words=8, overlap_words=0))
    before = _tree(out)
    (docs / "doc9.txt").write_text("A new document that the second run would add.")
    with index_lock(out):
        t0 = time.monotonic()
        with pytest.raises(IndexBusyError, match=f"being written by another .* run \\(pid {os.getpid()}\\)"):
            build_index([docs], out, HashEmbedder(), ChunkConfig(max_words=8, overlap_words=0))
        assert time.monotonic() - t0 < 5  # refused at once, not after a wait
    assert _tree(out) == before
    stats = build_index([docs], out, HashEmbedder(), ChunkConfig(max_words=8, overlap_words=0))  # lock released
    assert stats.documents_added == 1 and len(VectorIndex.open(out)) == stats.chunks_total


def test_a_killed_holder_leaves_no_stale_lock(docs, tmp_path):
    out = tmp_path / "idx"
    code = ("import sys, time\nfrom pathlib import Path\nfrom slmkit.rag.index import index_lock\n"
            "with index_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(IndexBusyError, match=f"pid {holder.pid}"):
            build_index([docs], out, HashEmbedder())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    stats = build_index([docs], out, HashEmbedder())  # the kernel dropped the dead holder's lock
    assert stats.documents_added == 3


def test_first_run_killed_before_its_first_commit_reruns_without_force(docs, tmp_path):
    out = tmp_path / "idx"
    out.mkdir()
    (out / LOCK).write_text("12345\n")  # what a run killed right after taking the lock leaves
    (out / "chunks.jsonl").write_text("")
    (out / f".{META}.tmp-12345-abc.json").write_text("{")
    stats = build_index([docs], out, HashEmbedder())
    assert stats.documents_added == 3 and (out / META).is_file()


def test_cli_second_run_exits_2_with_a_clear_message(docs, tmp_path, tiny_dir, capsys):
    out = tmp_path / "idx"
    with index_lock(out):
        code = main(["rag", "index", str(docs), "--output", str(out), "--embedder", str(tiny_dir)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "it/s]" not in ln]  # not transformers' load bar
    assert code == 2 and 1 <= len(lines) <= 2 and "Traceback" not in err, err
    assert "being written by another" in err and str(out) in err, err
    assert not (out / META).exists()
