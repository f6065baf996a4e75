"""Helpers shared by CLI verbs: JSON output, tables, option types."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

#: every verb with --output takes --force (the CLI contract)
FORCE_HELP = "replace an existing --output that slmkit did not write (without it: refused, exit 2)"
#: every verb that runs a model takes --device (slmkit.models.device)
DEVICE_HELP = "auto (CUDA when present, else CPU) | cpu | cuda | cuda:N"
#: --dtype where the default follows the device
DTYPE_HELP = "fp32 | bf16 | fp16 (default: bf16 on a GPU, fp32 on the CPU)"
#: --precision of the training verbs (mixed_precision)
PRECISION_HELP = ("auto (bf16 autocast on a GPU that has bf16, fp32 on the CPU) | fp32 | bf16 "
                  "(autocast; on CPUs with AVX512-BF16 or AMX about 2x faster than fp32)")

console = Console(stderr=False)
err_console = Console(stderr=True)


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(obj), indent=2) + "\n")


def kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


_REGISTRY_REF = re.compile(r"\{registry:([\w.]+):(\w+)\}")


def registry_names(module: str, attr: str) -> str:
    """A place in a help string for the names in the registry ``module.attr`` (a :class:`~slmkit.registry.Registry`
    or a dict), filled in by :class:`RegistryHelpCommand` when the help is shown: the CLI imports no technique
    module until then, and a method registered beside its function is listed with no edit here."""
    return f"{{registry:{module}:{attr}}}"


def _listing(module: str, attr: str) -> str:
    """``a | b (alias) | c``: the names of a registry (each object once, aliases in brackets) or a dict's keys."""
    import importlib

    reg = getattr(importlib.import_module(module), attr)
    groups = reg.groups() if hasattr(reg, "groups") else [[k] for k in sorted(reg)]
    return " | ".join(g[0] + (f" ({', '.join(g[1:])})" if len(g) > 1 else "") for g in groups)


class RegistryHelpCommand(TyperCommand):
    """A verb whose option help names registries (:func:`registry_names`): they are listed when its help is shown."""

    def format_help(self, ctx, formatter):
        for param in self.params:
            if isinstance(param.help, str):
                param.help = _REGISTRY_REF.sub(lambda m: _listing(m[1], m[2]), param.help)
        return super().format_help(ctx, formatter)


OPTION_HELP = ("KEY=VALUE: set another field of the method's config (repeatable; VALUE read as YAML: 64, 0.5, "
               "true, text), e.g. --option batch_size=4")


def parse_options(values: list[str], flag: str = "--option") -> dict[str, Any]:
    """``["k=v", ...]`` from a repeatable flag as ``{k: v}``, each value read as a YAML scalar (as a recipe's would be)."""
    import yaml

    from slmkit.errors import ConfigError

    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"{flag} takes KEY=VALUE (KEY a config field name), got {item!r}", f"e.g. {flag} batch_size=4")
        if key in out:
            raise ConfigError(f"{flag} {key} given twice")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"{flag} {key}: cannot read {raw!r} as a value") from None
    return out


def mixed_precision(precision: str, device) -> bool:
    """Whether ``--precision`` asks for bf16 autocast on ``device`` (exit 2 naming the flag when unknown)."""
    from slmkit.errors import ConfigError

    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision {precision}: unknown", "use auto, fp32 or bf16")
    if precision != "auto":
        return precision == "bf16"
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()
