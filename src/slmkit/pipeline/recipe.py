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

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slmkit.errors import ConfigError, SlmkitError

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


class RecipeError(ConfigError):
    """A recipe that cannot run: the message names the stage (index and name) and the key."""


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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to ``tp``). Ints are accepted for floats; nothing else is cast."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is typing.Literal:
        return (value in typing.get_args(tp)), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        out = []
        for item in value:
            ok, v = _coerce(item, args[0]) if args else (True, item)
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out)
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _nested(tp: Any) -> type | None:
    """The config dataclass a field of type ``tp`` holds (``X`` or ``X | None``), else None."""
    for arg in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def build_config(cls: type, settings: dict, where: str, takes: str = "this stage takes") -> Any:
    """Instantiate the frozen config dataclass ``cls`` from ``settings``; errors name ``where`` and the key.

    A field that holds another config dataclass takes a mapping of that config's fields (built the same way)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in settings:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=2, cutoff=0.5)
            raise RecipeError(
                f"{where}: unknown key {key!r}; {takes}: {', '.join(fields) or 'no settings'}",
                f"did you mean {' or '.join(near)}?" if near else None,
            )
    kwargs = {}
    for name, f in fields.items():
        if name not in settings:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"{where}: missing key {name!r} ({_type_name(hints[name])})", f"add `{name}: ...` to this stage")
            continue
        inner = _nested(hints[name])
        if inner is not None and isinstance(settings[name], dict):
            kwargs[name] = build_config(inner, settings[name], f"{where} key {name!r}", f"{inner.__name__} takes")
            continue
        ok, value = _coerce(settings[name], hints[name])
        if not ok:
            raise RecipeError(
                f"{where}: key {name!r} must be {_type_name(hints[name])}, got {type(settings[name]).__name__} {settings[name]!r}"
            )
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except SlmkitError as err:
        raise RecipeError(f"{where}: {err.problem}", err.hint) from None
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: {err}") from None


def library_config(cls: type, given: dict, options: dict, where: str = "options") -> Any:
    """The library config ``cls`` of a stage: its own keys' values ``given`` (field name -> value, or a mapping
    for a field that holds a config) plus ``options:``, any other field of ``cls``, through :func:`build_config`.

    A stage names only the settings it sets itself; a new field of ``cls`` reaches recipes through
    ``options:`` with no edit to the stage. An option that one of the stage's keys sets is an error naming it.
    """
    hint = "the stage sets it (from its own keys or the recipe's)"
    hints = typing.get_type_hints(cls)
    merged = dict(given)
    for key, value in given.items():  # a config the stage's own key sets: its errors name that key
        inner = _nested(hints[key]) if key in hints else None
        if inner is not None and isinstance(value, dict) and key not in options:
            merged[key] = build_config(inner, value, f"key {key!r}", f"{inner.__name__} takes")
    for key, value in options.items():
        if key in given and not (isinstance(given[key], dict) and isinstance(value, dict)):
            raise RecipeError(f"{where} key {key!r}: set by the stage itself", hint)
        if key in given:
            twice = sorted(set(value) & set(given[key]))
            if twice:
                raise RecipeError(f"{where} key {key!r}: {', '.join(twice)} set by the stage itself", hint)
            value = {**given[key], **value}
        merged[key] = value
    return build_config(cls, merged, where, f"{cls.__name__} takes")


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
