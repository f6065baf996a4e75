"""The CLI's help lists each option's registry as it is when the help is shown (issue 18): a method registered
beside its function appears in ``--help`` with no CLI edit, and one taken out disappears."""

from __future__ import annotations

import importlib

import pytest

from slmkit.cli import main

#: (verb argv, the registry module and name its help lists)
REGISTRY_OPTIONS = [
    (["prune"], "slmkit.compress.prune", "PRUNERS"),
    (["prune"], "slmkit.compress.structured", "BLOCK_SCORERS"),
    (["lowrank"], "slmkit.compress.lowrank", "FACTORISERS"),
    (["quantize"], "slmkit.compress.qmethods", "QUANTIZERS"),
    (["distill"], "slmkit.train.losses", "LOSSES"),
    (["dpo"], "slmkit.train.dpo", "PREFERENCE_METHODS"),
    (["generate"], "slmkit.runtime.kvcache", "KV_POLICIES"),
    (["chat"], "slmkit.runtime.kvcache", "KV_POLICIES"),
    (["fit"], "slmkit.runtime.kvcache", "KV_POLICIES"),
    (["serve"], "slmkit.collab.serving", "MODES"),
    (["serve"], "slmkit.collab.cascade", "SIGNALS"),
    (["route"], "slmkit.collab.cascade", "SIGNALS"),
    (["judge"], "slmkit.collab.judge", "JUDGES"),
    (["rag", "ask"], "slmkit.rag.retrieve", "RERANKERS"),
    (["rag", "index"], "slmkit.rag.retrieve", "RETRIEVERS"),
    (["speculate"], "slmkit.collab.drafters", "DRAFT_KINDS"),
    (["audit"], "slmkit.trust.suite", "DIMENSIONS"),
    (["pretrain"], "slmkit.models.student", "PRESETS"),
]


def _help(argv, capsys) -> str:
    assert main([*argv, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())  # rich wraps long lines: compare on single spaces


@pytest.mark.parametrize("argv, module, attr", REGISTRY_OPTIONS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_a_newly_registered_name_appears_in_help(argv, module, attr, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")
    registry = getattr(importlib.import_module(module), attr)
    before = _help(argv, capsys)
    assert all(name in before for name in (registry.names() if hasattr(registry, "names") else registry))
    if isinstance(registry, dict):
        monkeypatch.setitem(registry, "zzthrowaway", object())
    else:
        monkeypatch.setattr(registry, "_items", dict(registry._items))
        registry.add("zzthrowaway", object())
    assert "zzthrowaway" in _help(argv, capsys)
    monkeypatch.undo()
    assert "zzthrowaway" not in _help(argv, capsys)


def test_help_does_not_import_technique_modules_until_shown():
    """Building the CLI (every verb's start) still imports no torch: the names are looked up only for --help."""
    import subprocess
    import sys

    code = "import sys, typer; from slmkit.cli import app; typer.main.get_command(app); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_verb_that_names_a_registry_fills_it_in():
    """A help string naming a registry is filled in only by RegistryHelpCommand: no verb shows the raw placeholder."""
    import typer

    from slmkit.cli import app
    from slmkit.cli._common import RegistryHelpCommand

    def commands(group, path=()):
        for name, cmd in group.commands.items():
            yield from commands(cmd, (*path, name)) if hasattr(cmd, "commands") else [((*path, name), cmd)]

    named = 0
    for path, cmd in commands(typer.main.get_command(app)):
        if any("{registry:" in (p.help or "") for p in cmd.params):
            named += 1
            assert isinstance(cmd, RegistryHelpCommand), " ".join(path)
    assert named >= len({tuple(argv) for argv, _, _ in REGISTRY_OPTIONS})
