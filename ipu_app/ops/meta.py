"""Kernel metadata of a block pattern: the index lists that fast kernels walk.

A pattern of block size ``b`` is seen by a kernel at its own tile size ``tile`` (``b`` a multiple of
``tile``): each ``b x b`` block is ``(b/tile)^2`` tiles. For the forward product the kernel walks
block rows (``row_ptr``/``row_blk``/``row_col``); for the input gradient it walks block columns of
the transposed pattern (``col_ptr``/``col_blk``/``col_row``); the values gradient visits every tile
at ``(rows[k], cols[k])``. The lists are built once per pattern and cached: a pattern update rewrites
the pattern buffers in place, and the next call sees different coordinates and rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sparse.pattern import BlockPattern


@dataclass(frozen=True)
class KernelMeta:
    tile: int
    grid: tuple[int, int]       # (out/tile, in/tile)
    rows: torch.Tensor          # int32 [ntiles]: tile row of tile k
    cols: torch.Tensor          # int32 [ntiles]: tile column of tile k
    row_ptr: torch.Tensor       # int32 [out/tile + 1]
    row_blk: torch.Tensor       # int32 [ntiles]: tiles in row-major order
    row_col: torch.Tensor       # int32 [ntiles]: their tile columns
    col_ptr: torch.Tensor       # int32 [in/tile + 1]
    col_blk: torch.Tensor       # int32 [ntiles]: tiles in column-major order
    col_row: torch.Tensor       # int32 [ntiles]: their tile rows
    row_used: torch.Tensor      # uint8 [out/tile]: 1 where the tile row has a tile
    col_used: torch.Tensor      # uint8 [in/tile]

    @property
    def ntiles(self) -> int:
        return int(self.rows.numel())


def tile_values(values: torch.Tensor, tile: int) -> torch.Tensor:
    """``[nnz, b, b]`` values as ``[nnz * (b/tile)^2, tile, tile]`` in :func:`build_meta`'s tile order
    (differentiable; a view-free no-op when ``b == tile``)."""
    nnz, b, _ = values.shape
    if b == tile:
        return values
    m = b // tile
    return values.reshape(nnz, m, tile, m, tile).permute(0, 1, 3, 2, 4).reshape(nnz * m * m, tile, tile)


def untile_values(tiles: torch.Tensor, b: int) -> torch.Tensor:
    """The inverse of :func:`tile_values`."""
    tile = tiles.shape[-1]
    if b == tile:
        return tiles
    m = b // tile
    nnz = tiles.shape[0] // (m * m)
    return tiles.reshape(nnz, m, m, tile, tile).permute(0, 1, 3, 2, 4).reshape(nnz, b, b)


def _walk(line: torch.Tensor, other: torch.Tensor, lines: int, others: int):
    """Tiles ordered by (line, other): pointers per line, the order, the other coordinate."""
    order = torch.argsort(line * others + other)
    counts = torch.bincount(line, minlength=lines)
    ptr = torch.zeros(lines + 1, dtype=torch.int64, device=line.device)
    ptr[1:] = torch.cumsum(counts, 0)
    i32 = torch.int32
    return ptr.to(i32), order.to(i32), other[order].to(i32)


def build_meta(pattern: BlockPattern, tile: int) -> KernelMeta:
    """The index lists of ``pattern`` for ``tile x tile`` kernels (``block_size`` a multiple of ``tile``)."""
    b = pattern.block_size
    if b % tile:
        raise ValueError(f"block size {b} is not a multiple of the kernel tile {tile}")
    m = b // tile
    grid = (pattern.out_features // tile, pattern.in_features // tile)
    sub = torch.arange(m, device=pattern.rows.device)
    rows = (pattern.rows.long()[:, None, None] * m + sub[None, :, None]).expand(-1, m, m).reshape(-1)
    cols = (pattern.cols.long()[:, None, None] * m + sub[None, None, :]).expand(-1, m, m).reshape(-1)
    row_ptr, row_blk, row_col = _walk(rows, cols, grid[0], grid[1])
    col_ptr, col_blk, col_row = _walk(cols, rows, grid[1], grid[0])
    i32 = torch.int32
    return KernelMeta(tile, grid, rows.to(i32), cols.to(i32), row_ptr, row_blk, row_col,
                      col_ptr, col_blk, col_row,
                      (row_ptr[1:] > row_ptr[:-1]).to(torch.uint8), (col_ptr[1:] > col_ptr[:-1]).to(torch.uint8))


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter; None for inference tensors, which have none (never a hit)."""
    try:
        return t._version
    except RuntimeError:
        return None


class MetaCache:
    """Per-pattern :class:`KernelMeta`, rebuilt only when the pattern's coordinates change.

    An entry holds the pattern's coordinate tensors themselves (so their memory cannot be reused by
    another pattern) and their version counters, which every in-place write bumps (the updater's
    ``copy_``, ``load_state_dict``). On the CPU a hit is also confirmed by comparing coordinates with
    a private copy (``nnz`` integers, a few µs); on a GPU that comparison would stall the stream
    every layer, so there the version counters decide.
    """

    def __init__(self, tile: int | None, max_entries: int = 512) -> None:
        self.tile = tile  # None: each pattern's own block size
        self.max_entries = max_entries
        self.builds = 0
        self._entries: dict[tuple, tuple] = {}

    def get(self, pattern: BlockPattern) -> KernelMeta:
        rows, cols = pattern.rows, pattern.cols
        key = (rows.data_ptr(), cols.data_ptr(), pattern.shape, pattern.block_size, rows.device)
        versions = (_version(rows), _version(cols))
        entry = self._entries.get(key)
        if entry is not None:
            held_rows, held_cols, held_versions, copies, meta = entry
            if held_rows is rows and held_cols is cols and None not in versions and held_versions == versions and (
                    copies is None or (torch.equal(copies[0], rows) and torch.equal(copies[1], cols))):
                return meta
        meta = build_meta(pattern, self.tile or pattern.block_size)
        self.builds += 1
        if len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        copies = (rows.clone(), cols.clone()) if rows.device.type == "cpu" else None
        self._entries[key] = (rows, cols, versions, copies, meta)
        return meta
