"""Running a recipe in a run directory: cached, resumable, logged.

Layout of ``RUN_DIR``::

    recipe.yaml            the exact recipe of the last build
    build.log              log of every build (appended)
    01-gen-data/           one directory per stage: its artefacts ...
      .key                 ... the stage's cache key while it runs ...
      stage.json           ... and, written last, its record (the "finished" marker)
    report.html, report.json

A stage's key hashes its kind, its config, the recipe-level settings, the
contents of input files its config names (prompts, data, calibration text) and
the key of the stage before it, so changing a stage or editing one of its input
files re-runs it and everything after it, and nothing else. A stage whose
``stage.json`` carries the current key, and whose recorded outputs in its own
directory all exist, is not run again. A stage directory without ``stage.json`` but with the current
``.key`` belongs to an interrupted run: the stage runs again in the same
directory and picks up its own checkpoints. Every artefact and record is
written atomically (:mod:`slmkit.artefact`), so a crash or Ctrl-C loses only
the unfinished part of the stage that was running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.artefact import jsonable, atomic_file, check_output
from slmkit.pipeline.stages import STAGES, Context
from slmkit.pipeline.progress import LogView, View
from slmkit.pipeline.recipe import Recipe
from slmkit.pipeline.state import KEYFILE, RECORD, plan, read_record

log = logging.getLogger(__name__)



@dataclass
class BuildResult:
    run_dir: Path
    recipe: Recipe
    stages: list[dict] = field(default_factory=list)  #: records, each with "status": cached | ran | resumed
    seconds: float = 0.0
    report: Path | None = None


def recipe_yaml(recipe: Recipe) -> str:
    """YAML text of a recipe built in Python (parses back to the same recipe)."""
    import yaml

    stages = [{"stage": s.kind, **({"name": s.name} if s.name != s.kind else {}), **jsonable(dataclasses.asdict(s.config))}
              for s in recipe.stages]
    data = {"name": recipe.name, "teacher": recipe.teacher, "seed": recipe.seed, "dtype": recipe.dtype, "stages": stages}
    return yaml.safe_dump(data, sort_keys=False)


def _write_json(path: Path, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(jsonable(data), indent=2))


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """One build at a time per run directory (an advisory lock, released when the process dies)."""
    import fcntl

    from slmkit.errors import SlmkitError

    with open(run_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SlmkitError(f"another build is running in {run_dir}", "wait for it to finish, or use another --output") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send slmkit's INFO log to ``path`` for the duration; the console keeps only warnings."""
    root = logging.getLogger()
    pkg = logging.getLogger("slmkit")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    quiet = [h for h in root.handlers if h.level < logging.WARNING]
    old_levels = [h.level for h in quiet]
    old_pkg = pkg.level
    for h in quiet:
        h.setLevel(logging.WARNING)
    pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        handler.close()
        pkg.setLevel(old_pkg)
        for h, lvl in zip(quiet, old_levels):
            h.setLevel(lvl)


def is_run_dir(path: Path) -> bool:
    """True when ``path`` is a run directory a build made (its ``recipe.yaml`` and ``build.log``, or only the lock)."""
    names = {p.name for p in path.iterdir()}
    return {"recipe.yaml", "build.log"} <= names or names <= {".lock"}


def build(recipe: Recipe, run_dir: str | Path, view: View | None = None, report: bool = True,
          force: bool = False) -> BuildResult:
    """Run ``recipe`` in ``run_dir``: skip finished stages, resume interrupted ones, run the rest.

    A non-empty ``run_dir`` that no build made is refused unless ``force`` (then the
    build runs in it: its stage directories ``NN-name`` replace any of the same name).
    """
    run_dir = Path(run_dir)
    check_output(run_dir, force, owned=is_run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _locked(run_dir):
        return _build(recipe, run_dir, view or LogView(), report)


def _build(recipe: Recipe, run_dir: Path, view: View, report: bool) -> BuildResult:
    result = BuildResult(run_dir, recipe)
    t_build = time.perf_counter()
    with atomic_file(run_dir / "recipe.yaml") as tmp:
        tmp.write_text(recipe.text or recipe_yaml(recipe), encoding="utf-8")
    with _log_to(run_dir / "build.log"):
        log.info("build %s (%s) in %s: %d stages", recipe.name, recipe.source, run_dir, len(recipe.stages))
        steps = plan(recipe, run_dir)
        view.begin(recipe, [(s, state) for s, _, state in steps])
        slots: dict[str, str] = {"teacher": recipe.teacher}
        history: list[dict] = []
        cache: dict = {}
        ok = False
        try:
            for spec, key, state in steps:
                sdir = run_dir / spec.dirname
                if state == "done":
                    rec = read_record(sdir)
                    rec["status"] = "cached"
                    log.info("%s: unchanged (key %s), not run again", spec.label, key)
                    view.stage_end(spec, "cached", rec.get("seconds", 0.0))
                else:
                    rec = _run_stage(spec, key, state, sdir, run_dir, recipe, slots, history, cache, view)
                slots.update(rec.get("outputs", {}))
                history.append(rec)
                result.stages.append(rec)
            ok = True
        finally:
            result.seconds = time.perf_counter() - t_build
            view.end(ok, result.seconds)
            if not ok:
                log.info("build stopped after %.1f s; run the same command again to resume", result.seconds)
        if report:
            from slmkit.pipeline.report import write_report

            result.report = write_report(run_dir)
        log.info("build finished in %.1f s", result.seconds)
    return result


def _run_stage(spec, key, state, sdir, run_dir, recipe, slots, history, cache, view) -> dict:
    kind = STAGES.get(spec.kind)
    resumed = state == "partial"
    if sdir.exists() and not resumed:
        log.info("%s: settings or inputs changed; clearing %s", spec.label, sdir)
        shutil.rmtree(sdir)
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / RECORD).unlink(missing_ok=True)
    (sdir / KEYFILE).write_text(key)
    log.info("%s: %s (key %s)", spec.label, "resuming" if resumed else "running", key)
    view.stage_start(spec, resumed)
    ctx = Context(
        run_dir=run_dir,
        work=sdir,
        index=spec.index,
        name=spec.name,
        recipe=recipe,
        slots=dict(slots),
        history=list(history),
        progress=lambda done, total: view.step(spec, done, total),
        cache=cache,
    )
    started = time.time()
    t0 = time.perf_counter()
    c0 = time.process_time()
    try:
        out = kind.run(ctx, spec.config)
    except BaseException as err:
        log.error("%s failed: %s: %s", spec.label, type(err).__name__, err)
        view.stage_end(spec, "failed", time.perf_counter() - t0)
        raise
    seconds = time.perf_counter() - t0
    rec = {
        "index": spec.index,
        "name": spec.name,
        "kind": spec.kind,
        "dir": spec.dirname,
        "key": key,
        "config": dataclasses.asdict(spec.config),
        "inputs": dict(slots),
        "outputs": out.outputs,
        "metrics": out.metrics,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - c0,  #: all threads of this process; robust to a shared machine
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resumed": resumed,
    }
    _write_json(sdir / RECORD, rec)
    log.info("%s: done in %.1f s", spec.label, seconds)
    view.stage_end(spec, "resumed" if resumed else "ran", seconds)
    rec["status"] = "resumed" if resumed else "ran"
    return rec
