"""The MLM loss and accuracy over a large vocabulary, in row chunks that stay in cache.

``F.cross_entropy(logits.float(), targets)`` plus an ``argmax`` for the accuracy walks the
``[masked tokens, vocab]`` logits five times through memory in fp32 (cast, log-softmax, its
backward, the cast of the gradient, argmax). ``mlm_loss_and_correct`` reads the logits once per
pass, a chunk of rows at a time in fp32, and writes the gradient directly in the logits' dtype:
the same loss and gradient (fp32 arithmetic), several times faster on a CPU.
"""

from __future__ import annotations

import torch

CPU_CHUNK_ROWS = 16  # 16 x 30522 fp32 = 2 MB: one chunk stays in a core's L2 cache


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int):
        rows = logits.shape[0]
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        correct = torch.zeros((), dtype=torch.long, device=logits.device)
        for start in range(0, rows, chunk):
            part = logits[start : start + chunk].float()
            lse[start : start + chunk] = torch.logsumexp(part, dim=-1)
            correct += (part.max(dim=-1).indices == targets[start : start + chunk]).sum()
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(correct)
        return (lse - target_logits).mean(), correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct):
        logits, targets, lse = ctx.saved_tensors
        rows, chunk = logits.shape[0], ctx.chunk
        scale = grad_loss.float() / rows
        grad = torch.empty_like(logits)
        for start in range(0, rows, chunk):
            part = logits[start : start + chunk].float().sub_(lse[start : start + chunk, None]).exp_()
            part[torch.arange(part.shape[0], device=part.device), targets[start : start + chunk]] -= 1.0
            grad[start : start + chunk] = part.mul_(scale)
        return grad, None, None


def mlm_loss_and_correct(logits: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean cross-entropy, number of rows whose top logit is the target)``.

    ``logits`` is ``[rows, vocab]`` in any float dtype; the loss is computed in fp32 and the
    gradient has the logits' dtype. ``chunk`` rows are processed at a time (CPU default: 16;
    on a GPU all rows at once).
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [rows, vocab] and targets [rows], got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if logits.shape[0] == 0:  # no masked token: HF's convention is a NaN mean; keep the graph
        return logits.float().sum() * float("nan"), torch.zeros((), dtype=torch.long, device=logits.device)
    if chunk is None:
        chunk = CPU_CHUNK_ROWS if logits.device.type == "cpu" else logits.shape[0]
    return _ChunkedCrossEntropy.apply(logits, targets, max(1, int(chunk)))


def padded_mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean cross-entropy, correct, masked)`` over fixed-size masked positions: ``logits``
    ``[..., vocab]`` and ``labels`` of the same leading shape, -100 at padding (static shapes, no host
    sync: the compiled and GPU path). Counts are device tensors."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1).long()
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    valid = labels != -100
    correct = ((logits.argmax(-1) == labels) & valid).sum()
    return loss, correct, valid.sum()
