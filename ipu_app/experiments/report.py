"""``python -m ipu_app report RUNS_DIR --figure NAME``: one paper figure from finished runs.

Each figure writes ``NAME.png`` and its table as ``NAME.csv`` and ``NAME.md`` (some write more,
e.g. ``exploration_pattern.png``, ``learning_rate_law.csv``) into the output directory. Numbers
come from the run directories only (see ``runs.py``); nothing is trained or re-evaluated.
Where a setting was run at several learning rates the tables take the best one, as the paper's do;
runs that differ only by seed are averaged (``± std`` over seeds when there are several).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import auto_learning_rate
from ..rundir import RunDir
from ..io import atomic_write_bytes
from .runs import (
    DenseCurve,
    ReportError,
    Run,
    best_over_lr,
    dense_curve,
    dof_curve,
    fit_lr_curve,
    fit_power_law,
    group,
    load_runs,
    recently_grown_ratio,
)

DEFAULT_LAYER = "bert.encoder.layer.1.intermediate.dense"  # "Boom-up" of the second block (Fig. 11)
METHOD_LABELS = {"dense": "dense", "static": "static", "random": "DynSparse", "gradient": "DynSparse (RigL)"}


# ------------------------------------------------------------------------------------ tables
@dataclass
class Table:
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in self.columns})
        return out.getvalue()

    def markdown(self, title: str = "") -> str:
        lines = [f"# {title}", ""] if title else []
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(_md_value(row.get(c)) for c in self.columns) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines) + "\n"


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.10g}"
    return value


def _md_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e4 or abs(value) < 1e-3 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


# ------------------------------------------------------------------------------------ output
@dataclass
class Output:
    """What one figure writes: tables by file stem and matplotlib figures by file stem."""

    directory: Path
    title: str
    warn: Callable[[str], None] = lambda message: None
    written: list[Path] = field(default_factory=list)

    def table(self, stem: str, table: Table, title: str | None = None) -> None:
        self._write(f"{stem}.csv", table.csv().encode())
        self._write(f"{stem}.md", table.markdown(title or self.title).encode())

    def figure(self, stem: str, fig) -> None:
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        self._write(f"{stem}.png", buffer.getvalue())

    def _write(self, name: str, data: bytes) -> None:
        path = self.directory / name
        atomic_write_bytes(path, data)
        self.written.append(path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axis(axis) -> None:
    """Plain numbers (2.8, not 2.8×10⁰) on a log axis, minor ticks included."""
    from matplotlib.ticker import FormatStrFormatter

    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(FormatStrFormatter("%g"))


def _style(ax, xlabel: str, ylabel: str, title: str | None = None, *, xlog: bool = False, legend: int = 8) -> None:
    if xlog:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend)


def _require(runs: list[Run], what: str, figure: str, test: Callable[[Run], bool] = lambda r: True) -> list[Run]:
    chosen = [r for r in runs if test(r)]
    if not chosen:
        raise ReportError(f"--figure {figure} needs {what}; none of the {len(runs)} finished runs is one")
    return chosen


# ------------------------------------------------------------------------------------ pareto
def _pareto_table(runs: list[Run], curve: DenseCurve | None, sparse_test: Callable[[Run], bool]) -> Table:
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


def _draw_pareto(ax, runs: list[Run], curve: DenseCurve | None, label: Callable[[Run], str]) -> None:
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
    series: dict[str, list] = {}
    for point in best_over_lr([r for r in runs if r.mode != "dense"],
                              key=lambda r: (label(r), r.size, round(r.sparsity, 6))):
        series.setdefault(point.key[0], []).append(point)
    for name, points in series.items():
        points.sort(key=lambda p: p.first.flops)
        ax.errorbar([p.first.flops for p in points], [p.loss for p in points], yerr=[p.std for p in points],
                    marker="o", linestyle="--", capsize=3, label=name)
        for p in points:
            ax.annotate(p.first.size, (p.first.flops, p.loss), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    _style(ax, "non-embedding FLOPs per sequence", "validation MLM loss", xlog=True)


def report_pareto(runs: list[Run], out: Output) -> None:
    _require(runs, "dense runs (the dense family)", "pareto", lambda r: r.mode == "dense")
    curve = dense_curve(runs)
    out.table("pareto", _pareto_table(runs, curve, lambda r: r.mode != "dense"))
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
    out.table("pareto_block_size", blocks, "FLOPs reduction factor by block size (Fig. 8, Table 1)")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    _draw_pareto(axes[0], runs, curve, lambda r: f"{METHOD_LABELS[r.method]}"
                 + (f" b={r.block_size}" if r.mode != "dense" else ""))
    axes[0].set_title("Pareto: MLM loss vs non-embedding FLOPs (Fig. 3)")
    rows = [row for row in blocks.rows if row["flops_reduction_factor"] is not None]
    for model in sorted({row["model"] for row in rows}):
        mine = sorted((row for row in rows if row["model"] == model), key=lambda row: row["block_size"])
        axes[1].plot([row["block_size"] for row in mine], [row["flops_reduction_factor"] for row in mine], "o-",
                     label=model)
    axes[1].axhline(1.0, color="k", linewidth=0.8)
    axes[1].set_xscale("log", base=2)
    _plain_log_axis(axes[1].xaxis)
    axes[1].set_xlabel("block size")
    axes[1].set_ylabel("FLOPs reduction factor (sparse ÷ matched dense)")
    axes[1].set_title("FLOPs reduction by block size (Fig. 8)")
    axes[1].grid(True, alpha=0.3)
    if rows:
        axes[1].legend(fontsize=8)
    else:
        axes[1].text(0.5, 0.5, "no DynSparse run inside the dense range", ha="center", transform=axes[1].transAxes)
    out.figure("pareto", fig)


# ---------------------------------------------------------------------------------- sparsity
def report_sparsity(runs: list[Run], out: Output) -> None:
    _require(runs, "DynSparse or static runs", "sparsity", lambda r: r.mode != "dense")
    curve = dense_curve(runs)
    table = _pareto_table(runs, curve, lambda r: r.mode != "dense")
    table.rows.sort(key=lambda row: (row["setting"] != "dense", row["setting"], row["model"], row["sparsity"]))
    out.table("sparsity", table)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    _draw_pareto(axes[0], runs, curve, lambda r: f"{METHOD_LABELS[r.method]} {r.size}")
    for point in best_over_lr([r for r in runs if r.mode != "dense"],
                              key=lambda r: (r.method, r.size, round(r.sparsity, 6))):
        axes[0].annotate(f"s={point.first.sparsity:g}", (point.first.flops, point.loss), textcoords="offset points",
                         xytext=(4, 6), fontsize=7)
    axes[0].set_title("DynSparse at several sparsities (Fig. 4)")
    for (method, size), points in _series(runs, lambda r: (r.method, r.size), lambda r: r.sparsity):
        axes[1].errorbar([p.first.sparsity for p in points], [p.loss for p in points], yerr=[p.std for p in points],
                         marker="o", capsize=3, label=f"{METHOD_LABELS[method]} {size}")
    _style(axes[1], "sparsity s", "validation MLM loss")
    out.figure("sparsity", fig)


def _series(runs: list[Run], key: Callable[[Run], tuple], x: Callable[[Run], float]):
    """Best-over-LR points grouped into series by ``key``, each sorted by ``x``."""
    series: dict[tuple, list] = {}
    for point in best_over_lr(runs, key=lambda r: (key(r), x(r))):
        series.setdefault(point.key[0], []).append(point)
    return [(k, sorted(v, key=lambda p: x(p.first))) for k, v in series.items()]


# ------------------------------------------------------------------- pruning ratio × updates
def report_prune_ratio_updates(runs: list[Run], out: Output) -> None:
    runs = _require(runs, "DynSparse runs", "prune_ratio_updates", lambda r: r.mode == "dynamic")
    table = Table(["model", "block_size", "pruning_ratio", "num_updates", "pr_x_n", "learning_rate", "seeds",
                   "val_mlm_loss", "std", "explored_dof", "pruned_recently_grown"])
    points = best_over_lr(runs, key=lambda r: (r.size, r.block_size, float(r.get("sparsity.pruning_ratio")),
                                               int(r.get("sparsity.num_updates"))))
    for p in points:
        r = p.first
        pr, n = float(r.get("sparsity.pruning_ratio")), int(r.get("sparsity.num_updates"))
        table.add(model=r.size, block_size=r.block_size, pruning_ratio=pr, num_updates=n, pr_x_n=pr * n,
                  learning_rate=r.learning_rate, seeds=p.seeds, val_mlm_loss=p.loss,
                  std=p.std if p.seeds > 1 else None, explored_dof=p.mean(lambda q: q.summary.get("mean_explored_dof")),
                  pruned_recently_grown=p.mean(recently_grown_ratio))
    table.rows.sort(key=lambda row: (row["model"], row["block_size"], row["num_updates"], row["pruning_ratio"]))
    table.notes.append("explored_dof: final fraction of each dense weight ever active, mean over layers (Fig. 5); "
                       "pruned_recently_grown: fraction of pruned blocks grown at the previous update")
    out.table("prune_ratio_updates", table)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    rows = table.rows
    for by, other, style in (("num_updates", "pruning_ratio", "o-"), ("pruning_ratio", "num_updates", "s--")):
        for value in sorted({row[by] for row in rows}):
            mine = sorted((row for row in rows if row[by] == value), key=lambda row: row["pr_x_n"])
            if len(mine) < 2:
                continue
            label = f"{'n' if by == 'num_updates' else 'pr'} = {value:g}, {'pr' if other == 'pruning_ratio' else 'n'} varied"
            axes[0].plot([row["pr_x_n"] for row in mine], [row["val_mlm_loss"] for row in mine], style, label=label)
            axes[1].plot([row["pr_x_n"] for row in mine], [row["explored_dof"] or float("nan") for row in mine], style,
                         label=label)
    axes[2].scatter([row["explored_dof"] or float("nan") for row in rows], [row["val_mlm_loss"] for row in rows])
    for row in rows:
        axes[2].annotate(f"pr={row['pruning_ratio']:g},n={row['num_updates']}",
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
    out.figure("prune_ratio_updates", fig)


# ------------------------------------------------------------------- grouped bars and curves
def _categorical(runs: list[Run], out: Output, stem: str, key_name: str, key: Callable[[Run], str], title: str) -> None:
    table = Table(["model", "block_size", key_name, "learning_rate", "seeds", "val_mlm_loss", "std", "losses"])
    points = best_over_lr(runs, key=lambda r: (r.size, r.block_size, key(r)))
    for p in points:
        r = p.first
        table.add(model=r.size, block_size=r.block_size, **{key_name: key(r)}, learning_rate=r.learning_rate,
                  seeds=p.seeds, val_mlm_loss=p.loss, std=p.std if p.seeds > 1 else None,
                  losses=" ".join(f"{v:.4f}" for v in p.losses))
    table.rows.sort(key=lambda row: (row["model"], row["block_size"], row["val_mlm_loss"]))
    out.table(stem, table)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [f"{row[key_name]}\n{row['model']} b={row['block_size']}" for row in table.rows]
    ax.bar(range(len(labels)), [row["val_mlm_loss"] for row in table.rows],
           yerr=[row["std"] or 0.0 for row in table.rows], capsize=4, color="tab:blue")
    for p, row in zip(range(len(labels)), table.rows):
        ax.scatter([p] * len(row["losses"].split()), [float(v) for v in row["losses"].split()], color="k", s=10, zorder=3)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    lows = [float(v) for row in table.rows for v in row["losses"].split()]
    ax.set_ylim(min(lows) - 0.05 * (max(lows) - min(lows) + 0.1), max(lows) + 0.05 * (max(lows) - min(lows) + 0.1))
    ax.set_ylabel("validation MLM loss")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    out.figure(stem, fig)


def report_block_metric(runs: list[Run], out: Output) -> None:
    runs = _require(runs, "DynSparse runs", "block_metric", lambda r: r.mode == "dynamic")
    _categorical(runs, out, "block_metric", "block_metric", lambda r: str(r.get("sparsity.block_metric")),
                 "Block metric for magnitude pruning (Fig. 7)")


def _errorbar_figure(out: Output, stem: str, series: list[tuple[str, list[float], list]], xlabel: str,
                     title: str) -> None:
    """One log-x panel of seed-mean loss (± std) per series of (label, x values, points)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs, points in series:
        ax.errorbar([x if x > 0 else float("nan") for x in xs], [p.loss for p in points],
                    yerr=[p.std for p in points], marker="o", capsize=3, label=label)
    _style(ax, xlabel, "validation MLM loss", title, xlog=True)
    out.figure(stem, fig)


def _lr_curves(ax, runs: list[Run], key: Callable[[Run], str]) -> None:
    for name, points in _series(runs, key=lambda r: (key(r),), x=lambda r: r.learning_rate):
        pts = group([q for p in points for q in p.runs], key=lambda r: (round(r.learning_rate, 12),))
        pts.sort(key=lambda p: p.first.learning_rate)
        ax.errorbar([p.first.learning_rate for p in pts], [p.loss for p in pts], yerr=[p.std for p in pts], marker="o",
                    capsize=3, label=name[0])
    _style(ax, "learning rate", "validation MLM loss", xlog=True)


def _per_lr_table(runs: list[Run], key_name: str, key: Callable[[Run], Any]) -> Table:
    table = Table(["model", key_name, "learning_rate", "seeds", "val_mlm_loss", "std", "best"])
    best = {p.key: round(p.first.learning_rate, 12) for p in best_over_lr(runs, key=lambda r: (r.size, key(r)))}
    for p in group(runs, key=lambda r: (r.size, key(r), round(r.learning_rate, 12))):
        r = p.first
        table.add(model=r.size, **{key_name: key(r)}, learning_rate=r.learning_rate, seeds=p.seeds, val_mlm_loss=p.loss,
                  std=p.std if p.seeds > 1 else None, best=best[(r.size, key(r))] == p.key[2])
    table.rows.sort(key=lambda row: (row["model"], str(row[key_name]), row["learning_rate"]))
    return table


def report_group_lasso(runs: list[Run], out: Output) -> None:
    runs = _require(runs, "sparse runs", "group_lasso", lambda r: r.mode != "dense")

    def regulariser(r: Run) -> str:
        return "group lasso" if float(r.get("sparsity.group_lasso", 0.0)) > 0 else "weight decay"

    def coefficient(r: Run) -> float:
        if regulariser(r) == "group lasso":
            return float(r.get("sparsity.group_lasso"))
        sparse = r.get("optimizer.sparse_weight_decay")  # the decay of the sparse values (null: weight_decay)
        return float(r.get("optimizer.weight_decay") if sparse is None else sparse)

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
    out.table("group_lasso", table)
    series = [(f"{reg} ({size})", [coefficient(p.first) for p in pts], pts)
              for (size, reg), pts in _series(runs, lambda r: (r.size, regulariser(r)), coefficient)]
    _errorbar_figure(out, "group_lasso", series, "regularisation coefficient", "Group lasso vs weight decay (Fig. 6)")


def report_init(runs: list[Run], out: Output) -> None:
    runs = _require(runs, "sparse runs", "init", lambda r: r.mode != "dense")
    key = lambda r: str(r.get("sparsity.init"))  # noqa: E731
    out.table("init", _per_lr_table(runs, "init", key))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _lr_curves(ax, runs, key)
    ax.set_title("Initialisation of sparse weights (Fig. 9)")
    out.figure("init", fig)


def report_zero_vs_frozen(runs: list[Run], out: Output) -> None:
    runs = _require(runs, "sparse runs", "zero_vs_frozen", lambda r: r.mode != "dense")
    inactive = lambda r: str(r.get("sparsity.inactive", "zero"))  # noqa: E731
    table = Table(["model", "inactive", "sparsity", "trainable_fraction", "learning_rate", "seeds", "val_mlm_loss",
                   "std", "val_nsp_loss"])
    for (size, mode), pts in _series(runs, lambda r: (r.size, inactive(r)), lambda r: r.sparsity):
        for p in pts:
            r = p.first
            table.add(model=size, inactive=mode, sparsity=r.sparsity, trainable_fraction=r.density,
                      learning_rate=r.learning_rate, seeds=p.seeds, val_mlm_loss=p.loss,
                      std=p.std if p.seeds > 1 else None, val_nsp_loss=p.mean(lambda q: q.summary.get("final_val_nsp_loss")))
    table.rows.sort(key=lambda row: (row["model"], row["sparsity"], row["inactive"]))
    table.notes.append("zero: inactive weights are 0; frozen: inactive weights keep their untrained initial values "
                       "(Fig. 1a, Table A.9); best learning rate per setting")
    out.table("zero_vs_frozen", table)
    series = [(f"{'untrained (frozen)' if mode == 'frozen' else 'zero'} ({size})", [p.first.density for p in pts], pts)
              for (size, mode), pts in _series(runs, lambda r: (r.size, inactive(r)), lambda r: r.density)]
    _errorbar_figure(out, "zero_vs_frozen", series, "fraction of trainable parameters (1 − s)",
                     "Zero vs untrained inactive weights (Fig. 1a)")


def report_freeze_unfreeze(runs: list[Run], out: Output) -> None:
    runs = _require(runs, "runs with sparsity.freeze set (early or late)", "freeze_unfreeze",
                    lambda r: r.mode == "dense")
    phase = lambda r: str(r.get("sparsity.freeze", "none"))  # noqa: E731
    names = {"none": "dense", "early": "early untrained (unfreeze)", "late": "late untrained (freeze)"}
    table = _per_lr_table(runs, "freeze", phase)
    table.columns.insert(5, "final_train_loss")
    lookup = {(p.first.size, phase(p.first), round(p.first.learning_rate, 12)): p
              for p in group(runs, key=lambda r: (r.size, phase(r), round(r.learning_rate, 12)))}
    for row in table.rows:
        p = lookup[(row["model"], row["freeze"], round(row["learning_rate"], 12))]
        row["final_train_loss"] = p.mean(lambda q: q.summary.get("final_train_loss"))
        row["freeze"] = names.get(row["freeze"], row["freeze"])
    table.notes.append("a random fraction s of every sparse-module weight is untrained in the first half (early) or "
                       "the second half (late) of training (Fig. 1b, Table A.15)")
    out.table("freeze_unfreeze", table)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p in best_over_lr(runs, key=lambda r: (r.size, phase(r))):
        records = p.first.metrics("train")
        ax.plot([rec["step"] for rec in records], [rec["loss"] for rec in records],
                label=f"{names.get(phase(p.first), phase(p.first))} ({p.first.size}, lr {p.first.learning_rate:.3g})")
    steps = max(int(r.summary.get("steps", 0)) for r in runs)
    ax.axvline(steps / 2, color="k", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    _style(ax, "step", "training loss (MLM + NSP)", "When to sparsify: freeze vs unfreeze at T/2 (Fig. 1b)")
    out.figure("freeze_unfreeze", fig)


# ------------------------------------------------------------------------------- exploration
def _match_layer(names: list[str], wanted: str) -> str:
    if wanted in names:
        return wanted
    hits = [n for n in names if n.endswith(wanted)]
    if len(hits) == 1:
        return hits[0]
    raise ReportError(f"--layer {wanted!r} matches {len(hits)} sparse weights; use a full name such as {names[0]!r}")


def report_exploration(runs: list[Run], out: Output, layer: str | None = None) -> None:
    from ..sparse.exploration import ExplorationError, load_explored

    runs = _require(runs, "static or DynSparse runs", "exploration", lambda r: r.mode != "dense")
    table = Table(["run", "method", "model", "sparsity", "block_size", "pattern_updates", "initial_dof",
                   "final_explored_dof", "layer_explored_dof"])
    maps = {}
    wanted = layer or DEFAULT_LAYER
    for run in sorted(runs, key=lambda r: (r.sparsity, r.method, r.name)):
        layer_dof = None
        path = RunDir(run.path).explored_path
        if path.is_file():
            try:
                explored, block = load_explored(path)
            except ExplorationError as exc:
                out.warn(f"skipping run {run.name}: {exc}")
                continue
            name = _match_layer(sorted(explored), wanted)
            maps[run.name] = (run, name, explored[name], block)
            layer_dof = float(explored[name].mean())
        curve = dof_curve(run)
        table.add(run=run.name, method=METHOD_LABELS[run.method], model=run.size, sparsity=run.sparsity,
                  block_size=run.block_size, pattern_updates=run.summary.get("pattern_updates", 0),
                  initial_dof=curve[0][1], final_explored_dof=curve[-1][1], layer_explored_dof=layer_dof)
    table.notes.append(f"explored DOF: fraction of a dense weight ever active (mean over layers); layer_explored_dof: "
                       f"{wanted}")
    out.table("exploration", table)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in sorted(runs, key=lambda r: (r.sparsity, r.method, r.name)):
        curve = dof_curve(run)
        ax.plot([c[0] for c in curve], [c[1] for c in curve], drawstyle="steps-post",
                label=f"{METHOD_LABELS[run.method]}, s={run.sparsity:g}" + (f", b={run.block_size}" if run.block_size > 1
                                                                            else ""))
    ax.set_ylim(0, 1.02)
    _style(ax, "step", "explored degrees of freedom", "Explored degrees of freedom (Fig. 11, left)")
    out.figure("exploration", fig)
    if maps:
        fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 4.6), squeeze=False, constrained_layout=True)
        for ax, (run, name, explored, block) in zip(axes[0], maps.values()):
            ax.imshow(explored, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            ax.set_title(f"{METHOD_LABELS[run.method]}, s={run.sparsity:g}\nDOF {explored.mean():.3f}", fontsize=9)
            ax.set_xlabel(f"input blocks (b={block})")
            ax.set_ylabel("output blocks")
        fig.suptitle(f"accumulated pattern of {name} (black = ever active; Fig. 11, right)", fontsize=10)
        out.figure("exploration_pattern", fig)
    else:
        out.warn("no explored.safetensors in these runs: the accumulated pattern image is skipped")


# ----------------------------------------------------------------------------- learning rate
def report_learning_rate(runs: list[Run], out: Output) -> None:
    def family(r: Run) -> tuple:
        return (r.method, round(r.sparsity, 6), r.block_size)

    def label(f: tuple) -> str:
        method, s, b = f
        return "dense" if method == "dense" else f"{METHOD_LABELS[method]} s={s:g}" + (f" b={b}" if b > 1 else "")

    groups = group(runs, key=lambda r: (r.size,) + family(r))
    table = Table(["model", "setting", "sparsity", "block_size", "nonzero_params", "learning_rates", "best_swept_lr",
                   "best_swept_loss", "fitted_optimum_lr", "fitted_loss", "fit", "eq3_lr"])
    fits = {}
    for g in sorted(groups, key=lambda g: (g.key[1:], g.first.summary.get("non_embedding_nonzero_params") or 0)):
        r = g.first
        per_lr = group(g.runs, key=lambda q: (round(q.learning_rate, 12),))
        lrs, losses = [p.first.learning_rate for p in per_lr], [p.loss for p in per_lr]
        fit = fit_lr_curve(lrs, losses)
        fits[g.key] = (fit, lrs, losses)
        best = int(np.argmin(losses))
        table.add(model=r.size, setting=label(g.key[1:]), sparsity=r.sparsity, block_size=r.block_size,
                  nonzero_params=r.summary.get("non_embedding_nonzero_params"), learning_rates=len(lrs),
                  best_swept_lr=lrs[best], best_swept_loss=losses[best],
                  fitted_optimum_lr=fit.optimum_lr if fit else None, fitted_loss=fit.optimum_loss if fit else None,
                  fit=("cubic" if fit is not None and len(fit.coefficients) == 4 else "quadratic" if fit else
                       "too few learning rates") + (" (optimum at the edge of the sweep)" if fit and fit.at_edge else ""),
                  eq3_lr=auto_learning_rate(r.size, r.sparsity) if r.size != "?" else None)
    table.notes.append("fitted optimum: minimum of a cubic fit of loss vs ln(lr) over the swept range (Fig. 12; "
                       "quadratic with 3 learning rates); eq3_lr: the paper's dense law × Eq. 3's sparsity factor")
    out.table("learning_rate", table)
    law = Table(["setting", "sizes", "slope", "intercept", "paper_slope", "paper_intercept"])
    law_lines = {}
    by_family: dict[tuple, list] = {}
    for key, (fit, _, _) in fits.items():
        n = next(g.first.summary.get("non_embedding_nonzero_params") for g in groups if g.key == key)
        if fit is not None and not fit.at_edge and n:
            by_family.setdefault(key[1:], []).append((n, fit.optimum_lr, key[0]))
    for fam, items in by_family.items():
        result = fit_power_law([i[0] for i in items], [i[1] for i in items])
        if result is None:
            continue
        law_lines[fam] = (result, items)
        paper = (-0.44, -0.47) if fam[0] == "dense" else (-0.838, 6.13)
        law.add(setting=label(fam), sizes=" ".join(i[2] for i in sorted(items)), slope=result[0], intercept=result[1],
                paper_slope=paper[0], paper_intercept=paper[1])
    law.notes.append("ln η* = slope · ln N + intercept over sizes with an interior fitted optimum (Fig. 13); N = "
                     "non-embedding non-zero parameters; paper: dense −0.44/−0.47, sparse −0.838/6.13 (Eq. 9)")
    out.table("learning_rate_law", law, "Learning-rate scaling law (Fig. 13)")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (key, (fit, lrs, losses)) in enumerate(sorted(fits.items(), key=lambda kv: str(kv[0]))):
        color = colors[i % len(colors)]
        axes[0].plot(lrs, losses, "o", color=color, label=f"{key[0]} {label(key[1:])}")
        if fit is not None:
            grid = np.exp(np.linspace(math.log(fit.lr_min), math.log(fit.lr_max), 100))
            axes[0].plot(grid, fit(grid), "-", color=color, alpha=0.7)
            axes[0].plot([fit.optimum_lr], [fit.optimum_loss], "v", color="k", markersize=8)
    _style(axes[0], "learning rate", "validation MLM loss", "LR sweeps with cubic fits; ▼ fitted optimum (Fig. 12)",
           xlog=True, legend=7)
    for i, (fam, ((slope, intercept), items)) in enumerate(law_lines.items()):
        color = colors[i % len(colors)]
        ns = np.array(sorted(i_[0] for i_ in items), dtype=float)
        axes[1].plot([i_[0] for i_ in items], [i_[1] for i_ in items], "o", color=color, label=f"{label(fam)} fitted optima")
        axes[1].plot(ns, np.exp(slope * np.log(ns) + intercept), "-", color=color,
                     label=f"ln η = {slope:.3f} ln N + {intercept:.2f}")
    for row in table.rows:
        if row["eq3_lr"] and row["nonzero_params"]:
            axes[1].plot([row["nonzero_params"]], [row["eq3_lr"]], "x", color="gray")
    axes[1].plot([], [], "x", color="gray", label="paper: dense law × Eq. 3")
    axes[1].set_yscale("log")
    _style(axes[1], "non-embedding non-zero parameters N", "optimal learning rate",
           "Learning-rate scaling law (Fig. 13)", xlog=True, legend=7)
    out.figure("learning_rate", fig)

# ------------------------------------------------------------------------------------ paired seeds
def setting_name(run: Run) -> str:
    """The run's name without its seed (``bert_tiny_sparse,seed=1,update_every=500`` ->
    ``bert_tiny_sparse,update_every=500``): runs of one setting share it."""
    parts = [p for p in run.name.split(",") if not p.startswith("seed=")]
    return ",".join(parts) or run.name


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
    """``ours - base`` over the seeds both have: n, mean, std, t, two-sided p, the 95% confidence
    interval of the mean, how many seeds are below zero, 'beyond noise' (p < 0.05) and the seeds a
    paired t-test needs for 80% power at the observed mean and std."""
    from scipy import stats

    seeds = sorted(set(ours) & set(base))
    if not seeds:
        return None
    diffs = np.array([ours[s] - base[s] for s in seeds])
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


def _machine_group(run: Run) -> str | None:
    """What a run pairs within: its machine kind and precision (None: it trained on several kinds)."""
    machine = run.summary.get("machine") or "machine not recorded"
    if machine == "several":
        return None
    return f"{machine}, {run.summary.get('precision', '?')}"


def report_paired(runs: list[Run], out: Output) -> None:
    """Per-seed losses of every setting, and the paired per-seed difference to the static run of the
    same size, block size and sparsity (same seed = same initial pattern and data order) on the same
    machine kind and precision, with the regime statistics (pruned_recently_grown, explored DOF)
    beside them."""
    settings: dict[tuple[str, str], dict[int, Run]] = {}
    dropped = []
    for run in sorted(runs, key=lambda r: (setting_name(r), r.seed)):
        group = _machine_group(run)
        if group is None:
            dropped.append(run.name)
            continue
        settings.setdefault((group, setting_name(run)), {})[run.seed] = run
    groups = sorted({group for group, _ in settings})
    baselines = {}
    for key, by_seed in settings.items():
        first = next(iter(by_seed.values()))
        if first.method == "static":
            baselines.setdefault((key[0], first.size, first.block_size, first.sparsity), key)
    table = Table(["setting", "machine", "method", "seeds", "val_mlm_loss", "std", "per_seed", "baseline",
                   "diff_mean", "diff_std", "diff_ci_low", "diff_ci_high", "t", "p", "below_baseline",
                   "beyond_noise", "seeds_for_80_power", "pruned_recently_grown", "grown_pruned_again",
                   "explored_dof"])
    long = Table(["setting", "machine", "seed", "val_mlm_loss", "diff_vs_baseline", "pruned_recently_grown",
                  "grown_pruned_again", "explored_dof"])
    for key, by_seed in settings.items():
        group, name = key
        first = next(iter(by_seed.values()))
        losses = {seed: r.loss for seed, r in by_seed.items()}
        base_key = baselines.get((group, first.size, first.block_size, first.sparsity)) if first.mode != "dense" else None
        base_key = None if base_key == key else base_key
        diff = paired_difference(losses, {s: r.loss for s, r in settings[base_key].items()}) if base_key else None
        prg = [v for v in (recently_grown_ratio(r) for r in by_seed.values()) if v is not None]
        again = [v for v in (recently_grown_ratio(r, "grown_pruned_again") for r in by_seed.values()) if v is not None]
        dof = [r.summary["mean_explored_dof"] for r in by_seed.values()
               if r.summary.get("mean_explored_dof") is not None]
        values = np.array(list(losses.values()))
        get = (lambda k: diff[k]) if diff else (lambda k: None)
        table.add(setting=name, machine=group, method=METHOD_LABELS.get(first.method, first.method), seeds=len(values),
                  val_mlm_loss=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else None,
                  per_seed=" ".join(f"{seed}:{loss:.4f}" for seed, loss in losses.items()),
                  baseline=base_key[1] if base_key else None, diff_mean=get("mean"), diff_std=get("std"),
                  diff_ci_low=get("ci_low"), diff_ci_high=get("ci_high"), t=get("t"), p=get("p"),
                  below_baseline=f"{diff['below']}/{diff['n']}" if diff else None,
                  beyond_noise=get("beyond_noise"), seeds_for_80_power=get("seeds_for_80_power"),
                  pruned_recently_grown=float(np.mean(prg)) if prg else None,
                  grown_pruned_again=float(np.mean(again)) if again else None,
                  explored_dof=float(np.mean(dof)) if dof else None)
        for seed, run in by_seed.items():
            base = settings[base_key].get(seed) if base_key else None
            long.add(setting=name, machine=group, seed=seed, val_mlm_loss=run.loss,
                     diff_vs_baseline=run.loss - base.loss if base else None,
                     pruned_recently_grown=recently_grown_ratio(run),
                     grown_pruned_again=recently_grown_ratio(run, "grown_pruned_again"),
                     explored_dof=run.summary.get("mean_explored_dof"))
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
    out.table("paired", table)
    out.table("paired_per_seed", long)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(settings)), 4.5))
    labels = []
    for i, ((group, name), by_seed) in enumerate(settings.items()):
        losses = [r.loss for r in by_seed.values()]
        ax.plot([i] * len(losses), losses, "o", alpha=0.6)
        ax.errorbar([i + 0.15], [np.mean(losses)], yerr=[np.std(losses, ddof=1) if len(losses) > 1 else 0],
                    fmt="s", color="black", capsize=3)
        labels.append(name if len(groups) == 1 else f"{name}\n[{group}]")
    ax.set_xticks(range(len(settings)), labels, rotation=30, ha="right", fontsize=7)
    _style(ax, "", "final validation MLM loss", "Per-seed losses (points) and mean ± std")
    fig.tight_layout()
    out.figure("paired", fig)


# ------------------------------------------------------------------------------------ pilot: capacity
CAPACITY_MAX_RISE = 0.01  # a validation loss this far above its minimum at the end: overfitting
CAPACITY_MAX_SECONDS = 900.0  # a candidate run must fit the confirmatory sweep's budget


def report_capacity(runs: list[Run], out: Output) -> None:
    """The proxy pilot's choice rule (configs/sweeps/proxy_pilot_cpu.yaml): for static runs of one
    model, vocabulary and horizon, the capacity gap g of each sparsity against the lowest one, the
    run's cost t (train_time_s) and the score g / sqrt(t); the eligible candidate (s >= 0.9, its
    validation loss not rising by more than CAPACITY_MAX_RISE at the end, t <= CAPACITY_MAX_SECONDS)
    with the largest score is chosen. DynSparse runs play no part."""
    runs = _require(runs, "static runs at two or more sparsities", "capacity", lambda r: r.mode == "static")
    families: dict[tuple, list[Run]] = {}
    for run in runs:
        key = (run.size, run.summary.get("vocab_size"), int(run.summary.get("steps", 0)), run.seed,
               _machine_group(run))
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
    out.table("capacity", table)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in table.rows:
        if row["capacity_gap"] is None:
            continue
        ax.plot([row["train_time_s"]], [row["capacity_gap"]], "*" if row["chosen"] else ("o" if row["eligible"] else "x"),
                markersize=12 if row["chosen"] else 7)
        ax.annotate(f"{row['model']} V={row['vocab_size']} T={row['steps']} s={row['sparsity']:g}",
                    (row["train_time_s"], row["capacity_gap"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    _style(ax, "train time (s, one thread)", "capacity gap (nats)",
           "Pilot: capacity gap vs cost (★ chosen, × not eligible)")
    out.figure("capacity", fig)


FIGURES: dict[str, Callable[..., None]] = {
    "pareto": report_pareto,
    "sparsity": report_sparsity,
    "prune_ratio_updates": report_prune_ratio_updates,
    "block_metric": report_block_metric,
    "group_lasso": report_group_lasso,
    "init": report_init,
    "zero_vs_frozen": report_zero_vs_frozen,
    "freeze_unfreeze": report_freeze_unfreeze,
    "exploration": report_exploration,
    "learning_rate": report_learning_rate,
    "paired": report_paired,
    "capacity": report_capacity,
}


def sweep_figure(runs_dir: Path) -> str | None:
    """The ``figure`` a sweep directory was made for (its ``sweep.yaml``), if any."""
    import yaml

    spec = Path(runs_dir) / "sweep.yaml"
    if spec.is_file():
        try:
            raw = yaml.safe_load(spec.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            return None
        return raw.get("figure") if isinstance(raw, dict) else None
    return None


def build_report(runs_dir: str | Path, figure: str | None = None, output: str | Path | None = None, *,
                 layer: str | None = None, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``figure``'s PNG and tables from the finished runs under ``runs_dir``; the paths written."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    runs_dir = Path(runs_dir)
    figure = figure or sweep_figure(runs_dir)
    if figure is None:
        raise ReportError(f"give --figure (one of {', '.join(FIGURES)}); {runs_dir} has no sweep.yaml naming one")
    if figure not in FIGURES:
        raise ReportError(f"unknown figure {figure!r}; use one of {', '.join(FIGURES)}")
    runs, unfinished = load_runs(runs_dir, warn)
    if not runs:
        more = f" ({len(unfinished)} unfinished)" if unfinished else ""
        raise ReportError(f"no finished runs ({RunDir.SUMMARY}) under {runs_dir}{more}; run the sweep first")
    directory = Path(output) if output else runs_dir / "report"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create {directory}: {exc.strerror or exc}") from None
    out = Output(directory, title=f"{figure}: {len(runs)} runs from {runs_dir}", warn=warn)
    kwargs = {"layer": layer} if figure == "exploration" else {}
    FIGURES[figure](runs, out, **kwargs)
    return out.written
