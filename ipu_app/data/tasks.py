"""Sentence(-pair) classification tasks from local files in GLUE's formats, and a small demo task.

A task file is TSV (GLUE's own: tab-separated, a header row, no quoting), CSV (a header row) or
JSON Lines (one object per line). The text is one column (``sentence``) or two (``sentence1`` /
``sentence2``, ``question`` / ``sentence``, ...), found by GLUE's column names or given; the label
column is ``label`` (GLUE's raw STS-B: ``score``, MNLI: ``gold_label``) unless given. Labels are kept as
the strings the file holds; the classes are the training file's labels, sorted (numerically when they
are all integers); numeric labels that are not all integers make a regression task (``task_kind``).
A test file has no labels; its ``index`` (or ``idx``) column names its rows in the predictions.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field
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
    labels: list[str]  # empty for an unlabeled (test) file
    columns: tuple[str, ...]
    label_column: str
    ids: list[str] = field(default_factory=list)  # the file's index / idx column, else the row number

    def __len__(self) -> int:
        return len(self.texts)


def task_kind(train: TaskData) -> str:
    """``regression`` when every training label is a number and some is not an integer (STS-B's
    ``3.800``), else ``classification``."""
    try:
        values = [float(label) for label in train.labels]
    except ValueError:
        return "classification"
    integers = all(label.strip().lstrip("+-").isdigit() for label in train.labels)
    return "classification" if integers or not all(math.isfinite(v) for v in values) else "regression"


LABEL_COLUMNS = ("label", "score", "gold_label")


def read_task(path: str | Path, text_columns: tuple[str, ...] | None = None, label_column: str | None = None,
              labeled: bool = True) -> TaskData:
    """Read a TSV / CSV / JSON Lines task file (see the module docstring); ``labeled=False``: a test
    file, whose label column (if any) is not read."""
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
    if label_column is None:
        label_column = next((name for name in LABEL_COLUMNS if name in header), LABEL_COLUMNS[0])
    for name in (*columns, *([label_column] if labeled else [])):
        if name not in header:
            raise TaskError(f"{path} has no column {name!r}; its columns are {header}")
    index = next((name for name in ("index", "idx", "id") if name in header), None)
    texts, labels, ids = [], [], []
    for number, row in enumerate(rows, start=2 if kind != "jsonl" else 1):
        values = [row.get(name) for name in columns]
        label = row.get(label_column) if labeled else "-"
        if label is None or label == "" or any(v is None for v in values):
            raise TaskError(f"{path} line {number}: a missing {label_column!r} or text value")
        texts.append(tuple(str(v) for v in values))
        if labeled:
            labels.append(str(label))
        ids.append(str(row[index]) if index is not None else str(len(ids)))
    return TaskData(path, texts, labels, columns, label_column, ids)


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


TASK_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
DEV_NAMES = (("dev",), ("dev_matched", "dev_mismatched"), ("validation",), ("validation_matched",
                                                                          "validation_mismatched"))


def task_files(task: list[str]) -> tuple[Path, list[Path]]:
    """``--task``: a folder (GLUE's layout: ``train.tsv`` and ``dev.tsv``, or MNLI's ``dev_matched`` and
    ``dev_mismatched``; .csv / .jsonl too), or the training file and one or more dev files; the
    first dev file is the one ``--save best`` and the results' ``dev`` speak of."""
    paths = [Path(p) for p in task]
    if len(paths) >= 2:
        return paths[0], paths[1:]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]

        def find(name: str) -> Path | None:
            return next((folder / f"{name}{s}" for s in TASK_SUFFIXES if (folder / f"{name}{s}").is_file()), None)

        train = find("train")
        if train is None:
            raise TaskError(f"{folder} has no train file (train.tsv, .csv or .jsonl)")
        for names in DEV_NAMES:
            found = [find(name) for name in names]
            if found[0] is not None:
                return train, [f for f in found if f is not None]
        raise TaskError(f"{folder} has no dev file (dev.tsv, or dev_matched.tsv and dev_mismatched.tsv)")
    if len(paths) == 1:
        raise TaskError(f"--task {paths[0]}: give a task folder (train.tsv + dev.tsv) or two files, TRAIN DEV")
    raise TaskError("--task takes a folder or the files TRAIN DEV [DEV ...]")


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
