"""Masked-LM + NSP batches from prepared shards.

* Instances (segment pairs) are built per epoch from ``(seed, epoch)``: a document's
  sentences are packed to ``seq_len - 3`` tokens and cut into A and B; with
  probability 0.5 B is a random segment of another document (NSP label 1), else the
  true continuation (label 0; a one-sentence chunk is split inside the sentence).
* Whole-word masking: whole words are drawn until ``mask_prob`` of the tokens (at
  most ``max_predictions``) are chosen; each chosen token becomes [MASK] (80%), a
  random token (10%) or stays (10%). Masks depend only on ``(seed, epoch, sample)``.
* The validation set is built once with a fixed seed, independent of the run's
  seed, so validation losses compare across runs.
* ``BatchIterator`` walks a per-epoch permutation; each global batch is split by
  rank; its state (epoch, position) resumes exactly.
"""

from __future__ import annotations

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


class ShardedSplit:
    """The memory-mapped shards of one split as one corpus of documents."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(data_dir)
        if split not in self.manifest["splits"]:
            raise CorpusError(f"{data_dir} has no split {split!r}")
        self.tokens, doc_sentences, doc_shards = [], [], []
        self.sentence_offsets = []
        for shard_index, name in enumerate(self.manifest["splits"][split]["shards"]):
            try:
                tokens = np.load(self.data_dir / f"{name}.tokens.npy", mmap_mode="r")
                sentences = np.load(self.data_dir / f"{name}.sentences.npy")
                documents = np.load(self.data_dir / f"{name}.documents.npy")
            except (OSError, ValueError) as exc:
                raise CorpusError(f"shard {name} in {data_dir} is unreadable ({exc}); prepare the data again") from None
            if sentences[-1] != len(tokens) or documents[-1] != len(sentences) - 1:
                raise CorpusError(f"shard {name} in {data_dir} is inconsistent; prepare the data again")
            self.tokens.append(tokens)
            self.sentence_offsets.append(sentences)
            doc_sentences.append(np.stack([documents[:-1], documents[1:]], 1))
            doc_shards.append(np.full(len(documents) - 1, shard_index))
        # documents as (shard, first sentence, end sentence)
        self.documents = np.concatenate([np.column_stack([s, d]) for s, d in zip(doc_shards, doc_sentences)])
        if len(self.documents) < 2:
            raise CorpusError(f"split {split!r} of {data_dir} has {len(self.documents)} documents; need at least 2")


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
        self.is_continuation = np.zeros(self.vocab_size, dtype=bool)
        for token, i in vocab.items():
            self.is_continuation[i] = token.startswith("##")
        self._epoch, self._instances = None, None

    # ------------------------------------------------------------ instances
    def instances(self, epoch: int) -> np.ndarray:
        """``[N, 7]`` int64: (a_shard, a_start, a_end, b_shard, b_start, b_end, nsp_label) token ranges."""
        if self._epoch != epoch:
            self._instances = self._build_instances(epoch)
            self._epoch = epoch
        return self._instances

    def __len__(self) -> int:
        return len(self.instances(0))

    def _build_instances(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(derive_seed(self.seed, epoch, 0x1A57))
        corpus, target = self.corpus, self.masking.seq_len - 3
        docs = corpus.documents
        out = []
        for doc_index, (shard, first, end) in enumerate(docs):
            offsets = corpus.sentence_offsets[shard]
            i, chunk_start = first, first
            while i < end:
                i += 1
                if offsets[i] - offsets[chunk_start] < target and i < end:
                    continue
                chunk = (chunk_start, i)  # sentences [chunk_start, i)
                chunk_start = i
                random_next = rng.random() < self.masking.nsp_random_prob
                n_sent = chunk[1] - chunk[0]
                if random_next:
                    a_sents = int(rng.integers(1, n_sent)) if n_sent > 1 else 1
                    a0, a1 = offsets[chunk[0]], offsets[chunk[0] + a_sents]
                    other = int(rng.integers(len(docs) - 1))
                    other += other >= doc_index  # any other document
                    o_shard, o_first, o_end = docs[other]
                    o_offsets = corpus.sentence_offsets[o_shard]
                    start = int(rng.integers(o_first, o_end))
                    b0 = o_offsets[start]
                    b1 = min(o_offsets[o_end], b0 + max(target - (a1 - a0), 1))
                    # sentences of this chunk not used by A go back to the stream
                    i = chunk_start = chunk[0] + a_sents if a_sents < n_sent else chunk_start
                    b_shard = o_shard
                else:
                    if n_sent > 1:
                        cut = offsets[chunk[0] + int(rng.integers(1, n_sent))]
                    else:
                        length = offsets[chunk[1]] - offsets[chunk[0]]
                        if length < 2:
                            continue  # a one-token document cannot form a pair
                        cut = offsets[chunk[0]] + int(rng.integers(1, length))
                    a0, a1, b0, b1, b_shard = offsets[chunk[0]], cut, cut, offsets[chunk[1]], shard
                a0, a1, b0, b1 = _truncate_pair(int(a0), int(a1), int(b0), int(b1), target)
                out.append((shard, a0, a1, b_shard, b0, b1, int(random_next)))
        if not out:
            raise CorpusError("no training pairs could be built: the documents are too short")
        return np.asarray(out, dtype=np.int64)

    # --------------------------------------------------------------- samples
    def sample(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """One masked sample; identical for identical ``(seed, epoch, index)``."""
        a_shard, a0, a1, b_shard, b0, b1, nsp = self.instances(epoch)[index]
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
        rng = np.random.default_rng(derive_seed(self.seed, epoch, index))
        ids, labels = self._mask(ids, n, rng)
        return {"input_ids": ids, "token_type_ids": token_types, "attention_mask": attention,
                "mlm_labels": labels, "nsp_labels": np.int64(nsp)}

    def _mask(self, ids: np.ndarray, length: int, rng: np.random.Generator):
        labels = np.full_like(ids, -100)
        body = np.arange(length)
        candidates = body[~np.isin(ids[:length], self.special_ids)]
        if candidates.size == 0:
            return ids, labels
        # a word = a start token and the "##" continuations after it
        starts = ~self.is_continuation[ids[candidates]] | (np.diff(candidates, prepend=-2) != 1)
        word_id = np.cumsum(starts) - 1
        word_starts = np.flatnonzero(starts)
        word_lengths = np.diff(np.append(word_starts, candidates.size))
        budget = min(self.masking.max_predictions, max(1, int(round(length * self.masking.mask_prob))))
        chosen_words, total = [], 0
        for w in rng.permutation(word_starts.size):
            if total + word_lengths[w] > budget:
                continue
            chosen_words.append(w)
            total += word_lengths[w]
            if total == budget:
                break
        positions = candidates[np.isin(word_id, chosen_words)]
        labels[positions] = ids[positions]
        action = rng.random(positions.size)
        masked = ids.copy()
        masked[positions[action < 0.8]] = self.mask_id
        swap = positions[(action >= 0.8) & (action < 0.9)]
        random_ids = rng.integers(0, self.vocab_size, swap.size)
        bad = np.isin(random_ids, self.special_ids)
        while bad.any():  # never swap in a special token
            random_ids[bad] = rng.integers(0, self.vocab_size, int(bad.sum()))
            bad = np.isin(random_ids, self.special_ids)
        masked[swap] = random_ids
        return masked, labels


def _truncate_pair(a0: int, a1: int, b0: int, b1: int, target: int) -> tuple[int, int, int, int]:
    """Trim the longer segment from its end until both fit in ``target`` tokens (each keeps >= 1)."""
    while (a1 - a0) + (b1 - b0) > target:
        if a1 - a0 >= b1 - b0:
            a1 -= 1
        else:
            b1 -= 1
    return a0, a1, b0, b1


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


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
            n = len(self.dataset.instances(epoch))
            self._order = np.random.default_rng(derive_seed(self.dataset.seed, epoch, 0x0D3)).permutation(n)
            self._order_epoch = epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        global_batch = self.batch_size * self.world_size
        order = self._order_for(self.epoch)
        if len(order) < global_batch:
            raise CorpusError(f"the split has {len(order)} samples, fewer than one global batch of {global_batch}")
        if self.position + global_batch > len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self._order_for(self.epoch)
        start = self.position + self.rank * self.batch_size
        indices = order[start : start + self.batch_size]
        self.position += global_batch
        return collate([self.dataset.sample(self.epoch, int(i)) for i in indices])

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


class Prefetcher:
    """A ``BatchIterator`` whose next ``depth`` batches are built ahead by a background thread
    (``transform`` applied, pinned memory for a fast copy to a GPU), so the device never waits for
    the host. Batches are exactly those of the wrapped iterator, in order; ``state_dict`` is the
    position after the last batch *handed out* (not the last one built), so resume stays exact."""

    def __init__(self, batches: BatchIterator, depth: int, transform=None, pin_memory: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.batches, self.depth, self.transform, self.pin_memory = batches, depth, transform, pin_memory
        self._state = batches.state_dict()
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

    def __iter__(self):
        return self

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
            self.batches.load_state_dict(self._state)

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.batches.load_state_dict(state)
        self._state = self.batches.state_dict()


def validation_batches(data_dir: str | Path, batch_size: int, masking: MaskingConfig = MaskingConfig(),
                       max_batches: int | None = None, max_sequences: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The fixed validation set: pairs and masks drawn once with ``VALIDATION_SEED``; the first
    ``max_sequences`` (or ``max_batches`` batches) of it when given, whatever the batch size."""
    dataset = PretrainingDataset(data_dir, "validation", masking, seed=VALIDATION_SEED)
    n = len(dataset)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    if max_sequences is not None:
        n = min(n, max_sequences)
    samples = [dataset.sample(0, i) for i in range(n)]
    return [collate(samples[i : i + batch_size]) for i in range(0, n, batch_size)]
