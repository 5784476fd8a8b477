"""Explored degrees of freedom over training and one layer's accumulated pattern (Fig. 11)."""

from __future__ import annotations

from typing import Callable

from ...rundir import RunDir
from ..plotting import pyplot
from ..runs import ReportError, Run, dof_curve
from .common import METHOD_LABELS, Table, Tables, require, style

DEFAULT_LAYER = "bert.encoder.layer.1.intermediate.dense"  # "Boom-up" of the second block (Fig. 11)


def match_layer(names: list[str], wanted: str) -> str:
    if wanted in names:
        return wanted
    hits = [n for n in names if n.endswith(wanted)]
    if len(hits) == 1:
        return hits[0]
    raise ReportError(f"--layer {wanted!r} matches {len(hits)} sparse weights; use a full name such as {names[0]!r}")


def tables(runs: list[Run], warn: Callable[[str], None] = lambda message: None, layer: str | None = None,
           **_) -> Tables:
    from ...sparse.exploration import ExplorationError, load_explored

    runs = require(runs, "static or DynSparse runs", "exploration", lambda r: r.mode != "dense")
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
                warn(f"skipping run {run.name}: {exc}")
                continue
            name = match_layer(sorted(explored), wanted)
            maps[run.name] = (run, name, explored[name], block)
            layer_dof = float(explored[name].mean())
        curve = dof_curve(run)
        table.add(run=run.name, method=METHOD_LABELS[run.method], model=run.size, sparsity=run.sparsity,
                  block_size=run.block_size, pattern_updates=run.summary.get("pattern_updates", 0),
                  initial_dof=curve[0][1], final_explored_dof=curve[-1][1], layer_explored_dof=layer_dof)
    table.notes.append(f"explored DOF: fraction of a dense weight ever active (mean over layers); layer_explored_dof: "
                       f"{wanted}")
    if not maps:
        warn("no explored.safetensors in these runs: the accumulated pattern image is skipped")
    out = Tables(data={"runs": runs, "maps": maps})
    out.add("exploration", table)
    return out


def plot(result: Tables) -> dict:
    runs, maps = result.data["runs"], result.data["maps"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in sorted(runs, key=lambda r: (r.sparsity, r.method, r.name)):
        curve = dof_curve(run)
        ax.plot([c[0] for c in curve], [c[1] for c in curve], drawstyle="steps-post",
                label=f"{METHOD_LABELS[run.method]}, s={run.sparsity:g}" + (f", b={run.block_size}" if run.block_size > 1
                                                                            else ""))
    ax.set_ylim(0, 1.02)
    style(ax, "step", "explored degrees of freedom", "Explored degrees of freedom (Fig. 11, left)")
    figures = {"exploration": fig}
    if maps:
        fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 4.6), squeeze=False, constrained_layout=True)
        for ax, (run, name, explored, block) in zip(axes[0], maps.values()):
            ax.imshow(explored, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            ax.set_title(f"{METHOD_LABELS[run.method]}, s={run.sparsity:g}\nDOF {explored.mean():.3f}", fontsize=9)
            ax.set_xlabel(f"input blocks (b={block})")
            ax.set_ylabel("output blocks")
        fig.suptitle(f"accumulated pattern of {name} (black = ever active; Fig. 11, right)", fontsize=10)
        figures["exploration_pattern"] = fig
    return figures
