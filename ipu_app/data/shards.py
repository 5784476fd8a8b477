"""Corpus -> sharded binary pre-training data, with a manifest.

Layout of a data directory::

    manifest.json                 written last: counts, source and tokenizer hashes, shard list
    tokenizer/                    the tokenizer folder the ids belong to
    train-00000.tokens.npy        token ids (uint16, or int32 for vocabularies over 65535)
    train-00000.sentences.npy     int64 token offsets of sentence starts (+ end), length S + 1
    train-00000.documents.npy     int64 sentence offsets of document starts (+ end), length D + 1
    train-00000.json              done-marker: written after the arrays, names the shard's key

A shard counts as finished only when its marker exists and names the same key
(tokenizer hash + hashes of its documents), so a rerun reuses finished shards and
an interrupted run never leaves a shard that looks finished. Arrays are written to
temporary names and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..io import atomic_write_bytes
from .corpus import CorpusError, Document, split_sentences
from .tokenizer import copy_tokenizer, load_tokenizer, tokenizer_hash, vocab_tokens

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
MIN_TRAIN_DOCUMENTS = 2  # NSP needs a second document to draw random segments from


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _doc_hash(doc: Document) -> str:
    return hashlib.sha256(f"{doc.source}\0{doc.doc_id}\0{doc.text}".encode()).hexdigest()


@dataclass
class ShardPlan:
    split: str
    index: int
    documents: list[Document]
    key: str

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def plan_shards(documents: Sequence[Document], tok_hash: str, documents_per_shard: int) -> list[ShardPlan]:
    """Split documents into train/validation (document level, by hash) and into shards."""
    by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in documents:
        by_split["validation" if doc.is_validation() else "train"].append(doc)
    if not by_split["validation"] and len(by_split["train"]) > MIN_TRAIN_DOCUMENTS:
        # Tiny corpora: hold out the document with the smallest hash so validation is never empty.
        held = min(by_split["train"], key=_doc_hash)
        by_split["train"].remove(held)
        by_split["validation"].append(held)
    if len(by_split["train"]) < MIN_TRAIN_DOCUMENTS or not by_split["validation"]:
        raise CorpusError(
            f"corpus too small: {len(documents)} documents; need at least {MIN_TRAIN_DOCUMENTS + 1} "
            "(documents are separated by blank lines, or one per file)"
        )
    plans = []
    for split, docs in by_split.items():
        for i in range(0, len(docs), documents_per_shard):
            chunk = docs[i : i + documents_per_shard]
            key = hashlib.sha256((tok_hash + "".join(_doc_hash(d) for d in chunk)).encode()).hexdigest()
            plans.append(ShardPlan(split, i // documents_per_shard, chunk, key))
    return plans


def _shard_finished(directory: Path, plan: ShardPlan) -> dict | None:
    marker = directory / f"{plan.name}.json"
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    arrays_present = all((directory / f"{plan.name}.{part}.npy").is_file() for part in ("tokens", "sentences", "documents"))
    return info if info.get("key") == plan.key and arrays_present else None


def _write_shard(directory: Path, plan: ShardPlan, tokenizer) -> dict:
    sentences_per_doc, all_sentences = [], []
    for doc in plan.documents:
        sentences = split_sentences(doc.text)
        sentences_per_doc.append(len(sentences))
        all_sentences.extend(sentences)
    ids = tokenizer(all_sentences, add_special_tokens=False)["input_ids"] if all_sentences else []
    keep = [i for i, s in enumerate(ids) if s]  # sentences that tokenise to nothing are dropped
    lengths = np.array([len(ids[i]) for i in keep], dtype=np.int64)
    kept = np.zeros(len(ids), dtype=bool)
    kept[keep] = True
    doc_sentence_counts = [int(kept[a:b].sum()) for a, b in _ranges(sentences_per_doc)]
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    tokens = np.fromiter((t for i in keep for t in ids[i]), dtype=dtype, count=int(lengths.sum()))
    sentences = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    documents = np.concatenate([[0], np.cumsum([c for c in doc_sentence_counts if c])]).astype(np.int64)
    for part, array in (("tokens", tokens), ("sentences", sentences), ("documents", documents)):
        _atomic_npy(directory / f"{plan.name}.{part}.npy", array)
    info = {
        "key": plan.key,
        "split": plan.split,
        "documents": int(len(documents) - 1),
        "sentences": int(len(sentences) - 1),
        "tokens": int(len(tokens)),
    }
    atomic_write_bytes(directory / f"{plan.name}.json", json.dumps(info).encode())
    return info


def _ranges(counts: Iterable[int]):
    start = 0
    for c in counts:
        yield start, start + c
        start += c


def prepare_data(
    documents: Iterable[Document],
    tokenizer_dir: str | Path,
    output_dir: str | Path,
    documents_per_shard: int = 2000,
    sources: dict[str, str] | None = None,
    progress: bool = True,
) -> dict:
    """Tokenise documents into shards under ``output_dir``; reuse finished shards; return the manifest."""
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    documents = list(documents)
    if not documents:
        raise CorpusError("no documents found: the input files are empty")
    tok_hash = tokenizer_hash(tokenizer_dir)
    plans = plan_shards(documents, tok_hash, documents_per_shard)
    manifest_path = output_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("plan") == [p.key for p in plans] and all(_shard_finished(output_dir, p) for p in plans):
            return manifest
    output_dir.mkdir(parents=True, exist_ok=True)
    if (output_dir / "tokenizer").exists() and tokenizer_hash(output_dir / "tokenizer") != tok_hash:
        raise CorpusError(f"{output_dir} holds data of another tokenizer; choose a new output directory")
    copy_tokenizer(tokenizer_dir, output_dir / "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    splits = {s: {"shards": [], "documents": 0, "sentences": 0, "tokens": 0} for s in SPLITS}
    bar = tqdm(total=len(documents), desc="preparing shards", unit="doc", disable=not progress)
    for plan in plans:
        info = _shard_finished(output_dir, plan) or _write_shard(output_dir, plan, tokenizer)
        split = splits[plan.split]
        split["shards"].append(plan.name)
        for k in ("documents", "sentences", "tokens"):
            split[k] += info[k]
        bar.update(len(plan.documents))
    bar.close()
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tok_hash,
        "vocab_size": len(tokenizer),
        "sources": sources or {},
        "documents_per_shard": documents_per_shard,
        "plan": [p.key for p in plans],
        "splits": splits,
    }
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
    return manifest


def load_manifest(data_dir: str | Path) -> dict:
    """Read and check a data directory's manifest (one-line errors)."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise CorpusError(f"{data_dir} is not prepared pre-training data (no manifest.json); prepare it with `python -m ipu_app prepare-data --input FILES --output {data_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path} is corrupt ({exc.msg}); delete it and prepare the data again") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorpusError(f"{path} has format {manifest.get('format_version')}, expected {FORMAT_VERSION}; prepare the data again")
    return manifest


def source_hashes(paths: Iterable[str | Path]) -> dict[str, str]:
    """sha256 of each input file, for the manifest."""
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def check_tokenizer(data_dir: str | Path, manifest: dict) -> Path:
    """The data directory's ``tokenizer/``, checked against the one the shards were made with."""
    data_dir = Path(data_dir)
    directory = data_dir / "tokenizer"
    if not (directory / "vocab.txt").is_file():
        raise CorpusError(f"{directory} is missing (no vocab.txt): the shards' tokenizer is gone; "
                          "prepare the data again")
    expected = manifest.get("tokenizer_sha256")
    found = tokenizer_hash(directory)
    if expected and found != expected:
        raise CorpusError(
            f"{directory} is not the tokenizer the shards were made with (vocab.txt: {vocab_tokens(directory)} "
            f"tokens, sha256 "
            f"{found[:12]}; manifest.json: {manifest.get('vocab_size')} tokens, sha256 {expected[:12]}); "
            "put the original back or prepare the data again")
    return directory

