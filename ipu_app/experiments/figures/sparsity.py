"""Sparsity (Fig. 4): DynSparse and static at several sparsities, on the dense family's Pareto plot."""

from __future__ import annotations

from ..plotting import pyplot
from ..runs import Run, best_over_lr, dense_curve
from .common import METHOD_LABELS, Tables, require, series, style
from .pareto import draw_pareto, pareto_table


def tables(runs: list[Run], **_) -> Tables:
    require(runs, "DynSparse or static runs", "sparsity", lambda r: r.mode != "dense")
    curve = dense_curve(runs)
    table = pareto_table(runs, curve, lambda r: r.mode != "dense")
    table.rows.sort(key=lambda row: (row["setting"] != "dense", row["setting"], row["model"], row["sparsity"]))
    out = Tables(data={"runs": runs, "curve": curve})
    out.add("sparsity", table)
    return out


def plot(result: Tables) -> dict:
    runs, curve = result.data["runs"], result.data["curve"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    draw_pareto(axes[0], runs, curve, lambda r: f"{METHOD_LABELS[r.method]} {r.size}")
    for point in best_over_lr([r for r in runs if r.mode != "dense"],
                              key=lambda r: (r.method, r.size, round(r.sparsity, 6))):
        axes[0].annotate(f"s={point.first.sparsity:g}", (point.first.flops, point.loss), textcoords="offset points",
                         xytext=(4, 6), fontsize=7)
    axes[0].set_title("DynSparse at several sparsities (Fig. 4)")
    for (method, size), points in series(runs, lambda r: (r.method, r.size), lambda r: r.sparsity):
        axes[1].errorbar([p.first.sparsity for p in points], [p.loss for p in points], yerr=[p.std for p in points],
                         marker="o", capsize=3, label=f"{METHOD_LABELS[method]} {size}")
    style(axes[1], "sparsity s", "validation MLM loss")
    return {"sparsity": fig}
