"""What a run directory says about each stage: its cache key, its record, and the build plan.

A stage's key hashes its kind, its config, the recipe-level settings, the contents of input
files its config names (prompts, data, calibration text) and the key of the stage before it.
:func:`plan` compares the keys with each stage directory's ``stage.json`` (its record) and
``.key``, so the runner (:mod:`slmkit.pipeline.runner`) and the report
(:mod:`slmkit.pipeline.report`) read one account of a run without importing each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from slmkit.artefact import jsonable
from slmkit.pipeline.recipe import Recipe, StageSpec

log = logging.getLogger(__name__)

#: Bumped when the run-directory layout changes (invalidates every cached stage).
STAGE_FORMAT = 1
RECORD = "stage.json"
KEYFILE = ".key"


_FILE_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256, so a build hashes a file once


def _file_sha256(path: Path) -> str:
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[memo] = h.hexdigest()
    return _FILE_HASHES[memo]


def input_files(config) -> dict[str, str]:
    """``{value: sha256}`` of every string in a stage config that names an existing file
    (prompts, training data, calibration or evaluation text): editing such a file in place
    changes the stage's key, so the stage runs again. Directories (model specs) are not hashed."""
    found: dict[str, str] = {}

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v and "\0" not in v:
            try:
                if Path(v).is_file():
                    found[v] = _file_sha256(Path(v))
            except OSError:
                pass

    walk(jsonable(dataclasses.asdict(config)))
    return found


def stage_key(spec: StageSpec, recipe: Recipe, previous: str) -> str:
    """Hash of (stage kind, its config, recipe settings, the previous stage's key, the contents
    of input files its config names)."""
    config = jsonable(dataclasses.asdict(spec.config))
    # an empty ``options`` / ``loss_options`` mapping is left out, so the keys of stages written before
    # those settings existed are what they always were
    config = {k: v for k, v in config.items() if not (k.endswith("options") and v == {})}
    payload = {
        "format": STAGE_FORMAT,
        "kind": spec.kind,
        "config": config,
        "recipe": recipe.settings_key(),
        "input": previous,
    }
    files = input_files(spec.config)
    if files:  # absent when there are none, so the keys of such stages are what they always were
        payload["files"] = files
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def missing_outputs(rec: dict, run_dir: Path, spec: StageSpec) -> list[str]:
    """Outputs a finished stage recorded in its own directory that are no longer there."""
    out = []
    for name, value in (rec.get("outputs") or {}).items():
        if isinstance(value, str) and Path(value).parts[:1] == (spec.dirname,) and not (run_dir / value).exists():
            out.append(f"{name} ({value})")
    return out


def read_record(stage_dir: Path) -> dict | None:
    path = stage_dir / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def plan(recipe: Recipe, run_dir: Path) -> list[tuple[StageSpec, str, str]]:
    """(stage, key, state) for every stage without running anything; state is done | partial | todo."""
    out, prev, broken = [], "", False
    for spec in recipe.stages:
        key = stage_key(spec, recipe, prev)
        sdir = run_dir / spec.dirname
        rec = read_record(sdir)
        gone = missing_outputs(rec, run_dir, spec) if not broken and rec is not None and rec.get("key") == key else []
        if gone:
            log.warning("%s: recorded outputs are missing (%s); running it again", spec.label, ", ".join(gone))
        if not broken and rec is not None and rec.get("key") == key and not gone:
            state = "done"
        else:
            broken = True
            keyfile = sdir / KEYFILE
            # a finished stage whose outputs are gone is in an unknown state: cleared and run afresh
            state = "partial" if not gone and keyfile.is_file() and keyfile.read_text().strip() == key else "todo"
        out.append((spec, key, state))
        prev = key
    return out
