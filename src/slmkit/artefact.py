"""Artefacts: Hugging Face-loadable directories plus an ``slmkit.json`` manifest.

A directory is written into a temporary sibling and renamed into place, so a
crash never leaves a half-written model at the destination. The manifest
records where the model came from, which stages made it (with their configs),
the metrics measured on it and the slmkit version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slmkit.errors import SlmkitError

MANIFEST = "slmkit.json"


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
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
        self.stages.append({"stage": name, "config": _jsonable(config), **_jsonable(extra)})

    def to_json(self) -> str:
        from slmkit import __version__

        data = _jsonable(self)
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


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``dest`` only if the block succeeds.

    On success an existing ``dest`` is replaced (if ``overwrite``); on any
    exception the temporary directory is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise SlmkitError(f"output {dest} already exists", "choose another --output or remove it")
    if dest.exists() and not dest.is_dir():
        raise SlmkitError(f"output {dest} exists and is not a directory", "choose another --output")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path that is renamed to ``dest`` when the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_model(model, tokenizer, dest: str | os.PathLike, manifest: Manifest) -> Path:
    """Save ``model`` and ``tokenizer`` as safetensors plus ``slmkit.json``, atomically."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(manifest.to_json())
    return dest
