"""Random sparsity patterns and the initial values of sparse weights (paper Fig. 9)."""

from __future__ import annotations

import math

import torch

from ..choices import VALUE_INITS
from .pattern import BlockPattern, PatternError, check_block_shape, nnz_blocks

DEFAULT_INIT_STD = 0.02  # BERT's initializer range, the paper's default


def random_pattern(
    out_features: int,
    in_features: int,
    block_size: int,
    sparsity: float,
    generator: torch.Generator | None = None,
) -> BlockPattern:
    """A uniformly random pattern with ``nnz_blocks(...)`` active blocks."""
    nnz = nnz_blocks(out_features, in_features, block_size, sparsity)
    grid_rows, grid_cols = check_block_shape(out_features, in_features, block_size)
    index = torch.randperm(grid_rows * grid_cols, generator=generator)[:nnz]
    return BlockPattern.from_linear_index(out_features, in_features, block_size, index)


def init_std(method: str, fan_in: int, fan_out: int, sparsity: float, std: float = DEFAULT_INIT_STD) -> float:
    """Standard deviation of the initial weights for an init method.

    ``*_rescaled`` raise the variance by ``1 / (1 - s)`` so a sparse layer keeps
    the activation variance of its dense counterpart (Evci et al. 2020).
    """
    if method not in VALUE_INITS:
        raise PatternError(f"unknown init {method!r}; use one of {list(VALUE_INITS)}")
    if method.startswith("trunc_normal"):
        base = std
    else:  # Glorot: uniform(-a, a), a = sqrt(6 / (fan_in + fan_out)), std = a / sqrt(3)
        base = math.sqrt(2.0 / (fan_in + fan_out))
    if method.endswith("_rescaled"):
        base /= math.sqrt(1.0 - sparsity)
    return base


@torch.no_grad()
def init_values_(
    values: torch.Tensor,
    method: str,
    fan_in: int,
    fan_out: int,
    sparsity: float,
    std: float = DEFAULT_INIT_STD,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill ``values`` in place: truncated normal (cut at 2 std) or Glorot uniform."""
    sigma = init_std(method, fan_in, fan_out, sparsity, std)
    sample = torch.empty(values.shape, dtype=torch.float32)
    if method.startswith("trunc_normal"):
        torch.nn.init.trunc_normal_(sample, 0.0, sigma, -2 * sigma, 2 * sigma, generator=generator)
    else:
        limit = sigma * math.sqrt(3.0)
        torch.nn.init.uniform_(sample, -limit, limit, generator=generator)
    return values.copy_(sample)
