"""Decoupled group lasso on the active (stored) values of sparse weights (weight decay is AdamW's).

It acts on ``values`` only, so inactive positions and frozen weights are never
touched. Apply it right after the optimizer step with the step's learning rate.

Group lasso convention (paper Eq. 2):
``W <- W - lr * lambda * w_std * sqrt(B) * W / sqrt(sum_block W^2 + eps)``
with ``B`` the number of weights in a block (``b * b``), so ``sqrt(B) = b``. This
is the usual group-lasso group weighting (Yuan & Lin): a block whose weights all
have magnitude ``w`` is shrunk by ``lr * lambda * w_std`` per weight whatever its
size, like an L1 penalty of strength ``lambda * w_std``; and because BERT weights
are of order ``w_std`` the coefficient is on the scale of a weight-decay one.
"""

from __future__ import annotations

import torch


DEFAULT_GROUP_LASSO_EPS = 1e-6


@torch.no_grad()
def group_lasso_(values: torch.Tensor, lr: float, coefficient: float, w_std: float = 0.02,
                 eps: float = DEFAULT_GROUP_LASSO_EPS) -> torch.Tensor:
    """One decoupled group-lasso step on ``[nnz, b, b]`` values, in place."""
    if coefficient == 0.0 or lr == 0.0:
        return values
    b = values.shape[-1]
    norms = values.float().pow(2).sum(dim=(1, 2), keepdim=True).add_(eps).sqrt_()
    values.sub_((values.float() * (lr * coefficient * w_std * b) / norms).to(values.dtype))
    return values


def group_lasso_penalty(values: torch.Tensor, w_std: float = 0.02) -> float:
    """``w_std * sqrt(B) * sum_blocks ||block||_2``: the penalty whose decoupled step is ``group_lasso_``."""
    b = values.shape[-1]
    return float(values.detach().float().pow(2).sum(dim=(1, 2)).sqrt().sum()) * w_std * b


