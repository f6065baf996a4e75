"""Finding the checkpoint to resume from: the newest *complete* ``checkpoint-N``.

Used by SFT, preference training (DPO and friends) and distillation. The Trainer writes a
checkpoint as model weights, then optimizer / scheduler / RNG state, then
``trainer_state.json`` last; it deletes old checkpoints (``save_total_limit``) file by file.
A run killed during either leaves a ``checkpoint-N`` that cannot be resumed from, and
resuming from it used to fail on every later ``--resume``. A checkpoint counts as complete
when:

* ``trainer_state.json`` parses and its ``global_step`` is ``N``;
* its weights are there and whole: ``model.safetensors`` / ``adapter_model.safetensors``
  (header and data length checked against the file size), a sharded
  ``model.safetensors.index.json`` with every shard present and whole, or a ``.bin``;
* ``optimizer.pt`` and ``scheduler.pt`` are there and not empty (slmkit never saves with
  ``save_only_model``: a resume needs them).

Incomplete ones are logged and removed, so the Trainer can write that step again cleanly.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
WEIGHTS = ("model.safetensors", "adapter_model.safetensors")
BIN_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
OPTIMIZER = ("optimizer.pt", "scheduler.pt")


def checkpoint_step(path: Path) -> int | None:
    """``N`` of a ``checkpoint-N`` directory name, else None."""
    head, _, tail = path.name.rpartition("-")
    return int(tail) if head == "checkpoint" and tail.isdigit() else None


def safetensors_whole(path: Path) -> bool:
    """The file's header parses and its tensors' data ends exactly at the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return False
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                return False
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(header, dict):
        return False
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            return False
    return 8 + n + end == size


def _nonempty(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _weights_whole(ckpt: Path) -> bool:
    for name in WEIGHTS:
        if (ckpt / name).exists():
            return safetensors_whole(ckpt / name)
    for name in INDEXES:
        if (ckpt / name).exists():
            try:
                shards = set(json.loads((ckpt / name).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False
            if not shards:
                return False
            check = safetensors_whole if name.startswith("model.safetensors") else _nonempty
            return all(isinstance(s, str) and "/" not in s and check(ckpt / s) for s in shards)
    return any(_nonempty(ckpt / name) for name in BIN_WEIGHTS)


def incomplete_reason(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None when it is complete."""
    step = checkpoint_step(ckpt)
    if step is None or not ckpt.is_dir():
        return "not a checkpoint-N directory"
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return f"no readable {STATE}"
    if not isinstance(state, dict) or state.get("global_step") != step:
        return f"{STATE} does not name step {step}"
    if not _weights_whole(ckpt):
        return "model weights missing or truncated"
    missing = [n for n in OPTIMIZER if not _nonempty(ckpt / n)]
    if missing:
        return f"{', '.join(missing)} missing or empty"
    return None


def is_complete(ckpt: Path) -> bool:
    return incomplete_reason(Path(ckpt)) is None


def last_complete_checkpoint(directory: str | Path, remove: bool = True) -> Path | None:
    """Newest complete ``checkpoint-N`` in ``directory`` (None when there is none).

    Incomplete ones (a run killed while saving or while deleting an old checkpoint) are
    logged and, with ``remove``, deleted.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = sorted((p for p in directory.iterdir() if checkpoint_step(p) is not None and p.is_dir()),
                   key=checkpoint_step)
    best = None
    for p in found:
        why = incomplete_reason(p)
        if why is None:
            best = p
            continue
        log.warning("skipping incomplete checkpoint %s (%s: the run stopped while writing or deleting it)%s",
                    p, why, "; removing it" if remove else "")
        if remove:
            shutil.rmtree(p, ignore_errors=True)
    return best
