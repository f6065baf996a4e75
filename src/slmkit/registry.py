"""A named registry per technique family (quantizers, pruners, losses, ...).

Modelled on lm-evaluation-harness' registry: duplicate names are rejected and an
unknown name raises a :class:`~slmkit.errors.ConfigError` listing near matches.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from slmkit.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one family.

    >>> LOSSES: Registry[Callable] = Registry("loss")
    >>> @LOSSES.register("fkl")
    ... def forward_kl(...): ...
    """

    def __init__(self, family: str):
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for key in (name, *aliases):
                if key in self._items:
                    raise ValueError(f"{self.family} {key!r} is already registered")
                self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            near = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(near)}?" if near else None
            raise ConfigError(
                f"unknown {self.family} {name!r}; known: {', '.join(sorted(self._items))}", hint
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def groups(self) -> list[list[str]]:
        """Each registered object's names, the name it was registered under first and then its aliases,
        ordered by that first name."""
        by_object: dict[int, list[str]] = {}
        for key, obj in self._items.items():
            by_object.setdefault(id(obj), []).append(key)
        return sorted(by_object.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def import_package_modules(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> None:
    """Import every module of the package ``package`` (its ``__path__``) but those in ``skip``.

    A family's package calls this last, so a method registered beside its function in a new module
    of the package is found by name (CLI, recipes, entry point) with no import line anywhere else."""
    import importlib
    import pkgutil

    skip = set(skip)
    for info in pkgutil.iter_modules(list(path)):
        if info.name not in skip and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
