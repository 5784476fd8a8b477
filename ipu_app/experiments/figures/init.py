"""Initialisation of the sparse weights (Fig. 9): loss against the learning rate per init scheme."""

from __future__ import annotations

from ..plotting import pyplot
from ..runs import Run
from .common import Tables, lr_curves, per_lr_table, require


def _init(r: Run) -> str:
    return str(r.get("sparsity.init"))


def tables(runs: list[Run], **_) -> Tables:
    runs = require(runs, "sparse runs", "init", lambda r: r.mode != "dense")
    out = Tables(data={"runs": runs})
    out.add("init", per_lr_table(runs, "init", _init))
    return out


def plot(result: Tables) -> dict:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lr_curves(ax, result.data["runs"], _init)
    ax.set_title("Initialisation of sparse weights (Fig. 9)")
    return {"init": fig}
