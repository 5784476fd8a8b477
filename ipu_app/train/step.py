"""Step backends: what one optimizer step is on a device, apart from the loop that runs it.

The loop (``trainer.Trainer``) owns everything a step shares on every device: phases, the skip and
divergence rules, counters, the log window, validation, checkpoints, signals. A backend owns what
differs: the optimizer it needs, the step itself (``step`` returns a :class:`StepResult`; the loop
times it and does the bookkeeping), the pattern update's data movement, and where the weights must
be before the host reads them. :class:`TorchStep` is the CPU/GPU step; ``ipu.trainer.IpuStep`` runs
a PopTorch executor.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch

from ..sparse.regularize import group_lasso_
from .optim import build_optimizer
from .sums import TRAIN_FIELDS, Sums, output_sums

if TYPE_CHECKING:
    from .trainer import Trainer


@dataclass
class StepResult:
    """One optimizer step as the loop records it. ``tokens`` and ``real_tokens`` are global (all
    ranks), ``sums`` and ``masked`` this rank's; ``grad_norm`` is NaN where a backend cannot report it."""

    finite: bool
    grad_norm: float
    lr: float
    sums: Sums
    masked: int
    tokens: int
    real_tokens: int


class StepBackend(Protocol):
    def make_optimizer(self, trainer: "Trainer") -> torch.optim.Optimizer:
        """The optimizer of the trainer's model (called once, while the trainer is built)."""

    def attach(self, trainer: "Trainer") -> None:
        """Everything built from the finished trainer (compiled graphs, executors)."""

    def step(self, trainer: "Trainer", step: int) -> StepResult:
        """Optimizer step number ``step``."""

    def update_pattern(self, trainer: "Trainer", step: int):
        """The scheduled pattern update after ``step`` (an accelerator moves its state here)."""

    def evaluate(self, trainer: "Trainer", final: bool, evaluate: Callable[[bool], dict]) -> dict:
        """Validation: ``evaluate(final)`` on the host model, after whatever makes it current."""

    def before_checkpoint(self, trainer: "Trainer") -> None:
        """Bring the weights to the host model before a checkpoint reads them."""

    def close(self, trainer: "Trainer") -> None:
        """Release what the backend holds (executors)."""


class TorchStep:
    """The CPU/GPU step: ``accumulation`` micro-batches each ``loss / accumulation`` backward (scaled
    in fp16), unscale, clipping (whose total norm is the step's one host read and its finiteness
    check), the optimizer step unless non-finite, group lasso with the step's learning rate,
    ``zero_grad``, the learning-rate schedule. RigL's recording steps run the eager model."""

    def make_optimizer(self, trainer: "Trainer") -> torch.optim.Optimizer:
        return build_optimizer(trainer.model, trainer.config)

    def attach(self, trainer: "Trainer") -> None:
        pass

    def step(self, trainer: "Trainer", step: int) -> StepResult:
        model, optimizer, updater = trainer.model, trainer.optimizer, trainer.updater
        model.train()
        if updater is not None:
            updater.begin_step(step)  # RigL: dense gradients only before an update
        # RigL's recording steps run eagerly (tensor hooks); the others run the compiled model.
        recording = updater is not None and updater.needs_dense_grad(step)
        forward = trainer.forward_model if recording else trainer.compiled_model
        sums = Sums(TRAIN_FIELDS, trainer.device)
        tokens = real_tokens = masked = 0
        accumulation, dist, scaler = trainer.accumulation, trainer.dist, trainer.scaler
        for micro in range(accumulation):
            batch = trainer.next_batch()
            masked += masked_tokens(batch)  # counted on the host, before the copy
            tokens += batch["input_ids"].numel()
            real_tokens += real_token_count(batch)
            batch = {k: v.to(trainer.device, non_blocking=True) for k, v in batch.items()}
            last = micro == accumulation - 1
            # DDP all-reduces gradients once per optimizer step, on the last micro-batch.
            sync = contextlib.nullcontext() if last or not dist.enabled else trainer.forward_model.no_sync()
            with sync:
                with trainer.precision.autocast():
                    out = forward(**batch)
                loss = out.loss / accumulation
                (scaler.scale(loss) if scaler else loss).backward()
            sums.add(**output_sums(out))  # on the device: no sync per micro-batch
        if scaler:
            scaler.unscale_(optimizer)
        if trainer.freezer is not None:
            trainer.freezer.before_optimizer_step(step)
        max_norm = trainer.config.optimizer.max_grad_norm or float("inf")
        # The step's one host sync: whether the gradients are finite decides the optimizer step.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        finite = math.isfinite(grad_norm)
        lr = trainer.scheduler.get_last_lr()[0]
        if scaler:
            scaler.step(optimizer)  # skips the step itself when the gradients overflowed
            scaler.update()
        elif finite:
            optimizer.step()
        if trainer.freezer is not None:
            trainer.freezer.after_optimizer_step(step)
        if finite and trainer.config.sparsity.group_lasso > 0:
            for _, layer in trainer.sparse_layers:
                group_lasso_(layer.values, lr, trainer.config.sparsity.group_lasso)
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            trainer.scheduler.step()
        return StepResult(finite=finite, grad_norm=grad_norm, lr=lr, sums=sums, masked=masked,
                          tokens=tokens * dist.world_size, real_tokens=real_tokens * dist.world_size)

    def update_pattern(self, trainer: "Trainer", step: int):
        return trainer.updater.step(step)

    def evaluate(self, trainer: "Trainer", final: bool, evaluate: Callable[[bool], dict]) -> dict:
        return evaluate(final)

    def before_checkpoint(self, trainer: "Trainer") -> None:
        pass

    def close(self, trainer: "Trainer") -> None:
        pass


def masked_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Masked tokens of a host batch (either form of the labels)."""
    labels = batch["masked_labels"] if "masked_labels" in batch else batch["mlm_labels"]
    return int(np.count_nonzero(labels.numpy() != -100))  # numpy: never a device read


def real_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Positions of a host batch that the attention mask keeps (the batch's tokens less padding)."""
    return int(np.count_nonzero(batch["attention_mask"].numpy()))
