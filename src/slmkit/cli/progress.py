"""Progress bars (with ETA) for the long verbs, drawn from :mod:`slmkit.progress` reports.

A verb wraps its library call in ``with progress_bar("quantize", json_out):``. Each phase the
library reports (calibration tokens, layers, training steps, prompts, chunks) gets its own
line on stderr: the bar ``build`` shows (:func:`slmkit.pipeline.progress.make_bar`). Nothing is
drawn under ``--json`` or when stderr is not a terminal (pipes, CI logs), so stdout and logs
stay clean. ``SLMKIT_PROGRESS=1`` forces the bars on without a terminal (``--json`` still
wins), ``SLMKIT_PROGRESS=0`` turns them off.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from slmkit.progress import reporting

ENV = "SLMKIT_PROGRESS"


def show_progress(json_out: bool) -> bool:
    """Whether a verb draws progress: never with ``--json``; else as ``SLMKIT_PROGRESS`` says, or when stderr is a terminal."""
    if json_out:
        return False
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


@contextmanager
def progress_bar(verb: str, json_out: bool) -> Iterator[None]:
    """Draw the library's progress reports inside the block as bars on stderr (when :func:`show_progress`)."""
    if not show_progress(json_out):
        yield
        return
    from rich.console import Console

    from slmkit.pipeline.progress import make_bar

    console = Console(stderr=True, force_terminal=True if not sys.stderr.isatty() else None)
    bar = make_bar(console)
    tasks: dict[str, object] = {}

    def listen(phase: str, done: int, total: int | None) -> None:
        task = tasks.get(phase)
        if task is None:
            task = tasks[phase] = bar.add_task(f"{verb}: {phase}", total=total)
        bar.update(task, completed=done, total=total)

    with bar, reporting(listen):
        yield


def with_progress(verb: str):
    """Decorate a verb so the progress its library call reports is drawn (``--json`` read from ``json_out``)."""

    def decorate(fn):
        @functools.wraps(fn)
        def verb_with_progress(*args, **kwargs):
            with progress_bar(verb, bool(kwargs.get("json_out", False))):
                return fn(*args, **kwargs)

        return verb_with_progress

    return decorate


def quiet_libraries() -> None:
    """Turn off the progress bars of transformers ("Loading weights") and datasets: on stderr they
    would bury a two-line error (slmkit draws its own bars, above)."""
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    disable_progress_bar()
    hf_logging.disable_progress_bar()
