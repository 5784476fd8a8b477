"""When to sparsify (Fig. 1b, Table A.15): a random subset untrained in the first or second half."""

from __future__ import annotations

from ..plotting import pyplot
from ..runs import Run, best_over_lr, group
from .common import Tables, per_lr_table, plain_log_axis, require, style

NAMES = {"none": "dense", "early": "early untrained (unfreeze)", "late": "late untrained (freeze)"}


def _phase(r: Run) -> str:
    return str(r.get("sparsity.freeze", "none"))


def tables(runs: list[Run], **_) -> Tables:
    runs = require(runs, "runs with sparsity.freeze set (early or late)", "freeze_unfreeze",
                   lambda r: r.mode == "dense")
    table = per_lr_table(runs, "freeze", _phase)
    table.columns.insert(5, "final_train_loss")
    lookup = {(p.first.size, _phase(p.first), round(p.first.learning_rate, 12)): p
              for p in group(runs, key=lambda r: (r.size, _phase(r), round(r.learning_rate, 12)))}
    for row in table.rows:
        p = lookup[(row["model"], row["freeze"], round(row["learning_rate"], 12))]
        row["final_train_loss"] = p.mean(lambda q: q.summary.get("final_train_loss"))
        row["freeze"] = NAMES.get(row["freeze"], row["freeze"])
    table.notes.append("a random fraction s of every sparse-module weight is untrained in the first half (early) or "
                       "the second half (late) of training (Fig. 1b, Table A.15)")
    out = Tables(data={"runs": runs})
    out.add("freeze_unfreeze", table)
    return out


def plot(result: Tables) -> dict:
    runs = result.data["runs"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p in best_over_lr(runs, key=lambda r: (r.size, _phase(r))):
        records = p.first.metrics("train")
        ax.plot([rec["step"] for rec in records], [rec["loss"] for rec in records],
                label=f"{NAMES.get(_phase(p.first), _phase(p.first))} ({p.first.size}, lr {p.first.learning_rate:.3g})")
    steps = max(int(r.summary.get("steps", 0)) for r in runs)
    ax.axvline(steps / 2, color="k", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    style(ax, "step", "training loss (MLM + NSP)", "When to sparsify: freeze vs unfreeze at T/2 (Fig. 1b)")
    return {"freeze_unfreeze": fig}
