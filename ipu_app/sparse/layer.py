"""What the DynSparse core needs of a block-sparse layer: a small interface, no model code.

``model.sparse_linear.SparseLinear`` offers it; so may any module (an accelerator's own layer, a
test double): ``PatternUpdater`` works on every module of a model that does.
"""

from __future__ import annotations

from typing import Protocol, get_type_hints

import torch
from torch import nn

from .pattern import BlockPattern


class SparseWeight(Protocol):
    """A ``[out, in]`` weight stored as ``values [nnz, b, b]`` at the blocks ``(block_rows, block_cols)``.

    The updater rewrites ``values``, ``block_rows``/``block_cols`` (and ``frozen``, where inactive
    weights keep untrained values) in place, then calls ``pattern_changed()``; with gradient
    regrowth it sets ``record_dense_grad`` and reads the dense gradient the layer accumulated in
    ``dense_grad``.
    """

    values: nn.Parameter
    block_rows: torch.Tensor  # int32 [nnz], sorted row-major with block_cols
    block_cols: torch.Tensor
    block_size: int
    target_sparsity: float
    frozen: torch.Tensor | None  # the untrained inactive weights [out, in], or None (zeros)
    record_dense_grad: bool
    dense_grad: torch.Tensor | None

    @property
    def pattern(self) -> BlockPattern: ...

    @property
    def nnz(self) -> int: ...

    @property
    def sparsity(self) -> float: ...

    def pattern_changed(self) -> None: ...


# Checked with hasattr, not a runtime_checkable isinstance: from Python 3.12 that isinstance looks members
# up statically, and an nn.Module's parameters and buffers (``values``, ``block_rows``) live in its
# ``_parameters``/``_buffers``, reached only through ``__getattr__`` -- so no layer would be found.
SPARSE_WEIGHT_MEMBERS = tuple(get_type_hints(SparseWeight)) + ("pattern", "nnz", "sparsity", "pattern_changed")


def offers_sparse_weight(module: nn.Module) -> bool:
    """Whether ``module`` has every member of ``SparseWeight`` (attributes, parameters or buffers)."""
    return all(hasattr(module, name) for name in SPARSE_WEIGHT_MEMBERS)


def sparse_weights(model: nn.Module) -> list[tuple[str, SparseWeight]]:
    """Every module of ``model`` that offers ``SparseWeight``, with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if offers_sparse_weight(m)]
