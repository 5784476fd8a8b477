"""One module per figure of ``python -m ipu_app report``. Each has a pure ``tables(runs, warn=, **options)``
(the numbers, from run directories only: a ``common.Tables``) and a ``plot(tables)`` (matplotlib
figures by file stem); ``report.py`` writes both. A new figure is a new module listed here."""

from __future__ import annotations

import importlib

NAMES = ("pareto", "sparsity", "prune_ratio_updates", "block_metric", "group_lasso", "init", "zero_vs_frozen",
         "freeze_unfreeze", "exploration", "learning_rate", "paired", "capacity", "horizon", "horizon_pilot")


def figure_module(name: str):
    """The module of figure ``name`` (``tables`` and ``plot``)."""
    if name not in NAMES:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")
