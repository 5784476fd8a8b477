"""Masked-LM + NSP batches from prepared shards.

* The sample index is built once per ``seq_len``, not per epoch: each document's
  sentences are packed greedily into chunks of ``seq_len - 3`` tokens (vectorised over
  documents, cached memory-mapped under ``DATA_DIR/index/``). Sample ``i`` of an epoch is
  chunk ``i`` cut into A and B by draws that depend only on ``(seed, epoch, i)``: with
  probability 0.5 B is a random segment of another document (NSP label 1; the chunk's
  sentences after A are not used in that epoch), else the true continuation (label 0; a
  one-sentence chunk is split inside the sentence). An epoch starts with one permutation.
* Whole-word masking: whole words are drawn until ``mask_prob`` of the tokens (at
  most ``max_predictions``) are chosen; each chosen token becomes [MASK] (80%), a
  random token (10%) or stays (10%). Masks depend only on ``(seed, epoch, sample)``.
* The validation set is built once with a fixed seed, independent of the run's
  seed, so validation losses compare across runs.
* ``BatchIterator`` walks a per-epoch permutation; each global batch is split by
  rank; its state (epoch, position) resumes exactly.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..seeding import derive_seed
from .corpus import CorpusError
from .shards import check_tokenizer, load_manifest
from .tokenizer import load_tokenizer

VALIDATION_SEED = 20210813  # fixed: the validation masks never depend on a run's seed


@dataclass(frozen=True)
class MaskingConfig:
    seq_len: int = 128
    mask_prob: float = 0.15
    max_predictions: int = 20
    nsp_random_prob: float = 0.5

    def validate(self) -> "MaskingConfig":
        if self.seq_len < 8:
            raise CorpusError(f"seq_len={self.seq_len} is too short; use at least 8")
        if not 0.0 < self.mask_prob < 1.0:
            raise CorpusError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.max_predictions < 1:
            raise CorpusError(f"max_predictions must be >= 1, got {self.max_predictions}")
        return self


def _mapped(path: Path) -> np.ndarray:
    """A ``.npy`` file memory-mapped read-only, as a plain array view (indexing an ``np.memmap``
    costs several times more per call)."""
    return np.load(path, mmap_mode="r").view(np.ndarray)


class ShardedSplit:
    """The memory-mapped shards of one split as one corpus of documents (picklable: a worker process
    reopens the maps instead of copying them)."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = load_manifest(data_dir)
        if split not in self.manifest["splits"]:
            raise CorpusError(f"{data_dir} has no split {split!r}")
        self._open()
        if len(self.documents) < 2:
            raise CorpusError(f"split {split!r} of {data_dir} has {len(self.documents)} documents; need at least 2")

    def _open(self) -> None:
        self.tokens, self.sentence_offsets, tables = [], [], []
        for shard_index, name in enumerate(self.manifest["splits"][self.split]["shards"]):
            try:
                tokens = _mapped(self.data_dir / f"{name}.tokens.npy")
                sentences = _mapped(self.data_dir / f"{name}.sentences.npy")
                documents = np.load(self.data_dir / f"{name}.documents.npy")
            except (OSError, ValueError) as exc:
                raise CorpusError(f"shard {name} in {self.data_dir} is unreadable ({exc}); prepare the data "
                                  "again") from None
            if len(sentences) == 0 or sentences[-1] != len(tokens) or documents[-1] != len(sentences) - 1:
                raise CorpusError(f"shard {name} in {self.data_dir} is inconsistent; prepare the data again")
            self.tokens.append(tokens)
            self.sentence_offsets.append(sentences)
            tables.append(np.column_stack([np.full(len(documents) - 1, shard_index), documents[:-1],
                                           documents[1:]]))
        # documents as (shard, first sentence, end sentence)
        self.documents = np.concatenate(tables).astype(np.int64) if tables else np.zeros((0, 3), np.int64)

    def __getstate__(self) -> dict:
        return {"data_dir": self.data_dir, "split": self.split, "manifest": self.manifest}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def chunks(self, target: int) -> np.ndarray:
        """``[N, 3]`` int32 (document, first sentence, end sentence): every document's sentences packed
        greedily into chunks of at least ``target`` tokens (the last of a document may be shorter);
        chunks under 2 tokens (no pair) are left out. Built once, vectorised over the documents of a
        shard, and cached memory-mapped in ``DATA_DIR/index/`` (computed in memory when the data
        directory is read-only)."""
        plan = self.manifest.get("plan") or self.manifest["splits"][self.split]["shards"]
        key = hashlib.sha256(repr((INDEX_VERSION, self.split, target, plan)).encode()).hexdigest()[:16]
        path = self.data_dir / "index" / f"{self.split}-chunks-{target}-{key}.npy"
        try:
            cached = _mapped(path)
            if cached.ndim == 2 and cached.shape[1] == 3:
                return cached
        except (OSError, ValueError):
            pass
        built = self._build_chunks(target)
        try:
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, built)
            os.replace(tmp, path)  # ranks building it at once write the same array
        except OSError:
            pass
        return built

    def _build_chunks(self, target: int) -> np.ndarray:
        parts = []
        for shard, offsets in enumerate(self.sentence_offsets):
            rows = np.flatnonzero(self.documents[:, 0] == shard)
            offsets = np.asarray(offsets)
            start, end = self.documents[rows, 1].copy(), self.documents[rows, 2]
            while rows.size:
                nxt = np.clip(np.searchsorted(offsets, offsets[start] + target, side="left"), start + 1, end)
                keep = offsets[nxt] - offsets[start] >= 2
                parts.append(np.column_stack([rows[keep], start[keep], nxt[keep]]))
                more = nxt < end
                rows, start, end = rows[more], nxt[more], end[more]
        if not parts:
            return np.zeros((0, 3), np.int32)
        chunks = np.concatenate(parts)
        chunks = chunks[np.lexsort((chunks[:, 1], chunks[:, 0]))]  # document order, then position
        dtype = np.int32 if chunks.max(initial=0) < np.iinfo(np.int32).max else np.int64
        return chunks.astype(dtype)


INDEX_VERSION = 1  # of the cached chunk index: a change rebuilds it


class PretrainingDataset:
    """Deterministic MLM + NSP samples of one split."""

    def __init__(self, data_dir: str | Path, split: str = "train", masking: MaskingConfig = MaskingConfig(),
                 seed: int = 0) -> None:
        self.corpus = ShardedSplit(data_dir, split)
        self.masking = masking.validate()
        self.seed = seed
        tokenizer = load_tokenizer(check_tokenizer(data_dir, self.corpus.manifest))
        self.vocab_size = len(tokenizer)
        if self.vocab_size != self.corpus.manifest.get("vocab_size", self.vocab_size):
            raise CorpusError(f"{data_dir}/tokenizer has {self.vocab_size} tokens, the shards were made with "
                              f"{self.corpus.manifest['vocab_size']}; prepare the data again")
        vocab = tokenizer.get_vocab()
        self.cls_id, self.sep_id = vocab["[CLS]"], vocab["[SEP]"]
        self.mask_id, self.pad_id = vocab["[MASK]"], vocab["[PAD]"]
        self.special_ids = np.array(sorted(tokenizer.all_special_ids))
        self.is_special = np.zeros(self.vocab_size, dtype=bool)
        self.is_special[self.special_ids] = True
        self.is_continuation = np.zeros(self.vocab_size, dtype=bool)
        for token, i in vocab.items():
            self.is_continuation[i] = token.startswith("##")
        self.chunks = self.corpus.chunks(self.masking.seq_len - 3)
        if not len(self.chunks):
            raise CorpusError(f"no training pairs could be built from split {split!r} of {data_dir}: the "
                              "documents are too short")

    def __len__(self) -> int:
        """Samples per epoch (the same in every epoch): one per chunk."""
        return len(self.chunks)

    # ------------------------------------------------------------ instances
    def instance(self, epoch: int, index: int, rng: np.random.Generator | None = None) -> tuple[int, ...]:
        """Sample ``index``'s segment pair ``(a_shard, a_start, a_end, b_shard, b_start, b_end, nsp_label)``
        (token ranges), drawn from ``rng`` (default: the sample's own generator)."""
        if rng is None:
            rng = np.random.default_rng(derive_seed(self.seed, epoch, index))
        corpus, target = self.corpus, self.masking.seq_len - 3
        docs = corpus.documents
        doc, c0, c1 = (int(x) for x in self.chunks[index])
        shard = int(docs[doc, 0])
        offsets = corpus.sentence_offsets[shard]
        n_sent = c1 - c0
        random_next = rng.random() < self.masking.nsp_random_prob
        if random_next:
            a_sents = int(rng.integers(1, n_sent)) if n_sent > 1 else 1
            a0, a1 = int(offsets[c0]), int(offsets[c0 + a_sents])
            other = int(rng.integers(len(docs) - 1))
            other += other >= doc  # any other document
            b_shard, o_first, o_end = (int(x) for x in docs[other])
            o_offsets = corpus.sentence_offsets[b_shard]
            b0 = int(o_offsets[int(rng.integers(o_first, o_end))])
            b1 = min(int(o_offsets[o_end]), b0 + max(target - (a1 - a0), 1))
        else:
            if n_sent > 1:
                cut = int(offsets[c0 + int(rng.integers(1, n_sent))])
            else:
                cut = int(offsets[c0]) + int(rng.integers(1, int(offsets[c1] - offsets[c0])))
            a0, a1, b0, b1, b_shard = int(offsets[c0]), cut, cut, int(offsets[c1]), shard
        a0, a1, b0, b1 = _truncate_pair(a0, a1, b0, b1, target)
        return shard, a0, a1, b_shard, b0, b1, int(random_next)

    # --------------------------------------------------------------- samples
    def sample(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """One masked sample; identical for identical ``(seed, epoch, index)``: the pair and then the
        mask are drawn from one generator seeded by them."""
        rng = np.random.default_rng(derive_seed(self.seed, epoch, index))
        a_shard, a0, a1, b_shard, b0, b1, nsp = self.instance(epoch, index, rng)
        tokens = self.corpus.tokens
        a, b = np.asarray(tokens[a_shard][a0:a1], np.int64), np.asarray(tokens[b_shard][b0:b1], np.int64)
        seq_len = self.masking.seq_len
        ids = np.full(seq_len, self.pad_id, dtype=np.int64)
        n = len(a) + len(b) + 3
        ids[:n] = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]])
        token_types = np.zeros(seq_len, dtype=np.int64)
        token_types[len(a) + 2 : n] = 1
        attention = np.zeros(seq_len, dtype=np.int64)
        attention[:n] = 1
        ids, labels = self._mask(ids, n, rng)
        return {"input_ids": ids, "token_type_ids": token_types, "attention_mask": attention,
                "mlm_labels": labels, "nsp_labels": np.int64(nsp)}

    def _mask(self, ids: np.ndarray, length: int, rng: np.random.Generator):
        labels = np.full_like(ids, -100)
        candidates = np.flatnonzero(~self.is_special[ids[:length]])
        if candidates.size == 0:
            return ids, labels
        # a word = a start token and the "##" continuations after it
        starts = ~self.is_continuation[ids[candidates]] | (np.diff(candidates, prepend=-2) != 1)
        word_id = np.cumsum(starts) - 1
        word_starts = np.flatnonzero(starts)
        word_lengths = np.diff(np.append(word_starts, candidates.size)).tolist()
        budget = min(self.masking.max_predictions, max(1, int(round(length * self.masking.mask_prob))))
        chosen = np.zeros(word_starts.size, dtype=bool)
        total = 0
        for w in rng.permutation(word_starts.size).tolist():
            if total + word_lengths[w] > budget:
                continue
            chosen[w] = True
            total += word_lengths[w]
            if total == budget:
                break
        positions = candidates[chosen[word_id]]
        labels[positions] = ids[positions]
        action = rng.random(positions.size)
        masked = ids.copy()
        masked[positions[action < 0.8]] = self.mask_id
        swap = positions[(action >= 0.8) & (action < 0.9)]
        random_ids = rng.integers(0, self.vocab_size, swap.size)
        bad = self.is_special[random_ids]
        while bad.any():  # never swap in a special token
            random_ids[bad] = rng.integers(0, self.vocab_size, int(bad.sum()))
            bad = self.is_special[random_ids]
        masked[swap] = random_ids
        return masked, labels


def _truncate_pair(a0: int, a1: int, b0: int, b1: int, target: int) -> tuple[int, int, int, int]:
    """Trim the longer segment from its end (A on a tie), one token at a time, until both fit in
    ``target`` tokens; in closed form."""
    la, lb = a1 - a0, b1 - b0
    excess = la + lb - target
    if excess <= 0:
        return a0, a1, b0, b1
    gap = abs(la - lb)
    if excess <= gap:  # only the longer one is trimmed
        return (a0, a1 - excess, b0, b1) if la > lb else (a0, a1, b0, b1 - excess)
    rest = excess - gap  # both equal now; A first
    short = min(la, lb)
    return a0, a0 + short - (rest + 1) // 2, b0, b0 + short - rest // 2


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def build_batch(dataset: "PretrainingDataset", epoch: int, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """The batch of samples ``indices`` of ``epoch``."""
    return collate([dataset.sample(epoch, int(i)) for i in indices])


def static_batch(batch: dict, max_predictions: int) -> dict:
    """A loader batch (``mlm_labels [B, S]`` with -100 where unmasked) with fixed-size masked inputs:
    ``masked_positions [B, P]`` and ``masked_labels [B, P]`` (-100 padding), P = ``max_predictions``.
    What a compiled graph needs (IPU, ``torch.compile``, a GPU without a host sync for ``nonzero``);
    built on the host, before the batch moves to the device."""
    labels = batch["mlm_labels"]
    count = int(np.count_nonzero(labels.numpy() != -100, axis=1).max())  # on the host, no tensor read
    if count > max_predictions:
        raise ValueError(f"a sequence has {count} masked tokens, more than max_predictions={max_predictions}")
    order = torch.argsort((labels == -100).to(torch.int8), dim=1, stable=True)[:, :max_predictions]
    out = {k: v for k, v in batch.items() if k != "mlm_labels"}
    out["masked_positions"] = order.to(torch.int32)
    out["masked_labels"] = labels.gather(1, order)
    return out


class BatchIterator:
    """Endless training batches for one rank, resumable from ``state_dict()``."""

    def __init__(self, dataset: PretrainingDataset, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise CorpusError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise CorpusError(f"rank {rank} is outside world size {world_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.epoch, self.position = 0, 0  # position: global samples consumed in this epoch
        self._order_epoch, self._order = None, None

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.dataset)
            index = np.arange(n, dtype=np.int32 if n < np.iinfo(np.int32).max else np.int64)
            rng = np.random.default_rng(derive_seed(self.dataset.seed, epoch, 0x0D3))
            rng.shuffle(index)  # the permutation(n) order, in half the memory
            self._order, self._order_epoch = index, epoch
        return self._order

    def __iter__(self):
        return self

    def next_request(self) -> tuple[int, np.ndarray]:
        """Advance by one batch and return what it holds: ``(epoch, sample indices)``, not built."""
        global_batch = self.batch_size * self.world_size
        n = len(self.dataset)
        if n < global_batch:
            raise CorpusError(f"the split has {n} samples (chunks of seq_len tokens), fewer than one global "
                              f"batch of {global_batch}; use a smaller batch or more data")
        if self.position + global_batch > n:
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order_for(self.epoch)
        start = self.position + self.rank * self.batch_size
        indices = order[start : start + self.batch_size]
        self.position += global_batch
        return self.epoch, indices

    def __next__(self) -> dict[str, torch.Tensor]:
        return build_batch(self.dataset, *self.next_request())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size or state["batch_size"] != self.batch_size:
            raise CorpusError(
                f"data position was saved with world size {state['world_size']} and batch {state['batch_size']}; "
                f"this run has {self.world_size} and {self.batch_size}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class _BuiltAhead:
    """A ``BatchIterator`` whose batches are built ahead elsewhere (a thread, worker processes): its
    state is the one after the last batch *handed out*, not the last one built, so resume stays
    exact. Subclasses stop their builders in ``close`` and call ``_rewind`` there."""

    def __init__(self, batches: BatchIterator) -> None:
        self.batches = batches
        self._state = batches.state_dict()

    def __iter__(self):
        return self

    def close(self) -> None:
        raise NotImplementedError

    def _rewind(self) -> None:
        """Put the iterator back at the last batch handed out (what was built ahead is dropped)."""
        self.batches.load_state_dict(self._state)

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.batches.load_state_dict(state)
        self._state = self.batches.state_dict()


class Prefetcher(_BuiltAhead):
    """A ``BatchIterator`` whose next ``depth`` batches are built ahead by a background thread
    (``transform`` applied, pinned memory for a fast copy to a GPU), so the device never waits for
    the host. Batches are exactly those of the wrapped iterator, in order; ``state_dict`` is the
    position after the last batch *handed out* (not the last one built), so resume stays exact."""

    def __init__(self, batches: BatchIterator, depth: int, transform=None, pin_memory: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        super().__init__(batches)
        self.depth, self.transform, self.pin_memory = depth, transform, pin_memory
        self._queue = None
        self._thread = None
        self._stop = None

    def _start(self) -> None:
        import queue
        import threading

        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop), daemon=True,
                                        name="ipu_app-prefetch")
        self._thread.start()

    def _work(self, out, stop) -> None:
        import queue

        while not stop.is_set():
            try:
                batch = next(self.batches)
                if self.transform is not None:
                    batch = self.transform(batch)
                if self.pin_memory:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                item = (batch, self.batches.state_dict(), None)
            except Exception as exc:  # handed to the training thread, raised there
                item = (None, None, exc)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._thread is None:
            self._start()
        batch, state, exc = self._queue.get()
        if exc is not None:
            self.close()
            raise exc
        self._state = state
        return batch

    def close(self) -> None:
        """Stop the thread and drop the batches built ahead (the state stays at the last handed out)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = self._queue = None
            self._rewind()


class _Requests(torch.utils.data.Sampler):
    """The endless ``(epoch, indices, state after)`` requests of a ``BatchIterator`` from its current
    position (a copy advances; the iterator itself is left where it was)."""

    def __init__(self, batches: BatchIterator) -> None:
        self.batches = batches

    def __iter__(self):
        cursor = BatchIterator(self.batches.dataset, self.batches.batch_size, self.batches.rank,
                               self.batches.world_size)
        cursor.load_state_dict(self.batches.state_dict())
        while True:
            epoch, indices = cursor.next_request()
            yield epoch, indices, cursor.state_dict()


def _worker_signals(worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the training process: it finishes the step, checkpoints and then
    stops them (a Ctrl-C reaches the whole process group)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _BatchBuilder(torch.utils.data.Dataset):
    """Builds one whole batch per request, in a worker process."""

    def __init__(self, dataset: PretrainingDataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __getitem__(self, request):
        epoch, indices, state = request
        batch = build_batch(self.dataset, epoch, indices)
        return _pack(batch if self.transform is None else self.transform(batch)), state


def _pack(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """A batch as one byte tensor + its layout: a worker hands over one shared-memory buffer per batch
    instead of one per field (each costs a segment and a file descriptor, ~1 ms)."""
    layout, offset, parts = [], 0, []
    for name, tensor in batch.items():
        raw = tensor.contiguous().view(-1).view(torch.uint8) if tensor.dim() else tensor.reshape(1).view(torch.uint8)
        layout.append((name, tensor.dtype, tuple(tensor.shape), offset))
        pad = -raw.numel() % 8  # every field starts 8-byte aligned
        parts += [raw, torch.zeros(pad, dtype=torch.uint8)]
        offset += raw.numel() + pad
    return torch.cat(parts), layout


def _unpack(packed: tuple[torch.Tensor, list]) -> dict[str, torch.Tensor]:
    """Views of the one buffer (no copy; pinned with it)."""
    buffer, layout = packed
    out = {}
    for name, dtype, shape, offset in layout:
        size = dtype.itemsize * math.prod(shape)
        out[name] = buffer[offset : offset + size].view(dtype).view(shape)
    return out


class WorkerLoader(_BuiltAhead):
    """A ``BatchIterator`` whose batches are built by ``num_workers`` processes (a torch
    ``DataLoader`` over whole-batch requests, ``prefetch`` batches ahead per worker, pinned memory
    for a GPU). The batches are those of the iterator, in order, for any number of workers (a
    sample depends only on ``(seed, epoch, index)``); ``state_dict`` is the position after the last
    batch handed out, so resume stays exact."""

    def __init__(self, batches: BatchIterator, num_workers: int, transform=None, pin_memory: bool = False,
                 prefetch: int = 2) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        super().__init__(batches)
        self.num_workers, self.transform = num_workers, transform
        self.pin_memory, self.prefetch = pin_memory, max(1, prefetch)
        self._iterator = None

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self.batches.load_state_dict(self._state)
            loader = torch.utils.data.DataLoader(
                _BatchBuilder(self.batches.dataset, self.transform), batch_size=None,
                sampler=_Requests(self.batches), num_workers=self.num_workers, pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch, persistent_workers=False, worker_init_fn=_worker_signals)
            self._iterator = iter(loader)
        packed, state = next(self._iterator)
        self._state = state
        return _unpack(packed)

    def close(self) -> None:
        """Stop the worker processes (the state stays at the last batch handed out)."""
        if self._iterator is not None:
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None
        self._rewind()


def validation_indices(available: int, wanted: int | None) -> np.ndarray:
    """Which validation samples a run validates on: all of them, or a fixed random ``wanted`` of
    them (drawn with ``VALIDATION_SEED``, in ascending order). The draw depends only on the split's
    size, so every run on the same data, whatever its seed, validates on the same sequences; a
    subset of the first N would not be representative (documents come in corpus order)."""
    if wanted is None or wanted >= available:
        return np.arange(available)
    rng = np.random.default_rng(derive_seed(VALIDATION_SEED, available))
    return np.sort(rng.choice(available, size=wanted, replace=False))


def validation_batches(data_dir: str | Path, batch_size: int, masking: MaskingConfig = MaskingConfig(),
                       max_batches: int | None = None, max_sequences: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The fixed validation set: pairs and masks drawn once with ``VALIDATION_SEED``; a fixed random
    ``max_sequences`` (or ``max_batches`` batches) of it when given (``validation_indices``), whatever
    the batch size."""
    dataset = PretrainingDataset(data_dir, "validation", masking, seed=VALIDATION_SEED)
    wanted = None
    if max_batches is not None:
        wanted = max_batches * batch_size
    if max_sequences is not None:
        wanted = max_sequences if wanted is None else min(wanted, max_sequences)
    samples = [dataset.sample(0, int(i)) for i in validation_indices(len(dataset), wanted)]
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
