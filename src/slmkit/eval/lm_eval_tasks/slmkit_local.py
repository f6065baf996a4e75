"""Data loaders of slmkit's local lm-eval tasks: the shared data directory (``$SLMKIT_DATA`` or
``../shared/data``), read with slmkit's readers, as the Hugging Face datasets lm-eval expects."""

from __future__ import annotations

import re

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

__all__ = ["process_results", "truthfulqa_mc1", "wikitext2", "wikitext_detokenizer"]

#: a top-level WikiText heading line (" = Title = "), not a section (" = = Section = = ")
_TITLE = re.compile(r"^ = [^=].* = $")


def truthfulqa_mc1(**_):
    """truthfulqa/TruthfulQA.csv as rows ``{question, mc1_targets: {choices, labels}}`` (split ``validation``)."""
    from datasets import Dataset, DatasetDict

    from slmkit.trust import datasets

    rows = [{"question": it.question,
             "mc1_targets": {"choices": [it.best, *it.incorrect], "labels": [1] + [0] * len(it.incorrect)}}
            for it in datasets.truthfulqa()]
    return DatasetDict({"validation": Dataset.from_list(rows)})


def wikitext2(**_):
    """wikitext-2/test.txt cut into its articles, rows ``{page}`` (split ``test``) as in EleutherAI/wikitext_document_level."""
    from datasets import Dataset, DatasetDict

    from slmkit.data.paths import data_file
    from slmkit.errors import DataError

    path = data_file("wikitext-2/test.txt")
    pages: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if _TITLE.match(line.rstrip("\n")):
            pages.append([])
        if pages:
            pages[-1].append(line)
    if not pages:
        raise DataError(f"{path}: no ' = Title = ' article headings found; expected WikiText-2's test.txt")
    return DatasetDict({"test": Dataset.from_list([{"page": "".join(p)} for p in pages])})
