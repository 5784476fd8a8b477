"""When pattern updates happen and how much of each layer they prune."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

from ..choices import PRUNING_SCHEDULES


class ScheduleError(ValueError):
    """An update schedule or pruning-ratio setting is invalid."""


@dataclass(frozen=True)
class PruneFraction:
    """``pr(t)``: the fraction of the active blocks pruned by an update after step ``t`` (checked once,
    here; calling it is pure arithmetic).

    cosine: ``pr(t) = pr * 0.5 * (1 + cos(pi * t / T))`` (Evci et al.; the paper's choice);
    constant: ``pr``.
    """

    pruning_ratio: float
    total_steps: int
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        if not 0.0 <= self.pruning_ratio <= 1.0:
            raise ScheduleError(f"pruning_ratio must be in [0, 1], got {self.pruning_ratio}")
        if self.total_steps <= 0:
            raise ScheduleError(f"total_steps must be positive, got {self.total_steps}")
        if self.schedule not in PRUNING_SCHEDULES:
            raise ScheduleError(f"unknown pruning_schedule {self.schedule!r}; use one of {list(PRUNING_SCHEDULES)}")

    def __call__(self, step: int) -> float:
        if self.schedule == "constant":
            return float(self.pruning_ratio)
        t = min(max(step, 0), self.total_steps)
        return self.pruning_ratio * 0.5 * (1.0 + math.cos(math.pi * t / self.total_steps))


def pruning_ratio_at(step: int, pruning_ratio: float, total_steps: int, schedule: str = "cosine") -> float:
    """``PruneFraction(pruning_ratio, total_steps, schedule)(step)``."""
    return PruneFraction(pruning_ratio, total_steps, schedule)(step)


@dataclass(frozen=True)
class UpdateSchedule:
    """The optimizer steps after which the pattern is updated.

    Steps count completed optimizer steps (1-based): an update at step ``t``
    runs after the ``t``-th optimizer step.
    """

    total_steps: int
    steps: tuple[int, ...]

    @classmethod
    def evenly_spaced(cls, total_steps: int, segments: int | None = None, *,
                      num_updates: int | None = None) -> "UpdateSchedule":
        """The paper's schedule: training is cut into ``n = segments`` segments of
        ``T/n`` steps and the pattern changes at every segment boundary, i.e. at
        ``k * T / n`` for ``k = 1 .. n-1``; there is no update after the last segment,
        so ``n - 1`` updates happen (Algorithm 1). ``num_updates`` is the old name of ``segments``."""
        if (segments is None) == (num_updates is None):
            raise ScheduleError("give segments (the paper's n; num_updates is its old name), exactly once")
        segments = num_updates if segments is None else segments
        if total_steps <= 0:
            raise ScheduleError(f"total_steps must be positive, got {total_steps}")
        if segments < 1:
            raise ScheduleError(f"segments must be >= 1, got {segments}")
        if segments > total_steps:
            raise ScheduleError(
                f"segments={segments} exceeds total_steps={total_steps}: segments would be shorter than one step"
            )
        steps = tuple(k * total_steps // segments for k in range(1, segments))
        return cls(total_steps, steps)

    @classmethod
    def every(cls, total_steps: int, interval: int) -> "UpdateSchedule":
        """An update after every ``interval`` steps (at ``k * interval < total_steps``)."""
        if total_steps <= 0:
            raise ScheduleError(f"total_steps must be positive, got {total_steps}")
        if interval < 1:
            raise ScheduleError(f"the update interval must be >= 1 step, got {interval}")
        return cls(total_steps, tuple(range(interval, total_steps, interval)))

    @classmethod
    def explicit(cls, total_steps: int, steps: Sequence[int]) -> "UpdateSchedule":
        """Updates at the given steps (each in ``[1, total_steps - 1]``, no repeats)."""
        if total_steps <= 0:
            raise ScheduleError(f"total_steps must be positive, got {total_steps}")
        clean = []
        for s in steps:
            if isinstance(s, bool) or int(s) != s:
                raise ScheduleError(f"update steps must be integers, got {s!r}")
            if not 1 <= int(s) < total_steps:
                raise ScheduleError(f"update step {s} is outside [1, {total_steps - 1}]")
            clean.append(int(s))
        if len(set(clean)) != len(clean):
            raise ScheduleError(f"update steps repeat: {sorted(clean)}")
        return cls(total_steps, tuple(sorted(clean)))

    @classmethod
    def never(cls, total_steps: int) -> "UpdateSchedule":
        """No updates: static sparsity."""
        return cls(max(total_steps, 1), ())

    def __len__(self) -> int:
        return len(self.steps)

    def is_update_step(self, step: int) -> bool:
        i = bisect.bisect_left(self.steps, step)
        return i < len(self.steps) and self.steps[i] == step

    def update_index(self, step: int) -> int:
        """0-based index of the update at ``step`` (which must be an update step)."""
        i = bisect.bisect_left(self.steps, step)
        if i >= len(self.steps) or self.steps[i] != step:
            raise ScheduleError(f"step {step} is not an update step")
        return i

    def next_update_step(self, step: int) -> int | None:
        """First update step strictly after ``step``, or None."""
        i = bisect.bisect_right(self.steps, step)
        return self.steps[i] if i < len(self.steps) else None
