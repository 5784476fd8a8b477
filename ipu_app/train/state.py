"""What a training run is at a step: :class:`TrainState` (the parts the builders made and the loop's
own counters), and :class:`StepContext`, the narrow view a step backend works through.

The loop (``trainer.Trainer``) advances a ``TrainState``; a backend's ``step`` gets a
``StepContext`` (the state, the batches and the run's fixed settings), never the trainer; the
checkpoint manager (``checkpoint.CheckpointManager``) saves and restores every stateful part of it
by key (``TrainState.checkpoint_parts``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .checkpoint import Attr, RngState
from .sums import TRAIN_FIELDS, Sums

if TYPE_CHECKING:
    from .step import StepResult


@dataclass
class Window:
    """Sums over the training steps since the last ``train`` log record. The loss sums stay where
    the model runs (``sums``: this rank's MLM loss, NSP loss and correct predictions by name, summed
    over micro-batches and steps) and are read once, at the log interval: no host sync per micro-batch.
    ``tokens`` counts every position of the batches (padding included), ``real_tokens`` the positions
    the attention mask keeps."""

    steps: int = 0
    masked: int = 0
    grad_norm: float = 0.0
    seconds: float = 0.0
    tokens: int = 0
    real_tokens: int = 0
    sums: Sums | None = None

    def add(self, sums: Sums, **values) -> None:
        if self.sums is None:
            self.sums = sums.clone()
        else:
            self.sums += sums
        for key, value in values.items():
            setattr(self, key, getattr(self, key) + value)

    def state_dict(self) -> dict:
        state = {k: v for k, v in vars(self).items() if k != "sums"}
        state["sums"] = None if self.sums is None else self.sums.state_dict()
        return state

    @classmethod
    def from_state(cls, state: dict, divisor: int, device: torch.device | str = "cpu") -> "Window":
        state = dict(state)
        if "loss" in state:  # a checkpoint of an older version held the averaged losses
            state = {"sums": [state["mlm_loss"] * divisor, state["nsp_loss"] * divisor, float(state["correct"])],
                     **{k: state[k] for k in ("steps", "masked", "grad_norm", "seconds", "tokens")}}
        sums = state.pop("sums")
        return cls(**state, sums=None if sums is None else Sums.from_state(sums, TRAIN_FIELDS).to(device))


@dataclass
class Counters:
    """A run's totals (saved in every checkpoint, reported in the summary)."""

    skipped_steps: int = 0
    skipped_updates: int = 0
    pattern_updates: int = 0
    train_seconds: float = 0.0
    train_tokens: int = 0
    train_real_tokens: int = 0  # positions the attention mask keeps (train_tokens less padding)
    last_train_loss: float = float("nan")
    wall_seconds: float = 0.0
    high_prg_updates: int = 0  # consecutive updates with mean pruned_recently_grown > PRG_WARN
    skipped_in_a_row: int = 0  # consecutive optimizer steps skipped for non-finite gradients
    prg_warned: bool = False
    machines: list = field(default_factory=list)  # every machine kind (machine_key) that trained the run
    init_from: dict | None = None  # training.init_from: what was loaded (source, step, pattern, positions)


@dataclass
class TrainState:
    """The parts of a run (made by ``build``) and where the loop stands. ``forward_model`` is what the
    step calls (the DDP wrapper where distributed), ``compiled_*`` the ``torch.compile``d forms
    (the plain ones without ``training.compile``). ``loss_divisor``: how many micro-batch means one
    step's sums add (the backend says)."""

    model: torch.nn.Module
    forward_model: torch.nn.Module
    compiled_model: Callable
    compiled_eval: Callable
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    schedule: Any
    updater: Any
    freezer: Any
    sparse_layers: list
    batches: Any
    host_transform: Callable | None
    loss_divisor: int
    counters: Counters = field(default_factory=Counters)
    window: Window = field(default_factory=Window)
    step: int = 0
    last_step_finite: bool = True
    last_lr: float = float("nan")  # the learning rate of the latest step
    last_sums: Sums | None = None  # the latest step's loss sums, on the device

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next training micro-batch of this rank, on the host."""
        batch = next(self.batches)
        return self.host_transform(batch) if self.host_transform is not None else batch

    def record(self, step: int, result: "StepResult", seconds: float) -> None:
        """Optimizer step ``step`` done (``result``, in ``seconds``): where the loop stands, the
        counters (skips, non-finite steps in a row, time, tokens) and the log window. ``tokens`` and
        ``real_tokens`` are global (all ranks), ``sums`` and ``masked`` this rank's; ``grad_norm`` is
        NaN where the backend does not report it."""
        self.step, self.last_lr, self.last_step_finite = step, result.lr, result.finite
        c = self.counters
        c.skipped_steps += not result.finite
        c.skipped_in_a_row = 0 if result.finite else c.skipped_in_a_row + 1
        c.train_seconds += seconds
        c.train_tokens += result.tokens
        c.train_real_tokens += result.real_tokens
        self.last_sums = result.sums
        self.window.add(result.sums, steps=1, masked=result.masked, seconds=seconds, tokens=result.tokens,
                        real_tokens=result.real_tokens, grad_norm=result.grad_norm if result.finite else 0.0)

    def checkpoint_parts(self, dist, device) -> dict:
        """Every part a checkpoint holds, by its key in ``state.pt``, in the order they are restored
        (None: the run has no such part)."""
        divisor = self.loss_divisor
        return {
            "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
            "updater": self.updater, "freezer": self.freezer, "data": self.batches,
            "rng": RngState(dist),
            "window": Attr(self, "window", save=Window.state_dict,
                           load=lambda s: Window.from_state(s, divisor, device)),
            "counters": Attr(self, "counters", save=lambda c: vars(c).copy(), load=lambda s: Counters(**s)),
            "last_step_finite": Attr(self, "last_step_finite", load=bool),
            "last_lr": Attr(self, "last_lr", load=float),
        }


@dataclass
class StepContext:
    """What a step backend sees: the state (model, optimizer, schedules, updater, batches, ...) and
    the run's fixed settings."""

    state: TrainState
    config: Any  # RunConfig
    device: torch.device
    precision: Any  # precision.Precision
    dist: Any  # distributed.DistContext
    accumulation: int
