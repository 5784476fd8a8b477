import copy

import pytest
import torch

from ipu_app.ipu.phase import IpuPatternSync, IpuStateError, pattern_buffer_names
from ipu_app.model.bert import ModelConfig, SparseBertForPreTraining
from ipu_app.sparse.layer import sparse_weights
from ipu_app.sparse.schedule import UpdateSchedule
from ipu_app.sparse.updater import build_updater

from .recorder import Recorder


def batch():
    ids = torch.randint(0, 50, (2, 16))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = 7
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "mlm_labels": labels, "nsp_labels": torch.tensor([0, 1])}


class FakePoptorchAdamW:
    """The poptorch.optim surface the sync uses: state_dict() with PopART-named moments, load_state_dict."""

    def __init__(self, model, log):
        self.log = log
        torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        model(**batch()).loss.backward()
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)
        self.torch_opt = torch_opt
        names = {p: n for n, p in model.named_parameters()}
        self.ipu_state = {}
        for p, st in torch_opt.state.items():
            self.ipu_state[f"Accl1___{names[p]}"] = st["exp_avg"].clone()
            self.ipu_state[f"Accl2___{names[p]}"] = st["exp_avg_sq"].clone()
        self.loaded = None

    def state_dict(self):
        self.log.append(("optimizer.state_dict", (), {}))
        return {"ipu_state": self.ipu_state, "ipu_param": {}, "state": {}, "param_groups": []}

    def load_state_dict(self, state):
        self.log.append(("optimizer.load_state_dict", (), {}))
        self.loaded = state


def tiny_model(**kwargs):
    torch.manual_seed(0)
    config = ModelConfig(size="tiny", vocab_size=64, max_position_embeddings=32, sparsity_mode="dynamic",
                         sparsity=0.9, block_size=kwargs.pop("block_size", 4), **kwargs)
    return SparseBertForPreTraining(config)


def updater_for(model, optimizer, **kwargs):
    return build_updater(model, optimizer, UpdateSchedule.evenly_spaced(10, 5), mode="dynamic", pruning_ratio=0.5,
                          seed=3, **kwargs)


def test_update_step_pulls_updates_and_pushes_without_shape_changes():
    model = tiny_model()
    log = []
    optimizer = FakePoptorchAdamW(model, log)
    executor = Recorder(log, "executor")
    sync = IpuPatternSync(executor, optimizer, updater_for(model, None), model)
    assert sync.buffer_names == [f"{n}.{b}" for n, _ in sparse_weights(model) for b in ("block_rows", "block_cols")]
    assert len(sync.buffer_names) == 2 * 6 * 2

    # The same update on the CPU path, for comparison.
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    names = dict(reference.named_parameters())
    for name, p in names.items():
        if f"Accl1___{name}" in optimizer.ipu_state:
            ref_opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": optimizer.ipu_state[f"Accl1___{name}"].clone(),
                                "exp_avg_sq": optimizer.ipu_state[f"Accl2___{name}"].clone()}
    ref_stats = updater_for(reference, ref_opt).update(2)

    shapes = {n: t.shape for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert sync.step(1) is None and log == []  # not an update step: nothing moves
    stats = sync.step(2)
    assert [entry[0] for entry in log] == ["executor.copyWeightsToHost", "optimizer.state_dict",
                                           "optimizer.load_state_dict", "executor.copyNamedBuffersToDevice"]
    assert stats.pruned == ref_stats.pruned > 0
    assert {n: t.shape for n, t in [*model.named_parameters(), *model.named_buffers()]} == shapes
    state = optimizer.loaded["ipu_state"]
    for (name, layer), (_, ref_layer) in zip(sparse_weights(model), sparse_weights(reference)):
        assert torch.equal(layer.block_rows, ref_layer.block_rows) and torch.equal(layer.block_cols, ref_layer.block_cols)
        assert torch.equal(layer.values, ref_layer.values)
        ref_state = ref_opt.state[ref_layer.values]
        assert torch.equal(state[f"Accl1___{name}.values"], ref_state["exp_avg"])
        assert torch.equal(state[f"Accl2___{name}.values"], ref_state["exp_avg_sq"])
    # Moments of other parameters are left alone.
    assert torch.equal(state["Accl1___bert.embeddings.word_embeddings.weight"],
                       optimizer.torch_opt.state[model.bert.embeddings.word_embeddings.weight]["exp_avg"])


def test_frozen_inactive_weights_upload_their_buffer_too():
    model = tiny_model(inactive="frozen")
    names = pattern_buffer_names(model)
    assert len(names) == 12 * 3 and names[2].endswith(".frozen")


def test_rigl_computes_dense_gradients_on_the_host():
    model = tiny_model()
    log = []
    optimizer = FakePoptorchAdamW(model, log)
    seen = []

    def dense_gradient(m, step):
        seen.append((step, all(layer.record_dense_grad for _, layer in sparse_weights(m))))
        m(**batch()).loss.backward()

    sync = IpuPatternSync(Recorder(log, "executor"), optimizer, updater_for(model, None, regrowth="gradient"), model,
                          dense_gradient=dense_gradient)
    stats = sync.step(4)
    assert seen == [(4, True)] and stats.pruned > 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(IpuStateError, match="dense-gradient pass"):
        IpuPatternSync(Recorder([], "e"), optimizer, updater_for(model, None, regrowth="gradient"), model).step(6)


def test_state_that_is_not_this_models_is_refused():
    model = tiny_model()
    log = []
    optimizer = FakePoptorchAdamW(model, log)
    name = sparse_weights(model)[0][0]
    optimizer.ipu_state[f"Accl1___{name}.values"] = torch.zeros(3)
    sync = IpuPatternSync(Recorder(log, "executor"), optimizer, updater_for(model, None), model)
    with pytest.raises(IpuStateError, match=r"has shape \(3,\)"):
        sync.step(2)
    del optimizer.ipu_state[f"Accl1___{name}.values"], optimizer.ipu_state[f"Accl2___{name}.values"]
    with pytest.raises(IpuStateError, match="no moments for .*use poptorch.optim.AdamW"):
        sync.step(2)
    assert "optimizer.load_state_dict" not in [entry[0] for entry in log]  # nothing was written back
