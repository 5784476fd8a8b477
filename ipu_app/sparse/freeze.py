"""Half-run freezing of a random subset of dense weights: the paper's "when to sparsify" study (Fig. 1b).

A fixed random fraction ``ratio`` of every chosen weight is *untrained* for half of the run and
trained for the other half:

* ``early`` ("early untrained", unfreeze): the subset keeps its initial values for steps
  ``1 .. T/2`` and trains from step ``T/2 + 1`` on;
* ``late`` ("late untrained", freeze): everything trains for steps ``1 .. T/2``; from step
  ``T/2 + 1`` the subset keeps the values it had after step ``T/2``.

During a frozen step the subset's gradients are zeroed before clipping (so the gradient norm is
that of the trained weights, and Adam's moments for the subset get no new information) and its
values are put back after the optimizer step (so neither Adam's running moments nor decoupled
weight decay move them). In the early mode the subset's moments are exactly zero when it thaws.
Masks are drawn from ``(seed, layer index)``, so every process and every resume agrees.
"""

from __future__ import annotations

import torch
from torch import nn

from ..choices import FREEZE_MODES
from ..seeding import seeded_generator


class PartialFreezer:
    def __init__(self, layers: list[tuple[str, nn.Linear]], mode: str, ratio: float, total_steps: int,
                 seed: int) -> None:
        if mode not in FREEZE_MODES[1:]:
            raise ValueError(f"freeze mode must be one of {list(FREEZE_MODES[1:])}, got {mode!r}")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"freeze ratio must be in (0, 1), got {ratio}")
        if not layers:
            raise ValueError("no weights to freeze")
        self.layers = layers
        self.mode = mode
        self.ratio = ratio
        self.switch_step = total_steps // 2  # steps <= switch are the first half
        self.masks: list[torch.Tensor] = []
        for index, (_, layer) in enumerate(layers):
            weight = layer.weight
            count = round(ratio * weight.numel())
            order = torch.randperm(weight.numel(), generator=seeded_generator(seed, 0xF2EE, index))
            mask = torch.zeros(weight.numel(), dtype=torch.bool)
            mask[order[:count]] = True
            self.masks.append(mask.reshape(weight.shape).to(weight.device))
        self.snapshots: list[torch.Tensor | None] = [None] * len(layers)

    def is_frozen(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 1) leaves the subset untrained."""
        return step <= self.switch_step if self.mode == "early" else step > self.switch_step

    @torch.no_grad()
    def before_optimizer_step(self, step: int) -> None:
        """Zero the subset's gradients (call after unscaling, before clipping); at the first frozen
        step, record the values the subset keeps."""
        if not self.is_frozen(step):
            return
        for i, ((_, layer), mask) in enumerate(zip(self.layers, self.masks)):
            if self.snapshots[i] is None:
                self.snapshots[i] = layer.weight[mask].clone()
            if layer.weight.grad is not None:
                layer.weight.grad[mask] = 0

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Put the subset's values back (undoing moment-driven updates and weight decay)."""
        if not self.is_frozen(step):
            return
        for (_, layer), mask, kept in zip(self.layers, self.masks, self.snapshots):
            layer.weight[mask] = kept.to(layer.weight.dtype)

    def frozen_fraction(self) -> float:
        return float(sum(int(m.sum()) for m in self.masks)) / sum(m.numel() for m in self.masks)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "switch_step": self.switch_step,
                "snapshots": {name: (s.cpu() if s is not None else None)
                              for (name, _), s in zip(self.layers, self.snapshots)}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["snapshots"]
        names = [name for name, _ in self.layers]
        if state["mode"] != self.mode or int(state["switch_step"]) != self.switch_step or sorted(saved) != sorted(names):
            raise ValueError("freeze state does not match this run (mode, switch step or layers differ)")
        snapshots = []
        for (name, layer), mask in zip(self.layers, self.masks):
            s = saved[name]
            if s is not None and s.numel() != int(mask.sum()):
                raise ValueError(f"freeze state for {name} holds {s.numel()} values, the mask {int(mask.sum())}")
            snapshots.append(s.to(layer.weight.device) if s is not None else None)
        self.snapshots = snapshots


def freezable_linears(encoder: nn.Module, module_paths: set[str], prefix: str = "") -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers of a BERT encoder at ``layer.N.PATH`` for ``PATH`` in ``module_paths``."""
    return [(prefix + name, m) for name, m in encoder.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layer.") and name.split(".", 2)[-1] in module_paths]
