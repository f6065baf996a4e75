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
import hashlib
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
from slmkit.pipeline.recipe import Recipe, StageSpec

log = logging.getLogger(__name__)

#: Bumped when the run-directory layout changes (invalidates every cached stage).
STAGE_FORMAT = 1
RECORD = "stage.json"
KEYFILE = ".key"


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
