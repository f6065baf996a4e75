"""Bad input files exit 2 with at most two lines naming the file, line or field (issue 17).

Non-UTF-8 text, a corrupt or truncated ``.gz``, JSON lines nested past the parser's recursion
limit or holding 5,000-digit numbers, deeply nested or non-UTF-8 YAML recipes, and malformed
rag index directories, against every command that reads them.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from slmkit.cli import main

DEEP = "[" * 100_000 + "]" * 100_000


def bad_jsonl(tmp_path) -> dict:
    """name -> (path, what the message must name)."""
    good = gzip.compress(b'{"text": "fine"}\n' * 50)
    files = {
        "not_utf8.jsonl": (b'{"text": "caf\xe9"}\n', ":1: not UTF-8"),
        "not_gzip.jsonl.gz": (b"this is not gzip at all\n", "gzip"),
        "cut_gzip.jsonl.gz": (good[: len(good) // 2], "gzip"),
        "deep.jsonl": (('{"text": ' + DEEP + "}\n").encode(), ":1: JSON nested too deeply"),
        "huge_int.jsonl": (('{"text": 1' + "0" * 5000 + "}\n").encode(), ":1: not valid JSON"),
    }
    out = {}
    for name, (data, needle) in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = (tmp_path / name, needle)
    return out


def _check(capsys, args, needle: str):
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert 1 <= len(lines) <= 2 and "Traceback" not in err and "internal error" not in err, err
    assert needle in err, err


COMMANDS = {  # command -> args with "{F}" for the bad file, "{M}" for the tiny model, "{O}" for an output
    "gen-data": ["gen-data", "{M}", "--prompts", "{F}", "--output", "{O}.jsonl"],
    "sft": ["sft", "{M}", "--data", "{F}", "--output", "{O}", "--max-steps", "1"],
    "dpo": ["dpo", "{M}", "--data", "{F}", "--output", "{O}", "--max-steps", "1"],
    "distill": ["distill", "--teacher", "{M}", "--student", "{M}", "--data", "{F}", "--loss", "fkl", "--output", "{O}", "--max-steps", "1"],
    "route": ["route", "--small", "{M}", "--large", "{M}", "--data", "{F}"],
    "rag-index": ["rag", "index", "{F}", "--output", "{O}", "--embedder", "{M}"],
    "rag-ask": ["rag", "ask", "{I}", "--questions", "{F}", "--model", "{M}", "--k", "0"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", ["not_utf8.jsonl", "not_gzip.jsonl.gz", "cut_gzip.jsonl.gz", "deep.jsonl", "huge_int.jsonl"])
def test_bad_jsonl_files_exit_2(capsys, tmp_path, tiny_dir, command, name):
    path, needle = bad_jsonl(tmp_path)[name]
    index = tmp_path / "idx"
    if command == "rag-ask":  # a valid (empty-vector) index so that the questions file is what fails
        _index(index, {})
    args = [a.replace("{F}", str(path)).replace("{M}", str(tiny_dir)).replace("{O}", str(tmp_path / "out")).replace("{I}", str(index))
            for a in COMMANDS[command]]
    _check(capsys, args, needle)


def test_bad_text_for_eval_exits_2(capsys, tmp_path, tiny_dir):
    p = tmp_path / "wiki.txt"
    p.write_bytes(b"some text\nmore \xff\xfe text\n")
    _check(capsys, ["eval", tiny_dir, "--perplexity", p], "not UTF-8")


@pytest.mark.parametrize("data,needle", [
    (b"name: caf\xe9\nstages: []\n", ":1: not UTF-8"),
    (("name: x\nstages: " + "[" * 20_000 + "]" * 20_000 + "\n").encode(), "nested too deeply"),
    (("name: x\nstages:\n" + "".join("  " * i + "- a:\n" for i in range(3000))).encode(), ""),
    (b"name: [unclosed\n", "not valid YAML"),
])
def test_bad_recipes_exit_2(capsys, tmp_path, data, needle):
    p = tmp_path / "recipe.yaml"
    p.write_bytes(data)
    _check(capsys, ["build", p, "--output", tmp_path / "run"], needle or "recipe.yaml")


def _index(root, meta_patch: dict | None = None, raw: bytes | None = None, chunks: bytes | None = None, shard: bytes | None = None):
    """An index directory holding one 4-d vector, then damaged as asked."""
    root.mkdir(parents=True, exist_ok=True)
    meta = {"format": 2, "count": 1, "embedder": {"spec": "x", "dim": 4}, "chunking": {}, "docs": {},
            "removed": [], "shards": [{"file": "vectors-000001.npy", "rows": 1}]}
    meta.update(meta_patch or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    (root / "index.json").write_bytes(raw if raw is not None else json.dumps(meta).encode())
    (root / "chunks.jsonl").write_bytes(chunks if chunks is not None else b'{"id": "d@0", "doc": "d", "text": "t"}\n')
    if shard is not None:
        (root / "vectors-000001.npy").write_bytes(shard)
    else:
        np.save(root / "vectors-000001.npy", np.ones((1, 4), np.float32) / 2)
    return root


BAD_INDEXES = {
    "not_json": dict(raw=b"{not json"),
    "not_utf8": dict(raw=b'{"format": 1, "x": "\xff"}'),
    "a_list": dict(raw=b"[1, 2]"),
    "deep": dict(raw=DEEP.encode()),
    "no_count": dict(meta_patch={"count": None}),
    "count_text": dict(meta_patch={"count": "one"}),
    "no_embedder": dict(meta_patch={"embedder": None}),
    "dim_text": dict(meta_patch={"embedder": {"dim": "4"}}),
    "shards_dict": dict(meta_patch={"shards": {"file": "x"}}),
    "shard_outside": dict(meta_patch={"shards": [{"file": "../../etc/passwd", "rows": 1}]}),
    "shard_missing": dict(meta_patch={"shards": [{"file": "vectors-000009.npy", "rows": 1}]}),
    "shard_corrupt": dict(shard=b"\x93NUMPY garbage"),
    "docs_list": dict(meta_patch={"docs": [1]}),
    "removed_text": dict(meta_patch={"removed": "all"}),
    "chunks_not_json": dict(chunks=b"{oops\n"),
    "chunks_not_utf8": dict(chunks=b'{"text": "\xff"}\n'),
    "chunks_short": dict(chunks=b""),
    "count_too_big": dict(meta_patch={"count": 5}),
}


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_malformed_rag_index_exits_2(capsys, tmp_path, tiny_dir, case):
    root = _index(tmp_path / "idx", **BAD_INDEXES[case])
    _check(capsys, ["rag", "ask", root, "what?", "--model", tiny_dir, "--k", "0"], str(root))


def test_a_sound_index_still_opens(tmp_path):
    from slmkit.rag.index import VectorIndex

    idx = VectorIndex.open(_index(tmp_path / "idx"))
    assert len(idx) == 1 and idx.vectors.shape == (1, 4) and idx.chunks[0]["text"] == "t"


def test_readers_keep_lines_and_name_the_line(tmp_path):
    from slmkit.data.readers import Lines, read_lines
    from slmkit.errors import DataError

    p = tmp_path / "a.txt"
    p.write_bytes(b"\xef\xbb\xbfone\r\ntwo\n\nthree")
    assert list(read_lines(p)) == ["one", "two", "", "three"]
    g = tmp_path / "a.txt.gz"
    g.write_bytes(gzip.compress(p.read_bytes()))
    assert list(read_lines(g)) == ["one", "two", "", "three"]
    p.write_bytes(b"ok\nok\nbad \xc3\x28 here\n")
    with pytest.raises(DataError, match=r"a\.txt:3: not UTF-8"):
        with Lines(p) as fh:
            list(fh)
