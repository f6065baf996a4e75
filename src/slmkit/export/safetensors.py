"""Safetensors export: a Hugging Face-loadable directory with the slmkit manifest, validated by reading it back."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from slmkit.artefact import Manifest, atomic_dir, write_model
from slmkit.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class ExportReport:
    """What an export wrote and how its read-back compared with the in-memory weights."""

    path: str
    format: str
    type: str
    bytes: int
    tensors: int  #: tensors compared after reading the file back
    exact: int  #: of those, bit-identical to the expected values
    max_abs_diff: float  #: largest difference from the expected values (0.0 when all exact)
    loader_checked: bool = False  #: also reloaded through slmkit.models.load (transformers)


def dir_bytes(path: str | os.PathLike) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def export_safetensors(model, tokenizer, dest: str | os.PathLike, manifest: Manifest | None = None,
                       dtype: str | None = None, check_loader: bool = True, force: bool = False) -> ExportReport:
    """Save ``model`` as an HF directory (``model.safetensors`` + config + tokenizer + ``slmkit.json``).

    ``dtype`` ("F32" | "F16" | "BF16", None = as in memory) converts a copy of the weights.
    The written tensors are read back and compared with the expected (converted)
    weights before the directory replaces anything at ``dest``; a mismatch raises
    and leaves ``dest`` as it was. ``force``: replace a directory slmkit did not write.
    """
    from safetensors.torch import load_file

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"safetensors export type must be one of {', '.join(DTYPES)}, got {dtype!r}",
                          "quantised types (Q4_0, ...) are GGUF-only: use --format gguf")
    manifest = manifest or Manifest(source=str(getattr(model.config, "name_or_path", "")))
    manifest.add_stage("export", {"format": "safetensors", "type": dtype or "as-is"})
    target = model
    if dtype is not None and next(model.parameters()).dtype != DTYPES[dtype]:
        import copy

        target = copy.deepcopy(model).to(DTYPES[dtype])
    dest = Path(dest)
    with atomic_dir(dest, force=force) as tmp:  # checked before it replaces anything at dest
        write_model(target, tokenizer, tmp, manifest)
        written = {}
        for f in sorted(tmp.glob("*.safetensors")):
            written.update(load_file(str(f)))
        expected = target.state_dict()
        n = exact = 0
        worst = 0.0
        for name, t in written.items():
            ref = expected.get(name)
            if ref is None:
                raise RuntimeError(f"safetensors export wrote an unknown tensor {name}")
            n += 1
            same = torch.equal(t, ref.detach().to(t.dtype))
            exact += same
            if not same:
                worst = max(worst, (t.float() - ref.float()).abs().max().item())
        if exact != n:
            raise RuntimeError(f"safetensors export: {n - exact} of {n} tensors differ after reading back (max {worst:g})")
        loader = False
        if check_loader:
            from slmkit.models import load

            back, _ = load(str(tmp), dtype=next(target.parameters()).dtype)
            for name, t in back.state_dict().items():
                if name in expected and not torch.equal(t, expected[name]):
                    raise RuntimeError(f"safetensors export: {name} differs after reloading with transformers")
            loader = True
    return ExportReport(str(dest), "safetensors", dtype or str(next(target.parameters()).dtype), dir_bytes(dest),
                        n, exact, worst, loader)
