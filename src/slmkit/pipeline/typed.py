"""The typed builder: a frozen config dataclass from a recipe's mapping, every key checked by name and type.

:func:`build_config` turns a stage's settings into its config; :func:`library_config` builds the library
config a stage runs (``DistillConfig``, ``SFTConfig``, ...) from the stage's own keys plus its ``options:``.
Errors are :class:`RecipeError` naming where (stage, key) and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from slmkit.errors import ConfigError, SlmkitError


class RecipeError(ConfigError):
    """A recipe that cannot run: the message names the stage (index and name) and the key."""


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
    """(ok, value converted to ``tp``). Ints and numeric strings (YAML's ``1e-4``) are accepted for floats; nothing else is cast."""
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
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string: a float the user meant
            try:
                return True, float(value)
            except ValueError:
                return False, value
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
