"""``python -m ipu_app report RUNS_DIR --figure NAME``: one paper figure from finished runs.

Each figure writes ``NAME.png`` and its table as ``NAME.csv`` and ``NAME.md`` (some write more,
e.g. ``exploration_pattern.png``, ``learning_rate_law.csv``) into the output directory. Numbers
come from the run directories only (see ``runs.py``); nothing is trained or re-evaluated.
Where a setting was run at several learning rates the tables take the best one, as the paper's do;
runs that differ only by seed are averaged (``± std`` over seeds when there are several).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..io import atomic_write_bytes
from ..rundir import RunDir
from .figures import NAMES as FIGURES
from .figures import figure_module
from .figures.common import Table
from .plotting import png_bytes
from .runs import ReportError, load_runs


@dataclass
class Output:
    """Where one report writes: tables (CSV + Markdown) and figures (PNG) by file stem, atomically."""

    directory: Path
    title: str
    written: list[Path] = field(default_factory=list)

    def table(self, stem: str, table: Table, title: str | None = None) -> None:
        self._write(f"{stem}.csv", table.csv().encode())
        self._write(f"{stem}.md", table.markdown(title or self.title).encode())

    def figure(self, stem: str, fig) -> None:
        self._write(f"{stem}.png", png_bytes(fig))

    def _write(self, name: str, data: bytes) -> None:
        path = self.directory / name
        atomic_write_bytes(path, data)
        self.written.append(path)


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
    module = figure_module(figure)
    result = module.tables(runs, warn=warn, layer=layer)
    out = Output(directory, title=f"{figure}: {len(runs)} runs from {runs_dir}")
    for stem, table, title in result.tables:
        out.table(stem, table, title)
    for stem, fig in module.plot(result).items():
        out.figure(stem, fig)
    return out.written
