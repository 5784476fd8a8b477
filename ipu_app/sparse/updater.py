"""PatternUpdater: one DynSparse prune-and-regrow step over every sparse layer of a model
(any module offering ``sparse.layer.SparseWeight``), assembled from small parts:

- ``schedule`` (``schedule.UpdateSchedule``): after which steps an update runs;
- ``prune_fraction`` (``schedule.PruneFraction``): ``pr(t)``;
- ``scorer`` (``scoring.BlockScorer``): the block norm pruning ranks by;
- ``regrowth`` (``regrowth.RandomRegrowth`` / ``GradientRegrowth``): where pruned blocks come back;
- ``Exploration`` (``exploration.py``): the ever-active blocks and their file.

``build_updater`` makes one from the names a config uses, checking each name once.

Runs on whatever device the tensors live on (the host, between training phases,
for IPUs); all random draws come from CPU generators seeded by
``(seed, update index, layer index)``, so every process and every resume agrees.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..choices import PATTERN_MODES
from .errors import PatternInvariantError, UpdaterError
from .exploration import Exploration, members
from .layer import SparseWeight, sparse_weights
from .pattern import blockify
from .regrowth import Regrowth, regrowth_rule
from .schedule import PruneFraction, UpdateSchedule
from .scoring import BlockScorer, num_to_prune, select_prune

__all__ = ["PatternUpdater", "build_updater", "UpdaterError", "PatternInvariantError", "UpdateStats",
           "LayerUpdateStats", "PRG_WARN"]

# Mean pruned_recently_grown above this at two updates in a row: the schedule is unsound (the trainer
# warns). Age-blind pruning would give ~pr(t) (<= 0.5 at the paper's pr); near 1, regrown blocks
# are always the ones pruned next.
PRG_WARN = 0.75


@dataclass
class LayerUpdateStats:
    name: str
    pruned: int
    grown: int
    nnz_blocks: int
    target_sparsity: float
    sparsity: float
    explored_dof: float
    # Fraction of the pruned blocks that had been grown at the previous update
    # ("wasted" exploration, paper Fig. 5b/c); NaN when nothing was pruned.
    pruned_recently_grown: float
    # Fraction of the blocks grown at the previous update that this one prunes again; NaN when none
    # had been grown. Unlike pruned_recently_grown it does not rise just because pr(t) decays.
    grown_pruned_again: float = float("nan")


@dataclass
class UpdateStats:
    step: int
    update_index: int
    pruning_ratio: float
    seconds: float
    layers: list[LayerUpdateStats] = field(default_factory=list)

    @property
    def pruned(self) -> int:
        return sum(s.pruned for s in self.layers)

    @property
    def mean_explored_dof(self) -> float:
        return float(np.mean([s.explored_dof for s in self.layers])) if self.layers else float("nan")

    def _mean_over_layers(self, field_name: str) -> float:
        """Mean of a per-layer statistic over the layers where it is defined (NaN: none)."""
        values = [v for v in (getattr(s, field_name) for s in self.layers) if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    @property
    def mean_grown_pruned_again(self) -> float:
        return self._mean_over_layers("grown_pruned_again")

    @property
    def mean_pruned_recently_grown(self) -> float:
        """Mean over layers that pruned something and had grown blocks before (NaN: none did)."""
        return self._mean_over_layers("pruned_recently_grown")

    def as_dict(self) -> dict:
        """Flat, JSON-friendly record for metrics logs."""
        return {
            "step": self.step,
            "update_index": self.update_index,
            "pruning_ratio": self.pruning_ratio,
            "seconds": self.seconds,
            "pruned_blocks": self.pruned,
            "mean_explored_dof": self.mean_explored_dof,
            "mean_pruned_recently_grown": self.mean_pruned_recently_grown,
            "mean_grown_pruned_again": self.mean_grown_pruned_again,
            "layers": [asdict(s) for s in self.layers],
        }


@dataclass
class _Plan:
    """What one layer's update will do, computed before anything is changed."""

    layer_index: int
    name: str
    layer: SparseWeight
    old_index: torch.Tensor  # [nnz] sorted block positions before the update
    drop: torch.Tensor  # slots to prune
    grow: torch.Tensor  # new block positions
    states: list[torch.Tensor]
    occupied: torch.Tensor  # flat bool mask of the blocks active before the update


class PatternUpdater:
    """Prunes the ``pr(t)`` lowest-norm blocks of every sparse layer and regrows as many.

    Call ``begin_step(step)`` before a training step's forward pass (RigL records
    the dense gradient only on update steps) and ``step(step)`` after its optimizer
    step; ``step`` runs the update when the schedule says so.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        schedule: UpdateSchedule,
        *,
        prune_fraction: Callable[[int], float],
        regrowth: Regrowth,
        scorer: Callable[[torch.Tensor], torch.Tensor] = BlockScorer(),
        dynamic: bool = True,
        check_invariants: bool = True,
    ) -> None:
        self.layers = sparse_weights(model)
        if not self.layers:
            raise UpdaterError("the model has no sparse layers to update (modules offering sparse.layer.SparseWeight)")
        self.optimizer = optimizer
        self.schedule = schedule
        self.dynamic = dynamic  # static sparsity: a fixed pattern (exploration still reported)
        self.prune_fraction = prune_fraction
        self.scorer = scorer
        self.regrowth = regrowth
        self.check_invariants = check_invariants
        self.update_count = 0
        self.exploration = Exploration(self.layers)

    # --------------------------------------------------------------- driving
    def is_update_step(self, step: int) -> bool:
        """Whether an update runs after optimizer step ``step`` (never for static sparsity)."""
        return self.dynamic and self.schedule.is_update_step(step)

    def needs_dense_grad(self, step: int) -> bool:
        """Whether training step ``step`` must record dense gradients (RigL, update steps only)."""
        return self.regrowth.needs_dense_grad and self.is_update_step(step)

    def begin_step(self, step: int) -> None:
        """Switch dense-gradient recording on for the step before a RigL update, off otherwise."""
        record = self.needs_dense_grad(step)
        for _, layer in self.layers:
            layer.record_dense_grad = record
            layer.dense_grad = None

    def discard_dense_grads(self) -> None:
        """Forget recorded gradients and stop recording (e.g. the step was skipped)."""
        for _, layer in self.layers:
            layer.record_dense_grad = False
            layer.dense_grad = None

    def step(self, step: int) -> UpdateStats | None:
        """Run the scheduled update after optimizer step ``step``, if any."""
        if not self.is_update_step(step):
            return None
        return self.update(step)

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, step: int) -> UpdateStats:
        """Prune and regrow every layer now (``step`` sets ``pr(t)`` and the RNG stream)."""
        if not self.dynamic:
            raise UpdaterError("static sparsity never updates its pattern")
        start = time.perf_counter()
        update_index = (
            self.schedule.update_index(step) if self.schedule.is_update_step(step) else self.update_count
        )
        pr_t = self.prune_fraction(step)
        plans = [self._plan(i, name, layer, pr_t, update_index) for i, (name, layer) in enumerate(self.layers)]
        stats = UpdateStats(step=step, update_index=update_index, pruning_ratio=pr_t, seconds=0.0)
        for plan in plans:
            self._apply(plan)
            stats.layers.append(self._record(plan))
        self.discard_dense_grads()
        self.update_count += 1
        stats.seconds = time.perf_counter() - start
        return stats

    def _plan(self, index: int, name: str, layer: SparseWeight, pr_t: float, update_index: int) -> _Plan:
        pattern = layer.pattern
        old_index = pattern.linear_index()
        num_blocks = pattern.num_blocks
        k = num_to_prune(pr_t, pattern.nnz, num_blocks - pattern.nnz)
        states = self._state_tensors(name, layer)
        occupied = torch.zeros(num_blocks, dtype=torch.bool, device=old_index.device)
        occupied[old_index] = True
        drop = select_prune(self.scorer(layer.values), k)
        grow = self.regrowth.select(index, name, layer, occupied, k, update_index)
        return _Plan(index, name, layer, old_index, drop.to(old_index.device), grow.to(old_index.device), states, occupied)

    def _state_tensors(self, name: str, layer: SparseWeight) -> list[torch.Tensor]:
        """Every optimizer state tensor shaped like ``values`` (plus a pending ``.grad``)."""
        param = layer.values
        tensors = [] if param.grad is None else [param.grad]
        if self.optimizer is None:
            return tensors
        for key, value in self.optimizer.state.get(param, {}).items():
            if not torch.is_tensor(value) or value.ndim == 0:
                continue  # Adam's step counter and other scalars are position-free
            if value.shape != param.shape:
                raise UpdaterError(
                    f"optimizer state {key!r} of {name}.values has shape {tuple(value.shape)}, not the "
                    f"parameter's {tuple(param.shape)}; the updater can only remap parameter-shaped state "
                    f"({type(self.optimizer).__name__} is not supported)"
                )
            tensors.append(value)
        return tensors

    def _apply(self, plan: _Plan) -> None:
        layer, drop, grow = plan.layer, plan.drop, plan.grow
        if drop.numel() == 0:
            return
        grid_cols = layer.pattern.grid[1]
        new_index = plan.old_index.clone()
        new_index[drop] = grow
        perm = torch.argsort(new_index)
        values = layer.values.data
        if layer.frozen is not None:
            # Nothing is lost: pruned blocks freeze at their current values and
            # grown blocks start from the frozen values they replace.
            blocks = blockify(layer.frozen, layer.block_size)
            old = plan.old_index[drop]
            blocks[old // grid_cols, old % grid_cols] = values[drop].to(layer.frozen.dtype)
            grown_values = blocks[grow // grid_cols, grow % grid_cols].clone()
            blocks[grow // grid_cols, grow % grid_cols] = 0
            values[drop] = grown_values.to(values.dtype)
        else:
            values[drop] = 0
        for tensor in plan.states:
            tensor[drop] = 0
        for tensor in [values, *plan.states]:
            tensor.copy_(tensor[perm])
        new_index = new_index[perm]
        layer.block_rows.copy_((new_index // grid_cols).to(torch.int32))
        layer.block_cols.copy_((new_index % grid_cols).to(torch.int32))
        layer.pattern_changed()
        if self.check_invariants:
            self._check(plan, new_index)

    def _check(self, plan: _Plan, new_index: torch.Tensor) -> None:
        layer, name = plan.layer, plan.name
        try:
            layer.pattern.validate(expected_nnz=plan.old_index.numel())
        except ValueError as exc:
            raise PatternInvariantError(f"{name}: {exc}") from exc
        dropped = plan.old_index[plan.drop]
        if bool(members(plan.grow, dropped, plan.occupied.numel()).any()):
            raise PatternInvariantError(f"{name}: a block was pruned and regrown in the same update")
        if bool(plan.occupied[plan.grow].any()):
            raise PatternInvariantError(f"{name}: a regrown block was already active")
        slots = torch.searchsorted(new_index, plan.grow)
        if not torch.equal(new_index[slots], plan.grow):
            raise PatternInvariantError(f"{name}: regrown blocks are missing from the pattern")
        if layer.frozen is None and bool(layer.values[slots].ne(0).any()):
            raise PatternInvariantError(f"{name}: regrown values are not zero")
        for tensor in plan.states:
            if tensor is not layer.values.grad and bool(tensor[slots].ne(0).any()):
                raise PatternInvariantError(f"{name}: optimizer state of regrown blocks is not zero")

    def _record(self, plan: _Plan) -> LayerUpdateStats:
        layer = plan.layer
        dropped = plan.old_index[plan.drop].cpu()
        grow = plan.grow.cpu()
        explored, recent, again = self.exploration.record(plan.layer_index, dropped, grow, self.update_count > 0)
        return LayerUpdateStats(
            name=plan.name,
            pruned=int(dropped.numel()),
            grown=int(grow.numel()),
            nnz_blocks=layer.nnz,
            target_sparsity=layer.target_sparsity,
            sparsity=layer.sparsity,
            explored_dof=explored,
            pruned_recently_grown=recent,
            grown_pruned_again=again,
        )

    # ----------------------------------------------------------- state dict
    def state_dict(self) -> dict:
        """Counters and exploration state (bit-packed), for exact resume."""
        return {"update_count": self.update_count, "layers": self.exploration.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.exploration.load_state_dict(state.get("layers", {}))
        self.update_count = int(state["update_count"])


def build_updater(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    schedule: UpdateSchedule,
    *,
    mode: str = "dynamic",
    pruning_ratio: float = 0.5,
    pruning_schedule: str = "cosine",
    regrowth: str = "random",
    block_metric: str = "l1",
    seed: int = 0,
    check_invariants: bool = True,
    grad_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PatternUpdater:
    """The updater of ``sparsity.*`` settings, by the names configs use; each is checked here, once
    (an unknown name or a ratio out of range is an ``UpdaterError`` naming the choices)."""
    if mode not in PATTERN_MODES:
        raise UpdaterError(f"unknown mode {mode!r}; use one of {list(PATTERN_MODES)}")
    try:
        scorer = BlockScorer(block_metric)
        prune_fraction = PruneFraction(pruning_ratio, schedule.total_steps, pruning_schedule)
        rule = regrowth_rule(regrowth, seed=seed, scorer=scorer, grad_reduce=grad_reduce)
    except ValueError as exc:
        raise UpdaterError(str(exc)) from None
    return PatternUpdater(model, optimizer, schedule, prune_fraction=prune_fraction, regrowth=rule, scorer=scorer,
                          dynamic=mode == "dynamic", check_invariants=check_invariants)
