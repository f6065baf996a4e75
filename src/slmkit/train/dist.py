"""Training in many processes: ``accelerate launch [--cpu] --num_processes N -m slmkit distill|sft|dpo ...``.

The transformers Trainer (and TRL's trainers on it) run data-parallel under ``accelerate launch``
(DDP; FSDP and DeepSpeed through accelerate's config): the Trainer shards each global batch over
the processes, all-reduces the gradients and writes its checkpoints from the main process (plus
one RNG state per process). slmkit's own writes around it, the run directory's identity file and
the final model with its manifest, go through :func:`on_main`: the main process does the work,
the others wait for it and receive its result, or its error, so every process leaves the same way.
A single process (no process group) simply calls the function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from slmkit.errors import SlmkitError

log = logging.getLogger(__name__)

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process in the initialised process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on the main process only; every process returns its result (picklable), or raises its
    :class:`~slmkit.errors.SlmkitError` (another failure on the main process: a RuntimeError elsewhere)."""
    rank, size = world()
    if size == 1:
        return fn()
    import torch.distributed as dist

    box: list = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except SlmkitError as err:
            box[0] = ("error", err)
        except BaseException as err:
            box[0] = ("failed", f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "ok":
        return value
    if kind == "error":
        raise value
    raise RuntimeError(f"the main process failed: {value}")
