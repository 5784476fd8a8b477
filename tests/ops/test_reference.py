import pytest
import torch
import torch.nn.functional as F

from ipu_app.ops import BackendError, get_backend, reference, resolve_backend
from ipu_app.sparse.init import random_pattern
from ipu_app.sparse.pattern import SUPPORTED_BLOCK_SIZES


@pytest.mark.parametrize("b", SUPPORTED_BLOCK_SIZES)
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
def test_reference_matches_masked_dense_linear(b, s):
    g = torch.Generator().manual_seed(b)
    out_f, in_f = 2 * 64, 64 if b < 64 else 128
    pattern = random_pattern(out_f, in_f, b, s, g)
    values = torch.randn(pattern.nnz, b, b, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(out_f, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(3, 7, in_f, dtype=torch.float64, generator=g, requires_grad=True)  # odd token count
    y = reference.linear(x, values, pattern, bias)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    mask = pattern.mask()
    weight = torch.zeros(out_f, in_f, dtype=torch.float64)
    weight[mask] = pattern.to_dense(values.detach())[mask]
    weight.requires_grad_(True)
    x2, bias2 = x.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, weight * mask, bias2)
    y2.backward(grad_y)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, bias2.grad)
    # values gradient = dense weight gradient sampled at the active blocks
    torch.testing.assert_close(values.grad, pattern.gather(weight.grad))


def test_reference_gradcheck():
    pattern = random_pattern(8, 12, 2, 0.5, torch.Generator().manual_seed(0))
    values = torch.randn(pattern.nnz, 2, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: reference.linear(x, v, pattern, b), (x, values, bias))


def test_frozen_values_enter_forward_but_get_no_gradient():
    pattern = random_pattern(16, 16, 4, 0.75, torch.Generator().manual_seed(0))
    values = torch.randn(pattern.nnz, 4, 4, requires_grad=True)
    frozen = torch.randn(16, 16)
    x = torch.randn(3, 16)
    y = reference.linear(x, values, pattern, None, frozen=frozen)
    weight = torch.where(pattern.mask(), pattern.to_dense(values.detach()), frozen)
    torch.testing.assert_close(y, x @ weight.t())
    assert not frozen.requires_grad


def test_low_precision_inputs():
    pattern = random_pattern(32, 32, 8, 0.5, torch.Generator().manual_seed(0))
    values = torch.randn(pattern.nnz, 8, 8, requires_grad=True)
    x = torch.randn(4, 32).bfloat16()
    y = reference.linear(x, values, pattern)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ pattern.to_dense(values.detach()).bfloat16().float().t(),
                               rtol=1e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = reference.linear(torch.randn(4, 32), values, pattern)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert values.grad.dtype == torch.float32


def test_backend_registry():
    assert resolve_backend("auto") == "auto" and resolve_backend("reference") == "reference"
    assert get_backend("reference") is reference.linear
    with pytest.raises(BackendError, match="unknown sparse backend 'cuda'"):
        get_backend("cuda")
