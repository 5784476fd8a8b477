"""Run metrics: one JSON object per line in ``RUN_DIR/metrics.jsonl`` and TensorBoard scalars.

Every record has ``kind`` (``train``, ``val``, ``update``, ``skip``) and ``step`` (completed
optimizer steps). On resume, records after the checkpoint's step are dropped (they will be
produced again), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..io import atomic_write_bytes


class MetricsLogger:
    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is in requirements.txt; a stripped install still trains
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, kind: str, step: int, **values) -> dict:
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        return record

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def log(self, kind: str, step: int, **values) -> dict:
        return {"kind": kind, "step": step, **values}

    def close(self) -> None:
        pass


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl`` (of one ``kind`` when given); a damaged line is a
    one-line ValueError naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path} line {number} is not JSON") from None
    return [r for r in records if kind is None or r["kind"] == kind]
