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
from typing import Callable, Protocol

import numpy as np
import torch

from ..sparse.regularize import group_lasso_
from .optim import build_optimizer
from .precision import Precision, resolve_precision
from .state import StepContext
from .sums import TRAIN_FIELDS, Sums, output_sums


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
    """What differs between devices; every method but the first three gets the run's
    :class:`~.state.StepContext` (the state and the fixed settings), never the trainer."""

    shards_validation: bool  # each rank validates its share (sums all-reduced), or every rank all of it

    def host_precision(self, config, device: torch.device) -> Precision:
        """The precision of what runs on ``device`` in this process (training and validation)."""

    def loss_divisor(self, accumulation: int, world_size: int) -> int:
        """How many micro-batch means one step's loss sums add (their divisor for a mean)."""

    def make_optimizer(self, model: torch.nn.Module, config) -> torch.optim.Optimizer:
        """The optimizer of the model (called once, while the state is built)."""

    def attach(self, ctx: StepContext) -> None:
        """Everything built from the finished state (compiled graphs, executors)."""

    def step(self, ctx: StepContext, step: int) -> StepResult:
        """Optimizer step number ``step``."""

    def update_pattern(self, ctx: StepContext, step: int):
        """The scheduled pattern update after ``step`` (an accelerator moves its state here)."""

    def evaluate(self, ctx: StepContext, final: bool, evaluate: Callable[..., dict]) -> dict:
        """Validation: ``evaluate(final)`` on the host model after whatever makes it current, or
        ``evaluate(final, model)`` on another one."""

    def before_checkpoint(self, ctx: StepContext) -> None:
        """Bring the weights to the host model before a checkpoint reads them."""

    def close(self, ctx: StepContext) -> None:
        """Release what the backend holds (executors)."""


class TorchStep:
    """The CPU/GPU step: ``accumulation`` micro-batches each ``loss / accumulation`` backward (scaled
    in fp16), unscale, clipping (whose total norm is the step's one host read and its finiteness
    check), the optimizer step unless non-finite, group lasso with the step's learning rate,
    ``zero_grad``, the learning-rate schedule. RigL's recording steps run the eager model."""

    shards_validation = True

    def host_precision(self, config, device: torch.device) -> Precision:
        return resolve_precision(config.training.precision, device)

    def loss_divisor(self, accumulation: int, world_size: int) -> int:
        return accumulation * world_size  # the sums are all-reduced over ranks

    def make_optimizer(self, model: torch.nn.Module, config) -> torch.optim.Optimizer:
        return build_optimizer(model, config)

    def attach(self, ctx: StepContext) -> None:
        pass

    def step(self, ctx: StepContext, step: int) -> StepResult:
        state, config = ctx.state, ctx.config
        model, optimizer, updater = state.model, state.optimizer, state.updater
        model.train()
        if updater is not None:
            updater.begin_step(step)  # RigL: dense gradients only before an update
        # RigL's recording steps run eagerly (tensor hooks); the others run the compiled model.
        recording = updater is not None and updater.needs_dense_grad(step)
        forward = state.forward_model if recording else state.compiled_model
        sums = Sums(TRAIN_FIELDS, ctx.device)
        tokens = real_tokens = masked = 0
        accumulation, dist, scaler = ctx.accumulation, ctx.dist, state.scaler
        for micro in range(accumulation):
            batch = state.next_batch()
            masked += masked_tokens(batch)  # counted on the host, before the copy
            tokens += batch["input_ids"].numel()
            real_tokens += real_token_count(batch)
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            last = micro == accumulation - 1
            # DDP all-reduces gradients once per optimizer step, on the last micro-batch.
            sync = contextlib.nullcontext() if last or not dist.enabled else state.forward_model.no_sync()
            with sync:
                with ctx.precision.autocast():
                    out = forward(**batch)
                loss = out.loss / accumulation
                (scaler.scale(loss) if scaler else loss).backward()
            sums.add(**output_sums(out))  # on the device: no sync per micro-batch
        if scaler:
            scaler.unscale_(optimizer)
        if state.freezer is not None:
            state.freezer.before_optimizer_step(step)
        max_norm = config.optimizer.max_grad_norm or float("inf")
        # The step's one host sync: whether the gradients are finite decides the optimizer step.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        finite = math.isfinite(grad_norm)
        lr = state.scheduler.get_last_lr()[0]
        if scaler:
            scaler.step(optimizer)  # skips the step itself when the gradients overflowed
            scaler.update()
        elif finite:
            optimizer.step()
        if state.freezer is not None:
            state.freezer.after_optimizer_step(step)
        if finite and config.sparsity.group_lasso > 0:
            for _, layer in state.sparse_layers:
                group_lasso_(layer.values, lr, config.sparsity.group_lasso)
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            state.scheduler.step()
        return StepResult(finite=finite, grad_norm=grad_norm, lr=lr, sums=sums, masked=masked,
                          tokens=tokens * dist.world_size, real_tokens=real_tokens * dist.world_size)

    def update_pattern(self, ctx: StepContext, step: int):
        return ctx.state.updater.step(step)

    def evaluate(self, ctx: StepContext, final: bool, evaluate: Callable[..., dict]) -> dict:
        return evaluate(final)

    def before_checkpoint(self, ctx: StepContext) -> None:
        pass

    def close(self, ctx: StepContext) -> None:
        pass


def masked_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Masked tokens of a host batch (either form of the labels)."""
    labels = batch["masked_labels"] if "masked_labels" in batch else batch["mlm_labels"]
    return int(np.count_nonzero(labels.numpy() != -100))  # numpy: never a device read


def real_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Positions of a host batch that the attention mask keeps (the batch's tokens less padding)."""
    return int(np.count_nonzero(batch["attention_mask"].numpy()))
