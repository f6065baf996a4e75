"""Progress of long library calls, reported to whoever listens (the CLI's bar), the way logging works.

Library loops call :func:`step` with a phase name and (done, total); they never print. A caller
that wants to show progress wraps the call in :func:`reporting` with a listener; without one,
:func:`step` only looks up a context variable. The listener lives in a
:class:`contextvars.ContextVar`, so it is scoped to the ``with`` block (and its thread) and no
module-level state is shared between calls. ``slmkit.cli.progress`` draws the listener as a
rich bar with an ETA, on stderr, and only on a terminal and without ``--json``.

For APIs that already take a ``progress(done, total)`` callback (``build_index``, the build
stages' ``ctx.progress``), :func:`callback` adapts one phase to it; Trainer-based training gets
:func:`trainer_callback`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: a listener gets (phase, done, total); total None = unknown
Listener = Callable[[str, int, "int | None"], None]

_LISTENER: ContextVar[Listener | None] = ContextVar("slmkit_progress_listener", default=None)


def step(phase: str, done: int, total: int | None = None) -> None:
    """Report that ``done`` of ``total`` units of ``phase`` (e.g. "layers", "prompts") are finished."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(phase, done, total)


def active() -> bool:
    """Whether anyone listens (lets a loop skip work it would do only to report progress)."""
    return _LISTENER.get() is not None


@contextmanager
def reporting(listener: Listener) -> Iterator[None]:
    """Send the :func:`step` calls made inside the block (in this thread) to ``listener``."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def callback(phase: str) -> Callable[[int, int | None], None]:
    """A ``progress(done, total)`` function that reports ``phase``."""
    return lambda done, total=None: step(phase, done, total)


def trainer_callback(phase: str = "training steps"):
    """A ``transformers.TrainerCallback`` reporting optimizer steps (global_step of max_steps)."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            step(phase, state.global_step, state.max_steps or None)

        def on_step_end(self, args, state, control, **kw):
            step(phase, state.global_step, state.max_steps or None)

    return ProgressCallback()
