"""The DynSparse algorithm's parts on their own: the factory's one check per choice, a custom scorer
and regrowth rule plugged into the updater, pr(t), and the exploration record and its file."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ipu_app.choices import BLOCK_METRICS, PRUNING_SCHEDULES, REGROWTH_RULES
from ipu_app.model.sparse_linear import SparseLinear
from ipu_app.sparse.exploration import Exploration, ExplorationError, load_explored
from ipu_app.sparse.layer import sparse_weights
from ipu_app.sparse.regrowth import GradientRegrowth, RandomRegrowth, RegrowthError, regrowth_rule
from ipu_app.sparse.schedule import PruneFraction, ScheduleError, UpdateSchedule
from ipu_app.sparse.scoring import BlockScorer
from ipu_app.sparse.updater import PatternUpdater, UpdaterError, build_updater


def model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return nn.Sequential(SparseLinear(16, 32, sparsity=0.75, block_size=4, generator=g))


@pytest.mark.parametrize("option, value, message", [
    ("mode", "dense", "unknown mode 'dense'; use one of ['static', 'dynamic']"),
    ("regrowth", "magnitude", "unknown regrowth 'magnitude'; use one of ['random', 'gradient']"),
    ("block_metric", "l3", "unknown block_metric 'l3'"),
    ("pruning_schedule", "linear", "unknown pruning_schedule 'linear'"),
    ("pruning_ratio", 1.5, "pruning_ratio must be in [0, 1], got 1.5"),
])
def test_the_factory_checks_each_choice_once_with_its_names(option, value, message):
    with pytest.raises(UpdaterError) as info:
        build_updater(model(), None, UpdateSchedule.evenly_spaced(10, 2), **{option: value})
    assert message in str(info.value)


def test_every_named_choice_builds_its_part():
    schedule = UpdateSchedule.evenly_spaced(10, 2)
    for name in REGROWTH_RULES:
        updater = build_updater(model(), None, schedule, regrowth=name)
        assert updater.regrowth.name == name
        assert updater.regrowth.needs_dense_grad == (name == "gradient")
    for metric in BLOCK_METRICS:
        assert build_updater(model(), None, schedule, block_metric=metric).scorer.metric == metric
    for shape in PRUNING_SCHEDULES:
        assert build_updater(model(), None, schedule, pruning_schedule=shape).prune_fraction.schedule == shape
    assert isinstance(regrowth_rule("random", seed=3), RandomRegrowth)
    assert isinstance(regrowth_rule("gradient"), GradientRegrowth)
    static = build_updater(model(), None, schedule, mode="static")
    assert not static.is_update_step(5) and static.step(5) is None


def test_custom_parts_plug_into_the_updater():
    # Prune the blocks with the largest first entry, regrow the lowest free positions.
    class FirstEntry:
        def __call__(self, values):
            return -values[:, 0, 0].float()

    class Lowest:
        name, needs_dense_grad = "lowest", False

        def select(self, layer_index, name, layer, occupied, k, update_index):
            return torch.nonzero(~occupied.cpu()).flatten()[:k]

    m = model()
    layer = m[0]
    with torch.no_grad():
        layer.values.copy_(torch.arange(layer.nnz, dtype=torch.float32).reshape(-1, 1, 1).expand_as(layer.values))
    before = layer.pattern.linear_index().tolist()
    updater = PatternUpdater(m, None, UpdateSchedule.evenly_spaced(10, 2), prune_fraction=lambda step: 0.25,
                             regrowth=Lowest(), scorer=FirstEntry())
    stats = updater.update(5)
    after = layer.pattern.linear_index().tolist()
    k = math.ceil(0.25 * len(before))
    free = [i for i in range(layer.pattern.num_blocks) if i not in before][:k]
    assert stats.pruned == k and sorted(set(before) - set(after)) == before[-k:]  # the largest values went
    assert sorted(set(after) - set(before)) == free


def test_prune_fraction_is_checked_once_and_pure():
    pr = PruneFraction(0.5, 1000)
    assert pr(0) == pytest.approx(0.5) and pr(500) == pytest.approx(0.25) and pr(2000) == pytest.approx(0.0)
    assert PruneFraction(0.3, 1000, "constant")(900) == 0.3
    for bad in ((1.5, 10, "cosine"), (0.5, 0, "cosine"), (0.5, 10, "linear")):
        with pytest.raises(ScheduleError):
            PruneFraction(*bad)


def test_gradient_regrowth_needs_a_finite_recorded_gradient():
    m = model()
    layer = m[0]
    occupied = layer.pattern.block_mask().flatten()
    rule = GradientRegrowth(BlockScorer("l2"))
    with pytest.raises(RegrowthError, match="call updater.begin_step"):
        rule.select(0, "0", layer, occupied, 2, 0)
    target = int(torch.nonzero(~occupied).flatten()[-1])  # a free block: (row, col) on the 8 x 4 grid
    row, col = divmod(target, 4)
    layer.dense_grad = torch.ones(32, 16)
    layer.dense_grad[4 * row:4 * row + 4, 4 * col:4 * col + 4] = 3.0
    layer.dense_grad[0, 0] = float("nan")
    with pytest.raises(UpdaterError, match="not finite"):
        rule.select(0, "0", layer, occupied, 2, 0)
    layer.dense_grad[0, 0] = 1.0
    reduced = []
    rule = GradientRegrowth(grad_reduce=lambda g: reduced.append(g) or g)
    grown = rule.select(0, "0", layer, occupied, 1, 0)
    assert grown.tolist() == [target] and len(reduced) == 1  # the strongest free block, after the reduction
    tied = rule.select(0, "0", layer, occupied, 2, 0)  # then the lowest free index among equal norms
    assert tied.tolist() == sorted([target, int(torch.nonzero(~occupied).flatten()[0])])


def test_exploration_records_saves_and_refuses_a_foreign_state(tmp_path):
    m = model()
    layers = sparse_weights(m)
    exploration = Exploration(layers)
    active = layers[0][1].pattern.linear_index()
    free = torch.nonzero(~layers[0][1].pattern.block_mask().flatten()).flatten()
    dof, recent, again = exploration.record(0, active[:2], free[:2], after_first=False)
    n = layers[0][1].pattern.num_blocks
    assert dof == pytest.approx((active.numel() + 2) / n) and math.isnan(recent) and math.isnan(again)
    dof2, recent2, again2 = exploration.record(0, free[:1], free[2:4], after_first=True)
    assert recent2 == 1.0 and again2 == 0.5 and dof2 == pytest.approx((active.numel() + 4) / n)
    exploration.save(tmp_path / "explored.safetensors")
    maps, block = load_explored(tmp_path / "explored.safetensors")
    assert block == 4 and np.array_equal(maps["0"], exploration.explored_mask("0").numpy())
    other = Exploration(layers)
    other.load_state_dict(exploration.state_dict())
    assert other.explored_dof() == exploration.explored_dof() and torch.equal(other.last_grown(0), free[2:4])
    with pytest.raises(ExplorationError, match="first difference: 0"):
        other.load_state_dict({"1": {}})
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00")
    with pytest.raises(ExplorationError, match="cannot read"):
        load_explored(tmp_path / "bad.safetensors")
