"""One call from text (or nothing: the embedded corpus) to prepared pre-training data."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

from .corpus import CorpusError, embedded_documents, embedded_files, file_documents
from .shards import prepare_data, source_hashes
from .tokenizer import build_standard_tokenizer, train_tokenizer

TOKENIZERS = ("bert-base-uncased", "train")


def cache_root() -> Path:
    """``$IPU_APP_CACHE`` or ``~/.cache/ipu_app``."""
    return Path(os.environ.get("IPU_APP_CACHE", Path.home() / ".cache" / "ipu_app"))


def _tokenizer(kind: str, documents, directory: Path, vocab_size: int) -> Path:
    if kind == "bert-base-uncased":
        return build_standard_tokenizer(directory)
    if kind == "train":
        return train_tokenizer((d for d in documents if not d.is_validation()), directory, vocab_size)
    raise CorpusError(f"unknown tokenizer {kind!r}; use one of {list(TOKENIZERS)}")


def prepare_files(paths: Sequence[str | Path], output_dir: str | Path, tokenizer: str = "bert-base-uncased",
                  vocab_size: int = 30522, document_mode: str = "blank_lines", progress: bool = True) -> Path:
    """Text files -> ``output_dir`` (idempotent). The tokenizer is trained on the train split only."""
    if not paths:
        raise CorpusError("no input files given")
    documents = list(file_documents(paths, document_mode))
    sources = source_hashes(paths)
    return _prepare(documents, Path(output_dir), tokenizer, vocab_size, sources, progress)


def prepare_embedded(tokenizer: str = "bert-base-uncased", vocab_size: int = 30522, cache_dir: str | Path | None = None,
                     progress: bool = True) -> Path:
    """The embedded corpus, prepared once into the cache and reused afterwards."""
    output_dir, sources = _embedded_dir(tokenizer, vocab_size, cache_dir)
    if (output_dir / "manifest.json").is_file():
        return output_dir
    return _prepare(list(embedded_documents()), output_dir, tokenizer, vocab_size, sources, progress)


def embedded_data_dir(tokenizer: str = "bert-base-uncased", vocab_size: int = 30522,
                      cache_dir: str | Path | None = None) -> Path:
    """Where ``prepare_embedded`` puts (or has put) the embedded corpus; prepares nothing."""
    return _embedded_dir(tokenizer, vocab_size, cache_dir)[0]


def _embedded_dir(tokenizer: str, vocab_size: int, cache_dir: str | Path | None) -> tuple[Path, dict]:
    sources = source_hashes(embedded_files())
    key = hashlib.sha256(repr((sorted(sources.values()), tokenizer, vocab_size)).encode()).hexdigest()[:16]
    return Path(cache_dir or cache_root()) / f"embedded-{key}", sources


def _prepare(documents, output_dir: Path, tokenizer: str, vocab_size: int, sources: dict, progress: bool) -> Path:
    if not documents:
        raise CorpusError("no documents found: the input files are empty")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = _tokenizer(tokenizer, documents, Path(tmp) / "tokenizer", vocab_size)
        prepare_data(documents, tok_dir, output_dir, sources=sources, progress=progress)
    return output_dir
