"""The paper's optimizer and learning-rate schedule.

Adam with decoupled weight decay (AdamW) on weight matrices, sparse ``values`` and embeddings;
biases and LayerNorm parameters are not decayed (BERT's convention). The learning rate rises
linearly over ``warmup_steps`` to the peak and then decays linearly to 0 at the last step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import RunConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    o = config.optimizer
    return torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=config.learning_rate,
                             betas=(o.beta1, o.beta2), eps=o.eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate for the optimizer step after ``step`` completed steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = total_steps - step
    return max(0.0, remaining / max(1, total_steps - warmup_steps))


class _LinearWarmupDecay:
    """LambdaLR multiplier as an object: its state dict then holds plain numbers only."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    t = config.training
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _LinearWarmupDecay(t.warmup_steps, t.steps))
