"""Block metric for magnitude pruning (Fig. 7): L1 / L2 / L∞, per seed, at the best learning rate."""

from __future__ import annotations

from ..plotting import pyplot
from ..runs import Run, best_over_lr
from .common import Table, Tables, require

STEM, KEY = "block_metric", "block_metric"
TITLE = "Block metric for magnitude pruning (Fig. 7)"


def _metric(r: Run) -> str:
    return str(r.get("sparsity.block_metric"))


def tables(runs: list[Run], **_) -> Tables:
    runs = require(runs, "DynSparse runs", "block_metric", lambda r: r.mode == "dynamic")
    table = Table(["model", "block_size", KEY, "learning_rate", "seeds", "val_mlm_loss", "std", "losses"])
    for p in best_over_lr(runs, key=lambda r: (r.size, r.block_size, _metric(r))):
        r = p.first
        table.add(model=r.size, block_size=r.block_size, **{KEY: _metric(r)}, learning_rate=r.learning_rate,
                  seeds=p.seeds, val_mlm_loss=p.loss, std=p.std if p.seeds > 1 else None,
                  losses=" ".join(f"{v:.4f}" for v in p.losses))
    table.rows.sort(key=lambda row: (row["model"], row["block_size"], row["val_mlm_loss"]))
    out = Tables()
    out.add(STEM, table)
    return out


def plot(result: Tables) -> dict:
    rows = result[STEM].rows
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [f"{row[KEY]}\n{row['model']} b={row['block_size']}" for row in rows]
    ax.bar(range(len(labels)), [row["val_mlm_loss"] for row in rows],
           yerr=[row["std"] or 0.0 for row in rows], capsize=4, color="tab:blue")
    for p, row in zip(range(len(labels)), rows):
        ax.scatter([p] * len(row["losses"].split()), [float(v) for v in row["losses"].split()], color="k", s=10, zorder=3)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    lows = [float(v) for row in rows for v in row["losses"].split()]
    ax.set_ylim(min(lows) - 0.05 * (max(lows) - min(lows) + 0.1), max(lows) + 0.05 * (max(lows) - min(lows) + 0.1))
    ax.set_ylabel("validation MLM loss")
    ax.set_title(TITLE)
    ax.grid(True, axis="y", alpha=0.3)
    return {STEM: fig}
