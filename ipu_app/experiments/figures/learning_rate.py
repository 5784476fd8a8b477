"""Learning-rate sweeps with cubic fits (Fig. 12) and the learning-rate scaling law (Fig. 13)."""

from __future__ import annotations

import math

import numpy as np

from ...sparse.flops import auto_learning_rate
from ..plotting import pyplot
from ..runs import Run, fit_lr_curve, fit_power_law, group
from .common import METHOD_LABELS, Table, Tables, style


def family(r: Run) -> tuple:
    return (r.method, round(r.sparsity, 6), r.block_size)


def label(f: tuple) -> str:
    method, s, b = f
    return "dense" if method == "dense" else f"{METHOD_LABELS[method]} s={s:g}" + (f" b={b}" if b > 1 else "")


def tables(runs: list[Run], **_) -> Tables:
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
    out = Tables(data={"fits": fits})
    out.add("learning_rate", table)
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
    out.add("learning_rate_law", law, "Learning-rate scaling law (Fig. 13)")
    out.data["law_lines"] = law_lines
    return out


def plot(result: Tables) -> dict:
    fits, law_lines, table = result.data["fits"], result.data["law_lines"], result["learning_rate"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (key, (fit, lrs, losses)) in enumerate(sorted(fits.items(), key=lambda kv: str(kv[0]))):
        color = colors[i % len(colors)]
        axes[0].plot(lrs, losses, "o", color=color, label=f"{key[0]} {label(key[1:])}")
        if fit is not None:
            grid = np.exp(np.linspace(math.log(fit.lr_min), math.log(fit.lr_max), 100))
            axes[0].plot(grid, fit(grid), "-", color=color, alpha=0.7)
            axes[0].plot([fit.optimum_lr], [fit.optimum_loss], "v", color="k", markersize=8)
    style(axes[0], "learning rate", "validation MLM loss", "LR sweeps with cubic fits; ▼ fitted optimum (Fig. 12)",
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
    style(axes[1], "non-embedding non-zero parameters N", "optimal learning rate",
           "Learning-rate scaling law (Fig. 13)", xlog=True, legend=7)
    return {"learning_rate": fig}
