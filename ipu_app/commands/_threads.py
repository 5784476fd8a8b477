"""``--threads`` of the commands that run a model outside training (evaluate, finetune)."""

from __future__ import annotations


def use_threads(threads: int | None) -> None:
    """Checked, then torch's thread count (default: OMP_NUM_THREADS or the cores this process may use)."""
    import torch

    from ..train.precision import resolve_threads

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(resolve_threads(None, threads)[0])
