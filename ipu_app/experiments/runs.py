"""Finished run directories as report inputs, and the numbers the paper's figures are made of.

A report reads only what training wrote: ``config.yaml`` (the resolved config), ``summary.json``
(final numbers), ``metrics.jsonl`` (curves) and ``explored.safetensors`` (exploration maps). It
never imports the model or trains anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..config import ConfigError, rename_old_keys
from ..rundir import RunDir
from ..train.metrics import METRICS_VERSION


class ReportError(ValueError):
    """Run directories that cannot make the asked-for report; one actionable line."""


@dataclass
class Run:
    """One finished training run."""

    name: str
    path: Path
    config: dict
    summary: dict
    _metrics: list[dict] | None = field(default=None, repr=False)

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key (``sparsity.ratio``)."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def mode(self) -> str:
        return self.get("sparsity.mode", "dense")

    @property
    def sparsity(self) -> float:
        return float(self.summary.get("sparsity", 0.0 if self.mode == "dense" else self.get("sparsity.ratio", 0.0)))

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    @property
    def size(self) -> str:
        return str(self.get("model.size", "?"))

    @property
    def nsp(self) -> bool:
        """Whether the run trained next-sentence prediction beside MLM (runs pair only with their kind)."""
        return bool(self.get("model.nsp", True))

    @property
    def block_size(self) -> int:
        return int(self.get("sparsity.block_size", 1)) if self.mode != "dense" else 1

    @property
    def loss(self) -> float:
        return float(self.summary["final_val_mlm_loss"])

    @property
    def flops(self) -> float:
        return float(self.summary["non_embedding_flops_per_sequence"])

    @property
    def learning_rate(self) -> float:
        return float(self.summary["learning_rate"])

    @property
    def seed(self) -> int:
        return int(self.get("seed", 0))

    @property
    def method(self) -> str:
        """``dense``, ``static``, or DynSparse's regrowth rule: ``random`` or ``gradient`` (RigL)."""
        if self.mode != "dynamic":
            return self.mode
        return str(self.get("sparsity.regrowth", "random"))

    def metrics(self, kind: str | None = None) -> list[dict]:
        if self._metrics is None:
            from ..train.metrics import read_metrics

            try:
                self._metrics = read_metrics(self.path) if RunDir(self.path).metrics_path.is_file() else []
            except ValueError as exc:
                raise ReportError(f"{exc}; the run's metrics are damaged") from None
        return [r for r in self._metrics if kind is None or r.get("kind") == kind]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} is not a JSON object")
    return data


def _read_yaml(path: Path) -> dict:
    from ..config import ConfigError, read_yaml

    try:
        data = read_yaml(path)
    except ConfigError as exc:
        raise ReportError(str(exc)) from None
    if not data:
        raise ReportError(f"{path} is empty: not a run's config")
    return data


REQUIRED_SUMMARY = ("final_val_mlm_loss", "non_embedding_flops_per_sequence", "learning_rate")


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories under ``root``: a sweep's ``runs/*``, or any directory (to depth 3) holding a
    ``config.yaml`` next to ``metrics.jsonl`` or ``summary.json``."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory; give a sweep directory or a directory of run directories")
    found = []

    def walk(p: Path, depth: int) -> None:
        if RunDir(p).is_run():
            found.append(p)
            return
        if depth == 0:
            return
        for child in sorted(p.iterdir()):
            if child.is_dir() and child.name not in (*RunDir.PARTS, "attempts"):
                walk(child, depth - 1)

    walk(root, 3)
    return found


def load_runs(root: Path, warn: Callable[[str], None] = lambda message: None) -> tuple[list[Run], list[str]]:
    """The finished runs under ``root`` and the names of unfinished ones (no ``summary.json``)."""
    runs, unfinished, old = [], [], []
    for path in find_run_dirs(root):
        run = RunDir(path)
        if not run.is_finished():
            unfinished.append(path.name)
            continue
        try:
            summary = _read_json(run.summary_path)
            config = rename_old_keys(_read_yaml(run.config_path), str(run.config_path))
        except (ReportError, ConfigError) as exc:  # a damaged run is left out; the others are reported
            warn(f"skipping run {path.name}: {exc}")
            continue
        missing = [k for k in REQUIRED_SUMMARY if summary.get(k) is None]
        if missing:
            raise ReportError(f"{run.summary_path} lacks {missing[0]!r}; was it written by this version?")
        if _flag_old_validation(summary):
            old.append(path.name)
        runs.append(Run(name=path.name, path=path, config=config, summary=summary))
    if old:
        warn(f"{len(old)} run(s) were written before metrics_version {METRICS_VERSION} ({', '.join(old[:3])}"
             + (" ..." if len(old) > 3 else "") + "): their validation NSP loss and MLM accuracy may be swapped "
             "and are left out, and their validation subset (data.validation_sequences) was the first N sequences, "
             "not a fixed random N, so their MLM losses pair only with each other; recompute all three with "
             "python -m ipu_app revalidate RUN_DIR...")
    if unfinished:
        warn(f"skipping {len(unfinished)} unfinished run(s): {', '.join(unfinished[:5])}"
             + (" ..." if len(unfinished) > 5 else ""))
    return runs, unfinished


# Recorded by runs before version 2 and possibly swapped there (read positionally).
SUSPECT_VALIDATION = ("final_val_nsp_loss", "final_val_mlm_accuracy")


def _flag_old_validation(summary: dict) -> bool:
    """For a summary written before ``METRICS_VERSION``: move the validation values that may be
    swapped to ``summary["unverified"]`` (so no table mixes them with right ones) and return True."""
    if int(summary.get("metrics_version", 1)) >= METRICS_VERSION:
        return False
    summary["unverified"] = {k: summary.pop(k) for k in SUSPECT_VALIDATION if k in summary}
    return True


# ------------------------------------------------------------------------------ aggregation
@dataclass
class Point:
    """Runs that differ only by seed, averaged."""

    key: tuple
    runs: list[Run]

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.runs]

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses))

    @property
    def std(self) -> float:
        return float(np.std(self.losses, ddof=1)) if len(self.runs) > 1 else 0.0

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def seeds(self) -> int:
        return len(self.runs)

    def mean(self, value: Callable[[Run], float | None]) -> float | None:
        values = [v for v in (value(r) for r in self.runs) if v is not None and math.isfinite(v)]
        return float(np.mean(values)) if values else None


def group(runs: Iterable[Run], key: Callable[[Run], tuple]) -> list[Point]:
    """Average over seeds: one Point per distinct ``key`` (in first-seen order)."""
    points: dict[tuple, Point] = {}
    for run in runs:
        k = key(run)
        points.setdefault(k, Point(k, [])).runs.append(run)
    return list(points.values())


def best_over_lr(runs: Iterable[Run], key: Callable[[Run], tuple]) -> list[Point]:
    """Per ``key``, the learning rate with the lowest seed-mean loss (the paper's tables report the
    best learning rate of each setting)."""
    by_lr = group(runs, lambda r: (key(r), round(r.learning_rate, 12)))
    best: dict[tuple, Point] = {}
    for point in by_lr:
        k = point.key[0]
        if k not in best or point.loss < best[k].loss:
            best[k] = Point(k, point.runs)
    return list(best.values())


# ------------------------------------------------------------------------ dense-family curve
@dataclass
class DenseCurve:
    """The dense family's MLM loss against non-embedding FLOPs, piecewise linear in log FLOPs."""

    flops: np.ndarray
    loss: np.ndarray
    names: list[str]

    @classmethod
    def from_points(cls, points: list[tuple[float, float, str]]) -> "DenseCurve | None":
        """``points``: (FLOPs, loss, name) per dense size; None with fewer than two sizes."""
        points = sorted(points)
        if len(points) < 2:
            return None
        flops, loss, names = zip(*points)
        return cls(np.array(flops, dtype=float), np.array(loss, dtype=float), list(names))

    def matched_loss(self, flops: float) -> float | None:
        """The dense loss at ``flops``, interpolated linearly in log FLOPs between adjacent sizes
        (None outside the family's range)."""
        x = math.log(flops)
        xs = np.log(self.flops)
        if x < xs[0] - 1e-12 or x > xs[-1] + 1e-12:
            return None
        return float(np.interp(x, xs, self.loss))

    def matched_flops(self, loss: float) -> float | None:
        """The FLOPs at which the interpolated dense curve reaches ``loss`` (the first crossing
        from the small end; None when no segment brackets it)."""
        xs = np.log(self.flops)
        for i in range(len(xs) - 1):
            lo, hi = self.loss[i], self.loss[i + 1]
            if min(lo, hi) - 1e-12 <= loss <= max(lo, hi) + 1e-12:
                if hi == lo:
                    return float(self.flops[i])
                t = (loss - lo) / (hi - lo)
                return float(math.exp(xs[i] + t * (xs[i + 1] - xs[i])))
        return None

    def reduction_bound(self, flops: float, loss: float) -> str | None:
        """When ``loss`` lies outside the family's losses, the side the factor is on: below the
        largest model's loss it is ``< FLOPs / FLOPs_largest``, above the smallest's ``> FLOPs /
        FLOPs_smallest`` (None inside the range, where :meth:`reduction_factor` is exact)."""
        if self.matched_flops(loss) is not None:
            return None
        if loss < self.loss.min() and self.loss[-1] == self.loss.min():
            return f"< {flops / self.flops[-1]:.3g}"
        if loss > self.loss.max() and self.loss[0] == self.loss.max():
            return f"> {flops / self.flops[0]:.3g}"
        return None

    def reduction_factor(self, flops: float, loss: float) -> float | None:
        """``FLOPs_sparse / FLOPs_dense`` at equal loss (the paper's Fig. 8): below 1, the run needs
        fewer FLOPs than the dense family for its loss."""
        dense = self.matched_flops(loss)
        return None if dense is None else flops / dense


def dense_curve(runs: Iterable[Run]) -> DenseCurve | None:
    """The dense family of ``runs``: per model size, the best learning rate's seed-mean loss."""
    dense = best_over_lr([r for r in runs if r.mode == "dense"], key=lambda r: (r.size,))
    return DenseCurve.from_points([(p.first.flops, p.loss, p.first.size) for p in dense])


# ------------------------------------------------------------------- learning-rate analysis
@dataclass
class LrFit:
    """A polynomial fit of loss against ln(learning rate) and its minimum in the swept range."""

    coefficients: np.ndarray  # highest power first, in x = ln(lr)
    lr_min: float
    lr_max: float
    optimum_lr: float
    optimum_loss: float
    at_edge: bool  # the fitted minimum is an end of the swept range: the optimum may lie outside

    def __call__(self, lr):
        return np.polyval(self.coefficients, np.log(lr))


def fit_lr_curve(lrs: Iterable[float], losses: Iterable[float]) -> LrFit | None:
    """Cubic fit of loss vs ln(lr) (the paper's Fig. 12 method); quadratic with three learning rates;
    None with fewer. The optimum is the fitted curve's minimum over the swept range."""
    lrs, losses = np.asarray(list(lrs), dtype=float), np.asarray(list(losses), dtype=float)
    if len(np.unique(lrs)) < 3:
        return None
    degree = 3 if len(np.unique(lrs)) >= 4 else 2
    x = np.log(lrs)
    coefficients = np.polyfit(x, losses, degree)
    lo, hi = float(x.min()), float(x.max())
    candidates = [lo, hi]
    second = np.polyder(coefficients, 2)
    for root in np.roots(np.polyder(coefficients)):
        if abs(root.imag) < 1e-9 and lo <= root.real <= hi and np.polyval(second, root.real) > 0:
            candidates.append(float(root.real))
    values = [float(np.polyval(coefficients, c)) for c in candidates]
    best = int(np.argmin(values))
    return LrFit(coefficients, math.exp(lo), math.exp(hi), math.exp(candidates[best]), values[best], at_edge=best < 2)


def fit_power_law(ns: Iterable[float], lrs: Iterable[float]) -> tuple[float, float] | None:
    """``(slope, intercept)`` of ``ln lr = slope · ln N + intercept`` (the paper's Fig. 13); None
    with fewer than two distinct N."""
    ns, lrs = np.asarray(list(ns), dtype=float), np.asarray(list(lrs), dtype=float)
    if len(np.unique(ns)) < 2:
        return None
    slope, intercept = np.polyfit(np.log(ns), np.log(lrs), 1)
    return float(slope), float(intercept)


# ------------------------------------------------------------------------------- exploration
def dof_curve(run: Run) -> list[tuple[int, float]]:
    """Mean explored degrees of freedom over steps: the pattern density at step 0, then the value
    logged at every pattern update, then the final value at the last step."""
    curve = [(0, run.density)]
    for record in run.metrics("update"):
        if record.get("mean_explored_dof") is not None:
            curve.append((int(record["step"]), float(record["mean_explored_dof"])))
    final = run.summary.get("mean_explored_dof")
    steps = int(run.summary.get("steps", curve[-1][0]))
    if final is not None and steps > curve[-1][0]:
        curve.append((steps, float(final)))
    return curve


def recently_grown_ratio(run: Run, key: str = "pruned_recently_grown") -> float | None:
    """Mean over updates and layers of the fraction of pruned blocks grown at the previous update
    (the paper's "ratio of removed, new weights", Fig. 5); ``key="grown_pruned_again"``: of the
    blocks grown at the previous update, the fraction pruned again."""
    values = [layer[key] for record in run.metrics("update") for layer in record.get("layers", [])
              if layer.get(key) is not None and math.isfinite(layer[key])]
    return float(np.mean(values)) if values else None
