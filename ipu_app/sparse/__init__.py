"""Backend-neutral DynSparse: patterns, schedules, scoring, regrowth, exploration, the updater, regularisers, FLOPs.

Submodules are imported on first use, so that torch-free ones (``flops``, ``schedule``) load without torch.
"""

import importlib

_EXPORTS = {"SUPPORTED_BLOCK_SIZES": "pattern", "BlockPattern": "pattern", "PatternError": "pattern",
            "nnz_blocks": "pattern", "UpdateSchedule": "schedule", "pruning_ratio_at": "schedule"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
