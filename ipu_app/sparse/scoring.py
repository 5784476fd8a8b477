"""Pure scoring and pruning rules of DynSparse: tensors in, indices out (regrowth: ``regrowth.py``).

Ties are always broken towards the lower index, so every rule is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..choices import BLOCK_METRICS
from .pattern import blockify


def block_norms(values: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    """Lp norm of every ``b x b`` block of ``[nnz, b, b]`` values (paper Eq. 1), in fp32."""
    v = values.detach().float().reshape(values.shape[0], -1)
    if metric == "l1":
        return v.abs().sum(dim=1)
    if metric == "l2":
        return v.pow(2).sum(dim=1).sqrt()
    if metric == "linf":
        return v.abs().amax(dim=1)
    raise ValueError(f"unknown block_metric {metric!r}; use one of {list(BLOCK_METRICS)}")


def dense_block_norms(dense: torch.Tensor, block_size: int, metric: str = "l1") -> torch.Tensor:
    """Block norms of a dense ``[out, in]`` tensor, flattened row-major over the block grid."""
    blocks = blockify(dense.detach(), block_size)
    return block_norms(blocks.reshape(-1, block_size, block_size), metric)


def num_to_prune(pruning_ratio: float, nnz: int, num_inactive: int) -> int:
    """``k = ceil(pr(t) * nnz)``, capped so ``k`` new blocks fit among the inactive positions."""
    k = math.ceil(pruning_ratio * nnz - 1e-9)
    return max(0, min(k, nnz, num_inactive))


def smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest scores, ascending index order; ties go to the lower index."""
    return _extreme(scores, k, largest=False)


def largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, ascending index order; ties go to the lower index."""
    return _extreme(scores, k, largest=True)


def _extreme(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} scores")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    scores = scores.flatten()
    threshold = torch.topk(scores, k, largest=largest, sorted=True).values[-1]
    strict = scores > threshold if largest else scores < threshold
    chosen = torch.nonzero(strict).flatten()
    ties = torch.nonzero(scores == threshold).flatten()[: k - chosen.numel()]
    return torch.cat([chosen, ties]).sort().values


def select_prune(norms: torch.Tensor, k: int) -> torch.Tensor:
    """Slots of the ``k`` lowest-norm active blocks."""
    return smallest(norms, k)


@dataclass(frozen=True)
class BlockScorer:
    """Scores blocks by a norm (``sparsity.block_metric``): the stored values' blocks for pruning,
    a dense tensor's blocks (RigL's gradient) for regrowth."""

    metric: str = "l1"

    def __post_init__(self) -> None:
        if self.metric not in BLOCK_METRICS:
            raise ValueError(f"unknown block_metric {self.metric!r}; use one of {list(BLOCK_METRICS)}")

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return block_norms(values, self.metric)

    def dense(self, dense: torch.Tensor, block_size: int) -> torch.Tensor:
        return dense_block_norms(dense, block_size, self.metric)
