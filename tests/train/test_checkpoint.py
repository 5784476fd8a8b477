"""CheckpointManager: every part saved and restored by its key, with no special cases."""

import random

import pytest
import torch

from ipu_app.config import load_config
from ipu_app.train.checkpoint import (Attr, CheckpointError, CheckpointManager, Expected, RngState,
                                      list_checkpoints)
from ipu_app.train.distributed import DistContext
from ipu_app.train.state import Counters, TrainState, Window
from ipu_app.train.sums import TRAIN_FIELDS, Sums

CONFIG = load_config("bert_tiny_sparse").to_dict()


class Box:
    """A plain object with one attribute, as a run's loop counters are."""

    def __init__(self, value):
        self.value = value


def _manager(tmp_path, model, parts, keep=2, config=CONFIG):
    return CheckpointManager(tmp_path, model, config, parts, keep=keep, dist=DistContext())


def _trained(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def test_every_part_comes_back_by_its_key(tmp_path):
    model, optimizer = _trained(0)
    box = Box(3.5)
    parts = {"optimizer": optimizer, "value": Attr(box, "value", load=float), "absent": None}
    _manager(tmp_path, model, parts).save(7)

    fresh_model, fresh_optimizer = _trained(1)  # other weights, other moments
    fresh_box = Box(0.0)
    step, path = _manager(tmp_path, fresh_model, {"optimizer": fresh_optimizer, "value": Attr(fresh_box, "value"),
                                                  "absent": None}).restore()
    assert step == 7 and path.name == "step_00000007"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()))
    moments = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert fresh_box.value == 3.5


def test_a_part_that_refuses_its_state_names_its_key(tmp_path):
    model, optimizer = _trained(0)
    _manager(tmp_path, model, {"optimizer": optimizer}).save(1)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)  # another parameter layout
    with pytest.raises(CheckpointError, match=r"does not match this run \(optimizer: "):
        _manager(tmp_path, model, {"optimizer": other}).restore()
    with pytest.raises(CheckpointError, match=r"\(missing: "):  # a key the checkpoint lacks
        _manager(tmp_path, model, {"missing": torch.optim.AdamW(model.parameters())}).restore()


def test_an_expected_value_that_changed_stops_the_restore_before_later_parts(tmp_path):
    model, _ = _trained(0)
    box = Box(1)
    _manager(tmp_path, model, {"data": Expected("abc", "changed"), "box": Attr(box, "value")}).save(2)
    later = Box(0)
    with pytest.raises(CheckpointError, match="^the data changed since step_00000002$"):
        _manager(tmp_path, model, {"data": Expected("xyz", "the data changed since {checkpoint}"),
                                   "box": Attr(later, "value")}).restore()
    assert later.value == 0
    older = Box(0)  # a checkpoint without the value (an older version) passes
    _manager(tmp_path, model, {"box": Attr(box, "value")}).save(3)
    _manager(tmp_path, model, {"data": Expected("xyz", "x"), "box": Attr(older, "value")}).restore()
    assert older.value == 1


def test_the_rng_state_restores_every_generator_and_checks_the_process_count(tmp_path):
    model, _ = _trained(0)
    manager = _manager(tmp_path, model, {"rng": RngState(DistContext())})
    manager.save(1)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99), random.seed(99)
    manager.restore()
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    with pytest.raises(CheckpointError, match="written by 1 processes, this run has 2"):
        RngState(DistContext(0, 2, 0)).load_state_dict(manager.parts["rng"].state_dict())


def test_keep_last_and_another_config_is_refused(tmp_path):
    model, _ = _trained(0)
    manager = _manager(tmp_path, model, {}, keep=2)
    for step in (1, 2, 3):
        manager.save(step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    with pytest.raises(CheckpointError, match="different config"):
        _manager(tmp_path, model, {}, config={**CONFIG, "seed": CONFIG["seed"] + 1}).restore()


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    model, _ = _trained(0)
    manager = _manager(tmp_path, model, {})
    manager.save(1), manager.save(2)
    (list_checkpoints(tmp_path)[-1][1] / "state.pt").write_bytes(b"")
    assert manager.restore()[0] == 1
    assert "resuming from the older step_00000001" in capsys.readouterr().err
    (list_checkpoints(tmp_path)[0][1] / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*\(and 1 older\)"):
        manager.restore()
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        _manager(tmp_path / "empty", model, {}).restore()


def test_the_train_state_window_and_counters_come_back_on_the_device(tmp_path):
    model, optimizer = _trained(0)
    state = TrainState(model=model, forward_model=model, compiled_model=model, compiled_eval=model,
                       optimizer=optimizer, scheduler=None, scaler=None, schedule=None, updater=None, freezer=None,
                       sparse_layers=[], batches=None, host_transform=None, loss_divisor=4)
    state.window.add(Sums(TRAIN_FIELDS).add(mlm_loss=2.0, nsp_loss=0.5, mlm_correct=3), steps=1, tokens=128)
    state.counters.skipped_steps, state.last_lr, state.last_step_finite = 2, 0.01, False
    parts = {k: v for k, v in state.checkpoint_parts(DistContext(), "cpu").items() if k != "data"}
    _manager(tmp_path, model, parts).save(5)
    state.window, state.counters, state.last_lr, state.last_step_finite = Window(), Counters(), 0.0, True
    _manager(tmp_path, model, parts).restore()
    assert state.window.steps == 1 and state.window.tokens == 128
    assert state.window.sums.read(lambda t: t) == {"mlm_loss": 2.0, "nsp_loss": 0.5, "mlm_correct": 3.0}
    assert state.counters.skipped_steps == 2 and state.last_lr == 0.01 and state.last_step_finite is False
