"""``--steps N``: what a run's length rescales (warmup, log / validate / checkpoint intervals, the
number of segments), and the micro-batch fitted to a batch set below it."""

from __future__ import annotations

from typing import Any

from .schema import SECTION_CLASSES, SparsitySection, TrainingSection


# --steps N keeps at least this warmup where the recipe has one (a tenth of a shorter run, at least 2):
# rounded to 0, a fresh Adam starts at the peak learning rate (a phase II of a few dozen steps
# diverged so: MLM loss 7.89 -> 9.32 in two steps); at 1, lr_factor's first step is the peak as well.
MIN_SHORT_RUN_WARMUP = 10


def short_run_warmup(warmup: int, steps: int, new_steps: int) -> int:
    """The warmup of a run rescaled from ``steps`` to ``new_steps``: its fraction of the run, but where
    there is one, at least ``min(10, max(2, new_steps // 10))`` steps (and fewer than the run's)."""
    scaled = int(round(warmup * new_steps / steps))
    if warmup <= 0 or new_steps <= 2:
        return min(scaled, max(0, new_steps - 1))
    return min(max(scaled, min(MIN_SHORT_RUN_WARMUP, max(2, new_steps // 10))), new_steps - 1)


# --steps N keeps at least this many of each per run (capped at the config's own interval).
SHORT_RUN_EVENTS = {"log_every": 20, "validate_every": 4, "checkpoint_every": 4}


def rescale_to_steps(raw: dict, steps: int, overridden: set[str]) -> dict[str, tuple[Any, Any]]:
    """Set ``training.steps`` and rescale what depends on the run length, unless set explicitly;
    returns ``{dotted key: (old, new)}`` for what changed."""
    changed: dict[str, tuple[Any, Any]] = {}

    def change(section: dict, key: str, new: Any, section_name: str) -> None:
        dotted = f"{section_name}.{key}"
        old = section.get(key, getattr(SECTION_CLASSES[section_name], key))
        if dotted not in overridden and old != new:
            changed[dotted] = (old, new)
            section[key] = new

    training = raw.setdefault("training", {})
    if not isinstance(training, dict):
        return changed  # validation reports it
    old_steps = training.get("steps", TrainingSection.steps)
    old_warmup = training.get("warmup_steps", TrainingSection.warmup_steps)
    if isinstance(old_steps, int) and isinstance(old_warmup, int) and old_steps > 0:
        change(training, "warmup_steps", short_run_warmup(old_warmup, old_steps, steps), "training")
    for key, events in SHORT_RUN_EVENTS.items():
        every = training.get(key, getattr(TrainingSection, key))
        if isinstance(every, int) and every > steps // events:
            change(training, key, max(1, steps // events), "training")
    training["steps"] = steps
    sparsity = raw.setdefault("sparsity", {})
    if (isinstance(sparsity, dict) and sparsity.get("update_every") is None
            and not overridden & {"sparsity.segments", "sparsity.update_every"}):
        change(sparsity, "segments", short_run_segments(
            steps, sparsity.get("segments", SparsitySection.segments),
            sparsity.get("min_segment_steps", SparsitySection.min_segment_steps)), "sparsity")
        if sparsity.get("mode", SparsitySection.mode) != "dynamic":
            # Inert without pattern updates: still set (saved configs, and so sweeps' stale checks, stay
            # as they were), but not reported as a change the run is subject to.
            changed.pop("sparsity.segments", None)
    return changed


def fit_micro_batch(raw: dict, overridden: set[str], world_size: int) -> dict[str, tuple[Any, Any]]:
    """A batch set below (or off) the recipe's micro-batch shrinks the micro-batch to the largest divisor of
    the per-process batch no larger than it, unless the micro-batch was set explicitly too (then a batch
    that does not divide stays an error)."""
    training = raw.get("training")
    if (not isinstance(training, dict) or "training.batch_size" not in overridden
            or "training.micro_batch_size" in overridden):
        return {}
    batch, micro = training.get("batch_size"), training.get("micro_batch_size")
    if not (isinstance(batch, int) and isinstance(micro, int) and batch >= 1 and micro >= 1 and world_size >= 1):
        return {}
    per_process, rest = divmod(batch, world_size)
    if rest or per_process == 0 or per_process % micro == 0:
        return {}
    new = max(d for d in range(1, min(micro, per_process) + 1) if per_process % d == 0)
    training["micro_batch_size"] = new
    return {"training.micro_batch_size": (micro, new)}


def short_run_segments(steps: int, segments: Any, min_segment_steps: Any) -> Any:
    """The paper's ``n`` for a run of ``steps``: at most ``segments``, with segments of at least
    ``min_segment_steps`` steps, and at least 2 segments (one update) where the run has 2 steps."""
    if not (isinstance(segments, int) and isinstance(min_segment_steps, int) and min_segment_steps >= 1):
        return segments  # validation reports the bad value
    return max(min(2, steps), min(segments, steps // min_segment_steps))
