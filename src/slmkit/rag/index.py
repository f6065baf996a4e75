"""A persistent vector index on disk: exact (brute-force) cosine search over unit vectors.

Layout of an index directory::

    index.json        format, embedder identity, chunking, retriever, vector shards, documents, removed chunks
    chunks.jsonl      one line per chunk: {"id", "doc", "text"} (append-only)
    vectors-NNNNNN.npy  float32 (rows, dim) per indexing batch (append-only)
    bm25/             the BM25 matrix of the live chunks (retriever bm25 or hybrid; slmkit.rag.lexical)

Documents are indexed in batches; each batch writes its vector shard, appends its chunks and
then rewrites ``index.json`` atomically: that rename is the commit. A crash leaves at most one
uncommitted batch, which the next run discards and redoes, so interrupted indexing resumes
without losing finished work. Adding documents later embeds only the new or changed ones
(a changed document's old chunks are marked removed).

One run writes an index at a time: ``build_index`` holds an exclusive ``flock`` on ``.lock``
inside the index directory for the whole run; a second run on the same output does not wait,
it exits 2 (:class:`IndexBusyError`) naming the holder's pid. Readers (``rag ask``) take no
lock: they see the last committed ``index.json`` and only the chunk lines and shards it lists.

Search is exact: one matrix-vector product over all vectors (``scores = V q``). bench/enhance.py
compares it with faiss (IndexFlatIP, HNSW) and usearch; for collections up to ~10^5 chunks exact
numpy search is fast enough, needs no extra dependency, and never misses a neighbour.
How an index is searched (dense, BM25 or both fused) is its ``retriever`` (:mod:`slmkit.rag.retrieve`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slmkit.artefact import TMP_MARK, atomic_file, check_output
from slmkit.data.readers import Lines, json_line
from slmkit.errors import DataError, SlmkitError
from slmkit.rag.chunk import ChunkConfig, Document, chunk_document, read_documents
from slmkit.rag.embed import Embedder
from slmkit.rag.lexical import BM25Index
from slmkit.rag.retrieve import RetrieverConfig

log = logging.getLogger(__name__)

FORMAT = 2  #: index.json's format version: 2 = sentence-transformers embeddings (pooling, prompts from the model), chunks bounded by embedder tokens
META = "index.json"
CHUNKS = "chunks.jsonl"
LOCK = ".lock"


REBUILD = "rebuild it with `slmkit rag index DOCS... --output INDEX`"


def read_meta(root: Path) -> dict:
    """``index.json`` of the index at ``root``, checked field by field (a DataError names the file and field)."""
    path = root / META
    if not path.is_file():
        raise DataError(f"{root} is not an slmkit index (no {META})", "build one with `slmkit rag index DOCS... --output INDEX`")
    try:
        meta = json.loads(path.read_bytes())
    except RecursionError:
        raise DataError(f"{path} is nested too deeply", REBUILD) from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})", REBUILD) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({str(err).splitlines()[0][:100]})", REBUILD) from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}", REBUILD)
    if meta.get("format") != FORMAT:
        raise DataError(f"{root} has index format {meta.get('format')!r}; this slmkit reads format {FORMAT} only", REBUILD)

    def bad(field: str, want: str):
        return DataError(f"{path}: field '{field}' must be {want}, got {str(meta.get(field, '(missing)'))[:60]}", REBUILD)

    def count_ok(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not count_ok(meta.get("count")):
        raise bad("count", "an integer >= 0")
    emb = meta.get("embedder")
    if not isinstance(emb, dict) or not count_ok(emb.get("dim")) or not emb["dim"]:
        raise bad("embedder", "an object with an integer 'dim' > 0")
    shards = meta.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(x, dict) and isinstance(x.get("file"), str) and x["file"] == Path(x["file"]).name
            and x["file"].startswith("vectors-") and count_ok(x.get("rows")) for x in shards):
        raise bad("shards", "a list of {file: vectors-NNNNNN.npy in the index directory, rows}")
    docs = meta.setdefault("docs", {})
    if not isinstance(docs, dict) or not all(
            isinstance(d, dict) and isinstance(d.get("sha256"), str) and count_ok(d.get("first")) and count_ok(d.get("chunks"))
            for d in docs.values()):
        raise bad("docs", "an object of {sha256, first, chunks} per document")
    removed = meta.setdefault("removed", [])
    if not isinstance(removed, list) or not all(count_ok(i) for i in removed):
        raise bad("removed", "a list of chunk numbers")
    if not isinstance(meta.setdefault("chunking", {}), dict):
        raise bad("chunking", "an object")
    retr = meta.setdefault("retriever", {"method": "dense"})  # indexes from before retrievers were dense
    try:
        RetrieverConfig.from_dict(retr)
    except (TypeError, AttributeError, SlmkitError):
        raise bad("retriever", "an object {method: dense|bm25|hybrid, ...}") from None
    return meta


class IndexMismatchError(SlmkitError):
    """The index was built with another embedder (or chunking) than the one asked for."""


@dataclass
class Hit:
    id: str  #: chunk id: ``<document key>@<chunk number>``
    doc: str  #: document key
    text: str
    score: float  #: cosine similarity to the query


@dataclass
class IndexStats:
    documents_added: int
    documents_skipped: int  #: already indexed with the same content
    chunks_added: int
    chunks_total: int


class VectorIndex:
    """An opened index: its metadata, chunk records and vectors (memory-mapped shards)."""

    def __init__(self, root: Path, meta: dict, chunks: list[dict], vectors: np.ndarray):
        self.root = root
        self.meta = meta
        self.chunks = chunks
        self.vectors = vectors  # (N, D) float32, unit rows
        self._bm25: BM25Index | None = None

    # ------------------------------------------------------------------ reading

    @classmethod
    def open(cls, root: str | Path) -> VectorIndex:
        root = Path(root)
        meta = read_meta(root)
        count, dim = meta["count"], meta["embedder"]["dim"]
        chunks = []
        if count:
            if not (root / CHUNKS).is_file():
                raise DataError(f"{root / CHUNKS} is missing: {META} records {count} chunks", REBUILD)
            with Lines(root / CHUNKS) as fh:
                for _ in range(count):
                    line = next(fh, "")
                    if not line.endswith("\n"):
                        raise DataError(f"{root / CHUNKS} is truncated: {META} records {count} chunks", REBUILD)
                    row = json_line(line, f"{root / CHUNKS}:{fh.lineno}")
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise DataError(f"{root / CHUNKS}:{fh.lineno}: expected an object with a string 'text'", REBUILD)
                    chunks.append(row)
        parts = []
        for s in meta["shards"]:
            try:
                parts.append(np.load(root / s["file"], mmap_mode="r", allow_pickle=False))
            except (OSError, ValueError, EOFError) as err:
                raise DataError(f"{root / s['file']}: not a readable vector shard ({str(err).splitlines()[0][:100]})", REBUILD) from None
        try:
            vectors = np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0, dim), np.float32)
        except ValueError:
            raise DataError(f"{root}: vector shards of different widths", REBUILD) from None
        if vectors.shape != (count, dim):
            raise DataError(f"{root}: vectors have shape {vectors.shape}, expected ({count}, {dim})", REBUILD)
        return cls(root, meta, chunks, vectors)

    @property
    def embedder_identity(self) -> dict:
        return self.meta["embedder"]

    def __len__(self) -> int:
        return len(self.chunks) - len(self.meta.get("removed", []))

    @property
    def retriever(self) -> RetrieverConfig:
        """How this index is searched (``rag index --retriever``)."""
        return RetrieverConfig.from_dict(self.meta["retriever"])

    def live_mask(self) -> np.ndarray:
        """(N,) bool: chunks not removed by a later version of their document."""
        live = np.ones(len(self.chunks), dtype=bool)
        live[self.meta.get("removed", [])] = False
        return live

    def lexical(self) -> BM25Index:
        """The BM25 index of the live chunks: the saved ``bm25/`` when current, else built in memory."""
        if self._bm25 is None:
            cfg = self.retriever.bm25
            if self.meta.get("bm25_built") == _bm25_state(self.meta):
                self._bm25 = BM25Index.load(self.root, cfg)
            if self._bm25 is None:
                log.warning("index %s: BM25 matrix missing or stale; building it in memory "
                            "(rerun `slmkit rag index` on this index to save it)", self.root)
                self._bm25 = _build_bm25(self.chunks, self.meta, cfg)
        return self._bm25

    def check_embedder(self, embedder: Embedder) -> None:
        have, want = self.embedder_identity, embedder.identity()
        if have != want:
            raise IndexMismatchError(
                f"index {self.root} was built with embedder {have.get('spec')!r} (dim {have.get('dim')}), "
                f"not {want.get('spec')!r} (dim {want.get('dim')})",
                f"query it with --embedder {have.get('spec')}, or index into a new --output",
            )

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-``k`` chunks for each query vector (rows of ``queries``, unit length), best first."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if k <= 0 or not len(self.chunks):
            return [[] for _ in queries]
        scores = queries @ self.vectors.T  # (Q, N) cosine similarity, rows are unit vectors
        removed = self.meta.get("removed", [])
        if removed:
            scores[:, removed] = -np.inf
        k = min(k, len(self))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out = []
        for qi, idx in enumerate(top):
            idx = idx[np.argsort(-scores[qi, idx], kind="stable")]
            out.append([self.hit(int(i), float(scores[qi, i])) for i in idx])
        return out

    def hit(self, i: int, score: float) -> Hit:
        """Chunk number ``i`` as a search result with ``score``."""
        c = self.chunks[i]
        return Hit(f"{c['doc']}@{c['n']}", c["doc"], c["text"], score)


# ---------------------------------------------------------------------- writing


def _new_meta(embedder: Embedder, chunking: ChunkConfig, retriever: RetrieverConfig) -> dict:
    return {"format": FORMAT, "embedder": embedder.identity(), "chunking": asdict(chunking), "count": 0,
            "shards": [], "docs": {}, "removed": [], "retriever": retriever.to_dict()}


def _bm25_state(meta: dict) -> dict:
    """What a saved BM25 matrix must have been built from to be current."""
    return {"count": meta["count"], "removed": len(meta.get("removed", [])), "bm25": meta["retriever"].get("bm25")}


def _build_bm25(chunks: list[dict], meta: dict, cfg) -> BM25Index:
    removed = set(meta.get("removed", []))
    rows = [i for i in range(len(chunks)) if i not in removed]
    return BM25Index.build([chunks[i]["text"] for i in rows], rows, cfg)


def _is_index(path: Path) -> bool:
    return (path / META).is_file()


def _is_ours(path: Path) -> bool:
    """An index, or what a first run killed before its first ``index.json`` leaves behind."""
    if _is_index(path):
        return True
    try:
        return all(p.name in (LOCK, CHUNKS) or (p.name.startswith(".") and TMP_MARK in p.name) for p in path.iterdir())
    except OSError:
        return False


class IndexBusyError(SlmkitError):
    """Another run is writing this index (exit 2)."""


@contextlib.contextmanager
def index_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``root`` (created if missing) for one writing run, or raise
    :class:`IndexBusyError` at once when another run holds it. The lock goes with the process:
    a killed run never leaves a stale lock behind."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise IndexBusyError(
                f"index {root} is being written by another `slmkit rag index` run"
                + (f" (pid {holder})" if holder.isdigit() else ""),
                "wait for it to finish (a rerun then adds only what is new), or index into another --output",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_for_write(root: Path, embedder: Embedder, chunking: ChunkConfig, retriever: RetrieverConfig | None,
                    force: bool = False) -> dict:
    """Existing metadata (checked against embedder and chunking) with uncommitted leftovers removed.

    A non-empty ``root`` that is not an index is refused unless ``force``, which
    writes the index into it (files of the same names are replaced, others kept).
    """
    check_output(root, force, owned=_is_ours)
    if not _is_index(root):
        root.mkdir(parents=True, exist_ok=True)
        meta = _new_meta(embedder, chunking, retriever or RetrieverConfig())
        (root / CHUNKS).write_text("")
        with atomic_file(root / META) as tmp:
            tmp.write_text(json.dumps(meta))
        return meta
    index = VectorIndex.open(root)
    index.check_embedder(embedder)
    if index.meta["chunking"] != asdict(chunking):
        raise IndexMismatchError(
            f"index {root} was built with chunking {index.meta['chunking']}, not {asdict(chunking)}",
            "add documents with the same chunking, or index into a new --output",
        )
    # discard what a crashed batch left behind: chunk lines past the committed count, stray shards
    keep = sum(len(line.encode("utf-8")) for line in _lines(root / CHUNKS, int(index.meta["count"])))
    with open(root / CHUNKS, "r+b") as fh:
        fh.truncate(keep)
    listed = {s["file"] for s in index.meta["shards"]}
    for stray in root.glob("vectors-*.npy"):
        if stray.name not in listed:
            stray.unlink()
    return index.meta


def _lines(path: Path, n: int) -> list[str]:
    out = []
    with open(path, encoding="utf-8", newline="") as fh:
        for _ in range(n):
            out.append(fh.readline())
    return out


def _commit(root: Path, meta: dict, chunks: list[dict], vectors: np.ndarray) -> None:
    shard = f"vectors-{len(meta['shards']) + 1:06d}.npy"
    with atomic_file(root / shard) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, vectors.astype(np.float32))
    with open(root / CHUNKS, "a", encoding="utf-8") as fh:
        for c in chunks:
            fh.write(json.dumps(c, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    meta["shards"].append({"file": shard, "rows": int(len(vectors))})
    meta["count"] += len(chunks)
    with atomic_file(root / META) as tmp:
        tmp.write_text(json.dumps(meta))


def build_index(
    paths: list[str | Path],
    dest: str | Path,
    embedder: Embedder,
    chunking: ChunkConfig = ChunkConfig(),
    batch_chunks: int = 256,
    progress: Callable[[int, int], None] | None = None,
    force: bool = False,
    retriever: RetrieverConfig | None = None,
) -> IndexStats:
    """Index the documents in ``paths`` into ``dest`` (created, or extended incrementally).

    Documents already indexed with identical text are skipped; a document whose text changed
    is re-indexed and its old chunks are marked removed. Work is committed every
    ``batch_chunks`` chunks, so an interrupted run loses at most one batch. ``dest``
    holding something else is refused unless ``force`` (see :func:`_open_for_write`).
    ``retriever`` sets how the index is searched (None: keep an existing index's, else the
    default :class:`RetrieverConfig`); a retriever using BM25 gets its matrix saved at the end.
    """
    root = Path(dest)
    check_output(root, force, owned=_is_ours)  # before reading any document
    docs: list[Document] = []
    seen: set[str] = set()
    for p in paths:
        for d in read_documents(p):
            if d.key in seen:
                raise DataError(f"document {d.key} appears twice", "give each jsonl row a unique 'id'")
            seen.add(d.key)
            docs.append(d)
    if not docs:
        raise DataError("no document text found in " + ", ".join(map(str, paths)))
    with index_lock(root):
        stats = _build_locked(root, docs, embedder, chunking, batch_chunks, progress, force, retriever)
        _finish_retriever(root, retriever)
        return stats


def _finish_retriever(root: Path, retriever: RetrieverConfig | None) -> None:
    """Record ``retriever`` (when given) and save a current BM25 matrix when the retriever uses one."""
    index = VectorIndex.open(root)
    meta = index.meta
    if retriever is not None and meta["retriever"] != retriever.to_dict():
        meta["retriever"] = retriever.to_dict()
    if index.retriever.needs_bm25 and meta.get("bm25_built") != _bm25_state(meta):
        _build_bm25(index.chunks, meta, index.retriever.bm25).save(root)
        meta["bm25_built"] = _bm25_state(meta)
    with atomic_file(root / META) as tmp:
        tmp.write_text(json.dumps(meta))


def _build_locked(root: Path, docs: list[Document], embedder: Embedder, chunking: ChunkConfig, batch_chunks: int,
                  progress: Callable[[int, int], None] | None, force: bool, retriever: RetrieverConfig | None) -> IndexStats:
    meta = _open_for_write(root, embedder, chunking, retriever, force)
    todo = [d for d in docs if meta["docs"].get(d.key, {}).get("sha256") != d.sha256]
    skipped = len(docs) - len(todo)
    added_chunks = 0
    pending: list[tuple[Document, list[str]]] = []

    def flush():
        nonlocal added_chunks
        if not pending:
            return
        texts = [t for _, cs in pending for t in cs]
        vectors = embedder.embed(texts)
        records = []
        next_id = meta["count"]
        for d, cs in pending:
            old = meta["docs"].get(d.key)
            if old is not None:  # changed document: retire its old chunks
                meta["removed"] = sorted(set(meta["removed"]) | set(range(old["first"], old["first"] + old["chunks"])))
            meta["docs"][d.key] = {"sha256": d.sha256, "first": next_id, "chunks": len(cs), "source": d.source}
            records += [{"id": next_id + n, "doc": d.key, "n": n, "text": t} for n, t in enumerate(cs)]
            next_id += len(cs)
        _commit(root, meta, records, vectors)
        added_chunks += len(records)
        pending.clear()
        if progress is not None:
            progress(added_chunks, len(todo))

    size = 0
    for d in todo:
        cs = chunk_document(d, chunking, getattr(embedder, "count_tokens", None), getattr(embedder, "max_tokens", 0))
        if not cs:
            continue
        pending.append((d, cs))
        size += len(cs)
        if size >= batch_chunks:
            flush()
            size = 0
    flush()
    log.info("indexed %d documents (%d chunks) into %s; %d unchanged", len(todo), added_chunks, root, skipped)
    return IndexStats(len(todo), skipped, added_chunks, meta["count"] - len(meta["removed"]))
