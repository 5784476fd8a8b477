"""Sentence(-pair) classification tasks from local files in GLUE's formats, and a small demo task.

A task file is TSV (GLUE's own: tab-separated, a header row, no quoting), CSV (a header row) or
JSON Lines (one object per line). The text is one column (``sentence``) or two (``sentence1`` /
``sentence2``, ``question`` / ``sentence``, ...), found by GLUE's column names or given; the label
column is ``label`` unless given. Labels are kept as the strings the file holds; the classes are
the training file's labels, sorted (numerically when they are all integers).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .corpus import CorpusError, embedded_documents, split_sentences

# GLUE's (and SuperGLUE's, SNLI's) text columns, pairs first: the first that a file has is used.
TEXT_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                ("premise", "hypothesis"), ("question", "passage"), ("sentence",), ("text",))
FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
DEMO_LABELS = ("address", "encyclopedia")


class TaskError(CorpusError):
    """A task file that cannot be read as a classification task; the message is one line."""


@dataclass
class TaskData:
    """One split: each example's text (one string, or two for a pair) and label (as in the file)."""

    path: Path
    texts: list[tuple[str, ...]]
    labels: list[str]
    columns: tuple[str, ...]
    label_column: str

    def __len__(self) -> int:
        return len(self.labels)


def read_task(path: str | Path, text_columns: tuple[str, ...] | None = None, label_column: str = "label") -> TaskData:
    """Read a TSV / CSV / JSON Lines task file (see the module docstring)."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise TaskError(f"{path}: unknown task format {path.suffix!r}; use .tsv, .csv or .jsonl")
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    rows = _read_rows(path, kind)
    if not rows:
        raise TaskError(f"{path} holds no examples")
    header = list(rows[0])
    columns = tuple(text_columns) if text_columns else next(
        (c for c in TEXT_COLUMNS if all(name in header for name in c)), None)
    if columns is None:
        raise TaskError(f"{path}: no known text column among {header}; give them with --text-columns")
    for name in (*columns, label_column):
        if name not in header:
            raise TaskError(f"{path} has no column {name!r}; its columns are {header}")
    texts, labels = [], []
    for number, row in enumerate(rows, start=2 if kind != "jsonl" else 1):
        values = [row.get(name) for name in columns]
        label = row.get(label_column)
        if label is None or label == "" or any(v is None for v in values):
            raise TaskError(f"{path} line {number}: a missing {label_column!r} or text value")
        texts.append(tuple(str(v) for v in values))
        labels.append(str(label))
    return TaskData(path, texts, labels, columns, label_column)


def _read_rows(path: Path, kind: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if kind == "jsonl":
                rows = []
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise TaskError(f"{path} line {number} is not JSON ({exc.msg})") from None
                        if not isinstance(row, dict):
                            raise TaskError(f"{path} line {number} is not a JSON object")
                        rows.append(row)
                return rows
            # GLUE's TSV files are not quoted (a sentence may start with a quote mark)
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if kind == "tsv" else csv.DictReader(f)
            rows = list(reader)
            if reader.fieldnames is None:
                return []
            if any(None in row for row in rows):  # more fields than the header names
                bad = next(i for i, row in enumerate(rows, start=2) if None in row)
                raise TaskError(f"{path} line {bad} has more fields than the header")
            return rows
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def label_names(train: TaskData) -> list[str]:
    """The classes: the training labels, sorted (as numbers when all are integers)."""
    found = set(train.labels)
    try:
        return sorted(found, key=int)
    except ValueError:
        return sorted(found)


def check_labels(split: TaskData, names: list[str]) -> None:
    unknown = sorted(set(split.labels) - set(names))
    if unknown:
        raise TaskError(f"{split.path} has labels the training file does not: {unknown[:5]} (classes: {names})")


def write_demo_task(output_dir: str | Path, train: int = 2000, dev: int = 500, seed: int = 0) -> dict:
    """A small single-sentence task from the embedded corpus: is a sentence from a State of the Union
    address or from an encyclopedia article? Balanced classes; dev sentences come from other documents
    than the training ones. Writes ``train.tsv`` and ``dev.tsv`` (GLUE's format); returns the counts."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise TaskError(f"{output_dir} is not empty; choose a new directory (nothing was overwritten)")
    rng = random.Random(seed)
    pools = {}
    for label, source in zip(DEMO_LABELS, ("sotu", "wiki")):
        documents = [d for d in embedded_documents() if d.source == source]
        rng.shuffle(documents)
        cut = max(1, len(documents) // 5)  # a fifth of the documents for dev
        pools[label] = [_sentences(documents[cut:], rng), _sentences(documents[:cut], rng)]
    splits = {}
    for index, (name, size) in enumerate((("train", train), ("dev", dev))):
        per_class = size // 2
        rows = []
        for label in DEMO_LABELS:
            pool = pools[label][index]
            if len(pool) < per_class:
                raise TaskError(f"the embedded corpus has {len(pool)} {label} sentences for {name}; ask for fewer")
            rows += [(sentence, label) for sentence in pool[:per_class]]
        rng.shuffle(rows)
        splits[name] = rows
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(output_dir / f"{name}.tsv", "w", encoding="utf-8", newline="") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{sentence}\t{label}\n" for sentence, label in rows)
    return {name: len(rows) for name, rows in splits.items()}


def _sentences(documents, rng: random.Random) -> list[str]:
    """Sentences of 6 to 60 words (whitespace and tabs made single spaces), shuffled."""
    found = []
    for document in documents:
        for sentence in split_sentences(document.text):
            words = sentence.split()
            if 6 <= len(words) <= 60:
                found.append(" ".join(words))
    rng.shuffle(found)
    return found
