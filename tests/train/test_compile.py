"""torch.compile of the model: one graph (the sparse kernels are opaque custom ops), the eager
model's values, and no recompilation when the pattern changes."""

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from ipu_app import ops
from ipu_app.data.batches import static_batch
from ipu_app.model.bert import ModelConfig, SparseBertForPreTraining
from ipu_app.sparse.layer import sparse_weights
from ipu_app.ops import cpu


def _batch(vocab=512, B=4, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, S), generator=g)
    labels = torch.full((B, S), -100)
    for b in range(B):
        where = torch.randperm(S, generator=g)[: 3 + b]
        labels[b, where] = ids[b, where]
    batch = dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids),
                 mlm_labels=labels, nsp_labels=torch.tensor([0, 1, 0, 1]))
    return batch, static_batch(batch, 8)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rewrite_patterns(model, seed):
    """Move every layer's blocks to other positions in place (what the updater does)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in sparse_weights(model):
        pattern = layer.pattern
        free = torch.randperm(pattern.num_blocks, generator=g)[: layer.nnz]
        free, _ = free.sort()
        with torch.no_grad():
            layer.block_rows.copy_((free // pattern.grid[1]).to(layer.block_rows.dtype))
            layer.block_cols.copy_((free % pattern.grid[1]).to(layer.block_cols.dtype))
        layer.pattern_changed()


_needs_cc = pytest.mark.skipif(not cpu.available(), reason="no C compiler")
BACKENDS = [("reference", 16), pytest.param("cpu", 16, marks=_needs_cc), pytest.param("cpu", 4, marks=_needs_cc)]


@pytest.mark.parametrize(("backend", "block_size"), BACKENDS)
def test_compiled_model_is_one_graph_equal_to_eager_and_does_not_recompile_on_pattern_updates(backend, block_size):
    torch.manual_seed(0)
    model = SparseBertForPreTraining(ModelConfig(size="tiny", vocab_size=512, max_position_embeddings=64,
                                                 block_size=block_size, backend=backend, sparsity=0.75,
                                                 dropout=0.0))
    ops.preload()
    batch, fixed = _batch()
    explained = dynamo.explain(model)(**fixed)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for update in range(3):
        eager = model(**batch)  # the exact-rows path is the reference for the fixed-size one
        eager.loss.backward()
        want = _grads(model)
        model.zero_grad()
        out = compiled(**fixed)
        out.loss.backward()
        got = _grads(model)
        model.zero_grad()
        torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-5)
        assert int(out.num_masked) == eager.num_masked and int(out.mlm_correct) == int(eager.mlm_correct)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
        _rewrite_patterns(model, seed=update)
    assert counter.frame_count == 1  # compiled once: three patterns, no recompilation


def test_fixed_size_masks_reject_too_many_masked_tokens():
    batch, _ = _batch()
    with pytest.raises(ValueError, match="more than max_predictions=2"):
        static_batch(batch, 2)


def test_compiled_training_trains_like_eager_and_compiles_once_over_pattern_updates(data_dir, tmp_path):
    from torch._dynamo.utils import counters

    from ipu_app.config import load_config
    from ipu_app.train.metrics import read_metrics
    from ipu_app.train.trainer import Trainer

    def new_trainer(config, run_dir):
        run_dir.mkdir(parents=True)
        return Trainer(config, run_dir, progress=False, tensorboard=False)

    def small_config(*extra):
        return load_config("bert_tiny_sparse", [
            f"data.dir={data_dir}", "training.steps=12", "training.batch_size=8", "training.micro_batch_size=4",
            "training.warmup_steps=2", "training.log_every=1", "training.validate_every=6",
            "training.checkpoint_every=4", "training.precision=fp32", "sparsity.segments=4",
            "data.validation_sequences=16", *extra])

    eager_run, compiled_run = tmp_path / "eager", tmp_path / "compiled"
    new_trainer(small_config(), eager_run).train()
    dynamo.reset()
    counters.clear()
    trainer = new_trainer(small_config("training.compile=true"), compiled_run)
    assert trainer.static_masks  # the fixed-size masked positions: no data-dependent shape in the graph
    trainer.train(stop_at=7)  # the train graph, the eval graph (validation at 6), updates at 3 and 6
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per forward
    trainer.train()  # the update at 9, the validation at 12: nothing compiled again
    assert counters["stats"]["unique_graphs"] == graphs
    eager = [(r["step"], r["loss"]) for r in read_metrics(eager_run, "train")]
    compiled = [(r["step"], r["loss"]) for r in read_metrics(compiled_run, "train")]
    assert [s for s, _ in compiled] == [s for s, _ in eager] == list(range(1, 13))
    for (_, a), (_, b) in zip(eager, compiled):
        assert b == pytest.approx(a, rel=2e-4)
    val_eager, val_compiled = read_metrics(eager_run, "val"), read_metrics(compiled_run, "val")
    assert [r["mlm_loss"] for r in val_compiled] == pytest.approx([r["mlm_loss"] for r in val_eager], rel=2e-4)
    updates = [r["pruned_blocks"] for r in read_metrics(compiled_run, "update")]
    assert updates == [r["pruned_blocks"] for r in read_metrics(eager_run, "update")]
