"""The stage registry and what a stage's run function receives.

A stage kind is a frozen config dataclass plus a run function (``run(ctx, cfg)
-> StageResult``), registered by name in :data:`STAGES`. Run functions are
thin glue over the library function of their area: they load their inputs from
the run directory, call that function and write its artefact into
``ctx.work``.

Stages pass things to later stages through named *slots*: ``teacher`` (always
there), ``model`` (the current student), ``data`` (teacher-generated data) and
``gguf`` (an exported GGUF file). A stage declares the slots it needs and
makes, so a recipe's order is checked before anything runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkit.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a stage made: slot values (paths relative to the run directory) and metrics."""

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageKind:
    name: str
    config: type  #: frozen dataclass of the stage's settings
    run: Callable[["Context", Any], StageResult]
    needs: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()  #: slots read (or a function of the config)
    makes: tuple[str, ...] = ()  #: slots written
    doc: str = ""

    def needs_for(self, cfg: Any) -> tuple[str, ...]:
        return self.needs(cfg) if callable(self.needs) else self.needs


STAGES: Registry[StageKind] = Registry("pipeline stage")


def stage(name: str, config: type, needs=(), makes: tuple[str, ...] = ()):
    """Register ``fn(ctx, cfg) -> StageResult`` as the stage kind ``name``."""

    def deco(fn):
        STAGES.add(name, StageKind(name, config, fn, needs, tuple(makes), (fn.__doc__ or "").strip().split("\n")[0]))
        return fn

    return deco


@dataclass
class Context:
    """Everything a stage's run function may use.

    ``work`` is the stage's own directory ``RUN_DIR/NN-name``; it survives an
    interrupted build, so a long stage keeps checkpoints there and resumes from
    them. ``slots`` maps slot names to values: a path relative to the run
    directory, or (for the teacher) a model spec.
    """

    run_dir: Path
    work: Path
    index: int
    name: str
    recipe: Any  #: the :class:`~slmkit.pipeline.recipe.Recipe`
    slots: dict[str, str]
    history: list[dict]  #: records (``stage.json``) of the earlier stages, in order
    progress: Callable[[int, int | None], None] = lambda done, total: None
    cache: dict = field(default_factory=dict)  #: models shared across stages of one build (read-only use)

    def resolve(self, value: str) -> str:
        """A slot value as something :func:`slmkit.models.load` takes."""
        p = self.run_dir / value
        return str(p) if p.exists() else value

    def rel(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.run_dir.resolve()))

    def slot(self, name: str) -> str:
        return self.resolve(self.slots[name])

    def load(self, slot: str = "model", cached: bool = False):
        """Load the model in ``slot`` as ``(model, tokenizer)``; ``cached`` shares one copy (do not mutate it)."""
        return self.load_spec(self.slots[slot], cached)

    def load_spec(self, value: str, cached: bool = False):
        """Load a slot value (run-directory path or model spec) as ``(model, tokenizer)``."""
        from slmkit.models import load

        spec = self.resolve(value)
        if not cached:
            if spec in self.cache:  # e.g. the student starts as the teacher: copy it rather than load it again
                import copy

                model, tok = self.cache[spec]
                return copy.deepcopy(model), copy.deepcopy(tok)
            return load(spec, dtype=self.recipe.dtype)
        if spec not in self.cache:
            self.cache[spec] = load(spec, dtype=self.recipe.dtype)
        return self.cache[spec]

    def teacher(self):
        """The teacher, loaded once per build and shared; never mutate it."""
        return self.load("teacher", cached=True)
