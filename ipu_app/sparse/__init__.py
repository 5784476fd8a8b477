"""Backend-neutral DynSparse: patterns, schedules, scoring, the updater, regularisers, FLOPs."""

from .pattern import SUPPORTED_BLOCK_SIZES, BlockPattern, PatternError, nnz_blocks
from .schedule import UpdateSchedule, pruning_ratio_at

__all__ = ["SUPPORTED_BLOCK_SIZES", "BlockPattern", "PatternError", "nnz_blocks", "UpdateSchedule", "pruning_ratio_at"]
