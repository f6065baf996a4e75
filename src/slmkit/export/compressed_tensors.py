"""compressed-tensors export: slmkit's GPTQ/AWQ codes as a ``pack-quantized`` checkpoint.

compressed-tensors (the vLLM project's checkpoint format, the one llm-compressor writes) is what
vLLM and transformers (``CompressedTensorsHfQuantizer``) load quantised weights from. This module
writes slmkit's integer codes and fp16 scales into it unchanged (nothing is re-rounded), so a
model quantised by :func:`slmkit.compress.quantize.quantize` runs on a GPU server without being
quantised again. ``config.json`` gains::

    "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
      "quantization_status": "compressed", "ignore": ["lm_head"],
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
        "symmetric": true, "strategy": "group", "group_size": 128, "actorder": "weight", ...}}}}

and each quantised Linear ``<m>`` is stored as (``PackedQuantizationCompressor`` in
compressed-tensors' ``compressors/pack_quantized``):

* ``<m>.weight_packed``  int32 ``(out, ceil(in * b / 32))``: the codes ``q`` in
  ``[-2^(b-1), 2^(b-1))`` offset by ``2^(b-1)`` to unsigned and packed along the input dimension,
  code ``i`` of a row at bit ``i*b`` of the row's bit stream, lowest bits first
  (``pack_to_int32``; for b = 4 and 8, whole codes per word, as every reader of the format agrees);
* ``<m>.weight_scale``   fp16 ``(out, G)``, one per group of ``group_size`` input columns
  (``strategy: group``) or one per row (``strategy: channel``, slmkit's ``group_size=0``);
* ``<m>.weight_shape``   int64 ``[out, in]``.

The weight is ``w = scale * q`` (symmetric, no zero point): exactly slmkit's symmetric grids
(:mod:`slmkit.compress.qgrid`). What the format cannot express is refused with a ConfigError
naming the tensor: asymmetric grids (slmkit's offsets are fp16 minima, compressed-tensors' zero
points are integers), 3- and 5-bit codes (the format's readers disagree on their packing; vLLM
reads 4 and 8) and GGUF k-quant grids (two-level scales). GPTQ's act-order in slmkit keeps groups
contiguous ("static groups"), i.e. compressed-tensors' ``actorder: weight``, so no ``g_idx`` is
needed. Quantised tensors outside the decoder blocks (a GGUF export's token embedding or output
head) are written as their dequantised values, dense, as slmkit's own model holds them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slmkit.artefact import MANIFEST, Manifest, atomic_dir
from slmkit.compress.qgrid import Grid, QTensor
from slmkit.errors import ConfigError
from slmkit.export.safetensors import ExportReport, dir_bytes

FORMAT = "pack-quantized"
WEIGHTS = "model.safetensors"
PACK_BITS = (4, 8)  #: code widths written (whole codes per int32 word)


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors config group: the grid its weights share."""

    bits: int
    group_size: int  #: 0 = per-channel (``strategy: channel``)
    actorder: bool  #: GPTQ chose codes in activation order (``actorder: weight``)

    def weights_args(self) -> dict:
        """The group's ``weights`` entry (compressed-tensors ``QuantizationArgs``)."""
        args = {"num_bits": self.bits, "type": "int", "symmetric": True, "dynamic": False,
                "strategy": "group" if self.group_size else "channel",
                "group_size": self.group_size or None}
        if self.actorder:
            args["actorder"] = "weight"
        return args


def scheme_for(name: str, qt: QTensor, actorder: bool) -> Scheme:
    """The scheme of one quantised weight; ConfigError naming ``name`` when the format cannot hold its codes."""
    g: Grid = qt.grid
    where = f"{name} ({g.gguf or f'{g.bits}-bit, group size {g.group_size}'})"
    if g.kquant:
        raise ConfigError(f"{where}: GGUF k-quant codes have two-level scales, which compressed-tensors cannot store",
                          "quantise with a plain grid: slmkit quantize --method gptq --bits 4 --group-size 128")
    if not g.symmetric or qt.mins is not None:
        raise ConfigError(f"{where} is asymmetric: its offsets are fp16 minima, compressed-tensors stores integer "
                          "zero points", "quantise without --asymmetric")
    if g.bits not in PACK_BITS:
        raise ConfigError(f"{where}: compressed-tensors export writes 4- or 8-bit codes, not {g.bits}-bit",
                          "quantise with --bits 4 or --bits 8")
    if qt.scales.dtype != torch.float16:
        raise ConfigError(f"{where}: scales are {qt.scales.dtype}, expected fp16")
    return Scheme(g.bits, g.width(qt.codes.shape[1]) if g.group_size else 0, actorder)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(out, in)`` int8 codes -> ``(out, ceil(in*bits/32))`` int32, as compressed-tensors' ``pack_to_int32``:
    each code offset by ``2^(bits-1)``, code ``i`` of a row at bits ``[(i % k)*bits, ...)`` of word ``i // k``
    (``k = 32 // bits``), missing codes at the row's end as zero bits."""
    if bits not in PACK_BITS:
        raise ConfigError(f"packing supports {PACK_BITS} bits, got {bits}")
    k = 32 // bits
    out, cols = codes.shape
    u = (codes.to(torch.int64) + (1 << (bits - 1))).numpy().astype(np.uint32)  # [0, 2^b)
    pad = -cols % k
    if pad:
        u = np.pad(u, ((0, 0), (0, pad)))
    words = (u.reshape(out, -1, k) << (np.arange(k, dtype=np.uint32) * bits)).sum(-1, dtype=np.uint32)
    return torch.from_numpy(words.view(np.int32).copy())


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The int8 codes :func:`pack_int32` packed (``cols`` per row)."""
    k = 32 // bits
    u = packed.numpy().view(np.uint32)[..., None] >> (np.arange(k, dtype=np.uint32) * bits)
    u = (u & np.uint32((1 << bits) - 1)).reshape(packed.shape[0], -1)[:, :cols]
    return torch.from_numpy(u.astype(np.int16) - (1 << (bits - 1))).to(torch.int8)


def quantization_config(schemes: dict[str, Scheme], ignore: list[str]) -> dict:
    """``config.json``'s ``quantization_config`` for modules ``{module name: Scheme}``: one config group per
    scheme, targeting every Linear when one scheme covers all quantised modules, else the modules by name."""
    distinct = sorted(set(schemes.values()), key=lambda s: (s.bits, s.group_size))
    groups = {}
    for i, s in enumerate(distinct):
        targets = ["Linear"] if len(distinct) == 1 else sorted(m for m, t in schemes.items() if t == s)
        groups[f"group_{i}"] = {"targets": targets, "weights": s.weights_args(),
                                "input_activations": None, "output_activations": None, "format": FORMAT}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}


def used_act_order(quantized, manifest: Manifest | None) -> bool:
    """Whether GPTQ chose ``quantized``'s codes in activation order: its config says, or (codes read back from
    disk carry none) the last ``quantize`` stage of ``manifest``."""
    if quantized.method != "gptq":
        return False
    if quantized.config is not None:
        return bool(getattr(quantized.config, "act_order", False))
    stages = [st for st in (manifest.stages if manifest else []) if st.get("stage") == "quantize"]
    return bool(stages and (stages[-1].get("config") or {}).get("act_order", False))


def compressed_state(model, quantized, actorder: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Scheme], list[str]]:
    """``(tensors to write, {module: Scheme}, ignored Linears)`` for ``model`` with ``quantized``'s codes
    (``actorder``: see :func:`used_act_order`)."""
    from slmkit.compress.quantize import target_names

    targets = set(target_names(model))
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, Scheme] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        qt = quantized.tensors.get(name)
        if qt is None or name not in targets:  # plain, or quantised outside the blocks: as slmkit's model holds it
            tensors[name] = t.detach().contiguous()
            continue
        module = name[: -len(".weight")]
        s = schemes[module] = scheme_for(name, qt, actorder)
        tensors[f"{module}.weight_packed"] = pack_int32(qt.codes, s.bits)
        tensors[f"{module}.weight_scale"] = qt.scales.contiguous()
        tensors[f"{module}.weight_shape"] = torch.tensor(list(qt.codes.shape), dtype=torch.int64)
    if not schemes:
        raise ConfigError("no decoder-block weights carry quantised codes, so there is nothing to write as "
                          "compressed-tensors",
                          "quantise first: slmkit quantize MODEL --method gptq --bits 4 --output DIR")
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in schemes)
    return tensors, schemes, ignore


def export_compressed_tensors(model, tokenizer, quantized, dest: str | os.PathLike, manifest: Manifest | None = None,
                              check_loader: bool = True, force: bool = False) -> ExportReport:
    """Write ``model`` with ``quantized``'s codes as a compressed-tensors ``pack-quantized`` directory, atomically.

    ``model`` is slmkit's fake-quantised model (:func:`slmkit.compress.qstore.load_quantized`) and
    ``quantized`` its codes. Before ``dest`` is replaced, the written codes are read back and
    compared with ``quantized``'s (``exact`` counts the weights whose codes and scales match bit for
    bit); with ``check_loader`` (needs the compressed-tensors package) the directory is also loaded
    by transformers' ``AutoModelForCausalLM.from_pretrained`` and its logits on a few tokens compared
    with ``model``'s (``max_abs_diff``). ``force``: replace a directory slmkit did not write.
    """
    from safetensors.torch import load_file, save_file

    tensors, schemes, ignore = compressed_state(model, quantized, used_act_order(quantized, manifest))
    manifest = manifest or Manifest(source=str(getattr(model.config, "name_or_path", "")))
    manifest.add_stage("export", {"format": "compressed-tensors", "type": FORMAT},
                       schemes=sorted({json.dumps(s.weights_args(), sort_keys=True) for s in schemes.values()}))
    dest = Path(dest)
    with atomic_dir(dest, force=force) as tmp:
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = quantization_config(schemes, ignore)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(manifest.to_json())
        exact = check_codes(load_file(str(tmp / WEIGHTS)), schemes, quantized)
        worst = logits_gap(model, tmp) if check_loader else 0.0
    return ExportReport(str(dest), "compressed-tensors", FORMAT, dir_bytes(dest), len(schemes), exact, worst,
                        check_loader)


def check_codes(written: dict[str, torch.Tensor], schemes: dict[str, Scheme], quantized) -> int:
    """How many written weights hold exactly ``quantized``'s codes and scales; raises on any that does not."""
    for module, s in schemes.items():
        qt = quantized.tensors[f"{module}.weight"]
        codes = unpack_int32(written[f"{module}.weight_packed"], s.bits, qt.codes.shape[1])
        if not (torch.equal(codes, qt.codes) and torch.equal(written[f"{module}.weight_scale"], qt.scales)):
            raise RuntimeError(f"compressed-tensors export: {module} differs from its codes after reading back")
    return len(schemes)


def logits_gap(model, directory: Path, n_tokens: int = 8) -> float:
    """Largest |logit difference| between ``model`` and ``directory`` loaded by transformers, on ``n_tokens`` ids."""
    from importlib.util import find_spec

    from transformers import AutoModelForCausalLM

    if find_spec("compressed_tensors") is None:  # transformers' loader for the format
        raise ConfigError("checking a compressed-tensors export needs the compressed-tensors package",
                          "pip install 'slmkit[compressed-tensors]', or pass --no-loader-check")
    dtype = next(model.parameters()).dtype
    back = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
    ids = torch.arange(n_tokens)[None, :] % model.config.vocab_size
    with torch.no_grad():
        ref = model(ids.to(next(model.parameters()).device)).logits.float().cpu()
        got = back(ids).logits.float()
    gap = (got - ref).abs().max().item()
    # fp32: the same weights through the same ops; half precision: the loader's own rounding
    tol = (1e-3 if dtype == torch.float32 else 0.1) * max(ref.abs().max().item(), 1.0)
    if not gap <= tol:
        raise RuntimeError(f"compressed-tensors export: transformers' logits differ from slmkit's by {gap:g} "
                           f"(> {tol:g})")
    return gap
