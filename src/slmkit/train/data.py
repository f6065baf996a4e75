"""Training examples for distillation and fine-tuning.

* A plain-text file (anything that is not ``.jsonl``/``.json``) is language-modelling
  data: the text is tokenised once and cut into ``block_size`` chunks; every token is
  a target.
* A ``.jsonl`` file holds one object per line: ``{"messages": [...]}`` (chat data:
  rendered with the tokenizer's chat template, loss only on assistant tokens) or
  ``{"text": ...}`` (language-modelling data, chunked per row).

Each example is ``{"input_ids", "labels", "prompt_len", "idx"}``: ``labels`` is
``-100`` where no loss is taken, ``prompt_len`` is where the last assistant reply
(or, for text, the on-policy continuation) starts, ``idx`` the example's position in
the file order (used to check data order across resumes). Errors name the file and line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from slmkit.data.readers import json_line, open_lines, read_utf8
from slmkit.errors import ConfigError, DataError, UnsupportedModelError
from slmkit.train.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz")


@dataclass(frozen=True)
class DataConfig:
    block_size: int = 256  #: tokens per example (chunk length for text, truncation for chat)
    prompt_tokens: int = 32  #: text data: tokens of each chunk used as the prompt for on-policy / seq-KD samples
    max_examples: int = 0  #: keep only the first N examples (0 = all)

    def __post_init__(self):
        if self.block_size < 4:
            raise ConfigError(f"block_size must be >= 4, got {self.block_size}")
        if self.prompt_tokens < 1:
            raise ConfigError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}")


def is_jsonl(path: str | Path) -> bool:
    return str(path).endswith(JSONL_SUFFIXES)


def _chunks(ids: list[int], cfg: DataConfig, start_idx: int) -> list[dict]:
    out = []
    n = cfg.block_size
    for b in range(0, max(len(ids) - 1, 1), n):
        piece = ids[b : b + n]
        if len(piece) < 2 or (b > 0 and len(piece) < n // 2):
            continue  # a short tail chunk adds little and changes the batch shape
        out.append({"input_ids": piece, "labels": list(piece), "prompt_len": min(cfg.prompt_tokens, len(piece) - 1),
                    "idx": start_idx + len(out)})
    return out


def _validate_messages(msgs, where: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j} must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message, so there is nothing to learn from", "add the reply as a message with role 'assistant'")


def chat_example(tokenizer, messages: list[dict], cfg: DataConfig, idx: int = 0) -> dict | None:
    """Render ``messages`` with the chat template; labels only on assistant replies (and their end token)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UnsupportedModelError("the tokenizer has no chat template, so messages data cannot be rendered",
                                    "use a plain-text file or an instruction-tuned model's tokenizer")
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError("chat data needs a fast tokenizer (token offsets)")
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    text = render(messages, False)
    spans = []  # character spans of assistant replies in the full rendering
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(render(messages[:i], True)) if i else 0
            end = len(render(messages[: i + 1], False))
            spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    in_reply = [any(s <= a < e for s, e in spans) for a, _ in offsets]
    labels = [t if r else IGNORE_INDEX for t, r in zip(ids, in_reply)]
    prompt_len = next((k for k, (a, _) in enumerate(offsets) if a >= spans[-1][0]), len(ids))
    ids, labels = ids[: cfg.block_size], labels[: cfg.block_size]
    if all(x == IGNORE_INDEX for x in labels[1:]) or prompt_len < 1:
        return None
    return {"input_ids": ids, "labels": labels, "prompt_len": min(prompt_len, len(ids) - 1), "idx": idx}


def load_examples(path: str | Path, tokenizer, cfg: DataConfig = DataConfig()) -> tuple[list[dict], str]:
    """Examples of ``path`` and its kind ("text" or "chat"); a DataError names file:line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if not is_jsonl(path):
        ids = tokenizer(read_utf8(path, "data file", "pass a text file or a messages jsonl with some content"), add_special_tokens=False).input_ids
        examples, kind = _chunks(ids, cfg, 0), "text"
    else:
        examples, kinds = [], set()
        with open_lines(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                row = json_line(line, where)
                if not isinstance(row, dict) or not ({"messages", "text"} & row.keys()):
                    raise DataError(f"{where}: expected an object with 'messages' (chat) or 'text' (plain text)")
                if "messages" in row:
                    _validate_messages(row["messages"], where)
                    ex = chat_example(tokenizer, row["messages"], cfg, len(examples))
                    if ex is None:
                        log.warning("%s: assistant reply lies beyond block_size=%d tokens; skipped", where, cfg.block_size)
                        continue
                    examples.append(ex)
                    kinds.add("chat")
                else:
                    if not isinstance(row["text"], str) or not row["text"].strip():
                        raise DataError(f"{where}: 'text' must be a non-empty string")
                    examples.extend(_chunks(tokenizer(row["text"], add_special_tokens=False).input_ids, cfg, len(examples)))
                    kinds.add("text")
                if cfg.max_examples and len(examples) >= cfg.max_examples:
                    break
        kind = "chat" if kinds == {"chat"} else "text" if kinds == {"text"} else "mixed"
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    if not examples:
        raise DataError(f"data file {path} yields no training examples", "it needs at least 2 tokens of text or one assistant reply")
    return examples, kind


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


class Collator:
    """Right-pads a list of examples into tensors (labels padded with -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch([f["input_ids"] for f in feats], [f["labels"] for f in feats], self.pad_id,
                         prompt_len=[f["prompt_len"] for f in feats], idx=[f["idx"] for f in feats])


def pad_batch(ids: list[list[int]], labels: list[list[int]], pad_id: int, **extra: list[int]) -> dict[str, torch.Tensor]:
    L = max(len(x) for x in ids)
    B = len(ids)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # (B, T)
    lab = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)] = torch.as_tensor(x)
        lab[i, : len(y)] = torch.as_tensor(y)
        att[i, : len(x)] = 1
    out = {"input_ids": input_ids, "attention_mask": att, "labels": lab}
    out.update({k: torch.as_tensor(v, dtype=torch.long) for k, v in extra.items()})
    return out
