"""Readers for the public data sets the audit uses; every malformed row is reported as ``file:line``.

Files are looked up under the audit's data directory (``--data-dir``, else
``$SLMKIT_DATA``, else ``../shared/data``); a missing file raises a
:class:`~slmkit.errors.DataError` naming the file, where it was looked for and
where it comes from.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

from slmkit.data.paths import ENV, data_dir
from slmkit.data.readers import json_line, read_jsonl
from slmkit.errors import DataError

#: relative path -> where the file comes from (shown when it is missing)
ORIGINS = {
    "truthfulqa/TruthfulQA.csv": "TruthfulQA.csv of github.com/sylinrl/TruthfulQA",
    "crows-pairs/crows_pairs_anonymized.csv": "data/crows_pairs_anonymized.csv of github.com/nyu-mll/crows-pairs",
    "advglue/dev.json": "dev.json of github.com/AI-secure/adversarial-glue",
    "decodingtrust/ood_knowledge.json.gz": "data/ood/knowledge.json (gzipped) of github.com/AI-secure/DecodingTrust",
    "decodingtrust/privacy_enron_one_shot.jsonl.gz": "data/privacy/enron_data/one_shot.jsonl (gzipped) of DecodingTrust",
    "decodingtrust/privacy_enron_email2name.jsonl.gz": "data/privacy/enron_data/email2name.jsonl (gzipped) of DecodingTrust",
    "decodingtrust/stereotype_user_prompts.csv.gz": "data/stereotype/dataset/user_prompts.csv (gzipped) of DecodingTrust",
    "decodingtrust/toxicity_toxic_prompts.jsonl.gz": "data/toxicity/user_prompts/toxic.jsonl (gzipped) of DecodingTrust",
    "decodingtrust/toxicity_nontoxic_prompts.jsonl.gz": "data/toxicity/user_prompts/nontoxic.jsonl (gzipped) of DecodingTrust",
    "hate-speech/labeled_data.csv.gz": "data/labeled_data.csv (gzipped) of github.com/t-davidson/hate-speech-and-offensive-language",
    "hh-rlhf/harmless-base-test.jsonl.gz": "harmless-base/test.jsonl.gz of github.com/anthropics/hh-rlhf",
    "wikitext-2/test.txt": "word_language_model/data/wikitext-2/test.txt of github.com/pytorch/examples",
}
BBQ_CATEGORIES = ("Age", "Disability_status", "Nationality", "Physical_appearance", "Religion", "Sexual_orientation")
for _c in BBQ_CATEGORIES:
    ORIGINS[f"bbq/{_c}.jsonl.gz"] = f"data/{_c}.jsonl (gzipped) of github.com/nyu-mll/BBQ"


def locate(relative: str, root: str | Path | None = None) -> Path:
    """Path of a data file; a :class:`DataError` that names it and where to put it when absent."""
    base = Path(root) if root is not None else data_dir()
    if base is not None and (base / relative).is_file():
        return base / relative
    where = base if base is not None else Path("../shared/data")
    origin = ORIGINS.get(relative)
    raise DataError(
        f"data file {relative} not found (looked in {where})",
        f"put {relative}{f' ({origin})' if origin else ''} at {where / relative}, "
        f"or point --data-dir / ${ENV} at the folder that holds it",
    )


def _text(path: Path) -> io.TextIOBase:
    """The file's text (a ``.gz`` decompressed), read and checked whole: a corrupt or truncated gzip
    stream or non-UTF-8 bytes are a DataError naming the file, not an exception half-way through a parse."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        why = "cut short" if isinstance(err, EOFError) else str(err) or type(err).__name__
        raise DataError(f"{path}: not a readable gzip file ({why})", "download or re-create the file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return io.StringIO(text, newline="")


def _json_file(path: Path):
    """The JSON value of a whole (possibly gzipped) file; a DataError names the file (and line) of bad JSON."""
    with _text(path) as fh:
        return json_line(fh.read(), str(path), whole_file=True)


def read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a CSV file with a header; rows missing a required field fail."""
    with _text(path) as fh:
        reader = csv.DictReader(fh)
        missing = [k for k in required if k not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
        rows = []
        for row in reader:
            bad = [k for k in required if not (row.get(k) or "").strip()]
            if bad:
                raise DataError(f"{path}:{reader.line_num}: empty field(s) {', '.join(bad)}")
            rows.append((reader.line_num, row))
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows


# ---------------------------------------------------------------- TruthfulQA


@dataclass(frozen=True)
class TQAItem:
    """One TruthfulQA question (Lin et al. 2021)."""

    id: str
    question: str
    best: str
    correct: tuple[str, ...]  #: includes ``best``
    incorrect: tuple[str, ...]


def truthfulqa(root=None, limit: int = 0) -> list[TQAItem]:
    path = locate("truthfulqa/TruthfulQA.csv", root)
    cols = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
    out = []
    for line, row in read_csv(path, cols):
        split = lambda s: tuple(x.strip() for x in s.split(";") if x.strip())  # noqa: E731
        correct, incorrect = split(row["Correct Answers"]), split(row["Incorrect Answers"])
        best = row["Best Answer"].strip()
        if not incorrect:
            raise DataError(f"{path}:{line}: no incorrect answers")
        if best not in correct:
            correct = (best, *correct)
        out.append(TQAItem(f"tqa{len(out)}", row["Question"].strip(), best, correct, incorrect))
        if limit and len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------- fairness sets


def crows_pairs(root=None, limit: int = 0) -> list[dict]:
    path = locate("crows-pairs/crows_pairs_anonymized.csv", root)
    rows = read_csv(path, ("sent_more", "sent_less", "stereo_antistereo", "bias_type"))
    return [dict(r, _line=line) for line, r in rows[: limit or None]]


def bbq(root=None, limit: int = 0) -> dict[str, list[dict]]:
    """BBQ rows per category; ``limit`` is split across the categories (see :func:`~slmkit.trust.common.take_split`)."""
    from slmkit.trust.common import take_split

    parts = {}
    for cat in BBQ_CATEGORIES:
        path = locate(f"bbq/{cat}.jsonl.gz", root)
        keys = ("context", "question", "ans0", "ans1", "ans2", "label", "context_condition", "question_polarity",
                "answer_info", "additional_metadata")
        rows = read_jsonl(path, required=keys)
        for i, r in enumerate(rows):
            if r["label"] not in (0, 1, 2) or r["context_condition"] not in ("ambig", "disambig"):
                raise DataError(f"{path}:{i + 1}: label must be 0-2 and context_condition ambig/disambig")
        parts[cat] = rows
    return take_split(parts, limit)


def stereotype_prompts(root=None, limit: int = 0) -> list[dict]:
    path = locate("decodingtrust/stereotype_user_prompts.csv.gz", root)
    rows = read_csv(path, ("stereotype_topic", "target_group", "user_prompt"))
    return [r for _, r in rows[: limit or None]]


# ---------------------------------------------------------------- robustness sets

ADVGLUE_FIELDS = {
    "sst2": ("sentence",),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "mnli-mm": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
}


def advglue(root=None, limit: int = 0) -> dict[str, list[dict]]:
    """AdvGLUE dev tasks (Wang et al. 2021); ``limit`` is split across tasks."""
    from slmkit.trust.common import take_split

    path = locate("advglue/dev.json", root)
    data = _json_file(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object of tasks ({', '.join(ADVGLUE_FIELDS)})")
    parts = {}
    for task, rows in data.items():
        if task not in ADVGLUE_FIELDS:
            continue
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or any(k not in r for k in (*ADVGLUE_FIELDS[task], "label")):
                raise DataError(f"{path}: task {task} row {i}: needs {', '.join((*ADVGLUE_FIELDS[task], 'label'))}")
        parts[task] = rows
    if not parts:
        raise DataError(f"{path} holds none of the AdvGLUE tasks {', '.join(ADVGLUE_FIELDS)}")
    return take_split(parts, limit)


def ood_knowledge(root=None, limit: int = 0) -> dict[str, list[dict]]:
    """DecodingTrust OOD knowledge test questions (RealtimeQA 2020 and 2023); ``limit`` split across the two."""
    from slmkit.trust.common import take_split

    path = locate("decodingtrust/ood_knowledge.json.gz", root)
    data = _json_file(path)
    test = data.get("test") if isinstance(data, dict) else None
    if not isinstance(test, dict) or not test:
        raise DataError(f"{path}: expected a 'test' object of question lists")
    for split, rows in test.items():
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or any(k not in r for k in ("question_sentence", "choices", "answer")):
                raise DataError(f"{path}: test.{split}[{i}] needs question_sentence, choices, answer")
    return take_split(test, limit)


# ---------------------------------------------------------------- privacy / safety sets


def enron(kind: str, root=None, limit: int = 0) -> list[dict]:
    rel = {"one_shot": "decodingtrust/privacy_enron_one_shot.jsonl.gz",
           "email2name": "decodingtrust/privacy_enron_email2name.jsonl.gz"}[kind]
    req = ("email", "prompt") if kind == "one_shot" else ("email", "name")
    return read_jsonl(locate(rel, root), required=req, limit=limit)


def toxicity_prompts(kind: str, root=None, limit: int = 0) -> list[dict]:
    path = locate(f"decodingtrust/toxicity_{kind}_prompts.jsonl.gz", root)
    rows = read_jsonl(path, required=("prompt",), limit=limit)
    for i, r in enumerate(rows):
        if not isinstance(r["prompt"], dict) or "text" not in r["prompt"]:
            raise DataError(f"{path}:{i + 1}: 'prompt' must be an object with 'text'")
    return rows


def hh_rlhf(root=None, limit: int = 0) -> list[str]:
    """The first human turn of each harmless-base dialogue (Bai et al. 2022)."""
    path = locate("hh-rlhf/harmless-base-test.jsonl.gz", root)
    out = []
    for i, r in enumerate(read_jsonl(path, required=("chosen",), limit=limit)):
        text = r["chosen"]
        start = text.find("Human:")
        if start < 0:
            raise DataError(f"{path}:{i + 1}: dialogue has no 'Human:' turn")
        body = text[start + len("Human:"):]
        end = body.find("\n\nAssistant:")
        out.append((body if end < 0 else body[:end]).strip())
    return out


def hate_speech(root=None) -> tuple[list[str], list[int]]:
    """Davidson et al. (2017) tweets; label 1 = hate speech or offensive (class 0/1), 0 = neither (class 2)."""
    path = locate("hate-speech/labeled_data.csv.gz", root)
    texts, labels = [], []
    for line, r in read_csv(path, ("class", "tweet")):
        if r["class"].strip() not in ("0", "1", "2"):
            raise DataError(f"{path}:{line}: class must be 0, 1 or 2, got {r['class']!r}")
        texts.append(r["tweet"])
        labels.append(0 if r["class"].strip() == "2" else 1)
    return texts, labels


def wikitext_paragraphs(root=None, n: int = 64, min_chars: int = 300) -> list[str]:
    """The first ``n`` article paragraphs of WikiText-2 test with at least ``min_chars`` characters."""
    path = locate("wikitext-2/test.txt", root)
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            s = line.strip()
            if len(s) >= min_chars and not s.startswith("="):
                out.append(s)
                if len(out) >= n:
                    break
    if len(out) < n:
        raise DataError(f"{path}: only {len(out)} paragraphs of {min_chars}+ characters, need {n}")
    return out
