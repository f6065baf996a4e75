"""Compression: calibration, pruning, quantization and low-rank factorisation.

Every technique takes a transformers model (and calibration token ids where it
needs them) and returns a model; see the submodules for the methods and papers.
"""

from slmkit.compress.calibrate import (
    CalibConfig,
    LinearStats,
    block_inputs,
    calibration_ids,
    collect_stats,
    decoder_layers,
    linears,
    sequential,
)

__all__ = [
    "CalibConfig",
    "LinearStats",
    "block_inputs",
    "calibration_ids",
    "collect_stats",
    "decoder_layers",
    "linears",
    "sequential",
]
