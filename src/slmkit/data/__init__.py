"""Data: where the shared evaluation sets live, and readers for text / jsonl files."""

from slmkit.data.paths import data_dir, data_file
from slmkit.data.readers import read_jsonl, read_lines

__all__ = ["data_dir", "data_file", "read_jsonl", "read_lines"]
