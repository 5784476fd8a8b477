"""Pareto (Fig. 3, Fig. 8, Table 1): validation MLM loss against non-embedding FLOPs, the matched
dense loss and the FLOPs reduction factor, per block size."""

from __future__ import annotations

from typing import Callable

from ..plotting import pyplot
from ..runs import DenseCurve, Run, best_over_lr, dense_curve
from .common import METHOD_LABELS, Table, Tables, plain_log_axis, require, style


def pareto_table(runs: list[Run], curve: DenseCurve | None, sparse_test: Callable[[Run], bool]) -> Table:
    table = Table(["setting", "model", "block_size", "sparsity", "learning_rate", "seeds", "flops_per_sequence",
                   "val_mlm_loss", "std", "matched_dense_loss", "flops_reduction_factor", "reduction_bound",
                   "pareto_better"])
    for point in best_over_lr(runs, key=lambda r: (r.method, r.size, r.block_size, round(r.sparsity, 6))):
        r = point.first
        matched = reduction = better = bound = None
        if curve is not None and sparse_test(r):
            matched = curve.matched_loss(r.flops)
            reduction = curve.reduction_factor(r.flops, point.loss)
            bound = curve.reduction_bound(r.flops, point.loss)
            better = None if matched is None else point.loss < matched
        table.add(setting=METHOD_LABELS[r.method], model=r.size, block_size=r.block_size if r.mode != "dense" else None,
                  sparsity=r.sparsity, learning_rate=r.learning_rate, seeds=point.seeds, flops_per_sequence=r.flops,
                  val_mlm_loss=point.loss, std=point.std if point.seeds > 1 else None, matched_dense_loss=matched,
                  flops_reduction_factor=reduction, reduction_bound=bound, pareto_better=better)
    table.rows.sort(key=lambda row: (row["setting"] != "dense", row["setting"], row["flops_per_sequence"],
                                     row["block_size"] or 0))
    if curve is None:
        table.notes.append("fewer than two dense sizes: no matched dense loss or FLOPs reduction factor")
    else:
        table.notes.append("matched dense loss: the dense family's loss at the run's FLOPs, linear in log FLOPs "
                           f"between adjacent sizes ({', '.join(curve.names)}); reduction factor: the run's FLOPs ÷ the "
                           "dense FLOPs reaching the run's loss (< 1: fewer FLOPs than dense)")
        table.notes.append("– : outside the dense family's range (no interpolation); reduction_bound: a loss below "
                           "the largest dense model's needs more dense FLOPs than it has, so the factor is below "
                           "run FLOPs ÷ its FLOPs (and above run FLOPs ÷ the smallest's for a loss above the smallest's)")
    return table


def draw_pareto(ax, runs: list[Run], curve: DenseCurve | None, label: Callable[[Run], str]) -> None:
    if curve is not None:
        ax.plot(curve.flops, curve.loss, "k-o", label="dense family", zorder=3)
        for f, loss, n in zip(curve.flops, curve.loss, curve.names):
            ax.annotate(n, (f, loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
    else:  # one dense size is no curve, but it is in the table: draw it as a point
        dense = best_over_lr([r for r in runs if r.mode == "dense"], key=lambda r: (r.size,))
        for i, point in enumerate(dense):
            ax.errorbar([point.first.flops], [point.loss], yerr=[point.std], fmt="ks", capsize=3, zorder=3,
                        label="dense" if i == 0 else None)
            ax.annotate(point.first.size, (point.first.flops, point.loss), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    found: dict[str, list] = {}
    for point in best_over_lr([r for r in runs if r.mode != "dense"],
                              key=lambda r: (label(r), r.size, round(r.sparsity, 6))):
        found.setdefault(point.key[0], []).append(point)
    for name, points in found.items():
        points.sort(key=lambda p: p.first.flops)
        ax.errorbar([p.first.flops for p in points], [p.loss for p in points], yerr=[p.std for p in points],
                    marker="o", linestyle="--", capsize=3, label=name)
        for p in points:
            ax.annotate(p.first.size, (p.first.flops, p.loss), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    style(ax, "non-embedding FLOPs per sequence", "validation MLM loss", xlog=True)


def tables(runs: list[Run], **_) -> Tables:
    require(runs, "dense runs (the dense family)", "pareto", lambda r: r.mode == "dense")
    curve = dense_curve(runs)
    out = Tables(data={"runs": runs, "curve": curve})
    out.add("pareto", pareto_table(runs, curve, lambda r: r.mode != "dense"))
    # Fig. 8 / Table 1: reduction factor per block size for each sparse model size.
    blocks = Table(["setting", "model", "sparsity", "block_size", "val_mlm_loss", "matched_dense_loss",
                    "flops_reduction_factor"])
    for point in best_over_lr([r for r in runs if r.mode == "dynamic"],
                              key=lambda r: (r.method, r.size, round(r.sparsity, 6), r.block_size)):
        r = point.first
        blocks.add(setting=METHOD_LABELS[r.method], model=r.size, sparsity=r.sparsity, block_size=r.block_size,
                   val_mlm_loss=point.loss, matched_dense_loss=curve.matched_loss(r.flops) if curve else None,
                   flops_reduction_factor=curve.reduction_factor(r.flops, point.loss) if curve else None)
    blocks.rows.sort(key=lambda row: (row["setting"], row["model"], row["sparsity"], row["block_size"]))
    out.add("pareto_block_size", blocks, "FLOPs reduction factor by block size (Fig. 8, Table 1)")
    return out


def plot(result: Tables) -> dict:
    runs, curve = result.data["runs"], result.data["curve"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    draw_pareto(axes[0], runs, curve, lambda r: f"{METHOD_LABELS[r.method]}"
                + (f" b={r.block_size}" if r.mode != "dense" else ""))
    axes[0].set_title("Pareto: MLM loss vs non-embedding FLOPs (Fig. 3)")
    rows = [row for row in result["pareto_block_size"].rows if row["flops_reduction_factor"] is not None]
    for model in sorted({row["model"] for row in rows}):
        mine = sorted((row for row in rows if row["model"] == model), key=lambda row: row["block_size"])
        axes[1].plot([row["block_size"] for row in mine], [row["flops_reduction_factor"] for row in mine], "o-",
                     label=model)
    axes[1].axhline(1.0, color="k", linewidth=0.8)
    axes[1].set_xscale("log", base=2)
    plain_log_axis(axes[1].xaxis)
    axes[1].set_xlabel("block size")
    axes[1].set_ylabel("FLOPs reduction factor (sparse ÷ matched dense)")
    axes[1].set_title("FLOPs reduction by block size (Fig. 8)")
    axes[1].grid(True, alpha=0.3)
    if rows:
        axes[1].legend(fontsize=8)
    else:
        axes[1].text(0.5, 0.5, "no DynSparse run inside the dense range", ha="center", transform=axes[1].transAxes)
    return {"pareto": fig}
