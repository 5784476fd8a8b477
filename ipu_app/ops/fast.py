"""What the fast backends share: the autograd wiring of the three products and the call wrapper
(compute dtype, fallback to the reference op, per-pattern metadata)."""

from __future__ import annotations

from typing import Callable

import torch

from ..sparse.pattern import BlockPattern
from . import reference
from .meta import KernelMeta, MetaCache

# (x2d, values, meta, bias) -> y ; (gy, values, meta) -> dx ; (gy, x2d, meta) -> dvalues (fp32)
Product = Callable[..., torch.Tensor]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear on ``x`` computes in: autocast's where it is on, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def block_sparse_function(name: str, forward: Product, input_grad: Product, values_grad: Product):
    """An autograd Function ``(x2d, values, meta, bias) -> y`` from a backend's three products."""

    def fwd(ctx, x2d, values, meta: KernelMeta, bias):
        x2d, values = x2d.contiguous(), values.contiguous()
        y = forward(x2d, values, meta, bias)
        ctx.save_for_backward(x2d, values)
        ctx.meta = meta
        ctx.has_bias = bias is not None
        return y

    def bwd(ctx, gy):
        x2d, values = ctx.saved_tensors
        gy = gy.contiguous()
        gx = input_grad(gy, values, ctx.meta) if ctx.needs_input_grad[0] else None
        gv = values_grad(gy, x2d, ctx.meta).to(values.dtype) if ctx.needs_input_grad[1] else None
        gb = gy.sum(0, dtype=torch.float32).to(gy.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return gx, gv, None, gb

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def make_linear(function, covers: Callable[..., bool], cache: MetaCache, kernels: str,
                to_kernel_values: Callable[[torch.Tensor], torch.Tensor] = lambda v: v):
    """A backend's ``linear`` (``ops.reference.linear``'s signature): the reference op where ``covers``
    says no, else ``function`` on 2-D inputs in the compute dtype (autocast's, applied here, as
    ``F.linear`` would) with the pattern's cached metadata."""

    def linear(x: torch.Tensor, values: torch.Tensor, pattern: BlockPattern, bias: torch.Tensor | None = None,
               frozen: torch.Tensor | None = None) -> torch.Tensor:
        device = x.device.type
        dtype = compute_dtype(x)
        if not covers(device, dtype, pattern.block_size, frozen is not None):
            return reference.linear(x, values, pattern, bias, frozen)
        pattern._check_values(values)
        meta = cache.get(pattern)
        with torch.autocast(device, enabled=False):
            x2d = x.reshape(-1, pattern.in_features).to(dtype)
            b = None if bias is None else bias.to(dtype)
            y = function.apply(x2d, to_kernel_values(values.to(dtype)), meta, b)
        return y.reshape(*x.shape[:-1], pattern.out_features)

    linear.__doc__ = f"``y = x @ W^T + bias`` like :func:`ops.reference.linear`, on the {kernels} where they apply."
    return linear
