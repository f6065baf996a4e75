"""Progress of a build: a live terminal view (rich) or plain log lines.

The runner calls a :class:`View`: ``begin`` with every stage and its state
(done / partial / todo), ``stage_start``, ``step`` (done, total) from inside a
stage, ``stage_end`` and ``end``. The rich view shows a table of stages
(status, time) and a bar for the running stage's steps with its ETA.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

log = logging.getLogger(__name__)

_STYLE = {"pending": "dim", "running": "bold yellow", "ran": "green", "resumed": "green", "cached": "cyan", "failed": "bold red"}


def make_bar(console, transient: bool = False):
    """The rich progress bar slmkit shows (build stages, and every long verb through ``slmkit.cli.progress``):
    description, bar, done/total, elapsed time and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


class View(Protocol):
    def begin(self, recipe, stages: list) -> None: ...
    def stage_start(self, spec, resumed: bool) -> None: ...
    def step(self, spec, done: int, total: int | None) -> None: ...
    def stage_end(self, spec, status: str, seconds: float) -> None: ...
    def end(self, ok: bool, seconds: float) -> None: ...


class LogView:
    """Log lines only (library use, ``--json``, no terminal). Steps are logged at most every 10 s."""

    def __init__(self):
        self._last = 0.0

    def begin(self, recipe, stages):
        pass

    def stage_start(self, spec, resumed):
        pass

    def step(self, spec, done, total):
        now = time.monotonic()
        if now - self._last >= 10 or (total is not None and done >= total):
            self._last = now
            log.info("%s: step %d/%s", spec.label, done, total if total is not None else "?")

    def stage_end(self, spec, status, seconds):
        pass

    def end(self, ok, seconds):
        pass


class RichView(LogView):
    """A live table of stages plus a progress bar (with ETA) for the running stage."""

    def __init__(self, console=None):
        super().__init__()
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.progress = make_bar(self.console)
        self.rows: dict[int, dict] = {}
        self.task = None
        self.live = None
        self.title = ""
        self.caption = ""

    def _render(self):
        from rich.console import Group
        from rich.table import Table

        t = Table(title=self.title, title_justify="left", caption=self.caption, caption_justify="left", expand=False)
        for col in ("#", "stage", "kind", "status", "time"):
            t.add_column(col)
        for i, r in sorted(self.rows.items()):
            secs = r["seconds"]
            if r["status"] == "running":
                secs = time.monotonic() - r["t0"]
            t.add_row(str(i), r["name"], r["kind"], f"[{_STYLE.get(r['status'], '')}]{r['status']}", f"{secs:.1f} s" if secs else "")
        return Group(t, self.progress)

    def begin(self, recipe, stages):
        from rich.live import Live

        self.title = f"slmkit build: {recipe.name} (teacher {recipe.teacher})"
        for spec, state in stages:
            status = {"done": "pending", "partial": "pending (resume)", "todo": "pending"}[state]
            self.rows[spec.index] = {"name": spec.name, "kind": spec.kind, "status": status, "seconds": 0.0, "t0": 0.0}
        self.live = Live(console=self.console, get_renderable=self._render, refresh_per_second=4, transient=False)
        self.live.start()

    def stage_start(self, spec, resumed):
        self.rows[spec.index].update(status="running", t0=time.monotonic())
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(spec.name, total=None)

    def step(self, spec, done, total):
        super().step(spec, done, total)
        if self.task is not None:
            self.progress.update(self.task, completed=done, total=total)

    def stage_end(self, spec, status, seconds):
        self.rows[spec.index].update(status=status, seconds=seconds)
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def end(self, ok, seconds):
        self.caption = f"{'finished' if ok else 'stopped'} after {seconds:.0f} s"
        if self.live is not None:
            self.live.refresh()
            self.live.stop()
            if not self.console.is_terminal:
                self.console.line()
