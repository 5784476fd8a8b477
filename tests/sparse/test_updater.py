import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ipu_app.model.sparse_linear import SparseLinear
from ipu_app.sparse.layer import sparse_weights
from ipu_app.sparse import regrowth, scoring
from ipu_app.sparse.schedule import UpdateSchedule
from ipu_app.sparse.updater import PatternInvariantError, build_updater, UpdaterError

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


def make_model(b=4, s=0.75, seed=0, inactive="zero"):
    g = torch.Generator().manual_seed(seed)
    return nn.Sequential(
        SparseLinear(32, 64, sparsity=s, block_size=b, generator=g, inactive=inactive),
        nn.ReLU(),
        SparseLinear(64, 32, sparsity=s, block_size=b, generator=g, inactive=inactive),
    )


def train_steps(model, optimizer, n=2, seed=0, updater=None, first_step=1):
    g = torch.Generator().manual_seed(seed)
    for step in range(first_step, first_step + n):
        if updater is not None:
            updater.begin_step(step)
        x = torch.randn(16, 32, generator=g)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if updater is not None:
            updater.step(step)


def slot_state(optimizer, layer):
    return {k: v.clone() for k, v in optimizer.state[layer.values].items() if torch.is_tensor(v) and v.shape == layer.values.shape}


def dense_state(layer, tensor):
    """A slot-ordered tensor scattered to its dense position."""
    return layer.pattern.to_dense(tensor)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("b", [1, 4, 8])
def test_update_surgery_with_optimizers(name, b):
    model = make_model(b=b)
    optimizer = OPTIMIZERS[name](model.parameters())
    train_steps(model, optimizer)
    layers = sparse_weights(model)
    before = [(m.pattern.clone(), m.to_dense(), {k: dense_state(m, v) for k, v in slot_state(optimizer, m).items()})
              for _, m in layers]
    updater = build_updater(model, optimizer, UpdateSchedule.evenly_spaced(100, 4), pruning_ratio=0.5,
                             pruning_schedule="constant")
    stats = updater.update(25)
    for (_, layer), (old_pattern, old_dense, old_state), layer_stats in zip(layers, before, stats.layers):
        new_mask, old_mask = layer.mask(), old_pattern.mask()
        assert layer.nnz == old_pattern.nnz
        assert layer_stats.pruned == layer_stats.grown == math.ceil(0.5 * layer.nnz)
        kept, grown, dropped = new_mask & old_mask, new_mask & ~old_mask, old_mask & ~new_mask
        assert int(grown.sum()) == layer_stats.grown * b * b and int(dropped.sum()) == int(grown.sum())
        dense = layer.to_dense()
        # survivors keep their values and optimizer state at the same positions
        assert torch.equal(dense[kept], old_dense[kept])
        assert torch.all(dense[grown] == 0) and torch.all(dense[dropped] == 0)
        new_state = {k: dense_state(layer, v) for k, v in slot_state(optimizer, layer).items()}
        assert new_state.keys() == old_state.keys() and new_state
        for key in new_state:
            assert torch.equal(new_state[key][kept], old_state[key][kept]), key
            assert torch.all(new_state[key][grown] == 0), key
    # training continues with the edited state
    train_steps(model, optimizer, n=1)


def test_pruned_blocks_have_lowest_block_norm():
    model = make_model(b=4)
    layer = model[0]
    old_index = layer.pattern.linear_index()
    norms = scoring.block_norms(layer.values, "l1")
    updater = build_updater(model, None, UpdateSchedule.evenly_spaced(10, 2), pruning_ratio=0.5, pruning_schedule="constant")
    updater.update(5)
    survivors = torch.isin(old_index, layer.pattern.linear_index())
    assert norms[~survivors].max() <= norms[survivors].min()


def test_unsupported_optimizer_state_is_a_clear_error_and_changes_nothing():
    model = make_model()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, n=1)
    before = [m.pattern.clone() for _, m in sparse_weights(model)]
    updater = build_updater(model, optimizer, UpdateSchedule.evenly_spaced(10, 2))
    with pytest.raises(UpdaterError, match="'row_var'.*Adafactor is not supported"):
        updater.update(5)
    assert all(m.pattern.equal(p) for (_, m), p in zip(sparse_weights(model), before))


def test_same_seed_same_patterns_across_processes_and_devices():
    runs = []
    for _ in range(2):
        model = make_model(seed=1)
        updater = build_updater(model, None, UpdateSchedule.evenly_spaced(100, 10), seed=5)
        for step in updater.schedule.steps[:3]:
            updater.step(step)
        runs.append([m.pattern for _, m in sparse_weights(model)])
    assert all(a.equal(b) for a, b in zip(*runs))
    other = make_model(seed=1)
    build_updater(other, None, UpdateSchedule.evenly_spaced(100, 10), seed=6).update(10)
    assert not all(a.equal(m.pattern) for a, (_, m) in zip(runs[0], sparse_weights(other)))


def test_random_regrowth_comes_from_seed_update_and_layer(monkeypatch):
    seen = []
    real = regrowth.select_regrow_random

    def spy(occupied, k, generator):
        seen.append(generator.initial_seed())
        return real(occupied, k, generator)

    monkeypatch.setattr("ipu_app.sparse.regrowth.select_regrow_random", spy)
    from ipu_app.seeding import derive_seed

    updater = build_updater(make_model(), None, UpdateSchedule.evenly_spaced(100, 10), seed=9)
    updater.step(30)  # third update: index 2
    assert seen == [derive_seed(9, 2, 0), derive_seed(9, 2, 1)]


def test_static_mode_never_updates():
    model = make_model()
    before = [m.pattern.clone() for _, m in sparse_weights(model)]
    updater = build_updater(model, None, UpdateSchedule.evenly_spaced(100, 10), mode="static")
    assert all(updater.step(t) is None for t in range(1, 100))
    assert all(m.pattern.equal(p) for (_, m), p in zip(sparse_weights(model), before))
    assert updater.exploration.mean_explored_dof() == pytest.approx(model[0].pattern.density)
    with pytest.raises(UpdaterError, match="never updates"):
        updater.update(10)


def test_steps_off_schedule_do_nothing_and_cosine_decays_prune_count():
    model = make_model(b=1, s=0.9)
    updater = build_updater(model, None, UpdateSchedule.evenly_spaced(100, 4), pruning_ratio=0.5)
    assert updater.step(24) is None
    first, last = updater.step(25), updater.step(75)
    nnz = model[0].nnz
    assert first.pruning_ratio == pytest.approx(0.25 * (1 + math.cos(math.pi / 4)))
    assert first.layers[0].pruned == math.ceil(first.pruning_ratio * nnz)
    assert last.layers[0].pruned == math.ceil(last.pruning_ratio * nnz) < first.layers[0].pruned


def test_rigl_records_dense_gradient_only_before_updates():
    model = make_model(b=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    updater = build_updater(model, optimizer, UpdateSchedule.explicit(10, [3]), regrowth="gradient")
    hooks = []
    for step in (1, 2, 3):
        updater.begin_step(step)
        hooks.append([m.record_dense_grad for _, m in updater.layers])
        x = torch.randn(8, 32)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        if step < 3:
            assert all(m.dense_grad is None for _, m in updater.layers)
        else:
            grads = [m.dense_grad.clone() for _, m in updater.layers]
        optimizer.step()
        updater.step(step)
    assert hooks == [[False, False], [False, False], [True, True]]
    assert all(m.dense_grad is None and not m.record_dense_grad for _, m in updater.layers)
    # the recorded gradient is the dense weight gradient of the update step
    assert grads[0].shape == (64, 32) and grads[1].shape == (32, 64)
    assert bool((grads[0] != 0).float().mean() > 0.5)  # dense: inactive positions have gradients too


def test_rigl_grows_largest_gradient_blocks():
    model = make_model(b=4)
    layer = model[0]
    old_index = layer.pattern.linear_index()
    updater = build_updater(model, None, UpdateSchedule.explicit(10, [5]), regrowth="gradient",
                             pruning_ratio=0.5, pruning_schedule="constant")
    grad = torch.rand(64, 32)
    layer.dense_grad = grad.clone()
    model[2].dense_grad = torch.rand(32, 64)
    updater.update(5)
    scores = scoring.dense_block_norms(grad, 4, "l1")
    scores[old_index] = -1
    grown = layer.pattern.linear_index()[~torch.isin(layer.pattern.linear_index(), old_index)]
    k = grown.numel()
    assert torch.equal(grown, torch.topk(scores, k).indices.sort().values)


def test_rigl_without_recorded_gradient_fails_clearly():
    updater = build_updater(make_model(), None, UpdateSchedule.explicit(10, [5]), regrowth="gradient")
    with pytest.raises(UpdaterError, match="begin_step"):
        updater.step(5)
    model = make_model()
    updater = build_updater(model, None, UpdateSchedule.explicit(10, [5]), regrowth="gradient")
    for _, m in updater.layers:
        m.dense_grad = torch.full((m.out_features, m.in_features), float("nan"))
    with pytest.raises(UpdaterError, match="not finite"):
        updater.step(5)


def test_invariant_violation_raises(monkeypatch):
    model = make_model()

    def bad_regrow(occupied, k, generator):  # regrows already-active blocks
        return torch.nonzero(occupied).flatten()[:k]

    monkeypatch.setattr("ipu_app.sparse.regrowth.select_regrow_random", bad_regrow)
    with pytest.raises(PatternInvariantError):
        build_updater(model, None, UpdateSchedule.evenly_spaced(10, 2)).update(5)


def test_telemetry_explored_dof_and_recent_regrowth():
    model = make_model(b=1, s=0.9)
    updater = build_updater(model, None, UpdateSchedule.evenly_spaced(1000, 20), pruning_ratio=1.0,
                             pruning_schedule="constant")
    dof = [updater.exploration.mean_explored_dof()]
    for step in updater.schedule.steps[:5]:
        stats = updater.step(step)
        dof.append(stats.mean_explored_dof)
        for s in stats.layers:
            assert s.sparsity == pytest.approx(1 - s.nnz_blocks / (64 * 32)) and s.target_sparsity == 0.9
    assert dof[0] == pytest.approx(205 / 2048) and all(b > a for a, b in zip(dof, dof[1:]))
    # with pr = 1 every pruned block had been grown at the previous update (fresh zeros tie at norm 0)
    assert stats.layers[0].pruned_recently_grown == 1.0
    union = updater.exploration.explored_mask("0")
    assert union.sum() / union.numel() == pytest.approx(updater.exploration.explored_dof()["0"])
    assert stats.as_dict()["layers"][0]["name"] == "0"


def test_state_dict_resume_matches_uninterrupted_run():
    schedule = UpdateSchedule.evenly_spaced(100, 10)

    def run():
        model = make_model(seed=2)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        updater = build_updater(model, optimizer, schedule, seed=1)
        train_steps(model, optimizer, n=40, updater=updater)
        return model, optimizer, updater

    full_model, _, full_updater = run()
    # interrupted: 20 steps, then a fresh process restores model, optimizer and updater state
    model = make_model(seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    updater = build_updater(model, optimizer, schedule, seed=1)
    train_steps(model, optimizer, n=20, updater=updater)
    saved = (model.state_dict(), optimizer.state_dict(), updater.state_dict())
    model2 = make_model(seed=99)  # different initial pattern: must be overwritten by the checkpoint
    model2.load_state_dict(saved[0])
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    optimizer2.load_state_dict(saved[1])
    updater2 = build_updater(model2, optimizer2, schedule, seed=1)
    updater2.load_state_dict(saved[2])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # replay the data stream position
        torch.randn(16, 32, generator=g)
    for step in range(21, 41):
        updater2.begin_step(step)
        loss = model2(torch.randn(16, 32, generator=g)).pow(2).mean()
        optimizer2.zero_grad()
        loss.backward()
        optimizer2.step()
        updater2.step(step)
    for (_, a), (_, b) in zip(sparse_weights(full_model), sparse_weights(model2)):
        assert a.pattern.equal(b.pattern) and torch.equal(a.values, b.values)
    assert full_updater.exploration.explored_dof() == updater2.exploration.explored_dof()
    assert full_updater.update_count == updater2.update_count == 4


def test_load_state_dict_rejects_other_models():
    updater = build_updater(make_model(), None, UpdateSchedule.evenly_spaced(10, 2))
    other = build_updater(nn.Sequential(SparseLinear(8, 8, sparsity=0.5)), None, UpdateSchedule.evenly_spaced(10, 2))
    with pytest.raises(UpdaterError, match="does not match"):
        updater.load_state_dict(other.state_dict())


def test_frozen_inactive_update_loses_nothing():
    model = make_model(b=4, inactive="frozen")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, optimizer)
    before = [m.to_dense() for _, m in sparse_weights(model)]
    build_updater(model, optimizer, UpdateSchedule.evenly_spaced(10, 2), pruning_ratio=0.5).update(5)
    for (_, m), dense in zip(sparse_weights(model), before):
        assert torch.equal(m.to_dense(), dense)  # weights only moved between trained and frozen sets
        assert torch.all(m.frozen[m.mask()] == 0)
        for key, state in slot_state(optimizer, m).items():
            assert int((state == 0).all(dim=(1, 2)).sum()) >= math.ceil(0.5 * 0.5 * m.nnz * 0.99), key


def test_updater_option_errors():
    for kwargs, match in (
        ({"mode": "dense"}, "unknown mode"),
        ({"regrowth": "momentum"}, "unknown regrowth"),
        ({"block_metric": "l0"}, "unknown block_metric"),
        ({"pruning_ratio": 2.0}, "pruning_ratio"),
    ):
        with pytest.raises(UpdaterError, match=match):
            build_updater(make_model(), None, UpdateSchedule.evenly_spaced(10, 2), **kwargs)
    with pytest.raises(UpdaterError, match="no sparse layers"):
        build_updater(nn.Linear(2, 2), None, UpdateSchedule.evenly_spaced(10, 2))


@given(
    b=st.sampled_from([1, 2, 4, 8]),
    s=st.floats(0.0, 0.98),
    pr=st.floats(0.0, 1.0),
    regrowth=st.sampled_from(["random", "gradient"]),
    metric=st.sampled_from(["l1", "l2", "linf"]),
    seed=st.integers(0, 1000),
)
def test_updater_properties(b, s, pr, regrowth, metric, seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(SparseLinear(16, 32, sparsity=s, block_size=b, generator=g))
    layer = model[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    layer.values.grad = torch.randn(layer.values.shape, generator=g)
    optimizer.step()
    old_index = layer.pattern.linear_index()
    layer.dense_grad = torch.rand(32, 16, generator=g)
    updater = build_updater(model, optimizer, UpdateSchedule.explicit(10, [1]), pruning_ratio=pr,
                             pruning_schedule="constant", regrowth=regrowth, block_metric=metric, seed=seed)
    stats = updater.update(1).layers[0]  # invariants are checked inside
    new_index = layer.pattern.linear_index()
    assert new_index.numel() == old_index.numel()
    grid = layer.pattern.num_blocks
    assert stats.pruned == min(math.ceil(pr * old_index.numel() - 1e-9), grid - old_index.numel())
    assert int((~torch.isin(new_index, old_index)).sum()) == stats.grown == stats.pruned


def test_one_element_values_keep_their_moments_remapped():
    # b = 1 and nnz = 1: values has one element, like Adam's step counter; only the 0-dim
    # counter is position-free, the moments must be zeroed at the regrown slot.
    model = nn.Sequential(SparseLinear(4, 4, sparsity=15 / 16, block_size=1, generator=torch.Generator().manual_seed(1)))
    layer = model[0]
    assert layer.values.numel() == 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps_4x4(model, optimizer)
    assert optimizer.state[layer.values]["exp_avg"].abs().sum() > 0
    updater = build_updater(model, optimizer, UpdateSchedule.evenly_spaced(10, 2), pruning_ratio=1.0,
                             pruning_schedule="constant")
    stats = updater.update(5)
    assert stats.pruned == 1
    state = optimizer.state[layer.values]
    assert float(state["exp_avg"].abs().sum()) == 0 and float(state["exp_avg_sq"].abs().sum()) == 0
    assert float(state["step"]) == 2  # the global counter is untouched
    assert math.isnan(stats.layers[0].pruned_recently_grown)  # nothing had been grown before
    assert updater.update(6).layers[0].pruned_recently_grown == 1.0


def train_steps_4x4(model, optimizer, n=2):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
        optimizer.step()


def test_mean_pruned_recently_grown_skips_layers_without_history():
    model = make_model(b=1, s=0.9)
    updater = build_updater(model, None, UpdateSchedule.evenly_spaced(100, 4), pruning_ratio=1.0,
                             pruning_schedule="constant")
    first = updater.update(25)
    assert math.isnan(first.mean_pruned_recently_grown) and math.isnan(first.as_dict()["mean_pruned_recently_grown"])
    second = updater.update(50)
    assert second.mean_pruned_recently_grown == 1.0  # pr = 1: every pruned block had just been grown
    assert second.mean_grown_pruned_again == 1.0 and math.isnan(first.mean_grown_pruned_again)


def test_grown_pruned_again_counts_the_previous_growth():
    # pr 0.5 then (cosine, T = 40) smaller: of the blocks grown at step 10, the fraction pruned at step 20.
    model = make_model(b=1, s=0.9)
    updater = build_updater(model, None, UpdateSchedule.explicit(40, [10, 20]), pruning_ratio=0.5)
    updater.step(10)
    grown = {name: set(updater.exploration.last_grown(i).tolist()) for i, (name, _) in enumerate(updater.layers)}
    before = {name: set(layer.pattern.linear_index().tolist()) for name, layer in updater.layers}
    stats = updater.step(20)
    for (name, layer), layer_stats in zip(updater.layers, stats.layers):
        pruned = before[name] - set(layer.pattern.linear_index().tolist())
        assert layer_stats.grown_pruned_again == pytest.approx(len(pruned & grown[name]) / len(grown[name]))
        assert layer_stats.pruned_recently_grown == pytest.approx(len(pruned & grown[name]) / len(pruned))


class BareBlockSparse(nn.Module):
    """Not a SparseLinear: only what ``sparse.layer.SparseWeight`` asks for."""

    def __init__(self, out_features, in_features, block_size, rows, cols, values):
        super().__init__()
        self.out_features, self.in_features, self.block_size = out_features, in_features, block_size
        self.values = nn.Parameter(values)
        self.register_buffer("block_rows", torch.tensor(rows, dtype=torch.int32))
        self.register_buffer("block_cols", torch.tensor(cols, dtype=torch.int32))
        self.target_sparsity = 1 - len(rows) * block_size**2 / (out_features * in_features)
        self.frozen, self.record_dense_grad, self.dense_grad = None, False, None
        self.changes = 0

    @property
    def pattern(self):
        from ipu_app.sparse.pattern import BlockPattern

        return BlockPattern(self.out_features, self.in_features, self.block_size, self.block_rows, self.block_cols)

    @property
    def nnz(self):
        return self.values.shape[0]

    @property
    def sparsity(self):
        return self.pattern.sparsity

    def pattern_changed(self):
        self.changes += 1


def test_updater_works_on_any_module_offering_the_interface():
    # A 4x4 grid of 2x2 blocks with 4 active blocks whose L1 norms are 4, 40, 0.4, 400: at pr = 0.5
    # the two smallest, (0, 2) and (0, 0), go; two of the 12 free blocks come back at zero.
    scale = torch.tensor([1.0, 10.0, 0.1, 100.0]).reshape(4, 1, 1)
    layer = BareBlockSparse(8, 8, 2, [0, 1, 2, 3], [0, 1, 2, 3], torch.ones(4, 2, 2) * scale)
    model = nn.Sequential(layer)
    updater = build_updater(model, None, UpdateSchedule.evenly_spaced(4, 2), pruning_ratio=0.5,
                             pruning_schedule="constant")
    assert [name for name, _ in updater.layers] == ["0"]
    stats = updater.step(2)
    assert stats is not None and layer.changes == 1 and layer.nnz == 4
    blocks = set(zip(layer.block_rows.tolist(), layer.block_cols.tolist()))
    assert {(1, 1), (3, 3)} <= blocks and not {(0, 0), (2, 2)} & blocks
    kept = {(r, c): float(v.abs().sum()) for r, c, v in zip(layer.block_rows.tolist(), layer.block_cols.tolist(),
                                                           layer.values.detach())}
    assert kept[(1, 1)] == 40.0 and kept[(3, 3)] == 400.0
    assert sorted(v for k, v in kept.items() if k not in {(1, 1), (3, 3)}) == [0.0, 0.0]


@pytest.mark.parametrize("module, foreign", [
    ("ipu_app.sparse.updater", ("ipu_app.model", "ipu_app.data", "ipu_app.train", "transformers")),
    ("ipu_app.data.ahead", ("ipu_app.model", "ipu_app.sparse", "ipu_app.train")),
])
def test_layering_the_dynsparse_core_knows_no_model_and_the_data_no_sparsity(module, foreign):
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({foreign!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
