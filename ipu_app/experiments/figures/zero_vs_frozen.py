"""Zero vs untrained (frozen) inactive weights (Fig. 1a, Table A.9)."""

from __future__ import annotations

from ..runs import Run
from .common import Table, Tables, errorbar_figure, require, series


def _inactive(r: Run) -> str:
    return str(r.get("sparsity.inactive", "zero"))


def tables(runs: list[Run], **_) -> Tables:
    runs = require(runs, "sparse runs", "zero_vs_frozen", lambda r: r.mode != "dense")
    table = Table(["model", "inactive", "sparsity", "trainable_fraction", "learning_rate", "seeds", "val_mlm_loss",
                   "std", "val_nsp_loss"])
    for (size, mode), pts in series(runs, lambda r: (r.size, _inactive(r)), lambda r: r.sparsity):
        for p in pts:
            r = p.first
            table.add(model=size, inactive=mode, sparsity=r.sparsity, trainable_fraction=r.density,
                      learning_rate=r.learning_rate, seeds=p.seeds, val_mlm_loss=p.loss,
                      std=p.std if p.seeds > 1 else None, val_nsp_loss=p.mean(lambda q: q.summary.get("final_val_nsp_loss")))
    table.rows.sort(key=lambda row: (row["model"], row["sparsity"], row["inactive"]))
    table.notes.append("zero: inactive weights are 0; frozen: inactive weights keep their untrained initial values "
                       "(Fig. 1a, Table A.9); best learning rate per setting")
    out = Tables(data={"runs": runs})
    out.add("zero_vs_frozen", table)
    return out


def plot(result: Tables) -> dict:
    found = [(f"{'untrained (frozen)' if mode == 'frozen' else 'zero'} ({size})", [p.first.density for p in pts], pts)
             for (size, mode), pts in series(result.data["runs"], lambda r: (r.size, _inactive(r)), lambda r: r.density)]
    return {"zero_vs_frozen": errorbar_figure(found, "fraction of trainable parameters (1 − s)",
                                              "Zero vs untrained inactive weights (Fig. 1a)")}
