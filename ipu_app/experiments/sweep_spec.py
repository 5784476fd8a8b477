"""Sweep specs: the YAML grid of a sweep (see ``sweep.py`` for the format and how runs are run),
parsed, expanded into named runs and validated before anything starts."""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import CONFIG_DIR, ConfigError, RunConfig, load_config, parse_yaml

SPEC_KEYS = ("figure", "description", "set", "grid", "seeds")
SWEEP_DIR = CONFIG_DIR / "sweeps"


class SweepError(ValueError):
    """A sweep spec or sweep directory that cannot be used; one actionable line."""


@dataclass
class RunSpec:
    """One run of a sweep: its name, config and overrides."""

    name: str
    config: str
    overrides: dict[str, Any]
    steps: int | None = None
    seed: int | None = None

    def override_args(self) -> list[str]:
        return [f"{key}={_yaml_scalar(value)}" for key, value in self.overrides.items()]

    def resolve(self) -> RunConfig:
        try:
            config = load_config(self.config, self.override_args(), steps=self.steps, seed=self.seed)
        except ConfigError as exc:
            raise SweepError(f"run {self.name}: {exc}") from None
        config.name = self.name
        return config

    def command(self, run_dir: Path, resume: bool) -> list[str]:
        base = [sys.executable, "-m", "ipu_app", "train", "--no-progress"]
        if resume:
            return base + ["--resume", str(run_dir)]
        cmd = base + ["--config", self.config, "--output-dir", str(run_dir)]
        if self.steps is not None:
            cmd += ["--steps", str(self.steps)]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        for item in self.override_args():
            cmd += ["--set", item]
        cmd += ["--set", f"name={self.name}"]
        return cmd


@dataclass
class Sweep:
    name: str
    figure: str | None
    runs: list[RunSpec]
    text: str = ""
    description: str = ""


# ------------------------------------------------------------------------------ spec parsing
def resolve_spec_path(name_or_path: str | Path) -> Path:
    """A spec path, or a name under ``configs/sweeps``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (SWEEP_DIR / f"{name_or_path}.yaml", SWEEP_DIR / str(name_or_path)):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
    raise SweepError(f"no sweep spec {name_or_path!r}; give a YAML path or one of: {known}")


def load_sweep(name_or_path: str | Path) -> Sweep:
    """Parse and expand a sweep spec; every run's config is loaded and validated here."""
    path = resolve_spec_path(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = parse_yaml(text, path)
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path} must be a YAML mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r}; a sweep spec has {', '.join(SPEC_KEYS)}")
    common = raw.get("set") or {}
    if not isinstance(common, dict):
        raise SweepError(f"{path}: 'set' must map dotted config keys to values")
    grids = raw.get("grid")
    if isinstance(grids, dict):
        grids = [grids]
    if not grids or not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        raise SweepError(f"{path}: 'grid' must be a list of mappings, each with a 'config' key")
    runs = []
    for seed in _seeds(raw.get("seeds"), common, grids, path):
        for index, grid in enumerate(grids):
            entry = grid if seed is None else {**grid, "seed": seed}
            runs.extend(expand_grid(entry, common, where=f"{path} grid entry {index + 1}"))
    seen: dict[str, RunSpec] = {}
    for run in runs:
        if run.name in seen:
            raise SweepError(f"{path}: two runs are both named {run.name!r}; add a distinguishing key or 'label'")
        seen[run.name] = run
    for run in runs:
        run.resolve()  # every config error before anything starts
    return Sweep(name=path.stem, figure=raw.get("figure"), runs=runs, text=text,
                 description=str(raw.get("description") or ""))


def _seeds(seeds: Any, common: dict, grids: list[dict], path: Path) -> list[int | None]:
    """The ``seeds`` key: every grid entry is run once per seed, seeds outermost, so the arms of
    one seed are neighbours in the run order (``--jobs 2`` runs a pair side by side)."""
    if seeds is None:
        return [None]
    if isinstance(seeds, dict) and set(seeds) == {"from", "count"}:
        start, count = seeds["from"], seeds["count"]
        if not (isinstance(start, int) and isinstance(count, int) and count >= 1):
            raise SweepError(f"{path}: 'seeds: {{from: N, count: K}}' needs integers, K >= 1")
        seeds = list(range(start, start + count))
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise SweepError(f"{path}: 'seeds' must be a list of integers or {{from: N, count: K}}, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: 'seeds' lists a seed twice")
    if "seed" in common or any("seed" in grid for grid in grids):
        raise SweepError(f"{path}: give the seeds either in 'seeds' or as a 'seed' key, not both")
    return list(seeds)


def expand_grid(grid: dict, common: dict, where: str = "grid") -> list[RunSpec]:
    """The runs of one grid entry: the product of its list-valued keys, in spec order."""
    if "config" not in grid:
        raise SweepError(f"{where}: every grid entry needs 'config' (a config name or a list of them)")
    label = grid.get("label")
    keys = [k for k in grid if k != "label"]
    axes = [grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys]
    for key, values in zip(keys, axes):
        if not values:
            raise SweepError(f"{where}: {key!r} has an empty list of values")
    shown = [k for k in keys if k != "config"]
    runs = []
    for combo in itertools.product(*axes):
        chosen = dict(zip(keys, combo))
        config = chosen.pop("config")
        if not isinstance(config, str):
            raise SweepError(f"{where}: config must be a name or a list of names, got {config!r}")
        values = {**common, **chosen}
        for key in values:
            if not isinstance(key, str) or not key:
                raise SweepError(f"{where}: {key!r} is not a dotted config key")
        steps = values.pop("training.steps", None)
        seed = values.pop("seed", None)
        name = ",".join([str(label or config)] + [f"{_short(k, shown)}={_fmt(chosen[k])}" for k in shown])
        runs.append(RunSpec(name=name, config=config, overrides=values, steps=steps, seed=seed))
    return runs


def _short(key: str, keys: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    same = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    return leaf if len(same) == 1 else key


def _fmt(value: Any) -> str:
    """A value as it appears in a run (directory) name: short and filesystem-safe."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(_fmt(v) for v in value)
    text = str(value)
    if "/" in text:  # a path: its last component
        text = Path(text.rstrip("/")).name or "root"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text
