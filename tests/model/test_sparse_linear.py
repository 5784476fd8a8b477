import io

import pytest
import torch
from torch import nn

from ipu_app.model.sparse_linear import SparseLinear, densify_, sparsify_
from ipu_app.sparse.layer import sparse_weights
from ipu_app.seeding import seeded_generator
from ipu_app.sparse.pattern import PatternError


def test_drop_in_for_linear():
    layer = SparseLinear(32, 16, True, sparsity=0.75, block_size=4)
    assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]
    assert layer.values.shape == (8, 4, 4)  # 0.25 * 8 * 4 blocks
    assert {n for n, _ in layer.named_buffers()} == {"block_rows", "block_cols"}
    x = torch.randn(2, 5, 32)
    y = layer(x)
    assert y.shape == (2, 5, 16)
    torch.testing.assert_close(y, nn.functional.linear(x, layer.to_dense(), layer.bias))
    assert layer.sparsity == pytest.approx(0.75)
    assert "nnz_blocks=8" in repr(layer)
    assert SparseLinear(32, 16, bias=False, sparsity=0.5).bias is None


def test_state_dict_round_trip_keeps_pattern():
    a = SparseLinear(64, 32, sparsity=0.9, block_size=8, generator=torch.Generator().manual_seed(1))
    b = SparseLinear(64, 32, sparsity=0.9, block_size=8, generator=torch.Generator().manual_seed(2))
    assert not a.pattern.equal(b.pattern)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    version = b.pattern_version
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.pattern.equal(a.pattern) and torch.equal(a.values, b.values)
    assert b.pattern_version == version + 1
    x = torch.randn(3, 64)
    torch.testing.assert_close(a(x), b(x))


def test_loading_a_broken_pattern_fails():
    layer = SparseLinear(64, 32, sparsity=0.9, block_size=8)
    state = layer.state_dict()
    state["block_rows"] = state["block_rows"].flip(0)
    with pytest.raises(RuntimeError, match="invalid sparsity pattern"):
        layer.load_state_dict(state)
    state = SparseLinear(64, 32, sparsity=0.5, block_size=8).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(state)


def test_from_linear_random_and_magnitude_and_back():
    linear = nn.Linear(16, 8)
    sparse = SparseLinear.from_linear(linear, sparsity=0.5, block_size=4, generator=torch.Generator().manual_seed(0))
    mask = sparse.mask()
    assert torch.equal(sparse.to_dense()[mask], linear.weight.detach()[mask])
    assert torch.equal(sparse.bias, linear.bias)
    magnitude = SparseLinear.from_linear(linear, sparsity=0.5, block_size=4, selection="magnitude")
    norms = linear.weight.detach().abs().reshape(2, 4, 4, 4).sum(dim=(1, 3)).flatten()
    assert torch.equal(magnitude.pattern.linear_index(), norms.topk(magnitude.nnz).indices.sort().values)
    # frozen subset keeps every weight: the dense view is the original layer
    frozen = SparseLinear.from_linear(linear, sparsity=0.5, block_size=4, inactive="frozen")
    assert torch.equal(frozen.to_dense(), linear.weight.detach())
    x = torch.randn(3, 16)
    torch.testing.assert_close(frozen(x), linear(x))
    torch.testing.assert_close(frozen.to_linear()(x), linear(x))
    with pytest.raises(PatternError, match="unknown selection"):
        SparseLinear.from_linear(linear, selection="movement")
    with pytest.raises(PatternError, match="unknown inactive"):
        SparseLinear(16, 8, inactive="random")


def test_frozen_subset_is_not_trained():
    layer = SparseLinear(16, 8, sparsity=0.75, block_size=2, inactive="frozen")
    frozen = layer.frozen.clone()
    assert frozen.abs().sum() > 0 and torch.all(frozen[layer.mask()] == 0)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    assert torch.equal(layer.frozen, frozen)
    assert "frozen" in dict(layer.named_buffers())


def test_sparsify_and_densify_a_model():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 2))
    x = torch.randn(4, 16)
    names = sparsify_(model, lambda name, m: m.out_features != 2, sparsity=0.75, block_size=4, seed=3,
                      inactive="frozen")
    assert names == ["0", "2"]
    layers = sparse_weights(model)
    assert [n for n, _ in layers] == names and type(model[3]) is nn.Linear
    assert all(m.sparsity == pytest.approx(0.75) for _, m in layers)
    # layer i draws its pattern from generator (seed, i)
    expected = SparseLinear.from_linear(nn.Linear(32, 16), sparsity=0.75, block_size=4,
                                        generator=seeded_generator(3, 1))
    assert layers[1][1].pattern.equal(expected.pattern)
    y = model(x)
    assert densify_(model) == names
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))
    torch.testing.assert_close(model(x), y)


def test_dense_gradient_recording():
    layer = SparseLinear(8, 4, sparsity=0.5, block_size=2)
    x1, x2 = torch.randn(3, 8), torch.randn(5, 8)
    layer(x1).sum().backward()
    assert layer.dense_grad is None  # never on ordinary steps
    layer.record_dense_grad = True
    gy = torch.randn(3, 4)
    layer(x1).backward(gy)
    torch.testing.assert_close(layer.dense_grad, gy.t() @ x1)
    gy2 = torch.randn(5, 4)
    layer(x2).backward(gy2)  # micro-batches accumulate
    torch.testing.assert_close(layer.dense_grad, gy.t() @ x1 + gy2.t() @ x2)
    with torch.no_grad():
        layer(x1)  # inference does not record
    torch.testing.assert_close(layer.dense_grad, gy.t() @ x1 + gy2.t() @ x2)
