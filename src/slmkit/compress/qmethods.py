"""The quantizer registry: each method is registered beside its function with :func:`quantizer`.

A method is ``run(model, ids, cfg, names, grid_of) -> {hf weight name: QTensor}`` (it quantises
the weights ``names`` in place, each on ``grid_of(name)``) plus a frozen config class with a
``grid`` field. :func:`slmkit.compress.quantize.quantize`, the CLI verb and the build stage find
it by name; the package imports every method module once (``slmkit/compress/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from slmkit.registry import Registry


@dataclass(frozen=True)
class Quantizer:
    """A registered method: ``run(model, ids, cfg, names, grid_of) -> {hf weight name: QTensor}`` and its
    config class; ``grid_of(name)`` is each weight's grid."""

    run: Callable
    config: type
    needs_calibration: bool
    help: str = ""


QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


def quantizer(name: str, config: type, *, calibration: bool, help: str = ""):
    """Register the decorated ``run`` as quantizer ``name`` with its ``config`` class (which has a ``grid`` field)."""
    def deco(fn):
        QUANTIZERS.add(name, Quantizer(fn, config, calibration, help))
        return fn

    return deco
