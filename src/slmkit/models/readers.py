"""Readers of artefact directories that transformers cannot load by itself (packed codes, factorised Linears).

A format is a :class:`Reader`: how to recognise a directory in it and how to read the model. The
package that writes the format defines its reader beside the writer; :data:`slmkit.plugins.MODEL_READERS`
names it (``"module:attribute"``), and :func:`find_reader` imports it on first use, so
:func:`slmkit.models.load` loops over readers and ``models/`` imports none of the packages above it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from slmkit.plugins import MODEL_READERS


@dataclass(frozen=True)
class Reader:
    """One artefact format: ``recognise(dir) -> bool`` and ``read(dir, config, torch_dtype) -> model``."""

    recognise: Callable[[Path], bool]
    read: Callable  #: (directory, transformers config, torch dtype) -> PreTrainedModel (not yet in eval mode)
    help: str = ""


def readers(table: Mapping[str, str] = MODEL_READERS) -> dict[str, Reader]:
    """Every reader of ``table`` (name -> ``"module:attribute"``), imported."""
    out = {}
    for name, target in table.items():
        module, _, attr = target.partition(":")
        out[name] = getattr(importlib.import_module(module), attr)
    return out


def find_reader(path: str | Path, table: Mapping[str, str] = MODEL_READERS) -> Reader | None:
    """The first reader that recognises the directory ``path``, or None (a plain transformers directory)."""
    path = Path(path)
    return next((r for r in readers(table).values() if r.recognise(path)), None)
