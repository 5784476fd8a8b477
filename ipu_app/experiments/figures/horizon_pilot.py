"""The horizon pilot's choice rule (configs/sweeps/horizon_pilot_cpu.yaml): the DynSparse schedule
the confirmatory horizon sweep runs, with the capacity and overfitting checks beside it."""

from __future__ import annotations

import numpy as np

from ..plotting import pyplot
from ..runs import ReportError, Run, recently_grown_ratio
from .common import METHOD_LABELS, Table, Tables, require, style
from .horizon import mean_or_none, nsp_transition, val_curve
from .paired import machine_group

MAX_RISE = 0.01  # final validation loss this far above the run's own minimum: overfitting, not eligible
TIE = 0.001  # means closer than this tie; the tie goes to the longer update interval


def rise(run: Run) -> float | None:
    """How far the final validation MLM loss ends above the run's lowest one."""
    curve = val_curve(run)
    return curve[max(curve)] - min(curve.values()) if curve else None


def schedule(run: Run) -> tuple[str, int, float]:
    """A DynSparse run's schedule: regrowth, update interval (steps) and pruning ratio."""
    every = run.get("sparsity.update_every")
    if every is None:
        segments = int(run.get("sparsity.segments", 1))
        every = int(run.get("training.steps", 0)) // max(segments, 1)
    return run.method, int(every), float(run.get("sparsity.pruning_ratio", 0.0))


def choose(rows: list[dict]) -> dict | None:
    """The rule: among eligible random-regrowth schedules the lowest mean final validation MLM loss;
    means within ``TIE`` of the lowest go to the longest update interval."""
    eligible = [row for row in rows if row["eligible"] and row["regrowth"] == "random"]
    if not eligible:
        return None
    best = min(row["val_mlm_loss"] for row in eligible)
    tied = [row for row in eligible if row["val_mlm_loss"] - best < TIE]
    return max(tied, key=lambda row: (row["update_every"], -row["val_mlm_loss"]))


def tables(runs: list[Run], **_) -> Tables:
    runs = require(runs, "DynSparse and static runs", "horizon_pilot", lambda r: r.mode in ("static", "dynamic"))
    machines = sorted({machine_group(r) or "several" for r in runs})
    statics: dict[float, dict[int, Run]] = {}
    dynamic: dict[tuple, dict[int, Run]] = {}
    for run in runs:
        if run.mode == "static":
            statics.setdefault(round(run.sparsity, 6), {})[run.seed] = run
        else:
            dynamic.setdefault(schedule(run), {})[run.seed] = run
    if not dynamic:
        raise ReportError("--figure horizon_pilot needs DynSparse runs (the schedules to choose from)")
    table = Table(["method", "regrowth", "update_every", "pruning_ratio", "seeds", "val_mlm_loss", "std", "per_seed",
                   "diff_vs_static", "max_val_rise", "nsp_steps", "pruned_recently_grown", "grown_pruned_again",
                   "explored_dof", "eligible", "chosen"])
    top = max(statics) if statics else None
    base = statics.get(top, {})
    for (regrowth, every, ratio), by_seed in sorted(dynamic.items()):
        runs_of = list(by_seed.values())
        rises = [rise(r) for r in runs_of]
        losses = [r.loss for r in runs_of]
        diffs = [r.loss - base[s].loss for s, r in by_seed.items() if s in base]
        eligible = all(x is not None and x <= MAX_RISE for x in rises)
        table.add(method=METHOD_LABELS.get(regrowth, regrowth), regrowth=regrowth, update_every=every,
                  pruning_ratio=ratio, seeds=len(losses), val_mlm_loss=float(np.mean(losses)),
                  std=float(np.std(losses, ddof=1)) if len(losses) > 1 else None,
                  per_seed=" ".join(f"{s}:{r.loss:.4f}" for s, r in sorted(by_seed.items())),
                  diff_vs_static=float(np.mean(diffs)) if diffs else None,
                  max_val_rise=max((x for x in rises if x is not None), default=None),
                  nsp_steps=" ".join(f"{s}:{nsp_transition(r) or 'never'}" for s, r in sorted(by_seed.items())),
                  pruned_recently_grown=mean_or_none(recently_grown_ratio(r) for r in runs_of),
                  grown_pruned_again=mean_or_none(recently_grown_ratio(r, "grown_pruned_again") for r in runs_of),
                  explored_dof=mean_or_none(r.summary.get("mean_explored_dof") for r in runs_of),
                  eligible=eligible, chosen=False)
    chosen = choose(table.rows)
    if chosen is not None:
        chosen["chosen"] = True
    checks = check_table(statics)
    table.notes.append(f"rule (fixed before the pilot ran): the random-regrowth schedule with the lowest mean final "
                       "validation MLM loss over the seeds; not eligible where a seed's validation loss ends more than "
                       f"{MAX_RISE} above its minimum; means within {TIE} tie and go to the longer update interval; "
                       "RigL rows are shown, not chosen from")
    table.notes.append("diff_vs_static: mean over seeds of the final loss minus static's at the highest sparsity; "
                       "nsp_steps: the first validation step with NSP loss below 0.5, per seed")
    table.notes.append("machines: " + "; ".join(machines) + (" (the seeds' arms did not all run on one kind)"
                                                              if len(machines) > 1 else ""))
    if chosen is None:
        table.notes.append("no eligible schedule: every one overfits; widen the pilot")
    out = Tables(data={"dynamic": dynamic, "statics": statics})
    out.add("horizon_pilot", table, "Horizon pilot: DynSparse schedules and the rule's choice")
    out.add("horizon_pilot_checks", checks, "Horizon pilot: capacity gap and overfitting of static")
    return out


def check_table(statics: dict[float, dict[int, Run]]) -> Table:
    """Per seed: static at each sparsity, the capacity gap to the lowest sparsity and the rise."""
    table = Table(["seed", "sparsity", "val_mlm_loss", "capacity_gap", "val_rise", "nsp_step"])
    low = min(statics) if statics else None
    for sparsity in sorted(statics):
        for seed, run in sorted(statics[sparsity].items()):
            other = statics[low].get(seed)
            table.add(seed=seed, sparsity=sparsity, val_mlm_loss=run.loss,
                      capacity_gap=run.loss - other.loss if other is not None and sparsity != low else None,
                      val_rise=rise(run), nsp_step=nsp_transition(run) or "never")
    table.notes.append("capacity_gap: final validation MLM loss minus static's at the lowest sparsity, same seed "
                       "(positive: the sparse model gives up loss that DynSparse can win back); val_rise: the final "
                       f"validation loss minus the run's minimum (above {MAX_RISE}: overfitting)")
    return table


def plot(result: Tables) -> dict:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rows = result["horizon_pilot"].rows
    for i, row in enumerate(rows):
        by_seed = result.data["dynamic"][(row["regrowth"], row["update_every"], row["pruning_ratio"])]
        ax.plot([i] * len(by_seed), [r.loss for r in by_seed.values()], "o", alpha=0.6)
        ax.plot([i + 0.15], [row["val_mlm_loss"]], "*" if row["chosen"] else "s", color="black",
                markersize=12 if row["chosen"] else 6)
    for sparsity, by_seed in result.data["statics"].items():
        ax.axhline(float(np.mean([r.loss for r in by_seed.values()])), linestyle="--", linewidth=1,
                   label=f"static s = {sparsity:g} (mean)")
    labels = [f"{'RigL' if r['regrowth'] == 'gradient' else 'rand'} every {r['update_every']}"
              f"\npr {r['pruning_ratio']:g}" for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    style(ax, "DynSparse schedule", "final validation MLM loss", "Horizon pilot (★ chosen by the rule)", legend=7)
    fig.tight_layout()
    return {"horizon_pilot": fig}
