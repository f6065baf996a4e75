"""Artefacts: Hugging Face-loadable directories plus an ``slmkit.json`` manifest.

A directory is written into a temporary sibling and renamed into place, so a
crash never leaves a half-written model at the destination, and an existing
output is replaced only when slmkit wrote it (or the user passed ``--force``):
see :func:`check_output`. The manifest
records where the model came from, which stages made it (with their configs),
the metrics measured on it and the slmkit version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from slmkit.errors import OutputExistsError

log = logging.getLogger(__name__)

MANIFEST = "slmkit.json"


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


@dataclasses.dataclass
class Manifest:
    """Provenance and metrics of one artefact (``slmkit.json``)."""

    source: str
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    slmkit_version: str = ""
    created: str = ""

    def add_stage(self, name: str, config: Any = None, **extra: Any) -> None:
        self.stages.append({"stage": name, "config": jsonable(config), **jsonable(extra)})

    def to_json(self) -> str:
        from slmkit import __version__

        data = jsonable(self)
        data["slmkit_version"] = self.slmkit_version or __version__
        data["created"] = self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return json.dumps(data, indent=2, sort_keys=False)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> Manifest | None:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


GGUF_MAGIC = b"GGUF"
TMP_MARK, _OLD = ".tmp-", ".old-"


def is_slmkit_dir(path: Path) -> bool:
    """True when ``path`` is a directory slmkit wrote: its manifest ``slmkit.json`` is there."""
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and not manifest.is_symlink()


def is_gguf_file(path: Path) -> bool:
    """True when ``path`` starts with the GGUF magic (a GGUF file, which an export may replace)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def check_output(path: str | os.PathLike, force: bool = False, owned: Callable[[Path], bool] = is_slmkit_dir,
                 kind: str = "dir") -> Path:
    """Refuse an output that would destroy something slmkit did not write; return ``path``.

    ``path`` may be written when it does not exist, is empty (an empty directory,
    or for ``kind="file"`` an empty file), or ``owned(path)`` says slmkit wrote it;
    with ``force`` anything of the right ``kind`` may be. A symbolic link is always
    refused (writing would go through it), and so is a file where a directory is
    wanted or the other way round. Raises :class:`OutputExistsError` (exit 2) and
    touches nothing.
    """
    path = Path(path)
    if path.is_symlink():
        raise OutputExistsError(f"output {path} is a symbolic link; slmkit does not write through links",
                                "choose another --output (the real path, or a new one)")
    if not path.exists():
        return path
    if kind == "dir" and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory", "choose another --output")
    if kind == "file" and path.is_dir():
        raise OutputExistsError(f"output {path} is a directory, not a file", "choose another --output")
    empty = not any(path.iterdir()) if kind == "dir" else path.stat().st_size == 0
    if empty or force or owned(path):
        return path
    raise OutputExistsError(f"output {path} exists and was not written by slmkit; it was left as it is",
                            "pass --force to replace it, or choose another --output")


def _umask() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the classic way (set and restore)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to disk; a file system that cannot is left alone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(dest: str | os.PathLike) -> None:
    """Remove the ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings a killed earlier write of ``dest`` left.

    Their names carry the writer's process id; those of a process still alive are
    left alone. A run killed between moving the old ``dest`` aside and moving the
    new one in leaves no ``dest`` but its ``.old-*``: that previous output is put back.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    stale: dict[str, list[Path]] = {TMP_MARK: [], _OLD: []}
    for entry in dest.parent.iterdir():
        for mark, found in stale.items():
            prefix = f".{dest.name}{mark}"
            if entry.name.startswith(prefix):
                pid = entry.name[len(prefix):].split("-")[0]
                if not (pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid)))):
                    found.append(entry)
    olds = sorted(stale[_OLD], key=lambda p: p.lstat().st_mtime)
    if olds and not dest.exists() and not dest.is_symlink():
        log.warning("putting back %s: a run stopped while replacing it", dest)
        os.replace(olds.pop(), dest)
    for entry in stale[TMP_MARK] + olds:
        log.info("removing %s, left by a run that was stopped", entry)
        _remove(entry)


def _prepare(dest: Path, force: bool, owned: Callable[[Path], bool], kind: str) -> None:
    if dest.is_symlink():
        check_output(dest, force, owned, kind)  # raises
    clean_stale(dest)
    check_output(dest, force, owned, kind)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, force: bool = False,
               owned: Callable[[Path], bool] = is_slmkit_dir) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``dest`` only if the block succeeds.

    ``dest`` is first checked with :func:`check_output` (an existing directory
    slmkit did not write is replaced only with ``force``). On success the new
    directory is flushed to disk and renamed into place, and only then is an
    existing ``dest`` removed; on any exception the temporary directory is
    removed and ``dest`` is untouched. Leftovers of a killed earlier write are
    cleaned first (:func:`clean_stale`).
    """
    dest = Path(dest)
    if dest.name in ("", ".", ".."):  # "." or "x/..": name the directory itself
        dest = Path(os.path.abspath(dest))
    _prepare(dest, force, owned, "dir")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_MARK}{os.getpid()}-", dir=dest.parent))
    try:
        yield tmp
        check_output(dest, force, owned, "dir")  # again: something may have appeared meanwhile
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        _fsync_tree(tmp)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}{_OLD}{os.getpid()}-", dir=dest.parent))
            os.replace(dest, old)  # replaces the empty placeholder directory
            os.replace(tmp, dest)
            _fsync(dest.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
            _fsync(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, force: bool = False,
                owned: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary path (same suffix) that is renamed to ``dest`` when the block succeeds.

    With ``owned`` (a predicate saying whether an existing file is slmkit's),
    ``dest`` is a user's output and is checked with :func:`check_output` first;
    without it, ``dest`` is a file inside a directory slmkit already owns and is
    replaced as it is. The file is flushed to disk and gets the umask's permissions.
    """
    dest = Path(dest)
    if owned is not None:
        _prepare(dest, force, owned, "file")
    else:
        clean_stale(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}{TMP_MARK}{os.getpid()}-", suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if owned is not None:
            check_output(dest, force, owned, "file")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
        _fsync(tmp)
        os.replace(tmp, dest)
        _fsync(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_model(model, tokenizer, directory: str | os.PathLike, manifest: Manifest) -> Path:
    """Save ``model`` and ``tokenizer`` (safetensors) plus ``slmkit.json`` into ``directory`` as it is (not atomic)."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / MANIFEST).write_text(manifest.to_json())
    return directory


def save_model(model, tokenizer, dest: str | os.PathLike, manifest: Manifest, force: bool = False) -> Path:
    """Save ``model`` and ``tokenizer`` as safetensors plus ``slmkit.json``, atomically (see :func:`atomic_dir`)."""
    dest = Path(dest)
    with atomic_dir(dest, force=force) as tmp:
        write_model(model, tokenizer, tmp, manifest)
    return dest
