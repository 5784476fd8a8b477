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

import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..io import atomic_write_bytes
from .corpus import CorpusError, Document, split_sentences
from .tokenizer import copy_tokenizer, load_tokenizer, tokenizer_hash, vocab_tokens

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
MIN_TRAIN_DOCUMENTS = 2  # NSP needs a second document to draw random segments from
SHARD_BYTES = 32 << 20  # a shard is closed at this much text (or documents_per_shard documents)


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _doc_hash(doc: Document) -> str:
    return hashlib.sha256(f"{doc.source}\0{doc.doc_id}\0{doc.text}".encode()).hexdigest()


@dataclasses.dataclass
class ShardPlan:
    split: str
    index: int
    documents: list[Document]
    key: str
    input_bytes: int = 0  # of the inputs behind these documents: the progress bar's unit

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def _plan(split: str, index: int, docs: list[Document], tok_hash: str, input_bytes: int = 0) -> ShardPlan:
    key = hashlib.sha256((tok_hash + "".join(_doc_hash(d) for d in docs)).encode()).hexdigest()
    return ShardPlan(split, index, docs, key, input_bytes)


def _too_small(count: int) -> CorpusError:
    if not count:
        return CorpusError("no documents found: the input files are empty")
    return CorpusError(f"corpus too small: {count} documents; need at least {MIN_TRAIN_DOCUMENTS + 1} "
                       "(documents are separated by blank lines, or one per file)")


def stream_shards(documents: Iterable[Document], tok_hash: str, documents_per_shard: int,
                  shard_bytes: int = SHARD_BYTES, input_bytes=None) -> Iterator[ShardPlan]:
    """Documents -> shard plans, streamed: each document goes to train or validation by its hash
    (document level) and into that split's open shard, which is closed at ``documents_per_shard``
    documents or ``shard_bytes`` of text. Only the open shards are held. ``input_bytes()`` (the
    reader's count) gives each plan the input bytes read up to it."""
    open_docs: dict[str, list[Document]] = {s: [] for s in SPLITS}
    open_bytes = dict.fromkeys(SPLITS, 0)
    closed = dict.fromkeys(SPLITS, 0)
    counted, total = 0, 0
    seen = dict.fromkeys(SPLITS, 0)  # documents per split

    def close(split: str) -> ShardPlan:
        nonlocal counted
        read = input_bytes() if input_bytes else total
        plan = _plan(split, closed[split], open_docs[split], tok_hash, read - counted)
        counted = read
        closed[split] += 1
        open_docs[split], open_bytes[split] = [], 0
        return plan

    for doc in documents:
        split = "validation" if doc.is_validation() else "train"
        open_docs[split].append(doc)
        seen[split] += 1
        size = len(doc.text.encode())
        open_bytes[split] += size
        total += size
        if len(open_docs[split]) >= documents_per_shard or open_bytes[split] >= shard_bytes:
            yield close(split)
    train, held = open_docs["train"], open_docs["validation"]
    if not closed["validation"] and not held and not closed["train"] and len(train) > MIN_TRAIN_DOCUMENTS:
        # Tiny corpora: hold out the document with the smallest hash so validation is never empty.
        chosen = min(train, key=_doc_hash)
        train.remove(chosen)
        held.append(chosen)
        seen["train"], seen["validation"] = seen["train"] - 1, 1
    if seen["train"] < MIN_TRAIN_DOCUMENTS or not seen["validation"]:
        if closed["train"] and seen["train"] >= MIN_TRAIN_DOCUMENTS:  # large, yet no validation document
            raise CorpusError("no document fell in the validation split (are all document ids equal? check "
                              "--id-field)")
        raise _too_small(seen["train"] + seen["validation"])
    for split in SPLITS:
        if open_docs[split]:
            yield close(split)


def _shard_finished(directory: Path, plan: ShardPlan) -> dict | None:
    marker = directory / f"{plan.name}.json"
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    arrays_present = all((directory / f"{plan.name}.{part}.npy").is_file() for part in ("tokens", "sentences", "documents"))
    return info if info.get("key") == plan.key and arrays_present else None


ENCODE_BATCH = 4096  # sentences per encode call: bounds the Python lists of ids held at once


def fast_tokenizer(directory: str | Path):
    """The Rust tokenizer of a tokenizer folder (``tokenizer.json``), without importing transformers
    (a worker starts in a fraction of the time); a folder without one goes through transformers."""
    path = Path(directory) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    return load_tokenizer(directory).backend_tokenizer


def _write_shard(directory: Path, plan: ShardPlan, tokenizer) -> dict:
    """Sentence-split and tokenise one shard's documents (the Rust tokenizer's batch encoding, in
    batches of ``ENCODE_BATCH`` sentences turned into arrays at once) and write its arrays, then
    its marker."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: faster
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    sentences_per_doc, pending, token_parts, length_parts = [], [], [], []

    def flush() -> None:
        ids = [e.ids for e in encode(pending, add_special_tokens=False)]
        length_parts.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
        token_parts.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                                       count=int(length_parts[-1].sum())))
        pending.clear()

    for doc in plan.documents:
        sentences = split_sentences(doc.text)
        sentences_per_doc.append(len(sentences))
        pending.extend(sentences)
        if len(pending) >= ENCODE_BATCH:
            flush()
    if pending:
        flush()
    lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, np.int64)
    tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, dtype)
    kept = lengths > 0  # sentences that tokenise to nothing are dropped
    owner = np.repeat(np.arange(len(sentences_per_doc)), sentences_per_doc)
    per_doc = np.bincount(owner, weights=kept, minlength=len(sentences_per_doc)).astype(np.int64)
    sentences = np.concatenate([[0], np.cumsum(lengths[kept])]).astype(np.int64)
    documents = np.concatenate([[0], np.cumsum(per_doc[per_doc > 0])]).astype(np.int64)
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


_WORKER_TOKENIZER = None


def _worker_init(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C stops the main process, which waits for the shards
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker process: the processes are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = fast_tokenizer(tokenizer_dir)


def _worker_write(directory: str, plan: ShardPlan) -> dict:
    return _write_shard(Path(directory), plan, _WORKER_TOKENIZER)


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare_data(
    documents: Iterable[Document],
    tokenizer_dir: str | Path,
    output_dir: str | Path,
    documents_per_shard: int = 2000,
    sources: dict[str, str] | None = None,
    progress: bool = True,
    workers: int = 1,
    shard_bytes: int = SHARD_BYTES,
    tokenizer_name: str | None = None,
) -> dict:
    """Tokenise documents into shards under ``output_dir``; reuse finished shards; return the manifest.

    ``documents`` is streamed (a ``CorpusReader`` or any iterable): shards are planned as documents
    arrive and tokenised by ``workers`` processes (1: in this process), with at most two shards per
    worker waiting, so memory does not grow with the corpus. The manifest is written last."""
    from tqdm.auto import tqdm

    if workers < 1:
        raise CorpusError(f"--workers must be >= 1, got {workers}")
    output_dir = Path(output_dir)
    tok_hash = tokenizer_hash(tokenizer_dir)
    if (output_dir / "tokenizer").exists() and tokenizer_hash(output_dir / "tokenizer") != tok_hash:
        raise CorpusError(f"{output_dir} holds data of another tokenizer; choose a new output directory")
    reader_bytes = getattr(documents, "bytes_read", None)
    total = getattr(documents, "total_bytes", None)
    if total is None:
        documents = list(documents)
        total = sum(len(d.text.encode()) for d in documents)
    plans = stream_shards(documents, tok_hash, documents_per_shard, shard_bytes,
                          (lambda: documents.bytes_read) if reader_bytes is not None else None)
    tokenizer = fast_tokenizer(tokenizer_dir)
    splits = {s: {"shards": [], "documents": 0, "sentences": 0, "tokens": 0} for s in SPLITS}
    with tqdm(total=total, desc="preparing shards", unit="B", unit_scale=True, unit_divisor=1024,
              disable=not progress, dynamic_ncols=True) as bar:
        def record(plan: ShardPlan, info: dict) -> None:
            split = splits[plan.split]
            split["shards"].append(plan.name)
            for k in ("documents", "sentences", "tokens"):
                split[k] += info[k]
            bar.update(plan.input_bytes)

        keys = _write_shards(plans, output_dir, tokenizer_dir, tokenizer, workers, record)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tok_hash,
        "tokenizer": tokenizer_name,  # bert-base-uncased, train or a tokenizer folder's path (None: not told)
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "sources": sources or {},
        "documents_per_shard": documents_per_shard,
        "plan": keys,
        "splits": splits,
    }
    manifest_path = output_dir / "manifest.json"
    encoded = json.dumps(manifest, indent=2).encode()
    if not manifest_path.is_file() or manifest_path.read_bytes() != encoded:
        atomic_write_bytes(manifest_path, encoded)
    return manifest


def _write_shards(plans: Iterable[ShardPlan], output_dir: Path, tokenizer_dir, tokenizer, workers: int,
                  record: Callable[[ShardPlan, dict], None]) -> list[str]:
    """Write (or find finished) every planned shard, in this process or ``workers`` spawned ones, and
    ``record`` each in plan order; returns the plan's shard keys. A failure stops the workers after the
    shards they are writing: finished shards stay, none is half-written."""
    pool = None
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the workers start clean (no forked tokenizer threads), one core each
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(str(tokenizer_dir),))
    pending: list = []  # (plan, future or finished info), in plan order
    keys: list[str] = []
    done = lambda plan, info: record(plan, info if isinstance(info, dict) else info.result())  # noqa: E731
    try:
        for plan in plans:
            if not keys:  # the first shard exists: the corpus is usable
                output_dir.mkdir(parents=True, exist_ok=True)
                copy_tokenizer(tokenizer_dir, output_dir / "tokenizer")
            keys.append(plan.key)
            info = _shard_finished(output_dir, plan)
            if info is None and pool is None:
                info = _write_shard(output_dir, plan, tokenizer)
            job = dataclasses.replace(plan)  # holds the documents until the worker has them
            plan.documents = []
            pending.append((plan, info if info is not None else pool.submit(_worker_write, str(output_dir), job)))
            # hand on, in plan order, what is done; wait only when too many shards are in flight
            while pending and (len(pending) > 2 * workers or isinstance(pending[0][1], dict)):
                done(*pending.pop(0))
        for plan, result in pending:
            done(plan, result)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    if pool is not None:
        pool.shutdown()
    return keys


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
    """sha256 of each input (read in 1 MiB blocks; a folder: of its files' names and bytes), for the
    manifest."""
    hashes = {}
    for path in map(Path, paths):
        digest = hashlib.sha256()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if path.is_dir():
                digest.update(str(file.relative_to(path)).encode() + b"\0")
            with open(file, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        hashes[str(path)] = digest.hexdigest()
    return hashes


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

