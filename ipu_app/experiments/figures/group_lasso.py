"""Group lasso vs weight decay on the sparse values (Fig. 6)."""

from __future__ import annotations

import math

from ..runs import Run, best_over_lr
from .common import Table, Tables, errorbar_figure, require, series


def regulariser(r: Run) -> str:
    return "group lasso" if float(r.get("sparsity.group_lasso", 0.0)) > 0 else "weight decay"


def coefficient(r: Run) -> float:
    if regulariser(r) == "group lasso":
        return float(r.get("sparsity.group_lasso"))
    sparse = r.get("optimizer.sparse_weight_decay")  # the decay of the sparse values (null: weight_decay)
    return float(r.get("optimizer.weight_decay") if sparse is None else sparse)


def tables(runs: list[Run], **_) -> Tables:
    runs = require(runs, "sparse runs", "group_lasso", lambda r: r.mode != "dense")
    table = Table(["model", "regulariser", "coefficient", "learning_rate", "seeds", "val_mlm_loss", "std", "best"])
    points = best_over_lr(runs, key=lambda r: (r.size, regulariser(r), coefficient(r)))
    best: dict[tuple, float] = {}
    for p in points:
        k = (p.first.size, regulariser(p.first))
        best[k] = min(best.get(k, math.inf), p.loss)
    for p in points:
        r = p.first
        table.add(model=r.size, regulariser=regulariser(r), coefficient=coefficient(r), learning_rate=r.learning_rate,
                  seeds=p.seeds, val_mlm_loss=p.loss, std=p.std if p.seeds > 1 else None,
                  best=p.loss == best[(r.size, regulariser(r))])
    table.rows.sort(key=lambda row: (row["model"], row["regulariser"], row["coefficient"]))
    out = Tables(data={"runs": runs})
    out.add("group_lasso", table)
    return out


def plot(result: Tables) -> dict:
    found = [(f"{reg} ({size})", [coefficient(p.first) for p in pts], pts)
             for (size, reg), pts in series(result.data["runs"], lambda r: (r.size, regulariser(r)), coefficient)]
    return {"group_lasso": errorbar_figure(found, "regularisation coefficient", "Group lasso vs weight decay (Fig. 6)")}
