"""Recipes: a YAML file of ordered stages, parsed once into frozen dataclasses.

A recipe looks like::

    name: my-student
    teacher: default          # any model spec slmkit.models.load takes
    seed: 0
    stages:
      - stage: gen-data       # the stage kind (a name in STAGES)
        n: 64                 # the kind's settings (fields of its config dataclass)
      - stage: prune
        name: depth           # optional: the stage's directory name (default: the kind)
        method: depth
        keep_layers: 20

Everything is checked before any stage runs: the top-level keys, every
stage's kind, every setting's name and type (and the config's own
``__post_init__`` range checks), and the order of the stages (each stage's
inputs must be made by an earlier stage). Every error names the stage by index
and name, and the key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slmkit.errors import SlmkitError
from slmkit.pipeline.typed import RecipeError, build_config

#: Slots a recipe starts with: the teacher is always there.
INITIAL_SLOTS = frozenset({"teacher"})
#: What each slot means, for order errors.
SLOT_MEANING = {
    "teacher": "a teacher model",
    "model": "a student model",
    "data": "teacher-generated data",
    "gguf": "a GGUF file",
    "text": "held-out text split into calibration and evaluation parts",
}


@dataclass(frozen=True)
class StageSpec:
    """One parsed stage: its position, kind, directory name and validated config."""

    index: int  #: 1-based position in the recipe
    kind: str  #: a name in ``STAGES``
    name: str  #: directory name part (``NN-name``); defaults to the kind
    config: Any  #: the kind's frozen config dataclass

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.name})"

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.name}"


@dataclass(frozen=True)
class Recipe:
    """A whole recipe. ``text`` is the exact YAML it was parsed from (kept for the report)."""

    name: str
    teacher: str  #: model spec of the teacher (``default``, a directory, a ``.gguf`` file, a hub id)
    stages: tuple[StageSpec, ...]
    seed: int = 0  #: seeds every stage that samples
    dtype: str = "fp32"  #: dtype models are loaded in
    source: str = ""  #: where the recipe came from (path or ``package:NAME``)
    text: str = ""

    def __post_init__(self) -> None:
        check_run_name(self.name, self.source or "recipe")

    def settings_key(self) -> dict:
        """The recipe-level settings every stage depends on (part of each stage's cache key)."""
        return {"teacher": self.teacher, "seed": self.seed, "dtype": self.dtype}


_RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_run_name(name: Any, where: str = "recipe") -> str:
    """A recipe's ``name`` is one plain path component (it names the run directory ``runs/NAME``)."""
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise RecipeError(f"{where}: top-level key 'name' must be a plain name (letters, digits, '.', '_', '-'; "
                          f"no '/', not '.' or '..'), got {name!r}", "e.g. `name: my-student` (it names runs/NAME)")
    return name


_TOP_KEYS = {"name": str, "teacher": str, "seed": int, "dtype": str, "stages": list, "description": str}
_DTYPES = ("fp32", "bf16")


def _check_model_spec(spec: str, where: str) -> None:
    """The spec points at something loadable (a path that exists, a packaged name or a hub id); reads no weights."""
    from slmkit.models import resolve

    try:
        resolve(spec)
    except SlmkitError as err:
        raise RecipeError(f"{where}: {err.problem}", err.hint) from None


def parse_recipe(data: Any, source: str = "", text: str = "") -> Recipe:
    """Validate a loaded YAML document into a :class:`Recipe` (nothing runs)."""
    from slmkit.pipeline.stages import STAGES

    where0 = source or "recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where0}: a recipe is a mapping with 'teacher' and 'stages', got {type(data).__name__}")
    for key, value in data.items():
        if key not in _TOP_KEYS:
            near = difflib.get_close_matches(str(key), list(_TOP_KEYS), n=1, cutoff=0.5)
            raise RecipeError(f"{where0}: unknown top-level key {key!r}; known: {', '.join(_TOP_KEYS)}",
                              f"did you mean {near[0]}?" if near else None)
        ok = isinstance(value, _TOP_KEYS[key]) and not (isinstance(value, bool) and _TOP_KEYS[key] is int)
        if not ok:
            raise RecipeError(f"{where0}: top-level key {key!r} must be {_TOP_KEYS[key].__name__}, got {type(value).__name__} {value!r}")
    for key in ("teacher", "stages"):
        if key not in data:
            raise RecipeError(f"{where0}: missing top-level key {key!r}")
    if not data["stages"]:
        raise RecipeError(f"{where0}: 'stages' is empty", "list at least one stage")
    _check_model_spec(data["teacher"], f"{where0}: top-level key 'teacher'")
    dtype = data.get("dtype", "fp32")
    if dtype not in _DTYPES:
        raise RecipeError(f"{where0}: top-level key 'dtype' must be one of {', '.join(_DTYPES)}, got {dtype!r}")

    specs: list[StageSpec] = []
    names: set[str] = set()
    for i, entry in enumerate(data["stages"], 1):
        if not isinstance(entry, dict) or "stage" not in entry:
            raise RecipeError(f"{where0}: stage {i}: each stage is a mapping with a 'stage' key naming its kind, got {entry!r}")
        kind = entry["stage"]
        name = entry.get("name", kind)
        if not isinstance(kind, str) or not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise RecipeError(f"{where0}: stage {i}: 'stage' and 'name' must be short words (letters, digits, - or _), got {kind!r}/{name!r}")
        label = f"{where0}: stage {i} ({name})"
        if kind not in STAGES:
            near = difflib.get_close_matches(kind, STAGES.names(), n=2, cutoff=0.5)
            raise RecipeError(f"{label}: unknown stage {kind!r}; known: {', '.join(STAGES.names())}",
                              f"did you mean {' or '.join(near)}?" if near else None)
        if name in names:
            raise RecipeError(f"{label}: duplicate stage name {name!r}", "give one of them a distinct `name:`")
        names.add(name)
        settings = {k: v for k, v in entry.items() if k not in ("stage", "name")}
        cfg = build_config(STAGES.get(kind).config, settings, label)
        specs.append(StageSpec(i, kind, name, cfg))

    recipe = Recipe(
        name=str(data.get("name", Path(source).stem if source else "recipe")),
        teacher=data["teacher"],
        stages=tuple(specs),
        seed=data.get("seed", 0),
        dtype=dtype,
        source=source,
        text=text,
    )
    check_order(recipe, where0)
    return recipe


def check_order(recipe: Recipe, where: str = "recipe") -> None:
    """Every stage's inputs must be made by an earlier stage (simulated, nothing runs)."""
    from slmkit.pipeline.stages import STAGES

    have = set(INITIAL_SLOTS)
    for spec in recipe.stages:
        kind = STAGES.get(spec.kind)
        for slot in kind.needs_for(spec.config):
            if slot not in have:
                makers = sorted(n for n in STAGES.names() if slot in STAGES.get(n).makes)
                raise RecipeError(
                    f"{where}: {spec.label}: needs {SLOT_MEANING.get(slot, slot)} ('{slot}') but no earlier stage makes one",
                    f"put a stage that makes it ({', '.join(makers)}) before stage {spec.index}",
                )
        have |= set(kind.makes)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {p} does not exist", "pass a YAML recipe, or omit it for the default recipe")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = p.read_bytes()[: err.start].count(b"\n") + 1
        raise RecipeError(f"{p}:{line}: not UTF-8 text ({err.reason})", "save the recipe as UTF-8") from None
    except OSError as err:
        raise RecipeError(f"recipe {p} cannot be read ({err.strerror or err})") from None
    return parse_text(text, str(p))


def parse_text(text: str, source: str) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{source}{at}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply to be a recipe") from None
    try:
        return parse_recipe(data, source, text)
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply to be a recipe") from None


def packaged_recipes() -> dict[str, Path]:
    """Recipes shipped with slmkit (``default`` and the ``--target`` presets)."""
    root = Path(__file__).resolve().parent / "recipes"
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def packaged_recipe(name: str = "default") -> Recipe:
    found = packaged_recipes()
    if name not in found:
        near = difflib.get_close_matches(name, list(found), n=2, cutoff=0.4)
        raise RecipeError(f"unknown target {name!r}; known: {', '.join(n for n in found if n != 'default')}",
                          f"did you mean {' or '.join(near)}?" if near else None)
    return parse_text(found[name].read_text(encoding="utf-8"), f"package:{name}")
