import math

import pytest

from ipu_app.sparse.schedule import ScheduleError, UpdateSchedule, pruning_ratio_at


def test_evenly_spaced_has_no_update_after_last_segment():
    schedule = UpdateSchedule.evenly_spaced(100, 4)
    assert schedule.steps == (25, 50, 75)
    assert [schedule.is_update_step(t) for t in (24, 25, 26, 100)] == [False, True, False, False]
    assert schedule.update_index(75) == 2
    assert schedule.next_update_step(25) == 50 and schedule.next_update_step(75) is None


def test_paper_scale_schedule():
    schedule = UpdateSchedule.evenly_spaced(757_000, 160)
    assert len(schedule) == 159
    gaps = {b - a for a, b in zip((0, *schedule.steps), schedule.steps)}
    assert gaps <= {4731, 4732}  # every T/n = 4731.25 steps
    assert schedule.steps[-1] < 757_000


def test_explicit_schedule_and_errors():
    assert UpdateSchedule.explicit(10, [7, 3]).steps == (3, 7)
    for steps, match in (([0], "outside"), ([10], "outside"), ([3, 3], "repeat"), ([2.5], "integers")):
        with pytest.raises(ScheduleError, match=match):
            UpdateSchedule.explicit(10, steps)
    with pytest.raises(ScheduleError, match="exceeds"):
        UpdateSchedule.evenly_spaced(10, 11)
    with pytest.raises(ScheduleError, match=">= 1"):
        UpdateSchedule.evenly_spaced(10, 0)
    with pytest.raises(ScheduleError, match="not an update step"):
        UpdateSchedule.evenly_spaced(100, 4).update_index(26)
    assert len(UpdateSchedule.never(100)) == 0


def test_cosine_and_constant_pruning_ratio():
    assert pruning_ratio_at(0, 0.5, 1000) == pytest.approx(0.5)
    assert pruning_ratio_at(500, 0.5, 1000) == pytest.approx(0.25)
    assert pruning_ratio_at(1000, 0.5, 1000) == pytest.approx(0.0, abs=1e-12)
    assert pruning_ratio_at(250, 0.5, 1000) == pytest.approx(0.25 * (1 + math.cos(math.pi / 4)))
    assert pruning_ratio_at(900, 0.3, 1000, "constant") == 0.3
    with pytest.raises(ScheduleError, match="unknown pruning_schedule"):
        pruning_ratio_at(1, 0.5, 10, "linear")
    with pytest.raises(ScheduleError, match=r"\[0, 1\]"):
        pruning_ratio_at(1, 1.5, 10)


def test_every_interval_schedule():
    assert UpdateSchedule.every(2000, 500).steps == (500, 1000, 1500)
    assert UpdateSchedule.every(2001, 500).steps == (500, 1000, 1500, 2000)
    with pytest.raises(ScheduleError, match="interval must be >= 1"):
        UpdateSchedule.every(100, 0)
