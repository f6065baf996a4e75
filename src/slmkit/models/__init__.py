"""Getting models: load any spec, describe its architecture, build tiny test models."""

from slmkit.models.arch import ArchInfo, describe, describe_model
from slmkit.models.load import ModelSource, load, load_config, load_tokenizer, parse_dtype, resolve

__all__ = [
    "ArchInfo",
    "ModelSource",
    "describe",
    "describe_model",
    "load",
    "load_config",
    "load_tokenizer",
    "parse_dtype",
    "resolve",
]
