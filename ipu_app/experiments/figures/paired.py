"""Paired seeds: per-seed losses of every setting and the paired difference to its static baseline,
with the regime statistics beside them (the test of DynSparse against static beyond noise)."""

from __future__ import annotations

import math

import numpy as np

from ..plotting import pyplot
from ..runs import Run, recently_grown_ratio
from .common import METHOD_LABELS, Table, Tables, style


def setting_name(run: Run) -> str:
    """The run's name without its seed (``bert_tiny_sparse,seed=1,update_every=500`` ->
    ``bert_tiny_sparse,update_every=500``): runs of one setting share it. A run trained on MLM alone
    (``model.nsp: false``, often set for a whole sweep and so not in its name) gets `` (MLM only)``."""
    parts = [p for p in run.name.split(",") if not p.startswith("seed=")]
    name = ",".join(parts) or run.name
    return name if run.nsp else f"{name} (MLM only)"


def seeds_for_power(effect: float, sigma: float, power: float = 0.8, alpha: float = 0.05,
                    limit: int = 100_000) -> int | None:
    """The fewest paired seeds for which a two-sided paired t-test at ``alpha`` detects a true mean
    difference ``effect`` with per-seed std ``sigma`` with probability ``power`` (None: not within
    ``limit``, or no effect)."""
    from scipy import stats

    if not (effect and sigma and math.isfinite(effect) and math.isfinite(sigma)):
        return None
    d = abs(effect) / sigma
    for n in range(2, limit + 1):
        df = n - 1
        crit = stats.t.ppf(1 - alpha / 2, df)
        nc = d * math.sqrt(n)
        if stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc) >= power:
            return n
    return None


def paired_difference(ours: dict[int, float], base: dict[int, float]) -> dict | None:
    """``ours - base`` over the seeds both have (see ``difference_test``; None: no common seed)."""
    seeds = sorted(set(ours) & set(base))
    return difference_test([ours[s] - base[s] for s in seeds]) if seeds else None


def difference_test(diffs) -> dict:
    """A one-sample t-test of paired differences: n, mean, std, t, two-sided p, the 95% confidence
    interval of the mean, how many are below zero, 'beyond noise' (p < 0.05) and the pairs a paired
    t-test needs for 80% power at the observed mean and std."""
    from scipy import stats

    diffs = np.asarray(diffs, dtype=float)
    n = len(diffs)
    result = {"n": n, "mean": float(diffs.mean()), "std": float(diffs.std(ddof=1)) if n > 1 else None,
              "t": None, "p": None, "ci_low": None, "ci_high": None, "below": int((diffs < 0).sum()),
              "beyond_noise": None, "seeds_for_80_power": None}
    if n > 1:
        se = result["std"] / math.sqrt(n)
        if se > 0:
            result["t"] = float(result["mean"] / se)
            result["p"] = float(2 * stats.t.sf(abs(result["t"]), n - 1))
        else:
            result["t"], result["p"] = math.copysign(math.inf, result["mean"]), 0.0
        half = float(stats.t.ppf(0.975, n - 1) * se)
        result["ci_low"], result["ci_high"] = result["mean"] - half, result["mean"] + half
        result["beyond_noise"] = bool(result["p"] < 0.05)
        result["seeds_for_80_power"] = seeds_for_power(result["mean"], result["std"])
    return result


def machine_group(run: Run) -> str | None:
    """What a run pairs within: its machine kind and precision (None: it trained on several kinds)."""
    machine = run.summary.get("machine") or "machine not recorded"
    if machine == "several":
        return None
    return f"{machine}, {run.summary.get('precision', '?')}"


def tables(runs: list[Run], **_) -> Tables:
    """Per-seed losses of every setting, and the paired per-seed difference to the static run of the
    same size, block size and sparsity (same seed = same initial pattern and data order) on the same
    machine kind and precision, with the regime statistics (pruned_recently_grown, explored DOF)
    beside them."""
    settings, dropped = _settings(runs)
    groups = sorted({group for group, _ in settings})
    baselines = {}
    for key, by_seed in settings.items():
        first = next(iter(by_seed.values()))
        if first.method == "static":
            baselines.setdefault((key[0], first.size, first.nsp, first.block_size, first.sparsity), key)
    table = Table(["setting", "machine", "method", "seeds", "val_mlm_loss", "std", "per_seed", "baseline",
                   "diff_mean", "diff_std", "diff_ci_low", "diff_ci_high", "t", "p", "below_baseline",
                   "beyond_noise", "seeds_for_80_power", "pruned_recently_grown", "grown_pruned_again",
                   "explored_dof"])
    long = Table(["setting", "machine", "seed", "val_mlm_loss", "diff_vs_baseline", "pruned_recently_grown",
                  "grown_pruned_again", "explored_dof"])
    for key, by_seed in settings.items():
        first = next(iter(by_seed.values()))
        base_key = (baselines.get((key[0], first.size, first.nsp, first.block_size, first.sparsity))
                    if first.mode != "dense" else None)
        base_key = None if base_key == key else base_key
        baseline = settings[base_key] if base_key else None
        table.add(**_setting_row(key, by_seed, base_key, baseline))
        for seed, run in by_seed.items():
            base = baseline.get(seed) if baseline else None
            long.add(setting=key[1], machine=key[0], seed=seed, val_mlm_loss=run.loss,
                     diff_vs_baseline=run.loss - base.loss if base else None,
                     pruned_recently_grown=recently_grown_ratio(run),
                     grown_pruned_again=recently_grown_ratio(run, "grown_pruned_again"),
                     explored_dof=run.summary.get("mean_explored_dof"))
    _add_notes(table, groups, dropped)
    out = Tables(data={"settings": settings, "groups": groups})
    out.add("paired", table)
    out.add("paired_per_seed", long)
    return out


def _settings(runs: list[Run]) -> tuple[dict[tuple[str, str], dict[int, Run]], list[str]]:
    """``{(machine group, setting): {seed: run}}``, and the runs left out (trained on several machines)."""
    settings: dict[tuple[str, str], dict[int, Run]] = {}
    dropped = []
    for run in sorted(runs, key=lambda r: (setting_name(r), r.seed)):
        group = machine_group(run)
        if group is None:
            dropped.append(run.name)
            continue
        settings.setdefault((group, setting_name(run)), {})[run.seed] = run
    return settings, dropped


def _setting_row(key: tuple[str, str], by_seed: dict[int, Run], base_key, baseline: dict[int, Run] | None) -> dict:
    """One setting's row: its losses over the seeds, the paired test against its baseline, the regime
    statistics' means."""
    first = next(iter(by_seed.values()))
    losses = {seed: r.loss for seed, r in by_seed.items()}
    diff = paired_difference(losses, {s: r.loss for s, r in baseline.items()}) if baseline else None
    prg = [v for v in (recently_grown_ratio(r) for r in by_seed.values()) if v is not None]
    again = [v for v in (recently_grown_ratio(r, "grown_pruned_again") for r in by_seed.values()) if v is not None]
    dof = [r.summary["mean_explored_dof"] for r in by_seed.values() if r.summary.get("mean_explored_dof") is not None]
    values = np.array(list(losses.values()))
    get = (lambda k: diff[k]) if diff else (lambda k: None)
    return dict(setting=key[1], machine=key[0], method=METHOD_LABELS.get(first.method, first.method),
                seeds=len(values), val_mlm_loss=float(values.mean()),
                std=float(values.std(ddof=1)) if len(values) > 1 else None,
                per_seed=" ".join(f"{seed}:{loss:.4f}" for seed, loss in losses.items()),
                baseline=base_key[1] if base_key else None, diff_mean=get("mean"), diff_std=get("std"),
                diff_ci_low=get("ci_low"), diff_ci_high=get("ci_high"), t=get("t"), p=get("p"),
                below_baseline=f"{diff['below']}/{diff['n']}" if diff else None,
                beyond_noise=get("beyond_noise"), seeds_for_80_power=get("seeds_for_80_power"),
                pruned_recently_grown=float(np.mean(prg)) if prg else None,
                grown_pruned_again=float(np.mean(again)) if again else None,
                explored_dof=float(np.mean(dof)) if dof else None)


def _add_notes(table: Table, groups: list[str], dropped: list[str]) -> None:
    table.notes.append("diff = setting - baseline (static, same size, block size and sparsity, same machine kind and "
                       "precision) over the seeds both have; 95% confidence interval and two-sided p from Student's t "
                       "(n - 1 degrees of freedom); beyond_noise: p < 0.05; below_baseline: seeds with diff < 0; "
                       "seeds_for_80_power: paired seeds a t-test at 5% needs to detect the observed mean "
                       "difference with 80% probability at the observed std")
    if len(groups) > 1:
        table.notes.append(f"runs from {len(groups)} machine kinds / precisions are paired only within their own: "
                           + "; ".join(groups))
    if dropped:
        table.notes.append(f"left out: {len(dropped)} run(s) trained on several machine kinds (a resume on another "
                           f"machine): {', '.join(dropped[:5])}")


def plot(result: Tables) -> dict:
    settings, groups = result.data["settings"], result.data["groups"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(settings)), 4.5))
    labels = []
    for i, ((group, name), by_seed) in enumerate(settings.items()):
        losses = [r.loss for r in by_seed.values()]
        ax.plot([i] * len(losses), losses, "o", alpha=0.6)
        ax.errorbar([i + 0.15], [np.mean(losses)], yerr=[np.std(losses, ddof=1) if len(losses) > 1 else 0],
                    fmt="s", color="black", capsize=3)
        labels.append(name if len(groups) == 1 else f"{name}\n[{group}]")
    ax.set_xticks(range(len(settings)), labels, rotation=30, ha="right", fontsize=7)
    style(ax, "", "final validation MLM loss", "Per-seed losses (points) and mean ± std")
    fig.tight_layout()
    return {"paired": fig}
