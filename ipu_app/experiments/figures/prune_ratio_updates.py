"""Pruning ratio × number of updates (Fig. 10) and the explored degrees of freedom (Fig. 5)."""

from __future__ import annotations

from ..plotting import pyplot
from ..runs import Run, best_over_lr, recently_grown_ratio
from .common import Table, Tables, require


def tables(runs: list[Run], **_) -> Tables:
    runs = require(runs, "DynSparse runs", "prune_ratio_updates", lambda r: r.mode == "dynamic")
    table = Table(["model", "block_size", "pruning_ratio", "segments", "pr_x_n", "learning_rate", "seeds",
                   "val_mlm_loss", "std", "explored_dof", "pruned_recently_grown"])
    points = best_over_lr(runs, key=lambda r: (r.size, r.block_size, float(r.get("sparsity.pruning_ratio")),
                                               int(r.get("sparsity.segments"))))
    for p in points:
        r = p.first
        pr, n = float(r.get("sparsity.pruning_ratio")), int(r.get("sparsity.segments"))
        table.add(model=r.size, block_size=r.block_size, pruning_ratio=pr, segments=n, pr_x_n=pr * n,
                  learning_rate=r.learning_rate, seeds=p.seeds, val_mlm_loss=p.loss,
                  std=p.std if p.seeds > 1 else None, explored_dof=p.mean(lambda q: q.summary.get("mean_explored_dof")),
                  pruned_recently_grown=p.mean(recently_grown_ratio))
    table.rows.sort(key=lambda row: (row["model"], row["block_size"], row["segments"], row["pruning_ratio"]))
    table.notes.append("explored_dof: final fraction of each dense weight ever active, mean over layers (Fig. 5); "
                       "pruned_recently_grown: fraction of pruned blocks grown at the previous update")
    out = Tables()
    out.add("prune_ratio_updates", table)
    return out


def plot(result: Tables) -> dict:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    rows = result["prune_ratio_updates"].rows
    for by, other, style in (("segments", "pruning_ratio", "o-"), ("pruning_ratio", "segments", "s--")):
        for value in sorted({row[by] for row in rows}):
            mine = sorted((row for row in rows if row[by] == value), key=lambda row: row["pr_x_n"])
            if len(mine) < 2:
                continue
            label = f"{'n' if by == 'segments' else 'pr'} = {value:g}, {'pr' if other == 'pruning_ratio' else 'n'} varied"
            axes[0].plot([row["pr_x_n"] for row in mine], [row["val_mlm_loss"] for row in mine], style, label=label)
            axes[1].plot([row["pr_x_n"] for row in mine], [row["explored_dof"] or float("nan") for row in mine], style,
                         label=label)
    axes[2].scatter([row["explored_dof"] or float("nan") for row in rows], [row["val_mlm_loss"] for row in rows])
    for row in rows:
        axes[2].annotate(f"pr={row['pruning_ratio']:g},n={row['segments']}",
                         (row["explored_dof"] or float("nan"), row["val_mlm_loss"]), fontsize=7)
    axes[0].set_ylabel("validation MLM loss")
    axes[1].set_ylabel("explored degrees of freedom")
    axes[2].set_xlabel("explored degrees of freedom")
    axes[2].set_ylabel("validation MLM loss")
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("pr · n")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].set_title("MLM loss vs pr·n (Fig. 10)")
    axes[1].set_title("explored DOF vs pr·n (Fig. 5)")
    return {"prune_ratio_updates": fig}
