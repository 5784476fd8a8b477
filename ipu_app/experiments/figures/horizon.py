"""DynSparse - static against training length: the paired difference at every validation step and
at the end of runs of each length, with the NSP transition and the regime statistics beside it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..plotting import pyplot
from ..runs import Run, recently_grown_ratio
from .common import METHOD_LABELS, Table, Tables, require, style
from .paired import difference_test, machine_group, setting_name

NSP_LEARNED = 0.5  # validation NSP loss below this: the run has learned next-sentence prediction (chance: ln 2)
POOLED_ASSUMPTION = ("pooled rows test the within-machine differences of every machine kind together (stratified "
                     "by kind: a run pairs only with the static run of its own kind and precision); they assume the "
                     "difference has one mean on every kind, with the kinds' pairs independent")


def val_curve(run: Run) -> dict[int, float]:
    """Validation MLM loss by step (the run's ``val`` records; the last one per step)."""
    return {int(r["step"]): float(r["mlm_loss"]) for r in run.metrics("val")
            if r.get("mlm_loss") is not None and r.get("step") is not None}


def nsp_transition(run: Run, threshold: float = NSP_LEARNED) -> int | None:
    """The first validation step whose NSP loss is below ``threshold`` (None: never within the run)."""
    for record in sorted(run.metrics("val"), key=lambda r: r.get("step", 0)):
        if record.get("nsp_loss") is not None and record["nsp_loss"] < threshold:
            return int(record["step"])
    return None


def horizon(run: Run) -> int:
    return int(run.summary.get("steps") or run.get("training.steps", 0))


@dataclass
class Pair:
    """One seed's DynSparse run and the static run it pairs with."""

    seed: int
    ours: Run
    base: Run

    @property
    def diff(self) -> float:
        return self.ours.loss - self.base.loss


@dataclass
class Arm:
    """A DynSparse setting on one machine kind and precision at one training length, with its pairs."""

    setting: str
    machine: str
    steps: int
    baseline: str
    pairs: list[Pair] = field(default_factory=list)


def arms(runs: list[Run]) -> tuple[list[Arm], list[str]]:
    """Every DynSparse setting paired per seed with the static run of the same model, objective (MLM
    with or without NSP), block size, sparsity, length, machine kind and precision; the names of runs left out (trained on several
    machine kinds)."""
    statics: dict[tuple, dict[int, Run]] = {}
    ours: dict[tuple, dict[int, Run]] = {}
    dropped = []
    for run in runs:
        group = machine_group(run)
        if group is None:
            dropped.append(run.name)
            continue
        shape = (group, run.size, run.nsp, run.block_size, round(run.sparsity, 6), horizon(run))
        if run.mode == "static":
            statics.setdefault(shape, {})[run.seed] = run
        elif run.mode == "dynamic":
            ours.setdefault((setting_name(run),) + shape, {})[run.seed] = run
    found = []
    for (name, *shape), by_seed in sorted(ours.items(), key=lambda kv: (kv[0][0], kv[0][-1], kv[0][1])):
        base = statics.get(tuple(shape), {})
        pairs = [Pair(seed, by_seed[seed], base[seed]) for seed in sorted(set(by_seed) & set(base))]
        if pairs:
            found.append(Arm(name, shape[0], shape[-1], setting_name(pairs[0].base), pairs))
    return found, dropped


EXACT_SIGN_FLIPS = 20  # up to this many pairs the sign-flip test enumerates every assignment (2^n)


def distribution_free(diffs) -> dict:
    """Two checks of a paired mean that do not assume normal differences (the proxy's final losses are
    bimodal: a run has learned NSP by the end or not): the two-sided sign-flip permutation p of the mean
    difference (exact up to ``EXACT_SIGN_FLIPS`` pairs, else 100,000 random flips of a fixed seed) and
    the two-sided Wilcoxon signed-rank p (None below 2 pairs or where every difference is zero)."""
    from scipy import stats

    diffs = np.asarray(diffs, dtype=float)
    if len(diffs) < 2 or not np.any(diffs):
        return {"sign_flip_p": None, "wilcoxon_p": None}
    exact = len(diffs) <= EXACT_SIGN_FLIPS
    flips = stats.permutation_test((diffs,), np.mean, permutation_type="samples", alternative="two-sided",
                                   n_resamples=np.inf if exact else 100_000, rng=None if exact else 0)
    return {"sign_flip_p": float(flips.pvalue), "wilcoxon_p": float(stats.wilcoxon(diffs).pvalue)}


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (one arm's looks at its validation steps):
    the k-th smallest p times (m - k + 1), made monotone and capped at 1; None stays None and is not
    counted in m."""
    found = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(found):
        running = max(running, min(1.0, (len(found) - k) * p))
        adjusted[i] = running
    return adjusted


def _test_columns(test: dict | None, diffs=()) -> dict:
    if test is None:
        return {}
    return {"n": test["n"], "diff_mean": test["mean"], "diff_std": test["std"], "ci_low": test["ci_low"],
            "ci_high": test["ci_high"], "t": test["t"], "p": test["p"], **distribution_free(diffs),
            "below_zero": f"{test['below']}/{test['n']}", "beyond_noise": test["beyond_noise"],
            "seeds_for_80_power": test["seeds_for_80_power"]}


TEST_COLUMNS = ["n", "diff_mean", "diff_std", "ci_low", "ci_high", "t", "p", "sign_flip_p", "wilcoxon_p",
                "below_zero", "beyond_noise", "seeds_for_80_power"]


def curve_table(found: list[Arm]) -> tuple[Table, dict]:
    """One row per arm and validation step both runs of a pair have (and pooled rows where an arm's
    setting and length ran on several machine kinds)."""
    table = Table(["setting", "machine", "steps", "step", *TEST_COLUMNS, "holm_p", "sign_flip_holm_p",
                   "static_val_mlm_loss",
                   "dynsparse_val_mlm_loss", "per_seed"])
    curves: dict[tuple, list] = {}
    pooled: dict[tuple, dict[int, list[float]]] = {}
    for arm in found:
        per_step: dict[int, list[tuple[int, float, float]]] = {}
        for pair in arm.pairs:
            a, b = val_curve(pair.ours), val_curve(pair.base)
            for step in sorted(set(a) & set(b)):
                per_step.setdefault(step, []).append((pair.seed, a[step], b[step]))
        points, first = [], len(table.rows)
        for step, values in sorted(per_step.items()):
            diffs = [a - b for _, a, b in values]
            test = difference_test(diffs)
            table.add(setting=arm.setting, machine=arm.machine, steps=arm.steps, step=step,
                      **_test_columns(test, diffs),
                      static_val_mlm_loss=float(np.mean([b for *_, b in values])),
                      dynsparse_val_mlm_loss=float(np.mean([a for _, a, _ in values])),
                      per_seed=" ".join(f"{seed}:{a - b:+.4f}" for seed, a, b in values))
            points.append((step, test))
            pooled.setdefault((arm.setting, arm.steps), {}).setdefault(step, []).extend(diffs)
        _adjust_over_steps(table.rows[first:])
        curves[(arm.setting, arm.machine, arm.steps)] = points
    kinds = _kinds_per_setting(found)
    for (setting, steps), by_step in pooled.items():
        if kinds[(setting, steps)] > 1:
            first = len(table.rows)
            for step, diffs in sorted(by_step.items()):
                table.add(setting=setting, machine=f"pooled over {kinds[(setting, steps)]} kinds", steps=steps,
                          step=step, **_test_columns(difference_test(diffs), diffs))
            _adjust_over_steps(table.rows[first:])
    return table, curves


def _adjust_over_steps(rows: list[dict]) -> None:
    """Holm-adjusted p of the t-test and of the sign-flip test over one arm's validation steps."""
    for column in ("p", "sign_flip_p"):
        for row, adjusted in zip(rows, holm([row.get(column) for row in rows])):
            row["holm_p" if column == "p" else "sign_flip_holm_p"] = adjusted


def _kinds_per_setting(found: list[Arm]) -> dict[tuple, int]:
    kinds: dict[tuple, set] = {}
    for arm in found:
        kinds.setdefault((arm.setting, arm.steps), set()).add(arm.machine)
    return {key: len(value) for key, value in kinds.items()}


def transition(pairs: list[Pair]) -> dict:
    """Which arm learns NSP first, per seed: the seeds where DynSparse crosses earlier / later (a run
    that never crosses counts as crossing after the end), a two-sided sign test over the seeds that
    differ, and the final difference over the seeds where both runs crossed (the loss after the
    transition) with its p."""
    from scipy import stats

    earlier = later = 0
    after = []
    for pair in pairs:
        ours, base = nsp_transition(pair.ours), nsp_transition(pair.base)
        a = math.inf if ours is None else ours
        b = math.inf if base is None else base
        earlier += a < b
        later += a > b
        if ours is not None and base is not None:
            after.append(pair.diff)
    test = difference_test(after) if after else None
    return {"n": len(pairs), "earlier": earlier, "later": later,
            "sign_p": float(stats.binomtest(earlier, earlier + later).pvalue) if earlier + later else None,
            "both_crossed": len(after), "diff_after": test["mean"] if test else None,
            "p_after": test["p"] if test else None}


def _transition_columns(crossing: dict) -> dict:
    n = crossing["n"]
    return {"nsp_earlier": f"{crossing['earlier']}/{n}", "nsp_later": f"{crossing['later']}/{n}",
            "nsp_sign_p": crossing["sign_p"], "both_crossed": crossing["both_crossed"],
            "diff_after_both_crossed": crossing["diff_after"], "p_after_both_crossed": crossing["p_after"]}


def verdict(test: dict, crossing: dict) -> str:
    """Where a DynSparse advantage beyond noise comes from (or that there is none); ``crossing``: ``transition``'s."""
    if not test.get("beyond_noise"):
        return "no difference beyond noise"
    if test["mean"] > 0:
        return "static ahead"
    earlier = crossing["sign_p"] is not None and crossing["sign_p"] < 0.05 and crossing["earlier"] > crossing["later"]
    after = crossing["p_after"] is not None and crossing["p_after"] < 0.05 and crossing["diff_after"] < 0
    return {(True, True): "both: earlier NSP transition and lower loss after it",
            (True, False): "earlier NSP transition", (False, True): "lower loss after both crossed",
            (False, False): "DynSparse ahead; neither source beyond noise alone"}[(earlier, after)]


def end_tables(found: list[Arm]) -> tuple[Table, Table]:
    """The final difference per arm (one row per training length), and every pair's numbers."""
    end = Table(["setting", "machine", "steps", "method", "baseline", *TEST_COLUMNS, "static_val_mlm_loss",
                 "dynsparse_val_mlm_loss", "nsp_earlier", "nsp_later", "nsp_sign_p", "both_crossed",
                 "diff_after_both_crossed", "p_after_both_crossed", "verdict", "pruned_recently_grown",
                 "grown_pruned_again", "explored_dof", "static_train_time_s", "dynsparse_train_time_s"])
    per_seed = Table(["setting", "machine", "steps", "seed", "static_val_mlm_loss", "dynsparse_val_mlm_loss", "diff",
                      "static_nsp_step", "dynsparse_nsp_step", "static_val_nsp_loss", "dynsparse_val_nsp_loss",
                      "pruned_recently_grown", "grown_pruned_again", "explored_dof"])
    pooled: dict[tuple, list[Pair]] = {}
    for arm in found:
        diffs = [p.diff for p in arm.pairs]
        test = difference_test(diffs)
        crossing = transition(arm.pairs)
        ours = [p.ours for p in arm.pairs]
        end.add(setting=arm.setting, machine=arm.machine, steps=arm.steps,
                method=METHOD_LABELS.get(ours[0].method, ours[0].method), baseline=arm.baseline,
                **_test_columns(test, diffs), **_transition_columns(crossing), verdict=verdict(test, crossing),
                static_val_mlm_loss=float(np.mean([p.base.loss for p in arm.pairs])),
                dynsparse_val_mlm_loss=float(np.mean([r.loss for r in ours])),
                pruned_recently_grown=mean_or_none(recently_grown_ratio(r) for r in ours),
                grown_pruned_again=mean_or_none(recently_grown_ratio(r, "grown_pruned_again") for r in ours),
                explored_dof=mean_or_none(r.summary.get("mean_explored_dof") for r in ours),
                static_train_time_s=mean_or_none(p.base.summary.get("train_time_s") for p in arm.pairs),
                dynsparse_train_time_s=mean_or_none(r.summary.get("train_time_s") for r in ours))
        pooled.setdefault((arm.setting, arm.steps), []).extend(arm.pairs)
        for pair in arm.pairs:
            per_seed.add(setting=arm.setting, machine=arm.machine, steps=arm.steps, seed=pair.seed,
                         static_val_mlm_loss=pair.base.loss, dynsparse_val_mlm_loss=pair.ours.loss, diff=pair.diff,
                         static_nsp_step=_never(nsp_transition(pair.base)),
                         dynsparse_nsp_step=_never(nsp_transition(pair.ours)),
                         static_val_nsp_loss=pair.base.summary.get("final_val_nsp_loss"),
                         dynsparse_val_nsp_loss=pair.ours.summary.get("final_val_nsp_loss"),
                         pruned_recently_grown=recently_grown_ratio(pair.ours),
                         grown_pruned_again=recently_grown_ratio(pair.ours, "grown_pruned_again"),
                         explored_dof=pair.ours.summary.get("mean_explored_dof"))
    kinds = _kinds_per_setting(found)
    for (setting, steps), pairs in pooled.items():
        if kinds[(setting, steps)] > 1:
            diffs = [p.diff for p in pairs]
            test = difference_test(diffs)
            crossing = transition(pairs)
            end.add(setting=setting, machine=f"pooled over {kinds[(setting, steps)]} kinds", steps=steps,
                    **_test_columns(test, diffs), **_transition_columns(crossing), verdict=verdict(test, crossing))
    return end, per_seed


def mean_or_none(values) -> float | None:
    """The mean of the finite values given (None where there is none)."""
    found = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(found)) if found else None


def _never(step: int | None) -> int | str:
    return "never" if step is None else step


def tables(runs: list[Run], **_) -> Tables:
    runs = require(runs, "static and DynSparse runs of the same seeds", "horizon",
                   lambda r: r.mode in ("static", "dynamic"))
    found, dropped = arms(runs)
    if not found:
        from ..runs import ReportError

        raise ReportError("--figure horizon needs DynSparse runs with a static run of the same seed, model, sparsity, "
                          "block size, length, machine kind and precision; none pair")
    curve, curves = curve_table(found)
    end, per_seed = end_tables(found)
    notes = ["diff = DynSparse - static validation MLM loss, per seed, at the same step; 95% interval and two-sided p "
             "from Student's t (n - 1 degrees of freedom); seeds_for_80_power: pairs a paired t-test at 5% needs "
             "to detect the observed mean at the observed std with 80% probability; sign_flip_p and wilcoxon_p: "
             "two-sided checks that do not assume normal differences (the exact sign-flip permutation test of "
             f"the mean up to {EXACT_SIGN_FLIPS} pairs, and the Wilcoxon signed-rank test); 'beyond noise' is the "
             "t-test's; holm_p, sign_flip_holm_p: the per-step p-values Holm-adjusted over one arm's validation "
             "steps (every step is a look: a step is beyond noise for the arm only where its adjusted p < 0.05)",
             f"NSP transition: the first validation step with NSP loss below {NSP_LEARNED} (chance is ln 2 = 0.693); "
             "nsp_sign_p: two-sided sign test over the seeds whose two runs cross at different steps (a run that "
             "never crosses counts as after the end); diff_after_both_crossed: the final difference over the seeds "
             "where both runs crossed"]
    if any(row["machine"].startswith("pooled") for row in end.rows):
        notes.append(POOLED_ASSUMPTION)
    if dropped:
        notes.append(f"left out: {len(dropped)} run(s) trained on several machine kinds: {', '.join(dropped[:5])}")
    for table in (curve, end):
        table.notes.extend(notes)
    out = Tables(data={"curves": curves, "end": end, "seeds": seed_curves(found)})
    out.add("horizon", curve, "DynSparse - static at every validation step")
    out.add("horizon_end", end, "DynSparse - static at the end of each run length")
    out.add("horizon_per_seed", per_seed, "Per seed: final losses, NSP transition and regime statistics")
    return out


@dataclass
class SeedCurve:
    """One pair's difference against step and the steps where each of its runs learned NSP."""

    seed: int
    steps: list[int]
    diffs: list[float]
    dynsparse_nsp: int | None
    static_nsp: int | None


def seed_curves(found: list[Arm]) -> dict[tuple, list[SeedCurve]]:
    """Per arm (setting, machine, length): every pair's DynSparse - static validation MLM loss at
    the steps both runs validated."""
    out = {}
    for arm in found:
        curves = []
        for pair in arm.pairs:
            a, b = val_curve(pair.ours), val_curve(pair.base)
            steps = sorted(set(a) & set(b))
            curves.append(SeedCurve(pair.seed, steps, [a[s] - b[s] for s in steps],
                                    nsp_transition(pair.ours), nsp_transition(pair.base)))
        out[(arm.setting, arm.machine, arm.steps)] = curves
    return out


def plot_seeds(seeds: dict[tuple, list[SeedCurve]]):
    """One panel per arm: each seed's difference against step, a dot where its DynSparse run learned
    NSP and a cross where its static run did (the transition that makes the final losses bimodal)."""
    plt = pyplot()
    cols = min(3, len(seeds))
    rows = math.ceil(len(seeds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    several = len({machine for _, machine, _ in seeds}) > 1
    for ax, ((setting, machine, steps), curves) in zip(axes.flat, seeds.items()):
        for curve in curves:
            line, = ax.plot(curve.steps, curve.diffs, linewidth=1, label=str(curve.seed))
            for step, marker in ((curve.dynsparse_nsp, "o"), (curve.static_nsp, "x")):
                if step in curve.steps:
                    ax.plot(step, curve.diffs[curve.steps.index(step)], marker, color=line.get_color(), markersize=7)
        ax.axhline(0.0, color="black", linewidth=1)
        style(ax, "training step", "DynSparse - static (nats)",
              f"{setting} (T={steps})" + (f"\n{machine}" if several else ""), legend=6)
    for ax in list(axes.flat)[len(seeds):]:
        ax.set_visible(False)
    fig.suptitle("Per seed; o: DynSparse learned NSP (loss < 0.5), x: static did", fontsize=9)
    fig.tight_layout()
    return fig


def plot(result: Tables) -> dict:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (setting, machine, steps), points in result.data["curves"].items():
        if not points:
            continue
        xs = [step for step, _ in points]
        means = [test["mean"] for _, test in points]
        label = f"{setting} (T={steps})" + (f" [{machine}]" if len({k[1] for k in result.data["curves"]}) > 1 else "")
        line, = ax.plot(xs, means, marker="o", label=label)
        lows = [test["ci_low"] if test["ci_low"] is not None else test["mean"] for _, test in points]
        highs = [test["ci_high"] if test["ci_high"] is not None else test["mean"] for _, test in points]
        ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2)
    ax.axhline(0.0, color="black", linewidth=1)
    style(ax, "training step", "DynSparse - static validation MLM loss (nats)",
          "Paired difference (mean, 95% interval); below 0: DynSparse ahead", legend=7)
    fig.tight_layout()
    return {"horizon": fig, "horizon_seeds": plot_seeds(result.data["seeds"])}
