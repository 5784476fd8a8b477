import numpy as np
import pytest
import torch

from ipu_app.ipu.popsparse import (
    PopsparseError,
    dense_from_dynamic_coo,
    dynamic_coo,
    dynamic_params,
    sparse_matmul_options,
    static_bsmatmul,
    static_bsmatmul_reference,
)
from ipu_app.ops.reference import linear
from ipu_app.sparse.init import random_pattern


@pytest.mark.parametrize("block", [1, 4, 8, 16])
def test_dynamic_triplets_describe_the_transposed_weight(block):
    pattern = random_pattern(64, 128, block, 0.75, generator=torch.Generator().manual_seed(block))
    values = torch.randn(pattern.nnz, block, block)
    coo = dynamic_coo(pattern, values)
    dense_w = pattern.to_dense(values).numpy()  # [out, in]
    v = dense_from_dynamic_coo(coo, 128, 64, block)
    np.testing.assert_array_equal(v, dense_w.T)
    # Row-major in V = Wᵀ, element coordinates at block corners, int32 for the device.
    keys = list(zip(coo.rows.tolist(), coo.cols.tolist()))
    assert keys == sorted(keys) and len(set(keys)) == pattern.nnz
    assert coo.rows.dtype == np.int32 and all(r % block == 0 for r in coo.rows)
    # ``order`` lays out anything slot-shaped (values, moments) the same way.
    np.testing.assert_array_equal(coo.values, values.numpy()[coo.order].transpose(0, 2, 1).reshape(pattern.nnz, -1))
    params = dynamic_params(pattern, batch_size=4096)
    assert params["max_non_zero_blocks"] == pattern.nnz and params["input_size"] == 128
    assert params["nz_ratio"] == pytest.approx(0.25, abs=0.01)


def test_static_op_inputs_compute_the_layer():
    pattern = random_pattern(64, 128, 16, 0.75, generator=torch.Generator().manual_seed(1))
    values = torch.randn(pattern.nnz, 16, 16)
    x = torch.randn(32, 128)
    op = static_bsmatmul(pattern, values, tokens=32)
    assert op.attributes["matrix_dims"] == [32, 128, 64] and op.attributes["block_size"] == [16, 16, 16]
    assert sum(op.attributes["sparsity_mask"]) == pattern.nnz == op.attributes["bsr_rhs_lengths_per_2d_plane"][0]
    assert op.weight.shape == (pattern.nnz, 256)
    np.testing.assert_allclose(static_bsmatmul_reference(x.numpy(), op), linear(x, values, pattern).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_what_popsparse_cannot_take():
    with pytest.raises(PopsparseError, match="divisible by 16 for float16"):
        static_bsmatmul(random_pattern(64, 64, 8, 0.5, generator=torch.Generator().manual_seed(0)), torch.randn(32, 8, 8), tokens=32)
    assert static_bsmatmul(random_pattern(64, 64, 8, 0.5, generator=torch.Generator().manual_seed(0)), torch.randn(32, 8, 8), tokens=32,
                           dtype="float32").attributes["block_size"] == [16, 8, 8]
    with pytest.raises(PopsparseError, match="not a multiple of the lhs block"):
        static_bsmatmul(random_pattern(64, 64, 16, 0.5, generator=torch.Generator().manual_seed(0)), torch.randn(8, 16, 16), tokens=30)
    with pytest.raises(PopsparseError, match="half partials with 1x1"):
        sparse_matmul_options(partials="half", block_size=1)
    assert sparse_matmul_options()["metaInfoBucketOversizeProportion"] == "0.2"
    with pytest.raises(PopsparseError, match="values have shape"):
        dynamic_coo(random_pattern(64, 64, 4, 0.5, generator=torch.Generator().manual_seed(0)), torch.randn(3, 4, 4))
