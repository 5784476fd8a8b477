"""Regrowth: where the blocks a DynSparse update prunes come back. Everything about it is here: the
selection rules (pure: tensors in, positions out), the rule objects the updater calls, and what a
rule needs from training (``needs_dense_grad``: the layers record ``dY^T X`` on the step before an
update; the trainer runs that step eagerly, the IPU backend computes it on the host).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch

from ..choices import REGROWTH_RULES
from ..seeding import seeded_generator
from .errors import UpdaterError
from .layer import SparseWeight
from .scoring import BlockScorer, largest


class RegrowthError(UpdaterError):
    """A regrowth rule cannot select (no dense gradient was recorded, or it is not finite)."""


class Regrowth(Protocol):
    """Chooses ``k`` new block positions of one layer among those inactive before the update."""

    name: str
    needs_dense_grad: bool  # the layers must record their dense gradient on the step before an update

    def select(self, layer_index: int, name: str, layer: SparseWeight, occupied: torch.Tensor, k: int,
               update_index: int) -> torch.Tensor: ...


class RandomRegrowth:
    """Uniformly at random, from the generator ``(seed, update index, layer index)`` (paper §2.1)."""

    name = "random"
    needs_dense_grad = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def select(self, layer_index, name, layer, occupied, k, update_index):
        return select_regrow_random(occupied, k, seeded_generator(self.seed, update_index, layer_index))


class GradientRegrowth:
    """RigL (Evci et al.): the inactive blocks whose dense-gradient block norm is largest. ``grad_reduce``
    (e.g. a data-parallel all-reduce mean) is applied to each recorded gradient before scoring."""

    name = "gradient"
    needs_dense_grad = True

    def __init__(self, scorer: BlockScorer | None = None,
                 grad_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.scorer = scorer or BlockScorer()
        self.grad_reduce = grad_reduce

    def select(self, layer_index, name, layer, occupied, k, update_index):
        grad = layer.dense_grad
        if grad is None:
            raise RegrowthError(
                f"gradient regrowth needs the dense gradient of {name}; call updater.begin_step(step) "
                "before the forward pass of the step that precedes the update"
            )
        if self.grad_reduce is not None:
            grad = self.grad_reduce(grad)
        if not bool(torch.isfinite(grad).all()):
            raise RegrowthError(f"dense gradient of {name} is not finite; skip this update instead")
        return select_regrow_gradient(self.scorer.dense(grad, layer.block_size), occupied, k)


def regrowth_rule(name: str, *, seed: int = 0, scorer: BlockScorer | None = None,
                  grad_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Regrowth:
    """The rule a config names (``sparsity.regrowth``)."""
    if name == "random":
        return RandomRegrowth(seed)
    if name == "gradient":
        return GradientRegrowth(scorer, grad_reduce)
    raise ValueError(f"unknown regrowth {name!r}; use one of {list(REGROWTH_RULES)}")


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
