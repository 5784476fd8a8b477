import pytest
import torch

from ipu_app.sparse.scoring import (
    block_norms,
    dense_block_norms,
    largest,
    num_to_prune,
    select_prune,
    smallest,
)
from ipu_app.sparse.regrowth import select_regrow_gradient, select_regrow_random


def test_block_norms_by_metric():
    values = torch.tensor([[[1.0, -2.0], [2.0, 0.0]], [[-3.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(block_norms(values, "l1"), torch.tensor([5.0, 3.0]))
    torch.testing.assert_close(block_norms(values, "l2"), torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(block_norms(values, "linf"), torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="unknown block_metric"):
        block_norms(values, "l3")


def test_dense_block_norms_are_row_major_over_the_grid():
    dense = torch.arange(16.0).reshape(4, 4)
    # blocks: [[0,1],[4,5]] [[2,3],[6,7]] [[8,9],[12,13]] [[10,11],[14,15]]
    torch.testing.assert_close(dense_block_norms(dense, 2, "l1"), torch.tensor([10.0, 18.0, 42.0, 50.0]))


def test_num_to_prune_is_ceil_of_fraction_of_active_blocks():
    assert num_to_prune(0.5, 10, 100) == 5
    assert num_to_prune(0.25, 10, 100) == 3  # ceil(2.5)
    assert num_to_prune(0.1, 10, 100) == 1  # 0.1 * 10 is 1.0000000000000002 in floats: still 1
    assert num_to_prune(0.0, 10, 100) == 0
    assert num_to_prune(1.0, 10, 4) == 4  # capped by room to regrow


def test_selection_breaks_ties_towards_lower_index():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 2.0])
    assert smallest(scores, 3).tolist() == [0, 1, 3]
    assert largest(scores, 2).tolist() == [0, 5]
    assert select_prune(scores, 0).numel() == 0
    with pytest.raises(ValueError):
        smallest(scores, 7)


def test_random_regrowth_excludes_occupied_and_is_deterministic():
    occupied = torch.zeros(1000, dtype=torch.bool)
    occupied[torch.randperm(1000)[:100]] = True
    a = select_regrow_random(occupied, 50, torch.Generator().manual_seed(3))
    b = select_regrow_random(occupied, 50, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.numel() == 50 and a.unique().numel() == 50
    assert not occupied[a].any()
    # the permutation path (k a large share of the free positions)
    c = select_regrow_random(occupied, 800, torch.Generator().manual_seed(3))
    assert c.unique().numel() == 800 and not occupied[c].any()
    with pytest.raises(ValueError, match="only 900 positions are free"):
        select_regrow_random(occupied, 901, torch.Generator())


@pytest.mark.parametrize("k", [3, 12])  # rejection sampling and permutation paths
def test_random_regrowth_is_uniform(k):
    occupied = torch.zeros(40, dtype=torch.bool)
    occupied[:8] = True
    counts = torch.zeros(40)
    trials = 3000
    for seed in range(trials):
        counts[select_regrow_random(occupied, k, torch.Generator().manual_seed(seed))] += 1
    assert counts[:8].sum() == 0
    expected = trials * k / 32
    chi2 = float(((counts[8:] - expected) ** 2 / expected).sum())
    assert chi2 < 70  # 31 degrees of freedom: p < 1e-4 for a fair sampler


def test_gradient_regrowth_takes_largest_inactive_scores():
    scores = torch.tensor([9.0, 1.0, 5.0, 5.0, 0.5, 7.0])
    occupied = torch.tensor([True, False, False, False, False, True])
    assert select_regrow_gradient(scores, occupied, 2).tolist() == [2, 3]
    assert select_regrow_gradient(scores, occupied, 3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="free"):
        select_regrow_gradient(scores, occupied, 5)
