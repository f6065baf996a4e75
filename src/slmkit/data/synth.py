"""Teacher-generated training data (sequence-level / black-box distillation data).

Prompts come from a file (jsonl with ``messages``, ``prompt``, ``instruction``
(+ ``instances[0].input``, the Self-Instruct seed format), ``turns`` (MT-Bench,
first turn), ``question`` or ``text``; or a plain-text file, one prompt per line),
or are written by the teacher itself from seed tasks, Self-Instruct style (Wang et
al. 2023). The teacher is any :class:`~slmkit.backends.Backend`: a local HF model
or an OpenAI-compatible endpoint (vLLM, a cloud API), so a teacher that returns
only text still yields training data (black-box distillation, trained with
``--loss ce``).

Quality filters, in order: length (words), exact duplicates (normalised text),
near duplicates (Jaccard similarity of word 3-gram shingles, as in the
Self-Instruct / Alpaca pipelines' ROUGE-L filter but cheaper), teacher perplexity
of the response given its prompt (drops degenerate text), and an optional judge
score (an LLM judge rates 1-10).

Output is ``messages`` jsonl, appended one row at a time and flushed, so a crash
keeps what was generated; rerunning skips every prompt already answered or
rejected (rejections go to ``<output>.rejected.jsonl``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from slmkit import progress
from slmkit.backends.base import Backend, GenParams, PartialFailure
from slmkit.data.readers import open_lines, json_line
from slmkit.errors import BackendError, ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthConfig:
    n: int = 0  #: accepted examples to produce at most (0 = one per prompt)
    max_new_tokens: int = 256  #: teacher reply length cap
    temperature: float = 0.0  #: teacher sampling temperature (0 = greedy)
    seed: int = 0
    min_words: int = 3  #: drop replies shorter than this
    max_words: int = 2000  #: drop replies longer than this
    near_dup: float = 0.8  #: drop a reply whose 3-gram Jaccard similarity to a kept one is >= this (1 = exact only)
    max_perplexity: float = 0.0  #: drop replies whose teacher perplexity exceeds this (0 = no filter)
    min_judge_score: float = 0.0  #: with a judge: drop replies it scores below this (1-10)
    drop_truncated: bool = False  #: drop replies that hit max_new_tokens
    batch_size: int = 8  #: prompts sent to the teacher per call (each keeps its own seed: same replies at any size)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n < 0 or self.max_new_tokens < 1:
            raise ConfigError(f"n must be >= 0 and max_new_tokens >= 1, got {self.n}, {self.max_new_tokens}")
        if not 0 < self.near_dup <= 1:
            raise ConfigError(f"near_dup must be in (0, 1], got {self.near_dup}")
        if self.min_words > self.max_words:
            raise ConfigError(f"min_words {self.min_words} > max_words {self.max_words}")
        if not 0 <= self.min_judge_score <= 10:
            raise ConfigError(f"min_judge_score must be in [0, 10], got {self.min_judge_score}")


@dataclass
class PromptItem:
    id: str
    messages: list[dict]  #: the conversation to answer (ends with a user turn)


@dataclass
class SynthReport:
    output: str
    accepted: int  #: rows in the output after this call
    generated: int  #: replies generated in this call
    skipped_done: int  #: prompts already answered or rejected in an earlier call
    rejected: dict[str, int] = field(default_factory=dict)  #: reason -> count (this call)
    failed: int = 0  #: prompts the teacher gave no answer to (server errors after retries); a rerun retries them
    failures: list[str] = field(default_factory=list)  #: the first few of those, "id: why"


# ------------------------------------------------------------------ prompts


def _prompt_of(row: dict, where: str) -> list[dict]:
    if isinstance(row.get("messages"), list) and row["messages"]:
        msgs = [m for m in row["messages"] if isinstance(m, dict)]
        while msgs and msgs[-1].get("role") == "assistant":  # answer the last user turn afresh
            msgs = msgs[:-1]
        if msgs and all(isinstance(m.get("content"), str) for m in msgs):
            return msgs
    text = None
    if isinstance(row.get("prompt"), str):
        text = row["prompt"]
    elif isinstance(row.get("instruction"), str):
        text = row["instruction"]
        inst = row.get("instances") or []
        extra = row.get("input") or (inst[0].get("input") if inst and isinstance(inst[0], dict) else "")
        if extra:
            text = f"{text}\n\n{extra}"
    elif isinstance(row.get("turns"), list) and row["turns"] and isinstance(row["turns"][0], str):
        text = row["turns"][0]
    elif isinstance(row.get("question"), str):
        text = row["question"]
    elif isinstance(row.get("text"), str):
        text = row["text"]
    if not text or not text.strip():
        raise DataError(f"{where}: no prompt found", "rows need messages, prompt, instruction, turns, question or text")
    return [{"role": "user", "content": text.strip()}]


def read_prompts(path: str | Path, limit: int = 0) -> list[PromptItem]:
    """Prompts of a jsonl file (formats in the module docstring) or a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist")
    items: list[PromptItem] = []
    jsonl = str(path).endswith((".jsonl", ".json", ".jsonl.gz"))
    with open_lines(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if jsonl:
                row = json_line(line, where)
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object")
                rid = row.get("id", row.get("question_id"))
                items.append(PromptItem(str(rid) if rid is not None else f"{path.name}:{lineno}", _prompt_of(row, where)))
            else:
                items.append(PromptItem(f"{path.name}:{lineno}", [{"role": "user", "content": line.strip()}]))
            if limit and len(items) >= limit:
                break
    if not items:
        raise DataError(f"prompts file {path} is empty")
    return items


def self_instruct_prompts(teacher: Backend, seeds: list[PromptItem], n: int, seed: int = 0, examples: int = 3,
                          max_new_tokens: int = 96) -> list[PromptItem]:
    """``n`` new instructions written by the teacher from random seed tasks (Self-Instruct, Wang et al. 2023, Sec. 2.2)."""
    rng = random.Random(seed)
    out: list[PromptItem] = []
    seen = [_shingles(s.messages[-1]["content"]) for s in seeds]
    tries = 0
    while len(out) < n and tries < 4 * n + 8:
        tries += 1
        shots = rng.sample(seeds, min(examples, len(seeds)))
        listing = "\n".join(f"Task {i + 1}: {s.messages[-1]['content'].splitlines()[0]}" for i, s in enumerate(shots))
        ask = (f"Here are some tasks:\n{listing}\n\nWrite one new, different task of the same kind. "
               f"Reply with the task only.")
        params = GenParams(max_new_tokens=max_new_tokens, temperature=0.8, seed=seed * 100003 + tries)
        text = teacher.generate([[{"role": "user", "content": ask}]], params)[0].text.strip()
        text = re.sub(r"^(task\s*\d*\s*:)\s*", "", text, flags=re.I).strip()
        sh = _shingles(text)
        if len(text.split()) < 3 or any(_jaccard(sh, o) >= 0.7 for o in seen):
            continue
        seen.append(sh)
        out.append(PromptItem(f"self-instruct-{seed}-{tries}", [{"role": "user", "content": text}]))
    return out


# ------------------------------------------------------------------ filters (pure)


def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _shingles(text: str, k: int = 3) -> frozenset[str]:
    words = normalise(text).split()
    if len(words) < k:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i : i + k]) for i in range(len(words) - k + 1))


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class DedupIndex:
    """Exact (normalised hash) and near-duplicate (3-gram Jaccard) membership over kept texts."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.hashes: set[str] = set()
        self.shingles: list[frozenset[str]] = []

    def check(self, text: str) -> str | None:
        """The rejection reason for ``text`` ("duplicate" / "near_duplicate") or None."""
        h = hashlib.sha1(normalise(text).encode()).hexdigest()
        if h in self.hashes:
            return "duplicate"
        sh = _shingles(text)
        if self.threshold < 1 and any(_jaccard(sh, o) >= self.threshold for o in self.shingles):
            return "near_duplicate"
        return None

    def add(self, text: str) -> None:
        self.hashes.add(hashlib.sha1(normalise(text).encode()).hexdigest())
        self.shingles.append(_shingles(text))


JUDGE_PROMPT = ("Rate how helpful, correct and well written the answer is, from 1 (bad) to 10 (excellent).\n\n"
                "Question:\n{q}\n\nAnswer:\n{a}\n\nReply with the number only.")


def judge_score(judge: Backend, question: str, answer: str) -> float | None:
    """A 1-10 score from an LLM judge (MT-Bench style single-answer grading); None if it gives no number."""
    reply = judge.generate([[{"role": "user", "content": JUDGE_PROMPT.format(q=question, a=answer)}]],
                           GenParams(max_new_tokens=8))[0].text
    m = re.search(r"\d+(\.\d+)?", reply)
    return min(max(float(m.group()), 1.0), 10.0) if m else None


def _context_text(backend: Backend, messages: list[dict]) -> str:
    tok = getattr(backend, "tokenizer", None)
    if tok is not None and getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def teacher_perplexity(teacher: Backend, messages: list[dict], reply: str) -> float:
    s = teacher.score([reply], [_context_text(teacher, messages)])[0]
    return math.exp(-s.total / max(len(s.logprobs), 1))


# ------------------------------------------------------------------ the loop


def _read_done(path: Path) -> list[dict]:
    """Rows already written; a last line without its newline (a kill mid-write) is cut off the file.

    That row is generated again. A last line that happens to parse is cut too: appending the
    next row after it would join two rows on one line and break every later resume.
    """
    if not path.exists():
        return []
    rows, good_bytes = [], 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.endswith(b"\n"):
                log.warning("%s:%d: dropping a half-written last line (it will be generated again)", path, lineno)
                break
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError):
                raise DataError(f"{path}:{lineno}: not valid JSON; not an output of gen-data?") from None
            if not isinstance(row, dict) or "id" not in row:
                raise DataError(f"{path}:{lineno}: not a gen-data row (an object with an \"id\"); not an output of gen-data?")
            rows.append(row)
            good_bytes += len(raw)
    if good_bytes < path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good_bytes)
            fh.flush()
            os.fsync(fh.fileno())
    return rows


def _written_here(path: Path) -> bool:
    """A file of rows this module wrote: each is a JSON object that starts with its "id" (see ``append_row``)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(7) == b'{"id": '
    except OSError:
        return False


def check_synth_output(output: str | Path, force: bool = False) -> None:
    """Refuse an ``output`` (or its ``.rejected.jsonl``) that gen-data did not write, unless ``force``."""
    from slmkit.artefact import check_output

    output = Path(output)
    for path in (output, _rejected_path(output)):
        check_output(path, force, owned=_written_here, kind="file")


def _rejected_path(output: Path) -> Path:
    return output.with_name(output.name + ".rejected.jsonl")



def open_synth_output(output: str | Path, force: bool = False) -> tuple[Path, Path, list[dict], set[str]]:
    """Check ``output`` (and its rejected-rows file) for gen-data, empty a file slmkit did not write
    (only reached with ``force``), and return ``(output, rejected path, rows kept so far, ids done)``
    so that a rerun resumes where the last one stopped."""
    from slmkit.artefact import atomic_file

    output = Path(output)
    rejected_path = _rejected_path(output)
    check_synth_output(output, force)
    for path in (output, rejected_path):
        if path.is_file() and path.stat().st_size and not _written_here(path):  # only with force
            log.warning("replacing %s (--force): it was not written by gen-data", path)
            with atomic_file(path, force=True, owned=_written_here):
                pass
    output.parent.mkdir(parents=True, exist_ok=True)
    kept = _read_done(output)
    done = {str(r.get("id")) for r in kept} | {str(r.get("id")) for r in _read_done(rejected_path)}
    return output, rejected_path, kept, done


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _answer(teacher: Backend, batch: list[PromptItem], params: GenParams, report: SynthReport
            ) -> tuple[list, PartialFailure | None]:
    """``[(item, completion)]`` for the prompts of ``batch`` the teacher answered, in prompt order,
    and the failure of the others (None when all were answered).

    A prompt whose request failed (after the backend's retries) is left out, counted in
    ``report.failed`` and not written anywhere, so a rerun asks for it again; the others go on.
    """
    try:
        return list(zip(batch, teacher.generate([it.messages for it in batch], params))), None
    except PartialFailure as err:
        for i, why in err.failed.items():
            log.warning("gen-data: no answer to prompt %s: %s", batch[i].id, why)
            if len(report.failures) < 5:
                report.failures.append(f"{batch[i].id}: {why}")
        report.failed += len(err.failed)
        return [(it, c) for it, c in zip(batch, err.results) if c is not None], err


def generate_dataset(teacher: Backend, prompts: list[PromptItem], output: str | Path, cfg: SynthConfig = SynthConfig(),
                     judge: Backend | None = None, force: bool = False) -> SynthReport:
    """Answer ``prompts`` with ``teacher``, filter, and append ``messages`` rows to ``output`` (resumable).

    An existing ``output`` (or ``<output>.rejected.jsonl``) that this function did not
    write is refused (:class:`~slmkit.errors.OutputExistsError`), or with ``force`` replaced
    by an empty file before generation starts.
    """
    output, rejected_path, kept, done = open_synth_output(output, force)
    dedup = DedupIndex(cfg.near_dup)
    for r in kept:
        dedup.add(r["messages"][-1]["content"])
    target = cfg.n or len(prompts)
    report = SynthReport(str(output), len(kept), 0, 0)
    use_ppl = cfg.max_perplexity > 0
    pending = [item for item in prompts if item.id not in done]
    report.skipped_done = len(prompts) - len(pending)
    queue: list = []  # (item, completion) answered by the last teacher call, in prompt order
    empty_calls = 0  # teacher calls in a row that answered no prompt
    while pending or queue:
        progress.step("accepted replies", report.accepted, target)
        if report.accepted >= target:
            break
        if not queue:
            # ask for no more replies than could still be accepted; each reply's sampling seed depends only
            # on (seed, prompt id), so a resumed run, or another batch size, samples what a fresh one would
            take = min(cfg.batch_size, target - report.accepted)
            batch, pending = pending[:take], pending[take:]
            seeds = tuple(cfg.seed * 1_000_003 + int(hashlib.sha1(it.id.encode()).hexdigest()[:8], 16) for it in batch)
            params = GenParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seeds=seeds)
            queue, failure = _answer(teacher, batch, params, report)
            empty_calls = 0 if queue else empty_calls + 1
            if empty_calls >= 2:  # two calls in a row got nothing back: the teacher is down, stop (a rerun resumes)
                raise BackendError(f"teacher {teacher.name} answered none of the last two batches ({failure.problem})",
                                   f"{report.accepted} rows are in {output}; check the server, then rerun to go on")
            if not queue:
                continue
        item, c = queue.pop(0)
        report.generated += 1
        reply = c.text.strip()
        meta: dict = {"teacher": teacher.name, "finish_reason": c.finish_reason}
        words = len(reply.split())
        reason = None
        if words < cfg.min_words or words > cfg.max_words:
            reason = "length"
        elif cfg.drop_truncated and c.finish_reason == "length":
            reason = "truncated"
        else:
            reason = dedup.check(reply)
        if reason is None and use_ppl:
            try:
                meta["perplexity"] = round(teacher_perplexity(teacher, item.messages, reply), 4)
                reason = "perplexity" if meta["perplexity"] > cfg.max_perplexity else None
            except BackendError as err:
                log.warning("teacher perplexity filter off: %s", err.problem)
                use_ppl = False
        if reason is None and judge is not None and cfg.min_judge_score > 0:
            meta["judge_score"] = judge_score(judge, item.messages[-1]["content"], reply)
            if meta["judge_score"] is None or meta["judge_score"] < cfg.min_judge_score:
                reason = "judge"
        if reason is not None:
            report.rejected[reason] = report.rejected.get(reason, 0) + 1
            append_row(rejected_path, {"id": item.id, "reason": reason, "reply": reply, "meta": meta})
            continue
        dedup.add(reply)
        append_row(output, {"id": item.id, "messages": [*item.messages, {"role": "assistant", "content": reply}], "meta": meta})
        report.accepted += 1
    progress.step("accepted replies", report.accepted, target)
    return report
