"""What the fast backends share: the three products as custom ops with autograd (opaque to
``torch.compile``) and the call wrapper (compute dtype, fallback to the reference op)."""

from __future__ import annotations

from typing import Callable

import torch

from ..sparse.pattern import BlockPattern
from . import reference
from .meta import KernelMeta, MetaCache

# (x2d, values, meta, bias) -> y ; (gy, values, meta) -> dx ; (gy, x2d, meta) -> dvalues (fp32);
# optionally both gradients at once, (gy, x2d, values, meta) -> (dx, dvalues), for a backend that shares
# work between them (the token panels pack dY once)
Product = Callable[..., torch.Tensor]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear on ``x`` computes in: autocast's where it is on, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def block_sparse_ops(name: str, forward: Product, input_grad: Product, values_grad: Product, cache: MetaCache,
                     both_grads: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                     bias_grad: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """A backend's three products as ``torch.library`` custom ops with autograd:
    ``ipu_app::{name}_linear(x2d, values, rows, cols, bias, out_features, in_features, block_size)``
    (and its ``_input_grad`` / ``_values_grad``, and ``_grads`` for both where ``both_grads`` is given).
    The pattern enters as its coordinate tensors and the kernel metadata is looked up inside the op,
    so ``torch.compile`` sees one opaque op per layer whose shapes do not depend on the pattern: a
    pattern update changes no shape and no guard, and causes no recompilation. ``bias_grad(gy)``: the
    bias gradient (``gy`` summed over tokens in fp32, in ``gy``'s dtype) where the backend has a faster
    one than PyTorch's. Returns the forward op."""
    def meta_of(rows, cols, out_features, in_features, block_size) -> KernelMeta:
        return cache.get(BlockPattern(out_features, in_features, block_size, rows, cols))

    products = _product_ops(name, forward, input_grad, values_grad, meta_of)
    grads_op = _both_grads_op(name, both_grads, meta_of) if both_grads is not None else None
    bias_grad_op = _bias_grad_op(name, bias_grad) if bias_grad is not None else None
    _register_autograd(*products, grads_op, bias_grad_op)
    return products[0]


_LIB = "ipu_app"
_DIMS = "int out_features, int in_features, int block_size"


def _product_ops(name: str, forward: Product, input_grad: Product, values_grad: Product, meta_of):
    """The forward, input-gradient and values-gradient custom ops (with their fake kernels)."""
    @torch.library.custom_op(f"{_LIB}::{name}_linear", mutates_args=(),
                             schema=f"(Tensor x2d, Tensor values, Tensor rows, Tensor cols, Tensor? bias, {_DIMS}) -> Tensor")
    def linear_op(x2d, values, rows, cols, bias, out_features, in_features, block_size):
        meta = meta_of(rows, cols, out_features, in_features, block_size)
        return forward(x2d.contiguous(), values.contiguous(), meta, bias)

    @linear_op.register_fake
    def _(x2d, values, rows, cols, bias, out_features, in_features, block_size):
        return x2d.new_empty(x2d.shape[0], out_features)

    @torch.library.custom_op(f"{_LIB}::{name}_input_grad", mutates_args=(),
                             schema=f"(Tensor gy, Tensor values, Tensor rows, Tensor cols, {_DIMS}) -> Tensor")
    def input_grad_op(gy, values, rows, cols, out_features, in_features, block_size):
        meta = meta_of(rows, cols, out_features, in_features, block_size)
        return input_grad(gy.contiguous(), values.contiguous(), meta)

    @input_grad_op.register_fake
    def _(gy, values, rows, cols, out_features, in_features, block_size):
        return gy.new_empty(gy.shape[0], in_features)

    @torch.library.custom_op(f"{_LIB}::{name}_values_grad", mutates_args=(),
                             schema=f"(Tensor gy, Tensor x2d, Tensor values, Tensor rows, Tensor cols, {_DIMS}) -> Tensor")
    def values_grad_op(gy, x2d, values, rows, cols, out_features, in_features, block_size):
        meta = meta_of(rows, cols, out_features, in_features, block_size)
        return values_grad(gy.contiguous(), x2d.contiguous(), meta).to(values.dtype)

    @values_grad_op.register_fake
    def _(gy, x2d, values, rows, cols, out_features, in_features, block_size):
        return torch.empty_like(values)

    return linear_op, input_grad_op, values_grad_op


def _both_grads_op(name: str, both_grads, meta_of):
    """Both gradients in one op, for backends that compute them in one pass."""
    def grads(gy, x2d, values, rows, cols, out_features, in_features, block_size):
        meta = meta_of(rows, cols, out_features, in_features, block_size)
        gx, gv = both_grads(gy.contiguous(), x2d.contiguous(), values.contiguous(), meta)
        return gx, gv.to(values.dtype)

    grads_op = torch.library.custom_op(
        f"{_LIB}::{name}_grads", grads, mutates_args=(),
        schema=f"(Tensor gy, Tensor x2d, Tensor values, Tensor rows, Tensor cols, {_DIMS}) -> (Tensor, Tensor)")

    @grads_op.register_fake
    def _(gy, x2d, values, rows, cols, out_features, in_features, block_size):
        return gy.new_empty(gy.shape[0], in_features), torch.empty_like(values)

    return grads_op


def _bias_grad_op(name: str, bias_grad):
    op = torch.library.custom_op(f"{_LIB}::{name}_bias_grad", lambda gy: bias_grad(gy.contiguous()),
                                 mutates_args=(), schema="(Tensor gy) -> Tensor")

    @op.register_fake
    def _(gy):
        return gy.new_empty(gy.shape[1])

    return op


def _register_autograd(linear_op, input_grad_op, values_grad_op, grads_op, bias_grad_op) -> None:
    """The forward op's backward: both gradients in one op where there is one and both are needed;
    the bias gradient by the backend's op, else PyTorch's sum in fp32."""
    def setup_context(ctx, inputs, output):
        x2d, values, rows, cols, bias, out_features, in_features, block_size = inputs
        ctx.save_for_backward(x2d, values, rows, cols)
        ctx.dims = (out_features, in_features, block_size)
        ctx.has_bias = bias is not None

    def backward(ctx, gy):
        x2d, values, rows, cols = ctx.saved_tensors
        if grads_op is not None and ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            gx, gv = grads_op(gy, x2d, values, rows, cols, *ctx.dims)
        else:
            gx = input_grad_op(gy, values, rows, cols, *ctx.dims) if ctx.needs_input_grad[0] else None
            gv = values_grad_op(gy, x2d, values, rows, cols, *ctx.dims) if ctx.needs_input_grad[1] else None
        gb = None
        if ctx.has_bias and ctx.needs_input_grad[4]:
            gb = bias_grad_op(gy) if bias_grad_op is not None else gy.sum(0, dtype=torch.float32).to(gy.dtype)
        return gx, gv, None, None, gb, None, None, None

    linear_op.register_autograd(backward, setup_context=setup_context)


def make_linear(op, covers: Callable[..., bool], kernels: str,
                to_kernel_values: Callable[[torch.Tensor], torch.Tensor] = lambda v: v):
    """A backend's ``linear`` (``ops.reference.linear``'s signature): the reference op where ``covers``
    says no, else the custom ``op`` of :func:`block_sparse_ops` on 2-D inputs in the compute dtype
    (autocast's, applied here, as ``F.linear`` would)."""

    def linear(x: torch.Tensor, values: torch.Tensor, pattern: BlockPattern, bias: torch.Tensor | None = None,
               frozen: torch.Tensor | None = None) -> torch.Tensor:
        device = x.device.type
        dtype = compute_dtype(x)
        if not covers(device, dtype, pattern.block_size, frozen is not None):
            return reference.linear(x, values, pattern, bias, frozen)
        pattern._check_values(values)
        with torch.autocast(device, enabled=False):
            x2d = x.reshape(-1, pattern.in_features).to(dtype)
            b = None if bias is None else bias.to(dtype)
            y = op(x2d, to_kernel_values(values.to(dtype)), pattern.rows, pattern.cols, b, pattern.out_features,
                   pattern.in_features, pattern.block_size)
        return y.reshape(*x.shape[:-1], pattern.out_features)

    linear.__doc__ = f"``y = x @ W^T + bias`` like :func:`ops.reference.linear`, on the {kernels} where they apply."
    return linear
