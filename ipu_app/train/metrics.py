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
from ..rundir import RunDir


# summary.json's "metrics_version". 2: validation NSP loss and MLM accuracy read by name (version 1
# runs, which have no such key, may hold them swapped), validation subsets drawn at random,
# real_tokens_per_second.
METRICS_VERSION = 2


class MetricsError(ValueError):
    """``metrics.jsonl`` is damaged beyond a cut-off last line."""


def json_safe(value):
    """``value`` with every non-finite float replaced by None, so that the JSON is standard
    (``NaN`` and ``Infinity`` are not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _parse_lines(path: Path) -> list[tuple[int, str, dict | None]]:
    """``(line number, line, record or None)`` for the non-empty lines; a last line that is cut off
    (a crash mid-write: no newline at the end) reads as no line at all."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    parsed = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            parsed.append((number, line, json.loads(line)))
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):
                break  # torn by a crash: it is written again when the run resumes
            parsed.append((number, line, None))
    return parsed


class MetricsLogger:
    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = RunDir(run_dir).metrics_path
        if resume_step is not None and self.path.exists():
            kept = []
            for number, line, record in _parse_lines(self.path):
                if record is None:
                    raise MetricsError(f"{self.path} line {number} is not JSON; the run's metrics are damaged "
                                     "(delete that line to resume)")
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
            atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is in requirements.txt; a stripped install still trains
                SummaryWriter = None
            if SummaryWriter is not None:
                # purge_step drops the events at and after it: those after the checkpoint's step, which
                # the resumed run writes again (the checkpoint's own step is kept).
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(RunDir(run_dir).tensorboard_dir), purge_step=purge)

    def log(self, kind: str, step: int, **values) -> dict:
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
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
    one-line ValueError naming it, except a cut-off last line (a crash mid-write), which is left out."""
    path = RunDir(run_dir).metrics_path
    records = []
    for number, _, record in _parse_lines(path):
        if record is None:
            raise ValueError(f"{path} line {number} is not JSON")
        records.append(record)
    return [r for r in records if kind is None or r["kind"] == kind]
