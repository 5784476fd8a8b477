"""Block-sparse linear backends, all with the signature of ``reference.linear``:
``linear(x, values, pattern, bias=None, frozen=None) -> y``."""

from __future__ import annotations

from typing import Callable

import torch

from . import reference

SparseLinearOp = Callable[..., torch.Tensor]

_BACKENDS: dict[str, SparseLinearOp] = {"reference": reference.linear}
BACKEND_NAMES = ("auto", *_BACKENDS)


class BackendError(ValueError):
    """A backend name is unknown or the backend cannot run here."""


def resolve_backend(name: str) -> str:
    """The concrete backend a name selects (``auto`` picks the fastest available)."""
    if name == "auto":
        return "reference"
    if name not in _BACKENDS:
        raise BackendError(f"unknown sparse backend {name!r}; available: {list(BACKEND_NAMES)}")
    return name


def get_backend(name: str) -> SparseLinearOp:
    """The op function of a backend."""
    return _BACKENDS[resolve_backend(name)]
