"""One call from text (or nothing: the embedded corpus) to prepared pre-training data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .corpus import CorpusError, CorpusReader, duplicate_warnings, embedded_documents, embedded_files, expand_inputs
from .shards import SHARD_BYTES, default_workers, prepare_data, source_hashes
from .tokenizer import (build_standard_tokenizer, has_vocabulary, tokenizer_hash, train_tokenizer, use_tokenizer_folder,
                        vocab_tokens)

TOKENIZERS = ("bert-base-uncased", "train")  # or the path of a Hugging Face WordPiece tokenizer folder


def cache_root() -> Path:
    """``$IPU_APP_CACHE`` or ``~/.cache/ipu_app``."""
    return Path(os.environ.get("IPU_APP_CACHE", Path.home() / ".cache" / "ipu_app"))


# A trained vocabulary smaller than this is refused: the corpus is too small to learn a tokenizer from.
MIN_TRAINED_VOCAB = 1000


def _tokenizer(kind: str, documents, directory: Path, vocab_size: int) -> Path:
    if kind == "bert-base-uncased":
        return build_standard_tokenizer(directory)
    if kind == "train":
        folder = train_tokenizer((d for d in documents if not d.is_validation()), directory, vocab_size)
        learned = vocab_tokens(folder)
        if learned < min(MIN_TRAINED_VOCAB, vocab_size):
            raise CorpusError(f"--tokenizer train learned only {learned} tokens from this corpus (asked for "
                              f"{vocab_size}; at least {MIN_TRAINED_VOCAB} are needed): give more text or use "
                              "--tokenizer bert-base-uncased")
        if learned < vocab_size:
            print(f"trained a WordPiece vocabulary of {learned} tokens (asked for {vocab_size}: the corpus has no "
                  "more)", file=sys.stderr)
        return folder
    if Path(kind).is_dir():
        return use_tokenizer_folder(kind, directory)
    raise CorpusError(f"unknown tokenizer {kind!r}; use one of {list(TOKENIZERS)} or the path of a Hugging Face "
                      "WordPiece tokenizer folder")


def prepare_files(paths: Sequence[str | Path], output_dir: str | Path, tokenizer: str = "bert-base-uncased",
                  vocab_size: int = 30522, document_mode: str = "blank_lines", progress: bool = True,
                  overwrite: bool = False, *, input_format: str = "auto", text_field: str = "text",
                  id_field: str | None = None, dataset_split: str | None = None, workers: int | None = None,
                  documents_per_shard: int = 2000, shard_bytes: int = SHARD_BYTES) -> Path:
    """Input files or folders -> ``output_dir`` (idempotent: the same input reuses what is there).
    Documents are streamed (memory does not grow with the corpus) and tokenised by ``workers``
    processes (None: the cores). Data of other input in ``output_dir`` is replaced only with
    ``overwrite`` (a run may be training on it). The tokenizer is trained on the train split only."""
    if not paths:
        raise CorpusError("no input files given")
    reader = CorpusReader(expand_inputs(paths, input_format), document_mode, text_field, id_field, dataset_split)
    reader.check()  # a missing field or column fails now, before any work
    sources = source_hashes(i.path for i in reader.inputs)
    output_dir = Path(output_dir)
    _check_replacement(output_dir, sources, tokenizer, overwrite)
    if progress:
        print(f"reading {describe_inputs(reader.inputs)}", file=sys.stderr)
    for warning in duplicate_warnings(reader.inputs, sources):
        print(f"warning: {warning}", file=sys.stderr)
    if documents_per_shard < 1 or shard_bytes < 1:
        raise CorpusError(f"shards need at least one document and one byte, got --documents-per-shard "
                          f"{documents_per_shard} and {shard_bytes} bytes")
    return _prepare(reader, output_dir, tokenizer, vocab_size, sources, progress, overwrite, workers,
                    dict(documents_per_shard=documents_per_shard, shard_bytes=shard_bytes))


def describe_inputs(inputs) -> str:
    """``3 inputs: 2 jsonl files, 1 datasets folder``."""
    from collections import Counter

    kinds = Counter(i.format for i in inputs)
    parts = [f"{n} {kind} {'folder' if kind == 'datasets' else 'file'}{'s' if n > 1 else ''}"
             for kind, n in sorted(kinds.items())]
    return f"{len(inputs)} input{'s' if len(inputs) > 1 else ''}: {', '.join(parts)}"


def prepared_counts(manifest: dict) -> str:
    """The end-of-preparation line: documents, sentences, tokens and shards, per split."""
    splits = manifest.get("splits", {})
    total = {k: sum(s.get(k, 0) for s in splits.values()) for k in ("documents", "sentences", "tokens")}
    shards = sum(len(s.get("shards", [])) for s in splits.values())
    per_split = "; ".join(f"{name} {s.get('documents', 0):,} documents, {s.get('tokens', 0):,} tokens"
                          for name, s in splits.items())
    return (f"{total['documents']:,} documents, {total['sentences']:,} sentences, {total['tokens']:,} tokens in "
            f"{shards} shard{'s' if shards != 1 else ''} ({per_split}); vocabulary {manifest.get('vocab_size'):,}")


# Fewer validation documents than this make validation losses noisy: prepare-data says so.
MIN_VALIDATION_DOCUMENTS = 20


def validation_warning(manifest: dict) -> str | None:
    """A warning when the validation split is small (documents go to it by hash, about 3 in 100), else None."""
    held = manifest.get("splits", {}).get("validation", {})
    documents = held.get("documents", 0)
    if documents >= MIN_VALIDATION_DOCUMENTS:
        return None
    return (f"the validation split holds {documents} document{'s' if documents != 1 else ''} "
            f"({held.get('tokens', 0):,} tokens): validation losses will be noisy and compare poorly between runs; "
            f"give more documents (about 3 in 100 go to validation) or evaluate on other data "
            f"(python -m ipu_app evaluate --data)")


def _check_replacement(output_dir: Path, sources: dict, tokenizer: str, overwrite: bool) -> None:
    """Refuse to replace prepared data of other input unless asked."""
    manifest = output_dir / "manifest.json"
    if overwrite or not manifest.is_file():
        return
    try:
        old = json.loads(manifest.read_text())
    except ValueError:
        return  # a damaged manifest is redone
    if sorted(old.get("sources", {}).values()) != sorted(sources.values()):
        raise CorpusError(f"{output_dir} already holds prepared data of other input (runs may use it); choose "
                          "a new --output, or add --overwrite to replace it")


def prepare_embedded(tokenizer: str = "bert-base-uncased", vocab_size: int = 30522, cache_dir: str | Path | None = None,
                     progress: bool = True) -> Path:
    """The embedded corpus, prepared once into the cache and reused afterwards. Processes that start
    together (a sweep's ``--jobs``) prepare it one at a time: the others wait for the first and reuse
    its data (an flock on ``embedded-KEY.lock`` beside the folder)."""
    from ..io import exclusive_lock

    output_dir, sources = _embedded_dir(tokenizer, vocab_size, cache_dir)
    if (output_dir / "manifest.json").is_file():
        return output_dir

    def waiting() -> None:
        if progress:
            print(f"waiting for another process to prepare the embedded corpus in {output_dir}", file=sys.stderr)

    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CorpusError(f"the corpus cache {output_dir.parent} cannot be written ({exc.strerror}): set "
                          "IPU_APP_CACHE to a writable folder") from None
    with exclusive_lock(output_dir.with_name(output_dir.name + ".lock"), on_wait=waiting):
        if (output_dir / "manifest.json").is_file():  # prepared by the process this one waited for
            return output_dir
        return _prepare(list(embedded_documents()), output_dir, tokenizer, vocab_size, sources, progress, workers=1)


def embedded_data_dir(tokenizer: str = "bert-base-uncased", vocab_size: int = 30522,
                      cache_dir: str | Path | None = None) -> Path:
    """Where ``prepare_embedded`` puts (or has put) the embedded corpus; prepares nothing."""
    return _embedded_dir(tokenizer, vocab_size, cache_dir)[0]


def _embedded_dir(tokenizer: str, vocab_size: int, cache_dir: str | Path | None) -> tuple[Path, dict]:
    sources = source_hashes(embedded_files())
    if tokenizer not in TOKENIZERS and has_vocabulary(tokenizer):
        tokenizer = f"folder {tokenizer_hash(tokenizer)}"  # a folder is its vocabulary (and casing), not its path
    key = hashlib.sha256(repr((sorted(sources.values()), tokenizer, vocab_size)).encode()).hexdigest()[:16]
    return Path(cache_dir or cache_root()) / f"embedded-{key}", sources


def _prepare(documents, output_dir: Path, tokenizer: str, vocab_size: int, sources: dict, progress: bool,
             overwrite: bool = False, workers: int | None = None, shard_sizes: dict | None = None) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = _tokenizer(tokenizer, documents, Path(tmp) / "tokenizer", vocab_size)
        if overwrite and (output_dir / "tokenizer").exists() and \
                tokenizer_hash(output_dir / "tokenizer") != tokenizer_hash(tok_dir):
            shutil.rmtree(output_dir / "tokenizer")  # asked for: the new tokenizer replaces the old
        prepare_data(documents, tok_dir, output_dir, sources=sources, progress=progress,
                     tokenizer_name=tokenizer if tokenizer in TOKENIZERS else str(Path(tokenizer).resolve()),
                     workers=default_workers() if workers is None else workers, **(shard_sizes or {}))
    return output_dir


def prepared_data_dir(data) -> Path:
    """Where the data of a config's ``data`` section is (or will be) prepared: ``data.dir``, else the
    embedded corpus's cache folder for its tokenizer; prepares nothing."""
    return Path(data.dir) if data.dir else embedded_data_dir(data.tokenizer, data.vocab_size)


def located_data(data) -> Path:
    """The prepared data of a config's ``data`` section; prepares nothing (a one-line error when it is
    not there: a command prepares it first, ``ready_data``)."""
    from .corpus import CorpusError
    from .shards import load_manifest

    path = prepared_data_dir(data)
    if not data.dir and not (path / "manifest.json").is_file():
        raise CorpusError(f"the embedded corpus is not prepared for tokenizer {data.tokenizer!r} (vocab_size "
                          f"{data.vocab_size}): run python -m ipu_app prepare-data --tokenizer {data.tokenizer} "
                          f"--vocab-size {data.vocab_size} first (the train command does it itself)")
    load_manifest(path)  # one-line error when data.dir is not prepared data
    return path


def ready_data(data, progress: bool = True) -> Path:
    """What a command does before it builds a trainer: ``data.dir`` located (it must be prepared),
    or the embedded corpus prepared once into the cache (reused afterwards)."""
    if data.dir:
        return located_data(data)
    return prepare_embedded(data.tokenizer, data.vocab_size, progress=progress)


def data_vocabulary(data) -> dict:
    """The tokenizer a run with the ``data`` config section trains with, read from the prepared
    data's manifest: ``{"tokenizer", "vocab_size", "from"}``. ``tokenizer`` is ``bert-base-uncased``
    when the data's vocabulary is that one, else ``train`` (a vocabulary learned on a corpus);
    ``from`` is ``data`` (the manifest) or ``config`` (the data is not prepared yet: the values asked
    for, which a trained vocabulary may fall short of)."""
    from .shards import load_manifest
    from .tokenizer import BERT_UNCASED_VOCAB_SHA256

    path = prepared_data_dir(data)
    if not (path / "manifest.json").is_file():
        return {"tokenizer": data.tokenizer, "vocab_size": data.vocab_size, "from": "config"}
    manifest = load_manifest(path)  # a data.dir that is not prepared data: one line
    standard = manifest.get("tokenizer_sha256") == BERT_UNCASED_VOCAB_SHA256
    named = manifest.get("tokenizer")  # what prepare-data was given (manifests of older versions lack it)
    name = "bert-base-uncased" if standard else named if named and named not in TOKENIZERS else "train"
    return {"tokenizer": name, "vocab_size": int(manifest["vocab_size"]),
            "from": "data"}
