"""The ``slmkit`` command line: one Typer app; each verb is a thin wrapper over the library.

Area modules (``slmkit.cli.<area>``) each define ``register(app)``; add yours to
``AREAS``. Exit codes: 0 success, 2 bad input (a :class:`SlmkitError` or a
usage error, printed in one or two lines), 1 internal failure.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

from typer import exceptions as typer_exc
from typer._click import exceptions as click_exc  # typer 0.29 vendors click

from slmkit.errors import SlmkitError

AREAS = ["core", "runtime", "compress_prune", "compress_quant", "train_distill", "pretrain", "enhance", "collab", "trust", "pipeline", "lmeval"]

app = typer.Typer(
    name="slmkit",
    help="Obtain, enhance, deploy and audit small language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from slmkit import __version__

        print(f"slmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version")) -> None:
    """Obtain, enhance, deploy and audit small language models."""

for _area in AREAS:
    importlib.import_module(f"slmkit.cli.{_area}").register(app)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    logging.basicConfig(level=os.environ.get("SLMKIT_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = typer.main.get_command(app)
    try:
        cmd.main(args=argv, prog_name="slmkit", standalone_mode=False)
    except typer_exc.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer_exc.Exit as e:
        return e.exit_code
    except click_exc.NoArgsIsHelpError as e:
        e.show()
        return 0
    except click_exc.ClickException as e:
        e.show()
        return 2
    except SlmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # internal failure: one line, full traceback with SLMKIT_DEBUG=1
        if os.environ.get("SLMKIT_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {e} (set SLMKIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())
