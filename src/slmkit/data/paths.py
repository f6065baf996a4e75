"""Location of the real public evaluation sets (WikiText-2, TruthfulQA, BBQ, ...).

``$SLMKIT_DATA`` overrides the default, which is ``../shared/data`` relative
to the current directory and then to the repository checkout.
"""

from __future__ import annotations

from pathlib import Path

from slmkit import settings
from slmkit.errors import DataError

ENV = settings.DATA


def data_dir() -> Path | None:
    """The shared data directory, or None if it cannot be found."""
    env = settings.data_dir()
    if env:
        return env
    here = Path(__file__).resolve()
    for cand in (Path.cwd() / ".." / "shared" / "data", *(p / ".." / "shared" / "data" for p in here.parents)):
        if cand.is_dir():
            return cand.resolve()
    return None


def data_file(relative: str) -> Path:
    """Path of ``relative`` inside the shared data directory; a clear error if absent."""
    root = data_dir()
    if root is None or not (root / relative).exists():
        where = root if root is not None else "../shared/data"
        raise DataError(
            f"data file {relative} not found under {where}",
            f"set {ENV} to the folder holding it (e.g. {ENV}=/path/to/shared/data)",
        )
    return root / relative
