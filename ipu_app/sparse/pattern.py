"""The one representation of a sparse weight: a fixed-nnz block pattern.

A weight of shape ``[out, in]`` is cut into ``b x b`` blocks on a grid of
``out/b x in/b``. The pattern is the sorted (row-major) list of the grid
coordinates of the ``nnz`` active blocks; the values live elsewhere, as a
``[nnz, b, b]`` tensor whose slot ``i`` belongs to block ``(rows[i], cols[i])``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..choices import SUPPORTED_BLOCK_SIZES


class PatternError(ValueError):
    """A block pattern, shape, block size or sparsity ratio is invalid."""


def check_block_shape(out_features: int, in_features: int, block_size: int) -> tuple[int, int]:
    """Validate a weight shape against a block size; return the block grid ``(rows, cols)``."""
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise PatternError(
            f"block_size={block_size} is not supported; use one of {list(SUPPORTED_BLOCK_SIZES)}"
        )
    if out_features <= 0 or in_features <= 0:
        raise PatternError(f"weight shape [{out_features}, {in_features}] must be positive")
    if out_features % block_size or in_features % block_size:
        raise PatternError(
            f"block_size={block_size} must divide both dims of the weight [{out_features}, {in_features}]"
        )
    return out_features // block_size, in_features // block_size


def check_sparsity(sparsity: float) -> float:
    """Validate a sparsity ratio (fraction of zero weights), 0 <= s < 1."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or math.isnan(sparsity):
        raise PatternError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise PatternError(f"sparsity must be in [0, 1) (fraction of zero weights), got {sparsity}")
    return float(sparsity)


def nnz_blocks(out_features: int, in_features: int, block_size: int, sparsity: float) -> int:
    """Number of active blocks: ``round((1 - s) * out/b * in/b)``, half rounded up, at least 1."""
    grid_rows, grid_cols = check_block_shape(out_features, in_features, block_size)
    sparsity = check_sparsity(sparsity)
    total = grid_rows * grid_cols
    # Round half up on a value nudged against float noise (0.1 * 100 = 9.999999999999998).
    nnz = math.floor((1.0 - sparsity) * total + 0.5 + 1e-9)
    return min(total, max(1, nnz))


@dataclass(frozen=True)
class BlockPattern:
    """Sorted, unique block coordinates of a ``[out_features, in_features]`` weight.

    ``rows`` and ``cols`` are int32 tensors of length ``nnz``. The tensors may be
    the buffers of a module (no copy is made), so an in-place pattern update is
    seen by every holder of the pattern.
    """

    out_features: int
    in_features: int
    block_size: int
    rows: torch.Tensor
    cols: torch.Tensor

    # ----------------------------------------------------------------- basics
    @property
    def grid(self) -> tuple[int, int]:
        """Block grid shape ``(out/b, in/b)``."""
        return self.out_features // self.block_size, self.in_features // self.block_size

    @property
    def num_blocks(self) -> int:
        """Number of block positions of the dense weight."""
        r, c = self.grid
        return r * c

    @property
    def nnz(self) -> int:
        """Number of active blocks."""
        return int(self.rows.numel())

    @property
    def density(self) -> float:
        """Fraction of active weights, ``1 - sparsity``."""
        return self.nnz / self.num_blocks

    @property
    def sparsity(self) -> float:
        """Actual fraction of zero (inactive) weights."""
        return 1.0 - self.density

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def linear_index(self) -> torch.Tensor:
        """Row-major block position ``row * (in/b) + col`` of every slot (int64)."""
        return self.rows.long() * self.grid[1] + self.cols.long()

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_linear_index(
        cls, out_features: int, in_features: int, block_size: int, index: torch.Tensor
    ) -> "BlockPattern":
        """Build a pattern from block positions (any order); validates and sorts them."""
        _, grid_cols = check_block_shape(out_features, in_features, block_size)
        index = torch.as_tensor(index).long().flatten().sort().values
        pattern = cls(
            out_features,
            in_features,
            block_size,
            (index // grid_cols).to(torch.int32),
            (index % grid_cols).to(torch.int32),
        )
        pattern.validate()
        return pattern

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_size: int) -> "BlockPattern":
        """Build a pattern from a boolean ``[out/b, in/b]`` block mask."""
        if block_mask.dim() != 2:
            raise PatternError(f"block mask must be 2-D, got shape {tuple(block_mask.shape)}")
        grid_rows, grid_cols = block_mask.shape
        index = torch.nonzero(block_mask.flatten().bool()).flatten()
        return cls.from_linear_index(grid_rows * block_size, grid_cols * block_size, block_size, index)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int) -> "BlockPattern":
        """Build a pattern from an element mask whose blocks are all-on or all-off."""
        if mask.dim() != 2:
            raise PatternError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
        out_features, in_features = mask.shape
        grid_rows, grid_cols = check_block_shape(out_features, in_features, block_size)
        blocks = mask.bool().reshape(grid_rows, block_size, grid_cols, block_size)
        any_on, all_on = blocks.any(dim=(1, 3)), blocks.all(dim=(1, 3))
        if not torch.equal(any_on, all_on):
            raise PatternError(f"mask is not block-structured at block_size={block_size}")
        return cls.from_block_mask(any_on, block_size)

    # ------------------------------------------------------------- validation
    def validate(self, expected_nnz: int | None = None) -> None:
        """Raise PatternError unless coordinates are int32, in range, unique and sorted."""
        grid_rows, grid_cols = check_block_shape(self.out_features, self.in_features, self.block_size)
        if self.rows.dtype != torch.int32 or self.cols.dtype != torch.int32:
            raise PatternError(f"block coordinates must be int32, got {self.rows.dtype}/{self.cols.dtype}")
        if self.rows.dim() != 1 or self.rows.shape != self.cols.shape:
            raise PatternError(
                f"rows and cols must be 1-D of equal length, got {tuple(self.rows.shape)} and {tuple(self.cols.shape)}"
            )
        if self.nnz == 0:
            raise PatternError("a pattern needs at least one active block")
        if expected_nnz is not None and self.nnz != expected_nnz:
            raise PatternError(f"pattern has {self.nnz} blocks, expected {expected_nnz}")
        if int(self.rows.min()) < 0 or int(self.rows.max()) >= grid_rows:
            raise PatternError(f"block row out of range [0, {grid_rows})")
        if int(self.cols.min()) < 0 or int(self.cols.max()) >= grid_cols:
            raise PatternError(f"block column out of range [0, {grid_cols})")
        index = self.linear_index()
        if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            raise PatternError("block coordinates must be unique and sorted row-major")

    # ------------------------------------------------------------ conversions
    def block_mask(self) -> torch.Tensor:
        """Boolean ``[out/b, in/b]`` mask of active blocks."""
        mask = torch.zeros(self.num_blocks, dtype=torch.bool, device=self.rows.device)
        mask[self.linear_index()] = True
        return mask.reshape(self.grid)

    def mask(self) -> torch.Tensor:
        """Boolean ``[out, in]`` element mask."""
        b = self.block_size
        return self.block_mask().repeat_interleave(b, dim=0).repeat_interleave(b, dim=1)

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter ``[nnz, b, b]`` values into a dense ``[out, in]`` weight (differentiable)."""
        self._check_values(values)
        b = self.block_size
        grid_rows, grid_cols = self.grid
        dense = values.new_zeros(grid_rows, grid_cols, b, b)
        dense = dense.index_put((self.rows.long(), self.cols.long()), values)
        return dense.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """Gather the active blocks of a dense ``[out, in]`` tensor as ``[nnz, b, b]`` (differentiable)."""
        if tuple(dense.shape) != self.shape:
            raise PatternError(f"dense tensor has shape {tuple(dense.shape)}, expected {self.shape}")
        return blockify(dense, self.block_size)[self.rows.long(), self.cols.long()]

    def crow_indices(self) -> torch.Tensor:
        """BSR row pointers (int32, length ``out/b + 1``)."""
        counts = torch.bincount(self.rows.long(), minlength=self.grid[0])
        crow = torch.zeros(self.grid[0] + 1, dtype=torch.int32, device=self.rows.device)
        crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
        return crow

    def to_bsr(self, values: torch.Tensor) -> torch.Tensor:
        """The weight as a ``torch.sparse_bsr_tensor`` (values are shared, not copied)."""
        self._check_values(values)
        return torch.sparse_bsr_tensor(
            self.crow_indices(), self.cols, values, size=self.shape, dtype=values.dtype,
            check_invariants=False,
        )

    def to_coo(self, values: torch.Tensor | None = None, elementwise: bool = False):
        """COO triplets ``(rows, cols, values)``.

        Block-level by default (block coordinates and ``[nnz, b, b]`` values, the
        form block-sparse libraries take); ``elementwise=True`` gives one triplet per
        weight, in row-major element order of each block, sorted by block.
        """
        if not elementwise:
            return self.rows, self.cols, values
        if values is not None:
            self._check_values(values)
        b = self.block_size
        offs = torch.arange(b, device=self.rows.device)
        r = (self.rows.long()[:, None, None] * b + offs[None, :, None]).expand(-1, b, b).reshape(-1)
        c = (self.cols.long()[:, None, None] * b + offs[None, None, :]).expand(-1, b, b).reshape(-1)
        v = None if values is None else values.reshape(-1)
        return r.to(torch.int32), c.to(torch.int32), v

    def transposed(self) -> tuple["BlockPattern", torch.Tensor]:
        """The pattern of ``W^T`` and the slot permutation that maps this pattern's values to it."""
        index_t = self.cols.long() * self.grid[0] + self.rows.long()
        perm = torch.argsort(index_t)
        pattern_t = BlockPattern(
            self.in_features,
            self.out_features,
            self.block_size,
            self.cols[perm].contiguous(),
            self.rows[perm].contiguous(),
        )
        return pattern_t, perm

    def clone(self) -> "BlockPattern":
        return BlockPattern(self.out_features, self.in_features, self.block_size, self.rows.clone(), self.cols.clone())

    def equal(self, other: "BlockPattern") -> bool:
        return (
            self.shape == other.shape
            and self.block_size == other.block_size
            and torch.equal(self.rows.cpu(), other.rows.cpu())
            and torch.equal(self.cols.cpu(), other.cols.cpu())
        )

    def _check_values(self, values: torch.Tensor) -> None:
        b = self.block_size
        if tuple(values.shape) != (self.nnz, b, b):
            raise PatternError(f"values have shape {tuple(values.shape)}, expected {(self.nnz, b, b)}")


def blockify(dense: torch.Tensor, block_size: int) -> torch.Tensor:
    """View a ``[out, in]`` tensor as ``[out/b, in/b, b, b]`` blocks (a copy when needed)."""
    out_features, in_features = dense.shape
    grid_rows, grid_cols = check_block_shape(out_features, in_features, block_size)
    b = block_size
    return dense.reshape(grid_rows, b, grid_cols, b).permute(0, 2, 1, 3)
