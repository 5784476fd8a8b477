import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ipu_app.sparse.init import random_pattern
from ipu_app.sparse.pattern import SUPPORTED_BLOCK_SIZES, BlockPattern, PatternError, nnz_blocks


@st.composite
def patterns(draw):
    b = draw(st.sampled_from(SUPPORTED_BLOCK_SIZES[:5]))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    s = draw(st.floats(0.0, 0.99))
    seed = draw(st.integers(0, 2**31))
    return random_pattern(rows * b, cols * b, b, s, torch.Generator().manual_seed(seed)), s


def test_nnz_formula_matches_paper_rule():
    assert nnz_blocks(512, 2048, 1, 0.9) == round(0.1 * 512 * 2048)
    assert nnz_blocks(512, 2048, 16, 0.9) == 410  # 0.1 * 32 * 128 = 409.6
    assert nnz_blocks(64, 64, 16, 0.9) == 2  # 0.1 * 16 = 1.6
    assert nnz_blocks(16, 16, 16, 0.99) == 1  # at least one block
    assert nnz_blocks(40, 40, 4, 0.95) == 5  # 0.05 * 100 = 5 despite float noise
    assert nnz_blocks(8, 8, 4, 0.0) == 4


@pytest.mark.parametrize(
    "shape, b, s, match",
    [
        ((64, 64), 3, 0.9, "not supported"),
        ((64, 60), 16, 0.9, "must divide"),
        ((0, 64), 1, 0.9, "positive"),
        ((64, 64), 4, 1.0, r"\[0, 1\)"),
        ((64, 64), 4, -0.1, r"\[0, 1\)"),
        ((64, 64), 4, float("nan"), "number"),
    ],
)
def test_invalid_shapes_and_ratios_raise(shape, b, s, match):
    with pytest.raises(PatternError, match=match):
        nnz_blocks(*shape, b, s)


@given(patterns())
def test_random_pattern_properties(case):
    pattern, s = case
    pattern.validate()
    assert pattern.nnz == nnz_blocks(pattern.out_features, pattern.in_features, pattern.block_size, s)
    assert pattern.rows.dtype == torch.int32 and pattern.cols.dtype == torch.int32
    index = pattern.linear_index()
    assert torch.equal(index, index.unique())  # unique and sorted


@given(patterns())
def test_conversions_agree(case):
    pattern, _ = case
    b = pattern.block_size
    values = torch.randn(pattern.nnz, b, b, dtype=torch.float64)
    dense = pattern.to_dense(values)
    mask = pattern.mask()
    assert int(mask.sum()) == pattern.nnz * b * b
    assert torch.all(dense[~mask] == 0)
    # gather inverts scatter
    assert torch.equal(pattern.gather(dense), values)
    # BSR is the same matrix
    assert torch.equal(pattern.to_bsr(values).to_dense(), dense)
    crow = pattern.crow_indices()
    assert crow[0] == 0 and crow[-1] == pattern.nnz and bool((crow[1:] >= crow[:-1]).all())
    # element COO triplets list exactly the masked entries with their values
    r, c, v = pattern.to_coo(values, elementwise=True)
    rebuilt = torch.zeros_like(dense)
    rebuilt[r.long(), c.long()] = v
    assert torch.equal(rebuilt, dense) and r.numel() == int(mask.sum())
    # block triplets, masks and the round trips through them
    rows, cols, vals = pattern.to_coo(values)
    assert rows is pattern.rows and vals is values
    assert BlockPattern.from_mask(mask, b).equal(pattern)
    assert BlockPattern.from_block_mask(pattern.block_mask(), b).equal(pattern)
    # transposed pattern holds the transposed matrix
    pattern_t, perm = pattern.transposed()
    pattern_t.validate()
    assert torch.equal(pattern_t.to_dense(values[perm].transpose(1, 2)), dense.t())


def test_validate_rejects_broken_patterns():
    good = random_pattern(32, 32, 8, 0.5, torch.Generator().manual_seed(0))
    cases = {
        "unique and sorted": BlockPattern(32, 32, 8, good.rows.flip(0), good.cols.flip(0)),
        "out of range": BlockPattern(32, 32, 8, good.rows + 4, good.cols),
        "int32": BlockPattern(32, 32, 8, good.rows.long(), good.cols.long()),
        "at least one": BlockPattern(32, 32, 8, good.rows[:0], good.cols[:0]),
    }
    for message, broken in cases.items():
        with pytest.raises(PatternError, match=message):
            broken.validate()
    with pytest.raises(PatternError, match="expected 3"):
        good.validate(expected_nnz=3)
    with pytest.raises(PatternError, match="values have shape"):
        good.to_dense(torch.zeros(good.nnz, 4, 4))


def test_from_mask_rejects_non_block_mask():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(PatternError, match="not block-structured"):
        BlockPattern.from_mask(mask, 4)
    assert BlockPattern.from_mask(mask, 1).nnz == 1


def test_sparse_bsr_matmul_matches_dense():
    pattern = random_pattern(64, 32, 16, 0.5, torch.Generator().manual_seed(1))
    values = torch.randn(pattern.nnz, 16, 16)
    x = torch.randn(32, 5)
    torch.testing.assert_close(pattern.to_bsr(values) @ x, pattern.to_dense(values) @ x)
