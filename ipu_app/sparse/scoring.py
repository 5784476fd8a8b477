"""Pure scoring and selection rules of DynSparse: tensors in, indices out.

Ties are always broken towards the lower index, so every rule is deterministic.
"""

from __future__ import annotations

import math

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


def select_regrow_random(occupied: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` positions drawn uniformly without replacement among ``~occupied``.

    ``occupied`` is a flat boolean mask of the positions active *before* pruning
    (so a just-pruned block is never regrown in the same update). Sampling draws
    i.i.d. positions and keeps the first new free ones in draw order, which yields
    a uniform random subset while touching only O(k) positions; when ``k`` is a
    large share of the free positions a permutation of them is used instead.
    Depends only on the generator's state, never on the device.
    """
    occupied = occupied.detach().flatten().cpu()
    free_count = int(occupied.numel() - occupied.sum())
    if not 0 <= k <= free_count:
        raise ValueError(f"cannot regrow {k} blocks: only {free_count} positions are free")
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if 4 * k >= free_count:
        free = torch.nonzero(~occupied).flatten()
        return free[torch.randperm(free_count, generator=generator)[:k]].sort().values
    taken = occupied.clone()
    chosen: list[torch.Tensor] = []
    need = k
    n = occupied.numel()
    while need:
        free_fraction = (free_count - (k - need)) / n
        draws = torch.randint(n, (int(need / free_fraction * 1.2) + 32,), generator=generator)
        draws = draws[~taken[draws]]
        uniq, inverse = torch.unique(draws, return_inverse=True)
        first = torch.full((uniq.numel(),), draws.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
        picked = draws[first.sort().values][:need]
        taken[picked] = True
        chosen.append(picked)
        need -= picked.numel()
    return torch.cat(chosen).sort().values


def select_regrow_gradient(grad_scores: torch.Tensor, occupied: torch.Tensor, k: int) -> torch.Tensor:
    """RigL: the ``k`` inactive positions whose dense-gradient block norm is largest."""
    scores = grad_scores.detach().flatten().float().clone()
    occupied = occupied.flatten().to(scores.device)
    free_count = int(occupied.numel() - occupied.sum())
    if not 0 <= k <= free_count:
        raise ValueError(f"cannot regrow {k} blocks: only {free_count} positions are free")
    scores[occupied] = -math.inf
    return largest(scores, k)
