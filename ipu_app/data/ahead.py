"""Batches built ahead of the training step: by a background thread (``Prefetcher``) or by worker
processes (``WorkerLoader``), in the order and with the resumable state of the ``BatchIterator``
they wrap."""

from __future__ import annotations

import math

import torch

from .batches import BatchIterator, build_batch
from .sampling import PretrainingDataset


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
