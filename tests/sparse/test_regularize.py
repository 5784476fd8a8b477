import pytest
import torch

from ipu_app.sparse.regularize import group_lasso_, group_lasso_penalty


def test_group_lasso_shrinks_uniform_blocks_like_l1_whatever_the_block_size():
    for b in (1, 4, 16):
        values = torch.full((3, b, b), 0.05)
        group_lasso_(values, lr=0.1, coefficient=0.05, w_std=0.02, eps=0.0)
        torch.testing.assert_close(values, torch.full((3, b, b), 0.05 - 0.1 * 0.05 * 0.02))


def test_group_lasso_pulls_small_blocks_relatively_harder():
    values = torch.stack([torch.full((4, 4), 0.1), torch.full((4, 4), 0.001)])
    before = values.clone()
    group_lasso_(values, lr=1.0, coefficient=0.01)
    relative = 1 - values / before
    assert relative[1].mean() > 50 * relative[0].mean()
    # the step is the decoupled gradient of the penalty
    v = before.clone().requires_grad_(True)
    penalty = 0.02 * 4 * v.pow(2).sum(dim=(1, 2)).add(1e-6).sqrt().sum()
    penalty.backward()
    torch.testing.assert_close(before - values, 1.0 * 0.01 * v.grad)
    assert group_lasso_penalty(before) == pytest.approx(0.02 * 4 * (0.1 * 4 + 0.001 * 4), rel=1e-6)


def test_a_zero_coefficient_leaves_the_values_exactly():
    v = torch.randn(5, 2, 2)
    assert torch.equal(group_lasso_(v.clone(), 0.1, 0.0), v)
