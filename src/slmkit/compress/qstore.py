"""Packed storage of quantised models: integer codes + fp16 scales in safetensors.

A quantised artefact directory holds ``config.json``, the tokenizer files,
``slmkit.json`` (the manifest) and :data:`PACKED` (``quantized.safetensors``):

* ``<name>.qcodes``  uint8, the codes of ``<name>`` offset to ``[0, 2^bits)`` and
  packed little-endian at ``bits`` bits each (row-major), so 4-bit weights take
  half a byte per parameter;
* ``<name>.scales``  fp16 ``(out, G)``; ``<name>.mins`` fp16 ``(out, G)`` (asymmetric grids);
  GGUF k-quant grids store them as fp32 (the effective ``d*sc``, ``-dmin*m``) and add
  ``<name>.aux.<key>``, the super-block integers (:attr:`QTensor.aux`);
* every other tensor (norms, unquantised embeddings) as it is in memory.

The safetensors metadata holds the grid and each quantised tensor's shape.
:func:`load_quantized` rebuilds the fake-quantised model exactly (bit for bit)
and :func:`slmkit.models.load` calls it for such directories.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from slmkit.artefact import MANIFEST, Manifest, atomic_dir
from slmkit.compress.qgrid import Grid, QTensor, pack_codes, unpack_codes
from slmkit.errors import CorruptModelError
from slmkit.models.readers import Reader

PACKED = "quantized.safetensors"
FORMAT = "slmkit-quantized-1"


def save_quantized(model, tokenizer, quantized, dest: str | os.PathLike, manifest: Manifest,
                   extra: Callable[[Path], None] | None = None, force: bool = False) -> Path:
    """Write ``model`` with the codes of ``quantized`` packed, atomically; return ``dest``.

    ``extra(tmp_dir)``, if given, writes more files (e.g. a GGUF export) before the
    directory is renamed into place; if it raises, ``dest`` is left as it was.
    ``force``: replace a directory slmkit did not write (see :func:`slmkit.artefact.atomic_dir`).
    """
    dest = Path(dest)
    with atomic_dir(dest, force=force) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_packed(model, quantized, tmp / PACKED)
        if extra is not None:
            extra(tmp)
        (tmp / MANIFEST).write_text(manifest.to_json())
    return dest


def write_packed(model, quantized, path: str | os.PathLike) -> None:
    """Write :data:`PACKED` (``model``'s tensors, the codes of ``quantized`` packed) at ``path``."""
    from safetensors.torch import save_file

    grid: Grid = quantized.grid
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    own_grids = {}  # tensors on another grid than the record's (a llama.cpp mix: per-tensor block types)
    for name, t in state.items():
        if name == "lm_head.weight" and tied:
            continue
        qt = quantized.tensors.get(name)
        if qt is None:
            tensors[name] = t.detach().contiguous()
            continue
        if qt.grid != grid:
            own_grids[name] = _grid_json(qt.grid)
        tensors[f"{name}.qcodes"] = torch.from_numpy(pack_codes(qt.codes, qt.grid))
        tensors[f"{name}.scales"] = qt.scales.contiguous()
        if qt.mins is not None:
            tensors[f"{name}.mins"] = qt.mins.contiguous()
        for k, v in (qt.aux or {}).items():
            tensors[f"{name}.aux.{k}"] = v.contiguous()
        shapes[name] = list(qt.codes.shape)
    meta = {
        "format": FORMAT,
        "method": quantized.method,
        "grid": json.dumps(_grid_json(grid)),
        "shapes": json.dumps(shapes),
    }
    if own_grids:
        meta["grids"] = json.dumps(own_grids)
    if getattr(quantized, "gguf", None):
        meta["gguf"] = quantized.gguf
    save_file(tensors, str(path), metadata=meta)


def _grid_json(grid: Grid) -> dict:
    return {"bits": grid.bits, "group_size": grid.group_size, "symmetric": grid.symmetric, "gguf": grid.gguf}


def is_quantized_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / PACKED).is_file()


def read_packed(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, QTensor], Grid, str]:
    """``(plain tensors, {name: QTensor}, grid, method)`` from a ``quantized.safetensors`` file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CorruptModelError(f"{path} is not an slmkit quantised file (format {meta.get('format')!r})")
            grid = Grid(**json.loads(meta["grid"]))
            own = {k: Grid(**v) for k, v in json.loads(meta.get("grids", "{}")).items()}
            shapes = json.loads(meta["shapes"])
            raw = {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise CorruptModelError(f"cannot read {path}: {str(err).splitlines()[0]}", "quantise the model again") from None
    q = {}
    used = set()
    for name, shape in shapes.items():
        g = own.get(name, grid)
        codes = unpack_codes(raw[f"{name}.qcodes"].numpy().astype(np.uint8), tuple(shape), g)
        aux = {k[len(name) + 5:]: v for k, v in raw.items() if k.startswith(f"{name}.aux.")}
        used |= {f"{name}.qcodes", f"{name}.scales", f"{name}.mins"} | {f"{name}.aux.{k}" for k in aux}
        q[name] = QTensor(codes, raw[f"{name}.scales"], raw.get(f"{name}.mins"), g, aux or None)
    plain = {k: v for k, v in raw.items() if k not in used}
    return plain, q, grid, meta.get("method", "")


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """``(model, Quantized)`` from a quantised directory: the fake-quantised model, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slmkit.compress.quantize import Quantized

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    plain, q, grid, method = read_packed(path / PACKED)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {**plain, **{k: v.dequantize() for k, v in q.items()}}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CorruptModelError(
            f"{path / PACKED} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    from safetensors import safe_open

    with safe_open(str(path / PACKED), framework="pt") as fh:
        mix = (fh.metadata() or {}).get("gguf")
    return model.eval(), Quantized(method, grid, q, gguf=mix)


#: how :func:`slmkit.models.load` reads a packed directory (named in :data:`slmkit.plugins.MODEL_READERS`)
READER = Reader(recognise=is_quantized_dir, read=lambda path, config, dtype: load_quantized(path, dtype)[0],
                help="packed integer codes + fp16 scales written by `slmkit quantize`")
