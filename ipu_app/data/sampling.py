"""Masked-LM + NSP samples from prepared shards.

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
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
