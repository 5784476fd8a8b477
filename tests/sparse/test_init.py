import math

import pytest
import torch

from ipu_app.seeding import derive_seed, seeded_generator
from ipu_app.sparse.init import init_std, init_values_, random_pattern
from ipu_app.sparse.pattern import PatternError


def test_seeded_patterns_are_reproducible_and_distinct():
    a = random_pattern(128, 256, 4, 0.9, seeded_generator(7, 0))
    b = random_pattern(128, 256, 4, 0.9, seeded_generator(7, 0))
    c = random_pattern(128, 256, 4, 0.9, seeded_generator(7, 1))
    assert a.equal(b)
    assert not a.equal(c)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 3, 2)
    assert 0 <= derive_seed(-5, 2**40) < 2**63


def test_random_pattern_is_uniform_over_positions():
    counts = torch.zeros(16 * 16)
    for seed in range(400):
        counts += random_pattern(16, 16, 1, 0.75, seeded_generator(seed)).block_mask().flatten().float()
    # each position is active with probability 0.25: mean 100 of 400, sd ~8.7
    assert counts.sum() == 400 * 64
    assert counts.min() > 60 and counts.max() < 140


def test_truncated_normal_statistics():
    values = torch.empty(200_000)
    init_values_(values, "trunc_normal", 512, 512, 0.9, generator=torch.Generator().manual_seed(0))
    assert values.abs().max() <= 0.04  # cut at 2 std
    # std of a normal truncated at +-2 sigma is 0.8796 sigma
    assert values.std().item() == pytest.approx(0.02 * 0.8796, rel=0.02)
    assert values.mean().item() == pytest.approx(0.0, abs=2e-4)


def test_glorot_and_rescaled_variants():
    fan_in, fan_out, s = 512, 2048, 0.9
    assert init_std("glorot", fan_in, fan_out, s) == pytest.approx(math.sqrt(2 / (fan_in + fan_out)))
    assert init_std("glorot_rescaled", fan_in, fan_out, s) == pytest.approx(math.sqrt(2 / ((fan_in + fan_out) * (1 - s))))
    assert init_std("trunc_normal_rescaled", fan_in, fan_out, s) == pytest.approx(0.02 / math.sqrt(0.1))
    values = torch.empty(100_000)
    init_values_(values, "glorot", fan_in, fan_out, s, generator=torch.Generator().manual_seed(0))
    limit = math.sqrt(6 / (fan_in + fan_out))
    assert values.abs().max() <= limit and values.abs().max() > 0.99 * limit
    with pytest.raises(PatternError, match="unknown init"):
        init_std("xavier", 1, 1, 0.5)
