"""``python -m ipu_app revalidate RUN_DIR...``: recompute a finished run's final validation.

Runs written before ``METRICS_VERSION`` 2 may hold their validation NSP loss and MLM accuracy
swapped, and validated a ``data.validation_sequences`` subset made of the first N sequences. This
evaluates the run's final model (``RUN_DIR/model``, the weights its final validation saw) on the
validation set as the current version builds it, with the code training validates with, and writes
the three values into ``summary.json``; the values they replace stay in it under ``revalidated``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..rundir import RunDir
from .metrics import METRICS_VERSION

def revalidate_run(run_dir: str | Path, *, force: bool = False, progress: bool = False) -> dict | None:
    """The run's new final validation values (None: the run is at the current version already and
    ``force`` is not set). Raises ValueError (one line) for a directory that is not a finished run."""
    from ..config import ConfigError
    from .evaluate import evaluate_run, final_validation
    from .trainer import _json

    run = RunDir(run_dir)
    summary_path = run.summary_path
    if not run.is_finished():
        raise ConfigError(f"{run} is not a finished run (no {RunDir.SUMMARY}); finish it with "
                          f"python run_pretraining.py --resume {run}")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{summary_path} is damaged ({exc.msg})") from None
    if int(summary.get("metrics_version", 1)) >= METRICS_VERSION and not force:
        return None
    result = evaluate_run(run.path, checkpoint="final", progress=progress)
    new = final_validation(result)
    previous = {k: summary.get(k) for k in (*new, "metrics_version")}
    history = summary.get("revalidated", [])
    summary.update(new, metrics_version=METRICS_VERSION,
                   revalidated=[*history, {"previous": previous, "precision": result["precision"]}])
    run.write_summary(_json(summary) + "\n")  # as the trainer writes it
    return new


def main(run_dirs: list[str], force: bool = False) -> int:
    failed = 0
    for run_dir in run_dirs:
        try:
            new = revalidate_run(run_dir, force=force)
        except ValueError as exc:
            print(f"error: {run_dir}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if new is None:
            print(f"{run_dir}: metrics_version {METRICS_VERSION} already (its validation is right); --force "
                  "recomputes it anyway", file=sys.stderr)
        else:
            print(json.dumps({"run": str(run_dir), **new}))
    return 1 if failed else 0
