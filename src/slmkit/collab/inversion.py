"""Prompt inversion, a red-team tool: a small model reconstructs the prompt behind a model's output.

The prompt-extraction attacks invert a deployed model: given only what it wrote, recover the
(often hidden) prompt or system prompt that produced it. Morris et al. 2023, "Language Model
Inversion" (arXiv:2311.13647), invert from next-token distributions; output2prompt (Zhang et al.
2024, "Extracting Prompts by Inverting LLM Outputs", arXiv:2405.15012) needs only the text of the
outputs and trains a sequence-to-sequence inverter on (output -> prompt) pairs. This module is the
output-only variant with a chat model as the inverter: each pair becomes one SFT conversation

    user:      INSTRUCTION + "Reply: " + output
    assistant: prompt

trained with :func:`slmkit.train.sft.sft` (LoRA by default; loss on the prompt tokens only), and
reconstruction is greedy decoding of that conversation's assistant turn. Users run it against
their own deployment (a local model or any OpenAI-compatible endpoint, through a
:class:`~slmkit.backends.Backend`) to measure how much of their prompt leaks into its outputs.

Leakage is scored on held-out pairs with SQuAD's token F1 and exact match (normalised: lower case,
no punctuation or articles; :func:`slmkit.collab.cascade.token_f1`), against two references
from the same pairs: the first sentence of the output (a trivial baseline: replies often restate
their prompt) and the untrained model asked the same question zero-shot.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from slmkit.backends.base import Backend, GenParams, Prompt
from slmkit.collab.cascade import normalize_answer, token_f1
from slmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INSTRUCTION = "Here is a model's reply. Write the prompt that produced it."
ROLES = ("user", "system")


@dataclass(frozen=True)
class InvertConfig:
    """How an output is shown to the inverter, and how its prompt is decoded."""

    instruction: str = INSTRUCTION  #: the request put before each reply (keep it equal at training and use)
    max_output_chars: int = 1500  #: replies are cut to this many characters before they are shown
    max_new_tokens: int = 64  #: longest reconstructed prompt (tokens, greedy)

    def __post_init__(self):
        if not self.instruction.strip():
            raise ConfigError("instruction must not be empty")
        if self.max_output_chars < 1:
            raise ConfigError(f"max_output_chars must be >= 1, got {self.max_output_chars}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Pair:
    """One (prompt, output) pair; ``where`` is ``file:line`` (or another origin) for messages."""

    prompt: str
    output: str
    where: str = ""


# ---------------------------------------------------------------------------- building pairs


def _text(row: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in row:
        raise DataError(f"{where}: missing field '{key}'")
    val = row[key]
    if not isinstance(val, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(val).__name__}")
    if not allow_empty and not val.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return val


def _from_messages(messages, where: str, role: str, need_output: bool) -> Pair:
    """Prompt = the last ``role`` message before the first assistant turn; output = that turn."""
    from slmkit.train.records import check_messages

    msgs = check_messages(messages, where)
    first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
    prompts = [m["content"] for m in msgs[:first] if m["role"] == role]
    if not prompts or not prompts[-1].strip():
        raise DataError(f"{where}: no non-empty '{role}' message before the first assistant turn")
    if first == len(msgs):
        if need_output:
            raise DataError(f"{where}: no assistant message, so there is no output to invert")
        return Pair(prompts[-1], "", where)
    return Pair(prompts[-1], msgs[first]["content"], where)


def _from_self_instruct(row: dict, where: str) -> Pair:
    inst = row.get("instances")
    if not isinstance(inst, list) or not inst or not isinstance(inst[0], dict):
        raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, output}} objects")
    first = inst[0]
    text = _text(row, "instruction", where)
    extra = first.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: instances[0].input must be a string")
    prompt = text + (f"\n\n{extra}" if extra.strip() else "")
    return Pair(prompt, _text(first, "output", f"{where} instances[0]", allow_empty=True), where)


def read_pairs(path: str | Path, role: str = "user", need_output: bool = True, limit: int = 0) -> list[Pair]:
    """(prompt, output) pairs of a jsonl file; errors name the file and line.

    Rows are ``{"prompt", "output"}`` (``"completion"`` is accepted for ``"output"``),
    ``{"messages": [...]}`` (prompt = the last ``role`` message before the first assistant
    turn, output = that turn; ``role="system"`` targets system prompts), or Self-Instruct
    tasks ``{"instruction", "instances": [{"input", "output"}]}`` (prompt = instruction plus
    the first instance's input). ``need_output=False`` allows rows with a prompt only (their
    outputs are then collected from a backend with :func:`collect_pairs`).
    """
    from slmkit.data.readers import iter_jsonl

    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    pairs = []
    for lineno, row in iter_jsonl(path, limit):
        where = f"{path}:{lineno}"
        if "messages" in row:
            pair = _from_messages(row["messages"], where, role, need_output)
        elif "prompt" in row:
            key = "output" if "output" in row or "completion" not in row else "completion"
            out = _text(row, key, where, allow_empty=True) if need_output or key in row else ""
            pair = Pair(_text(row, "prompt", where), out, where)
        elif "instruction" in row:
            pair = _from_self_instruct(row, where)
        else:
            raise DataError(
                f"{where}: missing field 'prompt' (or 'messages')",
                'each line must be {"prompt": ..., "output": ...} or {"messages": [{"role": ..., "content": ...}, ...]}',
            )
        if need_output and not pair.output.strip():
            raise DataError(f"{where}: the output is empty, so there is nothing to invert")
        pairs.append(pair)
    if not pairs:
        raise DataError(f"data file {path} has no rows")
    return pairs


def collect_pairs(backend: Backend, prompts: Sequence[str], params: GenParams = GenParams(max_new_tokens=128),
                  user_turn: str | None = None) -> list[Pair]:
    """Query ``backend`` with each prompt and pair the prompt with its output.

    With ``user_turn`` each prompt is sent as the *system* prompt and ``user_turn`` as the
    user message (the system-prompt extraction setting); otherwise as the user message.
    """
    if user_turn is not None and not user_turn.strip():
        raise ConfigError("user_turn must not be empty (None sends each prompt as the user message)")
    chats: list[Prompt] = [
        [{"role": "system", "content": p}, {"role": "user", "content": user_turn}] if user_turn is not None
        else [{"role": "user", "content": p}]
        for p in prompts
    ]
    outs = backend.generate(chats, params)
    log.info("collected %d outputs from %s", len(outs), backend.name)
    return [Pair(p, c.text.strip(), f"{backend.name}[{i}]") for i, (p, c) in enumerate(zip(prompts, outs))]


# ---------------------------------------------------------------------------- formatting, training, inverting


def inversion_request(output: str, cfg: InvertConfig = InvertConfig()) -> str:
    """The user message that asks for the prompt behind ``output``."""
    return f"{cfg.instruction}\n\nReply: {output.strip()[: cfg.max_output_chars]}"


def conversations(pairs: Sequence[Pair], cfg: InvertConfig = InvertConfig()) -> list[list[dict]]:
    """Chat SFT examples: user = the inversion request for the output, assistant = the prompt."""
    return [
        [{"role": "user", "content": inversion_request(p.output, cfg)}, {"role": "assistant", "content": p.prompt.strip()}]
        for p in pairs
    ]


def train_inverter(model, tokenizer, pairs: Sequence[Pair], sft_cfg, checkpoints: str | Path,
                   cfg: InvertConfig = InvertConfig(), resume: bool = False):
    """Fine-tune ``model`` into an inverter on ``pairs`` with :func:`slmkit.train.sft.sft`.

    ``sft_cfg`` is an :class:`~slmkit.train.sft.SFTConfig` (give it ``lora=LoraSettings()``
    for LoRA; with LoRA ``model`` gets adapter layers injected, otherwise it is trained in
    place). Returns the :class:`~slmkit.train.sft.SFTResult`.
    """
    from slmkit.train.sft import sft

    if not pairs:
        raise DataError("no (output, prompt) pairs to train the inverter on")
    log.info("training an inverter on %d pairs for %d steps", len(pairs), sft_cfg.max_steps)
    return sft(model, tokenizer, conversations(pairs, cfg), sft_cfg, checkpoints, resume=resume)


def invert(backend: Backend, outputs: Sequence[str], cfg: InvertConfig = InvertConfig()) -> list[str]:
    """Greedy reconstruction of the prompt behind each output, by the inverter ``backend``."""
    chats: list[Prompt] = [[{"role": "user", "content": inversion_request(o, cfg)}] for o in outputs]
    return [c.text.strip() for c in backend.generate(chats, GenParams(max_new_tokens=cfg.max_new_tokens))]


# ---------------------------------------------------------------------------- metrics


_SENT_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def first_sentence(text: str) -> str:
    """The first sentence of ``text``'s first non-empty line (the baseline reconstruction).

    A sentence ends at ``.``, ``!`` or ``?`` before white space or the end; a would-be
    sentence without a letter (a list number such as ``1.``) runs on to the next end.
    """
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    for m in _SENT_END.finditer(line):
        head = line[: m.end()]
        if any(ch.isalpha() for ch in head):
            return head.strip()
    return line


def exact_match(pred: str, gold: str) -> bool:
    """Equal after SQuAD normalisation."""
    return normalize_answer(pred) == normalize_answer(gold)


def score(predictions: Sequence[str], golds: Sequence[str]) -> dict:
    """Mean token F1 and exact match of reconstructed prompts against the true ones."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} prompts")
    if not golds:
        raise DataError("no pairs to score")
    n = len(golds)
    return {
        "token_f1": sum(token_f1(p, g) for p, g in zip(predictions, golds)) / n,
        "exact_match": sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n,
        "n": n,
    }


def evaluate(pairs: Sequence[Pair], inverters: Mapping[str, Backend], cfg: InvertConfig = InvertConfig(),
             examples: int = 3) -> dict:
    """Leakage on ``pairs``: the first-sentence baseline and each named inverter backend.

    Returns ``{name: {"token_f1", "exact_match", "n", "examples": [{prompt, output, reconstruction}]}}``
    with ``first_sentence`` first, then the inverters in the given order.
    """
    golds = [p.prompt for p in pairs]
    outputs = [p.output for p in pairs]
    preds = {"first_sentence": [first_sentence(o) for o in outputs]}
    for name, backend in inverters.items():
        if name in preds:
            raise ConfigError(f"inverter name {name!r} is reserved for the baseline")
        preds[name] = invert(backend, outputs, cfg)
    report = {}
    for name, pr in preds.items():
        report[name] = {
            **score(pr, golds),
            "examples": [{"prompt": g, "output": o[:200], "reconstruction": r}
                         for g, o, r in list(zip(golds, outputs, pr))[:examples]],
        }
    return report
