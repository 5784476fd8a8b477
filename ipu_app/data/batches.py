"""Batches: collating samples, the stateful batch order and the fixed validation set.

* ``BatchIterator`` walks a per-epoch permutation; each global batch is split by rank; its state
  (epoch, position) resumes exactly.
* The validation set is built once with a fixed seed, independent of the run's seed, so
  validation losses compare across runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..seeding import derive_seed
from .corpus import CorpusError
from .sampling import VALIDATION_SEED, MaskingConfig, PretrainingDataset


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
