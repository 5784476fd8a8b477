"""The experiment tables of docs/experiments.md recomputed from the runs' records kept in docs/results.

Each folder of docs/results holds a sweep's finished runs without their weights (config.yaml,
metrics.jsonl, summary.json, kernels.json). ``report`` reads it as it reads the
sweep's own directory; every per-seed row and the primary test's numbers written in the docs must be
what it computes now."""

import math
from pathlib import Path

import pytest

from ipu_app.experiments.report import build_report

from .test_report import read_csv

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
EXPERIMENTS = ROOT / "docs" / "experiments.md"
HORIZON = sorted(p for p in RESULTS.glob("horizon*") if (p / "runs").is_dir())


def signed(value: float, digits: int = 4) -> str:
    """A difference as the docs write it: always a sign, the minus a typographic one."""
    return f"{value:+.{digits}f}".replace("-", "\N{MINUS SIGN}")


def step(value: str) -> str:
    return value if value == "never" else f"{int(value):,}"


def seed_row(row: dict) -> str:
    """One per-seed row of a horizon table in docs/experiments.md."""
    cells = [row["seed"], f"{float(row['static_val_mlm_loss']):.4f}", f"{float(row['dynsparse_val_mlm_loss']):.4f}",
             signed(float(row["diff"])), f"{step(row['static_nsp_step'])} / {step(row['dynsparse_nsp_step'])}",
             f"{float(row['pruned_recently_grown']):.3f}", f"{float(row['grown_pruned_again']):.3f}",
             f"{float(row['explored_dof']):.3f}"]
    return "| " + " | ".join(cells) + " |"


def test_every_horizon_result_folder_is_a_finished_pairing():
    assert HORIZON, "docs/results holds the records of the horizon tables"
    for folder in HORIZON:
        runs = sorted((folder / "runs").iterdir())
        assert runs and all((run / "summary.json").is_file() and (run / "metrics.jsonl").is_file() for run in runs)
        assert not any((run / "checkpoints").exists() or (run / "model").exists() for run in runs)  # records only


@pytest.mark.parametrize("folder", HORIZON, ids=lambda p: p.name)
def test_the_docs_per_seed_rows_and_tests_are_the_reports(folder, tmp_path):
    build_report(folder, "horizon", tmp_path)
    docs = " ".join(EXPERIMENTS.read_text().split())  # markdown wraps sentences anywhere
    per_seed = read_csv(tmp_path / "horizon_per_seed.csv")
    assert per_seed
    for row in per_seed:
        assert seed_row(row) in docs, f"docs/experiments.md lacks the row {seed_row(row)!r} ({folder.name})"
    for end in read_csv(tmp_path / "horizon_end.csv"):
        n = int(end["n"])
        mean = float(end["diff_mean"])
        stated = f"DynSparse − static = {signed(mean)}"
        if n >= 2:
            stated += (f", 95 % interval [{signed(float(end['ci_low']))}, {signed(float(end['ci_high']))}], "
                       f"t = {float(end['t']):.2f}, p = {float(end['p']):.2f} (n = {n}").replace("-", "\N{MINUS SIGN}")
        assert stated in docs, f"docs/experiments.md lacks {stated!r} ({folder.name}, {end['machine']})"
        assert math.isfinite(mean)
