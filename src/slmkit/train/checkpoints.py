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

A run directory also carries the run's identity (``run.json``: the model, the data and the
settings that must not change within a run): :func:`prepare_run` writes it when a run starts and,
on ``--resume``, refuses (:class:`~slmkit.errors.ConfigError`, exit 2) to continue another run's
checkpoints. Distillation keeps it in its output directory, SFT and preference training in
``OUTPUT.checkpoints``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import struct
from dataclasses import asdict
from pathlib import Path

from slmkit.artefact import atomic_file
from slmkit.errors import ConfigError

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
WEIGHTS = ("model.safetensors", "adapter_model.safetensors")
BIN_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
OPTIMIZER = ("optimizer.pt", "scheduler.pt")
RUN_FILE = "run.json"


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


# ---------------------------------------------------------------------------- run identity


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rows_sha256(rows) -> str:
    """sha256 of JSON-able training rows (conversations, preference pairs) in order."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def weights_sha256(model) -> str:
    """sha256 over every parameter and buffer of ``model`` (names, dtypes, shapes and bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: config fields that set how long a run trains and how often it saves or logs: a resume may change them
CADENCE_FIELDS = ("max_steps", "save_steps", "save_total_limit", "logging_steps")


def settings_identity(cfg) -> dict:
    """A training config's fields that must match for a resume to continue the run (all but :data:`CADENCE_FIELDS`)."""
    return {k: v for k, v in asdict(cfg).items() if k not in CADENCE_FIELDS}


def logging_steps(logging: int, save: int, max_steps: int) -> int:
    """The Trainer's logging interval, shortened to divide the save interval and the step budget.

    The Trainer logs the mean loss of the steps since its last log and forgets the steps after
    it when a run stops; a checkpoint taken between two logs therefore made a resumed run log
    (and record in ``log_history``) other numbers than an uninterrupted one. With every
    checkpoint and the last step on a log boundary, a resumed run's log equals the uninterrupted
    run's.
    """
    return math.gcd(math.gcd(max(1, logging), max(1, save)), max(1, max_steps))


def train_from(trainer, start: Path | None) -> None:
    """``trainer.train()``, resuming from the checkpoint ``start`` (or from step 0 when None).

    A checkpoint already at (or past) the step budget is loaded without training: the Trainer,
    resumed at its last step, runs one step more before it checks the budget (a rerun of a
    finished run, killed before it cleaned up, wrote a model one step further than the run's).
    """
    if start is not None and checkpoint_step(start) >= trainer.args.max_steps:
        from transformers.trainer_callback import TrainerState

        if checkpoint_step(start) > trainer.args.max_steps:
            log.warning("%s is past the step budget (%d); keeping its weights", start, trainer.args.max_steps)
        trainer._load_from_checkpoint(str(start))  # weights (or adapters) only: nothing is left to train
        trainer.state = TrainerState.load_from_json(str(start / STATE))
        return
    trainer.train(resume_from_checkpoint=str(start) if start is not None else None)


def stop_at(step: int):
    """A Trainer callback that stops training after ``step`` without finishing the run (tests use it to
    simulate a killed run: the checkpoints stay, the final model is not written)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= step:
                control.should_training_stop = True
            return control

    return StopAt()


def mean_logged_loss(log_history: list[dict]) -> float:
    """Mean training loss over all steps of a run, from the Trainer's ``log_history`` (each logged
    loss weighted by the steps it covers). Unlike the Trainer's ``training_loss`` (the steps run in
    *this* call), it is the same for a resumed run as for an uninterrupted one; NaN when nothing was logged."""
    total, last = 0.0, 0
    for h in log_history:
        if "loss" in h and "step" in h and h["step"] > last:
            total += float(h["loss"]) * (h["step"] - last)
            last = h["step"]
    return total / last if last else math.nan


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _holds_run(directory: Path, checkpoints: Path) -> bool:
    return (directory / RUN_FILE).exists() or (checkpoints.is_dir() and any(
        checkpoint_step(p) is not None for p in checkpoints.iterdir() if p.is_dir()))


def prepare_run(directory: str | Path, identity: dict, resume: bool, existing: str = "refuse",
                checkpoints: str | Path | None = None) -> Path | None:
    """Check ``directory``'s run against ``identity``; return the checkpoint to resume from (or None).

    ``identity`` (JSON-able) names what must not change within a run: model, data, settings
    (not the step budget or save cadence). With ``resume``, an existing ``run.json`` must equal
    it (else :class:`ConfigError` naming up to three differing fields); checkpoints without a
    ``run.json`` are refused (whose run they are cannot be told); a directory holding no run
    yet starts a new one (a run killed before it wrote anything resumes from step 0). Without
    ``resume``, a directory holding a run is refused (``existing="refuse"``) or cleared of its
    run state (``existing="replace"``). ``run.json`` is written atomically when a run starts.
    ``checkpoints``: where the ``checkpoint-N`` directories are (default ``directory``).
    """
    directory = Path(directory)
    ckpts = Path(checkpoints) if checkpoints is not None else directory
    run_file = directory / RUN_FILE
    held = directory.is_dir() and _holds_run(directory, ckpts)
    if held and resume:
        if not run_file.is_file():
            raise ConfigError(f"{directory} holds checkpoints without a {RUN_FILE}, so whose run they are cannot be checked",
                              f"delete {directory} to start over, or choose another --output")
        try:
            old = json.loads(run_file.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            raise ConfigError(f"{run_file} is not readable JSON", f"delete {directory} to start over") from None
        old, new = _flat(old if isinstance(old, dict) else {}), _flat(json.loads(json.dumps(identity)))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            shown = "; ".join(f"{k}: {str(old.get(k))[:40]!r} there, {str(new.get(k))[:40]!r} now" for k in diff[:3])
            raise ConfigError(f"{directory} holds a different run ({shown})",
                              "resume with the same model, data and settings, or choose another --output")
        ckpt = last_complete_checkpoint(ckpts)
        if ckpt is None:
            log.warning("no complete checkpoint in %s; starting from step 0", ckpts)
        return ckpt
    if held and existing == "refuse":
        raise ConfigError(f"{directory} already holds a training run",
                          "pass --resume to continue it, or choose another --output")
    if held:
        log.warning("starting a new run in %s: removing the previous run's checkpoints (pass --resume to continue one)",
                    directory)
        for p in ckpts.iterdir() if ckpts.is_dir() else ():
            if checkpoint_step(p) is not None and p.is_dir():
                shutil.rmtree(p)
    elif resume:
        log.warning("nothing to resume in %s; starting a new run", directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(run_file) as tmp:
        tmp.write_text(json.dumps(identity, indent=2, sort_keys=True))
    return None


def finish_run(directory: str | Path) -> None:
    """Remove a finished run's directory once its final artefact is safely written.

    Checkpoints go first, newest first, and ``run.json`` last: a run killed while this runs
    leaves a directory that ``--resume`` still recognises as its own (it resumes from a
    remaining complete checkpoint, or from step 0, and writes the same result).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    entries = sorted(directory.iterdir(), key=lambda p: (p.name == RUN_FILE, -(checkpoint_step(p) or 0)))
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    directory.rmdir()
