import math

import pytest
import torch
from torch import nn

from ipu_app.config import load_config
from ipu_app.model.bert import SparseBertForPreTraining
from ipu_app.model.sparse_linear import SparseLinear
from ipu_app.sparse.layer import sparse_weights
from ipu_app.sparse.schedule import UpdateSchedule
from ipu_app.sparse.updater import build_updater
from ipu_app.train.optim import SlotAdamW, build_optimizer, parameter_groups
from ipu_app.train.build import model_config


def two_layer_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), SparseLinear(32, 16, sparsity=0.75, block_size=4, generator=g))


def run(model, optimizer, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        optimizer.step()


def groups(model, per_slot):
    return parameter_groups(model, 0.01, sparse_weight_decay=0.05, per_slot_steps=per_slot)


def test_per_slot_adamw_equals_adamw_while_no_slot_is_regrown():
    a, b = two_layer_model(), two_layer_model()
    opt_a = torch.optim.AdamW(groups(a, False), lr=1e-2, betas=(0.9, 0.999), eps=1e-6)
    opt_b = SlotAdamW(groups(b, True), lr=1e-2, betas=(0.9, 0.999), eps=1e-6)
    run(a, opt_a, 5)
    run(b, opt_b, 5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=5e-6)  # float32 rounding order only
    values = b[1].values
    assert torch.equal(opt_b.state[values]["slot_step"], torch.full_like(values, 5.0))
    assert float(opt_b.state[values]["step"]) == 5


def first_step_size_of_regrown_slots(per_slot):
    model = two_layer_model()
    cls = SlotAdamW if per_slot else torch.optim.AdamW
    lr = 1e-3
    optimizer = cls(parameter_groups(model, 0.0, per_slot_steps=per_slot), lr=lr, eps=1e-12)
    run(model, optimizer, 50)
    updater = build_updater(model, optimizer, UpdateSchedule.evenly_spaced(100, 2), pruning_ratio=0.5,
                             pruning_schedule="constant")
    updater.update(50)
    layer = model[1]
    grown = layer.values.detach().eq(0)  # regrown slots start at zero
    assert grown.any()
    if per_slot:
        assert torch.all(optimizer.state[layer.values]["slot_step"][grown] == 0)
    run(model, optimizer, 1, seed=1)
    moved = layer.values.detach()[grown].abs() / lr
    assert int(moved.gt(0).sum()) >= 16  # (block rows whose every block is new get no gradient yet)
    return float(moved[moved > 0].mean())


def test_regrown_slots_get_bias_correction_afresh_only_per_slot():
    # Zero moments under the global step k = 51: |first step| = lr (1 - b1) / (1 - b1^k) / sqrt((1 - b2) /
    # (1 - b2^k)) = 0.71 lr here, tending to (1 - b1) / sqrt(1 - b2) = 3.16 lr as k grows.
    k = 51
    expected = (1 - 0.9) / (1 - 0.9**k) / math.sqrt((1 - 0.999) / (1 - 0.999**k))
    assert first_step_size_of_regrown_slots(False) == pytest.approx(expected, rel=1e-3)
    # Per-slot counts: the bias correction of step 1 makes it lr.
    assert first_step_size_of_regrown_slots(True) == pytest.approx(1.0, rel=1e-3)


def test_sparse_values_get_their_own_weight_decay(data_dir):
    config = load_config("bert_tiny_sparse", [f"data.dir={data_dir}", "optimizer.sparse_weight_decay=0.1",
                                              "training.steps=10", "training.warmup_steps=1", "sparsity.segments=2"])
    model = SparseBertForPreTraining(model_config(config))
    optimizer = build_optimizer(model, config)
    assert type(optimizer) is SlotAdamW  # per_slot is the default of a dynamic run
    values = {id(layer.values) for _, layer in sparse_weights(model)}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert {decay[v] for v in values} == {0.1}
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert decay[id(embeddings)] == 0.01
    assert [g.get("per_slot_steps", False) for g in optimizer.param_groups] == [False, True, False]
    short = ["training.steps=10", "training.warmup_steps=1", "sparsity.segments=2"]
    paper = build_optimizer(model, load_config("bert_tiny_sparse", ["optimizer.bias_correction=global", *short]))
    assert type(paper) is torch.optim.AdamW
    assert not any(g.get("per_slot_steps") for g in paper.param_groups)


def test_per_slot_is_plain_adamw_without_regrowth():
    # Static and dense runs never regrow a slot: whatever bias_correction says, they get AdamW itself.
    for name in ("bert_tiny_static", "bert_tiny_dense"):
        config = load_config(name, ["training.steps=10", "training.warmup_steps=1"])
        assert config.optimizer.bias_correction == "auto" and config.bias_correction == "per_slot"
        model = SparseBertForPreTraining(model_config(config))
        optimizer = build_optimizer(model, config)
        assert type(optimizer) is torch.optim.AdamW, name
        assert not any(g.get("per_slot_steps") for g in optimizer.param_groups), name
