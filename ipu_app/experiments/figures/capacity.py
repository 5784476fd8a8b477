"""The proxy pilot's choice rule (configs/sweeps/proxy_pilot_cpu.yaml): capacity gap against cost."""

from __future__ import annotations

import math

from ..plotting import pyplot
from ..runs import Run
from .common import Table, Tables, require, style
from .paired import machine_group

CAPACITY_MAX_RISE = 0.01  # a validation loss this far above its minimum at the end: overfitting
CAPACITY_MAX_SECONDS = 900.0  # a candidate run must fit the confirmatory sweep's budget


def tables(runs: list[Run], **_) -> Tables:
    """The proxy pilot's choice rule (configs/sweeps/proxy_pilot_cpu.yaml): for static runs of one
    model, vocabulary and horizon, the capacity gap g of each sparsity against the lowest one, the
    run's cost t (train_time_s) and the score g / sqrt(t); the eligible candidate (s >= 0.9, its
    validation loss not rising by more than CAPACITY_MAX_RISE at the end, t <= CAPACITY_MAX_SECONDS)
    with the largest score is chosen. DynSparse runs play no part."""
    runs = require(runs, "static runs at two or more sparsities", "capacity", lambda r: r.mode == "static")
    families: dict[tuple, list[Run]] = {}
    for run in runs:
        key = (run.size, run.summary.get("vocab_size"), int(run.summary.get("steps", 0)), run.seed,
               machine_group(run))
        families.setdefault(key, []).append(run)
    table = Table(["model", "vocab_size", "steps", "seed", "sparsity", "val_mlm_loss", "baseline_sparsity",
                   "capacity_gap", "train_time_s", "score", "val_rise", "eligible", "chosen"])
    candidates = []
    for (size, vocab, steps, seed, _), members in sorted(families.items(), key=lambda kv: str(kv[0])):
        members.sort(key=lambda r: r.sparsity)
        base = members[0]
        for run in members:
            gap = run.loss - base.loss if run is not base else None
            seconds = float(run.summary.get("train_time_s") or 0.0)
            vals = [r["mlm_loss"] for r in run.metrics("val") if r.get("mlm_loss") is not None]
            rise = (vals[-1] - min(vals)) if vals else None
            score = gap / math.sqrt(seconds) if gap is not None and seconds > 0 else None
            eligible = (run is not base and run.sparsity >= 0.9 - 1e-9 and score is not None
                        and (rise is None or rise <= CAPACITY_MAX_RISE) and seconds <= CAPACITY_MAX_SECONDS)
            row = dict(model=size, vocab_size=vocab, steps=steps, seed=seed, sparsity=run.sparsity,
                       val_mlm_loss=run.loss, baseline_sparsity=base.sparsity if run is not base else None,
                       capacity_gap=gap, train_time_s=seconds, score=score, val_rise=rise, eligible=eligible,
                       chosen=False)
            table.add(**row)
            if eligible:
                candidates.append(table.rows[-1])
    if candidates:
        max(candidates, key=lambda row: row["score"])["chosen"] = True
    table.notes.append("capacity_gap: val MLM loss minus that of the lowest sparsity of the same model, vocabulary, "
                       "horizon and seed (static, each at its own learning rate); score = gap / sqrt(train_time_s); "
                       f"eligible: s >= 0.9, validation loss at most {CAPACITY_MAX_RISE} above its minimum at the end, "
                       f"train_time_s <= {CAPACITY_MAX_SECONDS:g}; chosen: the eligible run with the largest score")
    if not candidates:
        table.notes.append("no eligible candidate: widen the pilot")
    out = Tables()
    out.add("capacity", table)
    return out


def plot(result: Tables) -> dict:
    table = result["capacity"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in table.rows:
        if row["capacity_gap"] is None:
            continue
        ax.plot([row["train_time_s"]], [row["capacity_gap"]], "*" if row["chosen"] else ("o" if row["eligible"] else "x"),
                markersize=12 if row["chosen"] else 7)
        ax.annotate(f"{row['model']} V={row['vocab_size']} T={row['steps']} s={row['sparsity']:g}",
                    (row["train_time_s"], row["capacity_gap"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    style(ax, "train time (s, one thread)", "capacity gap (nats)",
           "Pilot: capacity gap vs cost (★ chosen, × not eligible)")
    return {"capacity": fig}
