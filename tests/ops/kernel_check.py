"""The one harness every fast backend is checked with: forward, input gradient, values gradient and
bias gradient against ``ops.reference`` (in float64, from the same rounded inputs)."""

from __future__ import annotations

import torch

from ipu_app.ops import reference
from ipu_app.sparse.init import random_pattern
from ipu_app.sparse.pattern import BlockPattern

# relative error (Frobenius) allowed per compute dtype
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def pattern_with_gaps(out_f: int, in_f: int, b: int, sparsity: float, seed: int) -> BlockPattern:
    """A random pattern whose first block row and last block column are empty."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = out_f // b, in_f // b
    free = torch.arange(rows * cols).reshape(rows, cols)[1:, :-1].reshape(-1)
    keep = max(1, round((1 - sparsity) * free.numel()))
    index = free[torch.randperm(free.numel(), generator=g)[:keep]]
    return BlockPattern.from_linear_index(out_f, in_f, b, index)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_backend(op, b: int, dtype: torch.dtype, tokens: int, *, sparsity: float = 0.75, gaps: bool = False,
                  bias: bool = True, shape: tuple[int, int] = (96, 128), seed: int = 0, device: str = "cpu"):
    """Run ``op`` forward and backward and compare every output with the reference op."""
    out_f, in_f = shape[0] * max(1, b // 16), shape[1] * max(1, b // 16)
    g = torch.Generator().manual_seed(seed)
    pattern = (pattern_with_gaps(out_f, in_f, b, sparsity, seed) if gaps
               else random_pattern(out_f, in_f, b, sparsity, g))
    pattern = BlockPattern(out_f, in_f, b, pattern.rows.to(device), pattern.cols.to(device))
    values = torch.randn(pattern.nnz, b, b, generator=g).to(device, dtype).requires_grad_()
    x = torch.randn(tokens, in_f, generator=g).to(device, dtype).requires_grad_()
    bias_t = torch.randn(out_f, generator=g).to(device, dtype).requires_grad_() if bias else None
    y = op(x, values, pattern, bias_t)
    assert y.dtype == dtype and y.shape == (tokens, out_f)
    grad_y = torch.randn(tokens, out_f, generator=g).to(device, dtype)
    y.backward(grad_y)

    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (x, values)]
    ref_bias = bias_t.detach().double().cpu().requires_grad_() if bias else None
    ref_pattern = BlockPattern(out_f, in_f, b, pattern.rows.cpu(), pattern.cols.cpu())
    y_ref = reference.linear(ref_inputs[0], ref_inputs[1], ref_pattern, ref_bias)
    y_ref.backward(grad_y.double().cpu())
    tol = TOLERANCE[dtype]
    errors = {"y": rel(y.cpu(), y_ref), "dx": rel(x.grad.cpu(), ref_inputs[0].grad),
              "dvalues": rel(values.grad.cpu(), ref_inputs[1].grad)}
    if bias:
        errors["dbias"] = rel(bias_t.grad.cpu(), ref_bias.grad)
    assert values.grad.dtype == dtype and x.grad.dtype == dtype
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"b={b} {dtype} T={tokens}: relative errors {bad} above {tol}"
    if gaps:  # empty block row: bias only; empty block column: no input gradient
        expect_row = bias_t.detach().float().cpu()[:b].expand(tokens, b) if bias else torch.zeros(tokens, b)
        torch.testing.assert_close(y.detach().float().cpu()[:, :b], expect_row, rtol=0, atol=0)
        assert torch.count_nonzero(x.grad[:, -b:]) == 0
    return errors
