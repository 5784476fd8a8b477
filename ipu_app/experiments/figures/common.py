"""What every figure shares: the table type, what a figure's table function returns, the plot style
and the run selections (best learning rate per setting, series)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..plotting import pyplot
from ..runs import ReportError, Run, best_over_lr

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


@dataclass
class Tables:
    """What a figure's table function returns: its tables by file stem (with an optional Markdown
    title; None: the report's), in writing order, and whatever its plot function needs besides."""

    tables: list[tuple[str, Table, str | None]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, stem: str, table: Table, title: str | None = None) -> Table:
        self.tables.append((stem, table, title))
        return table

    def __getitem__(self, stem: str) -> Table:
        for name, table, _ in self.tables:
            if name == stem:
                return table
        raise KeyError(stem)


# ------------------------------------------------------------------------------------ style
def plain_log_axis(axis) -> None:
    """Plain numbers (2.8, not 2.8×10⁰) on a log axis, minor ticks included."""
    from matplotlib.ticker import FormatStrFormatter

    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(FormatStrFormatter("%g"))


def style(ax, xlabel: str, ylabel: str, title: str | None = None, *, xlog: bool = False, legend: int = 8) -> None:
    if xlog:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend)


def errorbar_figure(series: list[tuple[str, list[float], list]], xlabel: str, title: str):
    """One log-x panel of seed-mean loss (± std) per series of (label, x values, points)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs, points in series:
        ax.errorbar([x if x > 0 else float("nan") for x in xs], [p.loss for p in points],
                    yerr=[p.std for p in points], marker="o", capsize=3, label=label)
    style(ax, xlabel, "validation MLM loss", title, xlog=True)
    return fig


# ------------------------------------------------------------------------------------ selections
def require(runs: list[Run], what: str, figure: str, test: Callable[[Run], bool] = lambda r: True) -> list[Run]:
    chosen = [r for r in runs if test(r)]
    if not chosen:
        raise ReportError(f"--figure {figure} needs {what}; none of the {len(runs)} finished runs is one")
    return chosen


def series(runs: list[Run], key: Callable[[Run], tuple], x: Callable[[Run], float]):
    """Best-over-LR points grouped into series by ``key``, each sorted by ``x``."""
    found: dict[tuple, list] = {}
    for point in best_over_lr(runs, key=lambda r: (key(r), x(r))):
        found.setdefault(point.key[0], []).append(point)
    return [(k, sorted(v, key=lambda p: x(p.first))) for k, v in found.items()]


def lr_curves(ax, runs: list[Run], key: Callable[[Run], str]) -> None:
    """Seed-mean loss (± std) against the learning rate, one curve per ``key``."""
    from ..runs import group

    for name, points in series(runs, key=lambda r: (key(r),), x=lambda r: r.learning_rate):
        pts = group([q for p in points for q in p.runs], key=lambda r: (round(r.learning_rate, 12),))
        pts.sort(key=lambda p: p.first.learning_rate)
        ax.errorbar([p.first.learning_rate for p in pts], [p.loss for p in pts], yerr=[p.std for p in pts], marker="o",
                    capsize=3, label=name[0])
    style(ax, "learning rate", "validation MLM loss", xlog=True)


def per_lr_table(runs: list[Run], key_name: str, key: Callable[[Run], Any]) -> Table:
    """One row per setting and learning rate; ``best`` marks each setting's best learning rate."""
    from ..runs import group

    table = Table(["model", key_name, "learning_rate", "seeds", "val_mlm_loss", "std", "best"])
    best = {p.key: round(p.first.learning_rate, 12) for p in best_over_lr(runs, key=lambda r: (r.size, key(r)))}
    for p in group(runs, key=lambda r: (r.size, key(r), round(r.learning_rate, 12))):
        r = p.first
        table.add(model=r.size, **{key_name: key(r)}, learning_rate=r.learning_rate, seeds=p.seeds, val_mlm_loss=p.loss,
                  std=p.std if p.seeds > 1 else None, best=best[(r.size, key(r))] == p.key[2])
    table.rows.sort(key=lambda row: (row["model"], str(row[key_name]), row["learning_rate"]))
    return table
