"""Reference block-sparse linear: scatter the values into a dense weight, then ``F.linear``.

This is the specification every faster backend is tested against. Autograd flows
to the input, the values (gathered at the active blocks) and the bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sparse.pattern import BlockPattern


def dense_weight(values: torch.Tensor, pattern: BlockPattern, frozen: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``[out, in]`` weight: active blocks from ``values``; inactive ones zero,
    or taken from ``frozen`` (untrained, non-zero) when it is given."""
    weight = pattern.to_dense(values)
    if frozen is not None:
        weight = weight + frozen.to(weight.dtype).masked_fill(pattern.mask(), 0)
    return weight


def linear(
    x: torch.Tensor,
    values: torch.Tensor,
    pattern: BlockPattern,
    bias: torch.Tensor | None = None,
    frozen: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ W^T + bias`` with ``W`` the block-sparse weight of ``pattern``."""
    weight = dense_weight(values, pattern, frozen)
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, weight, bias)
