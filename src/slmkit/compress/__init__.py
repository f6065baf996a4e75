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
from slmkit.compress.awq import AWQConfig
from slmkit.compress.gptq import GPTQConfig
from slmkit.compress.lowrank import LowRankConfig, LowRankLinear, lowrank
from slmkit.compress.prune import (
    PRUNERS,
    MagnitudeConfig,
    SparseGPTConfig,
    WandaConfig,
    prune,
    pruner,
    pruner_config,
    weight_sparsity,
)
from slmkit.compress.qmethods import QUANTIZERS, quantizer
from slmkit.compress.quantize import IMatrixConfig, RTNConfig
from slmkit.compress.structured import DepthConfig, WidthConfig, prune_depth, prune_width

__all__ = [
    "AWQConfig",
    "GPTQConfig",
    "IMatrixConfig",
    "PRUNERS",
    "QUANTIZERS",
    "RTNConfig",
    "CalibConfig",
    "DepthConfig",
    "LinearStats",
    "LowRankConfig",
    "LowRankLinear",
    "MagnitudeConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "WidthConfig",
    "block_inputs",
    "calibration_ids",
    "collect_stats",
    "decoder_layers",
    "linears",
    "lowrank",
    "prune",
    "pruner",
    "pruner_config",
    "prune_depth",
    "prune_width",
    "quantizer",
    "sequential",
    "weight_sparsity",
]

# the package's other modules too: a pruner, quantiser or factoriser registered beside its function in a new
# module here is found by name with no import line anywhere else (slmkit.registry.import_package_modules)
from slmkit.registry import import_package_modules  # noqa: E402

import_package_modules(__name__, __path__)
