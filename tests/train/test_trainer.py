import json

import pytest
import torch

from ipu_app.config import ConfigError, load_config
from ipu_app.sparse.freeze import PartialFreezer
from ipu_app.sparse.layer import sparse_weights
from ipu_app.train.checkpoint import CheckpointError, list_checkpoints
from ipu_app.train.metrics import read_metrics
from ipu_app.train.trainer import Trainer
from ipu_app.train.optim import peak_learning_rate


def small_config(data_dir, name="bert_tiny_sparse", *extra):
    overrides = [
        f"data.dir={data_dir}", "training.steps=12", "training.batch_size=8", "training.micro_batch_size=4",
        "training.warmup_steps=2", "training.log_every=1", "training.validate_every=6",
        "training.checkpoint_every=4", "training.keep_checkpoints=2", "training.precision=fp32",
        "sparsity.segments=4", "data.validation_sequences=16", *extra,
    ]
    return load_config(name, overrides)


def new_trainer(config, run_dir, **kwargs):
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(config, run_dir, progress=False, tensorboard=False, **kwargs)


def train_losses(run_dir):
    return [(r["step"], r["loss"], r["mlm_loss"], r["grad_norm"]) for r in read_metrics(run_dir, "train")]


def test_full_run_writes_every_output(data_dir, tmp_path):
    config = small_config(data_dir)
    summary = new_trainer(config, tmp_path / "run").train()
    run = tmp_path / "run"
    saved = json.loads((run / "summary.json").read_text())
    for key in ("final_val_mlm_loss", "total_non_embedding_flops", "tokens_per_second", "wall_time_s",
                "final_val_nsp_loss", "final_val_mlm_accuracy", "mean_explored_dof"):
        assert key in saved and saved[key] == summary[key]
    assert 0 < saved["final_val_mlm_loss"] < 12
    # the paper's count: per sequence x steps x sequences per step
    assert saved["total_non_embedding_flops"] == pytest.approx(saved["non_embedding_flops_per_sequence"] * 12 * 8)
    assert saved["pattern_updates"] == 3 and saved["skipped_steps"] == 0
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, 13))
    assert [r["step"] for r in read_metrics(run, "val")] == [6, 12]
    updates = read_metrics(run, "update")
    assert [r["step"] for r in updates] == [3, 6, 9]  # n = 4 segments of 12 steps
    assert all(r["pruned_blocks"] > 0 for r in updates)
    assert [step for step, _ in list_checkpoints(run)] == [8, 12]  # keep-last-2
    assert (run / "model" / "model.safetensors").is_file() and (run / "tokenizer" / "vocab.txt").is_file()
    # 2 warmup steps up to the peak, then linear decay that would reach 0 one step after the last
    lrs = [r["learning_rate"] / peak_learning_rate(config) for r in read_metrics(run, "train")]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])

    from ipu_app.commands.export import export_run

    out = export_run(run, tmp_path / "hf")
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("name, extra", [
    ("bert_tiny_sparse", ["model.dropout=0.1"]),         # dropout: the global RNG must be restored
    ("bert_tiny_sparse_rigl", []),                       # RigL: dense gradients over 2 micro-batches
    ("bert_tiny_sparse_b16", ["sparsity.group_lasso=0.5", "training.precision=bf16"]),
    ("bert_tiny_dense", ["sparsity.freeze=early"]),      # the frozen values travel in the checkpoint
])
def test_resume_is_bit_exact(data_dir, tmp_path, name, extra):
    config = small_config(data_dir, name, *extra)
    full = new_trainer(config, tmp_path / "full").train()
    trainer = new_trainer(config, tmp_path / "part")
    assert trainer.train(stop_at=5) is None  # between checkpoints and updates
    assert [s for s, _ in list_checkpoints(tmp_path / "part")] == [4, 5]
    resumed = new_trainer(config, tmp_path / "part", resume=True)
    assert resumed.step == 5
    summary = resumed.train()
    assert train_losses(tmp_path / "part") == train_losses(tmp_path / "full")
    assert read_metrics(tmp_path / "part", "val") == read_metrics(tmp_path / "full", "val")
    assert summary["final_val_mlm_loss"] == full["final_val_mlm_loss"]
    assert summary.get("mean_explored_dof") == full.get("mean_explored_dof")
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_from_inside_a_logging_window_is_bit_exact(data_dir, tmp_path):
    """A checkpoint between two train records (a Ctrl-C, or checkpoint_every not a multiple of
    log_every) holds the open window's sums: the resumed run logs what an uninterrupted one does, from
    every offset of a 4-step window and from the next window."""
    config = small_config(data_dir, "bert_tiny_sparse", "training.steps=8", "training.log_every=4",
                          "training.validate_every=8", "training.checkpoint_every=8")
    full = new_trainer(config, tmp_path / "full").train()
    timing = {"seconds", "tokens_per_second", "real_tokens_per_second"}

    def records(run):
        return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run, "train")]

    for stop in (1, 2, 3, 5):
        run = tmp_path / f"stop{stop}"
        part = new_trainer(config, run)
        assert part.train(stop_at=stop) is None  # the stop writes a checkpoint at this step
        assert part.state.window.steps == stop % 4 and part.state.window.sums is not None
        resumed = new_trainer(config, run, resume=True)
        assert resumed.step == stop and resumed.state.window.steps == stop % 4
        assert resumed.state.window.sums.values.device == resumed.device
        summary = resumed.train()
        assert [r["step"] for r in records(run)] == [4, 8]
        assert records(run) == records(tmp_path / "full"), stop
        assert summary["final_val_mlm_loss"] == full["final_val_mlm_loss"]
        assert summary["final_train_loss"] == full["final_train_loss"]


def test_non_finite_gradients_skip_the_step_and_the_update(data_dir, tmp_path):
    config = small_config(data_dir)
    trainer = new_trainer(config, tmp_path / "run")
    trainer.train(stop_at=2)
    # Step 3 is an update step: poison its gradients.
    weight = trainer.model.bert.embeddings.word_embeddings.weight
    handle = weight.register_hook(lambda g: g * float("nan"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(stop_at=3)
    handle.remove()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no weight, pattern or buffer changed
    skips = read_metrics(tmp_path / "run", "skip")
    assert [(r["step"], r["what"]) for r in skips] == [(3, "optimizer_step"), (3, "pattern_update")]
    summary = trainer.train()
    assert summary["skipped_steps"] == 1 and summary["skipped_updates"] == 1 and summary["pattern_updates"] == 2
    assert torch.isfinite(torch.tensor(summary["final_val_mlm_loss"]))


def test_group_lasso_shrinks_sparse_blocks(data_dir, tmp_path):
    def block_norm_sum(extra, run):
        trainer = new_trainer(small_config(data_dir, "bert_tiny_static", "training.steps=3", *extra), tmp_path / run)
        trainer.train()
        return sum(float(m.values.detach().flatten(1).norm(dim=1).sum()) for _, m in sparse_weights(trainer.model))

    assert block_norm_sum(["sparsity.group_lasso=50.0"], "gl") < 0.9 * block_norm_sum([], "plain")


def test_static_and_dense_modes(data_dir, tmp_path):
    static = new_trainer(small_config(data_dir, "bert_tiny_static"), tmp_path / "static")
    patterns = [m.pattern.linear_index().clone() for _, m in sparse_weights(static.model)]
    summary = static.train()
    assert summary["pattern_updates"] == 0 and summary["mean_explored_dof"] == pytest.approx(0.1, abs=1e-3)
    assert all(torch.equal(p, m.pattern.linear_index()) for p, (_, m) in zip(patterns, sparse_weights(static.model)))
    dense = new_trainer(small_config(data_dir, "bert_tiny_dense"), tmp_path / "dense").train()
    assert "mean_explored_dof" not in dense
    from ipu_app.sparse.flops import non_embedding_training_flops_per_sequence as paper_flops

    assert dense["total_non_embedding_flops"] == pytest.approx(paper_flops(2, 128, 128, 0.0) * 12 * 8)
    assert summary["total_non_embedding_flops"] == pytest.approx(paper_flops(2, 128, 128, 0.9) * 12 * 8, rel=1e-4)


def test_resume_errors(data_dir, tmp_path):
    config = small_config(data_dir)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        new_trainer(config, tmp_path / "empty", resume=True)
    trainer = new_trainer(config, tmp_path / "run")
    trainer.train(stop_at=4)
    other = small_config(data_dir, "bert_tiny_sparse", "sparsity.ratio=0.8")
    with pytest.raises(CheckpointError, match="different config"):
        new_trainer(other, tmp_path / "run", resume=True)
    (tmp_path / "run" / "checkpoints" / "step_00000004" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step_00000004 is damaged \(state.pt: "
                                              r"not a checkpoint state file\)") as info:
        new_trainer(config, tmp_path / "run", resume=True)
    assert "weights_only=False" not in str(info.value)
    (tmp_path / "run" / "checkpoints" / "step_00000004" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="damaged"):
        new_trainer(config, tmp_path / "run", resume=True)


@pytest.mark.parametrize("file, content", [("state.pt", b""), ("model.safetensors", bytes(range(256)) * 4)])
def test_a_damaged_latest_checkpoint_falls_back_to_the_older_one(data_dir, tmp_path, capsys, file, content):
    config = small_config(data_dir)
    new_trainer(config, tmp_path / "run").train(stop_at=8)  # checkpoints at 4 and 8 (keep 2)
    target = tmp_path / "run" / "checkpoints" / "step_00000008" / file
    target.unlink() if content is None else target.write_bytes(content)
    capsys.readouterr()
    trainer = new_trainer(config, tmp_path / "run", resume=True)
    assert trainer.step == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: checkpoint ") and "step_00000008 is " in err and err.endswith(
        "resuming from the older step_00000004") and "\n" not in err
    assert "Traceback" not in err and "weights_only=False" not in err
    assert trainer.train()["steps"] == 12


def test_checkpoint_loads_without_pickled_code(data_dir, tmp_path):
    trainer = new_trainer(small_config(data_dir), tmp_path / "run")
    trainer.train(stop_at=4)
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["data"]["position"] == 4 * 8
    assert len(state["rng"]) == 1 and set(state["rng"][0]) >= {"torch", "python", "numpy"}  # one per rank
    assert state["updater"]["update_count"] == 1


def test_fp16_on_cpu_is_refused(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        new_trainer(small_config(data_dir, "bert_tiny_sparse", "training.precision=fp16"), tmp_path / "run")


def test_sigint_finishes_the_step_and_writes_a_checkpoint(data_dir, tmp_path):
    import os
    import signal

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job
    trainer = new_trainer(small_config(data_dir), tmp_path / "run")
    trainer.train(stop_at=1)
    weight = trainer.model.bert.embeddings.word_embeddings.weight
    fired = []

    def interrupt(grad):  # Ctrl-C in the middle of step 3's backward pass
        if trainer.step == 2 and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return grad

    weight.register_hook(interrupt)
    assert trainer.train() is None and trainer.stopped_by_signal
    assert trainer.step == 3  # the interrupted step was completed, not torn
    assert [s for s, _ in list_checkpoints(tmp_path / "run")][-1] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


# ------------------------------------------------- half-run freezing (paper Fig. 1b)

def weights(trainer):
    return {name: layer.weight.detach().clone() for name, layer in trainer.state.freezer.layers}


@pytest.mark.parametrize("mode", ["early", "late"])
def test_subset_is_untrained_for_half_the_run(data_dir, tmp_path, mode):
    config = small_config(data_dir, "bert_tiny_dense", f"sparsity.freeze={mode}", "sparsity.ratio=0.9")
    trainer = new_trainer(config, tmp_path / "run")
    freezer = trainer.state.freezer
    assert len(freezer.layers) == 2 * 6 and freezer.switch_step == 6  # tiny: 2 layers x 6 linears
    assert freezer.frozen_fraction() == pytest.approx(0.9, abs=1e-4)
    start = weights(trainer)
    trainer.train(stop_at=6)
    half = weights(trainer)
    trainer.train()
    end = weights(trainer)
    for (name, _), mask in zip(freezer.layers, freezer.masks):
        trained = ~mask
        assert not torch.equal(half[name][trained], start[name][trained])  # the rest always trains
        assert not torch.equal(end[name][trained], half[name][trained])
        if mode == "early":  # initial values for steps 1..6, trained afterwards
            assert torch.equal(half[name][mask], start[name][mask])
            assert not torch.equal(end[name][mask], half[name][mask])
        else:  # trained for steps 1..6, then kept at the values after step 6 (decay and moments undone)
            assert not torch.equal(half[name][mask], start[name][mask])
            assert torch.equal(end[name][mask], half[name][mask])


def test_masks_are_seeded_and_state_round_trips():
    layers = [("a", torch.nn.Linear(8, 8)), ("b", torch.nn.Linear(8, 16))]
    one = PartialFreezer(layers, "late", 0.5, 10, seed=3)
    two = PartialFreezer(layers, "late", 0.5, 10, seed=3)
    other = PartialFreezer(layers, "late", 0.5, 10, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(one.masks, two.masks))
    assert not torch.equal(one.masks[0], other.masks[0])
    assert [int(m.sum()) for m in one.masks] == [32, 64]
    assert [one.is_frozen(s) for s in (1, 5, 6, 10)] == [False, False, True, True]
    one.before_optimizer_step(6)
    two.load_state_dict(one.state_dict())
    assert torch.equal(two.snapshots[1], one.snapshots[1])
    with pytest.raises(ValueError, match="does not match"):
        PartialFreezer(layers, "early", 0.5, 10, seed=3).load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match="freeze ratio"):
        PartialFreezer(layers, "early", 1.0, 10, seed=3)


def test_freeze_config_errors(data_dir):
    with pytest.raises(ConfigError, match="sparsity.freeze=late needs sparsity.mode=dense"):
        small_config(data_dir, "bert_tiny_sparse", "sparsity.freeze=late")
    with pytest.raises(ConfigError, match="sparsity.freeze='sometimes' is not valid"):
        small_config(data_dir, "bert_tiny_dense", "sparsity.freeze=sometimes")


def test_checkpoint_from_before_a_new_config_key_still_resumes(data_dir, tmp_path):
    config = small_config(data_dir)
    assert new_trainer(config, tmp_path / "run").train(stop_at=4) is None
    state_file = tmp_path / "run" / "checkpoints" / "step_00000004" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["config"]["sparsity"]["freeze"]  # as written before the key existed
    torch.save(state, state_file)
    resumed = new_trainer(config, tmp_path / "run", resume=True)
    assert resumed.step == 4
    state["config"]["sparsity"]["ratio"] = 0.8  # a real difference is still refused
    torch.save(state, state_file)
    with pytest.raises(CheckpointError, match=r"sparsity.ratio: 0.8 in the checkpoint, 0.9 now"):
        new_trainer(config, tmp_path / "run", resume=True)


@pytest.mark.parametrize("regrowth", ["random", "gradient"])
def test_cpu_kernels_train_like_the_reference_op(data_dir, tmp_path, regrowth):
    """A whole DynSparse run (b = 16, pattern updates, RigL's dense gradient) on the CPU kernels
    follows the reference op's run: the same patterns and losses within fp32 rounding."""
    from ipu_app.ops import cpu

    if not cpu.available():
        pytest.skip("the CPU kernels do not build here")
    runs = {}
    for backend in ("reference", "cpu"):
        config = small_config(data_dir, "bert_tiny_sparse_b16", f"backend={backend}",
                              f"sparsity.regrowth={regrowth}")
        trainer = new_trainer(config, tmp_path / backend)
        summary = trainer.train()
        runs[backend] = (trainer, summary)
        assert ("CPU kernels" if backend == "cpu" else "reference op") in summary["sparse_kernels"]
    (ref, ref_summary), (fast, fast_summary) = runs["reference"], runs["cpu"]
    assert ref_summary["pattern_updates"] == fast_summary["pattern_updates"] == 3
    layers = list(zip(sparse_weights(ref.model), sparse_weights(fast.model)))
    same = [a.pattern.equal(b.pattern) for (_, a), (_, b) in layers]
    losses_ref, losses_fast = train_losses(tmp_path / "reference"), train_losses(tmp_path / "cpu")
    if all(same):
        for (_, a), (_, b) in layers:
            torch.testing.assert_close(b.values, a.values, rtol=1e-3, atol=1e-5)
        for (step, *a), (_, *b) in zip(losses_ref, losses_fast):
            assert a == pytest.approx(b, rel=1e-4), step
        assert fast_summary["final_val_mlm_loss"] == pytest.approx(ref_summary["final_val_mlm_loss"], rel=1e-4)
    else:
        # The kernels sum in another order than the reference op (token panels on a CPU without
        # AVX-512 most of all): at a near-tie of two block norms the pruning may keep the other
        # block, random regrowth then draws from another free set, and RigL's scores (dense gradients
        # of weights that differ by rounding) may rank a near-tie the other way. Up to the first
        # update (step 3) the runs agree to rounding, and a flip stays the exception.
        assert sum(same) >= 0.75 * len(same), same
        for (step, *a), (_, *b) in zip(losses_ref, losses_fast):
            if step <= 3:
                assert a == pytest.approx(b, rel=1e-4), step
        assert fast_summary["final_val_mlm_loss"] == pytest.approx(ref_summary["final_val_mlm_loss"], rel=2e-2)


def test_validation_precedes_the_update_and_a_churning_schedule_warns(data_dir, tmp_path, capsys):
    # n = 4 over 12 steps: updates at 3, 6, 9; validation at 6 and 12. pr = 1 (constant) prunes
    # exactly the blocks grown at the update before: pruned_recently_grown = 1 from the 2nd update.
    config = small_config(data_dir, "bert_tiny_sparse", "sparsity.pruning_ratio=1.0",
                          "sparsity.pruning_schedule=constant")
    new_trainer(config, tmp_path / "run").train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    at_6 = [r["kind"] for r in records if r["step"] == 6 and r["kind"] in ("val", "update")]
    assert at_6 == ["val", "update"]
    prg = [r["mean_pruned_recently_grown"] for r in records if r["kind"] == "update"]
    assert prg[1:] == [1.0, 1.0] and prg[0] is None  # NaN (null in the JSON): nothing grown before the first update
    warnings = [r for r in records if r["kind"] == "warning"]
    assert [(w["step"], w["what"]) for w in warnings] == [(9, "pruned_recently_grown")]
    err = capsys.readouterr().err
    assert "warning: pattern updates every 3 steps, below sparsity.min_segment_steps=1000" in err
    assert err.count("regrown blocks are pruned before they grow") == 1
    assert "step 6: pattern update 2/3, pr(t) 1.000" in err and "pruned_recently_grown 1.00" in err


def test_final_validation_is_announced_and_counted_in_wall_time(data_dir, tmp_path, capsys, monkeypatch):
    import time

    config = small_config(data_dir, "bert_tiny_sparse", "training.steps=4", "training.validate_every=4")
    trainer = new_trainer(config, tmp_path / "run")
    original, timed = Trainer.evaluate, {}

    def slow_validate(self, final=False):
        started = time.perf_counter()
        if final:
            time.sleep(1.5)
        result = original(self, final)
        timed[final] = time.perf_counter() - started
        return result

    monkeypatch.setattr(Trainer, "evaluate", slow_validate)
    summary = trainer.train()
    assert list(timed) == [True]  # step 4 is the end: one validation, the final one
    assert summary["wall_time_s"] >= summary["train_time_s"] + timed[True]
    from ipu_app.data.batches import validation_batches

    sequences = sum(b["input_ids"].shape[0] for b in validation_batches(data_dir, 4, max_sequences=16))
    assert f"final validation: {sequences} sequences" in capsys.readouterr().err


def _full_disk_for(monkeypatch, suffix):
    """safetensors' save_file fails as on a full disk (part of the file written) for paths ending in ``suffix``."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if not str(filename).endswith(suffix):
            return real(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_a_full_disk_keeps_the_last_checkpoint_and_the_run_resumes(data_dir, tmp_path, monkeypatch):
    config = small_config(data_dir)
    run = tmp_path / "run"
    new_trainer(config, run).train(stop_at=4)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_00000004").iterdir()}
    _full_disk_for(monkeypatch, "model.safetensors.tmp")
    with pytest.raises(CheckpointError) as info:
        new_trainer(config, run, resume=True).train()
    message = str(info.value)
    assert message.startswith("checkpoint step 8 was not written (cannot write ") and "\n" not in message
    assert "No space left on device); the previous checkpoint (step_00000004) is intact" in message
    assert f"--resume {run}" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]  # no temporary left
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_00000004").iterdir()} == before
    monkeypatch.undo()
    summary = new_trainer(config, run, resume=True).train()
    assert summary["steps"] == 12 and (run / "summary.json").is_file()


def test_a_full_disk_at_the_final_model_write_is_finished_by_resume(data_dir, tmp_path, monkeypatch):
    config = small_config(data_dir)
    run = tmp_path / "run"
    _full_disk_for(monkeypatch, "model" + "/model.safetensors.tmp")
    with pytest.raises(CheckpointError, match=r"cannot write .*model/model.safetensors: No space left on device; "
                                              r"the final checkpoint \(step 12\) is in place"):
        new_trainer(config, run).train()
    assert not (run / "summary.json").exists() and not (run / "model" / "model.safetensors.tmp").exists()
    monkeypatch.undo()
    summary = new_trainer(config, run, resume=True).train()
    assert summary["steps"] == 12 and (run / "model" / "model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["final_val_mlm_loss"] == summary["final_val_mlm_loss"]


def test_a_diverged_run_stops_with_one_line_and_its_metrics_stay_json(data_dir, tmp_path):
    from ipu_app.train.trainer import TrainingDiverged

    config = small_config(data_dir, "bert_tiny_sparse", "training.max_skipped_steps=3")
    trainer = new_trainer(config, tmp_path / "run")
    trainer.train(stop_at=4)  # a checkpoint at step 4
    with torch.no_grad():
        trainer.model.bert.embeddings.word_embeddings.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("training diverged: the 3 optimizer steps 5..7 all had non-finite gradients")
    assert "step_00000004 (step 4)" in message and "\n" not in message

    def strict(constant):
        raise AssertionError(f"{constant} is not JSON")

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=strict) for line in lines]
    skips = [r for r in records if r["kind"] == "skip" and r["what"] == "optimizer_step"]
    assert [r["step"] for r in skips] == [5, 6, 7] and all(r["grad_norm"] is None for r in skips)
    assert records[-1] == {"kind": "diverged", "step": 7, "skipped_in_a_row": 3}
    assert not (tmp_path / "run" / "summary.json").exists()


def test_isolated_skipped_steps_do_not_stop_the_run(data_dir, tmp_path):
    config = small_config(data_dir, "bert_tiny_sparse", "training.max_skipped_steps=2")
    trainer = new_trainer(config, tmp_path / "run")
    weight = trainer.model.bert.embeddings.word_embeddings.weight
    calls = []

    def poison_odd_steps(grad):  # one micro-batch in two: every other step has a NaN gradient
        calls.append(1)
        return grad * float("nan") if len(calls) % 4 in (1, 2) else grad

    weight.register_hook(poison_odd_steps)
    summary = trainer.train()
    assert summary["skipped_steps"] == 6 and summary["steps"] == 12


def test_resume_keeps_every_tensorboard_point_and_tolerates_a_torn_metrics_line(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small_config(data_dir)
    run = tmp_path / "run"
    run.mkdir()
    for stop in (4, 8):
        trainer = Trainer(config, run, progress=False, tensorboard=True, resume=stop > 4)
        trainer.train(stop_at=stop)
        trainer.close()
    with open(run / "metrics.jsonl", "a") as f:  # a crash in the middle of writing a record
        f.write('{"kind": "train", "step": 9, "lo')
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, 9))
    trainer = Trainer(config, run, progress=False, tensorboard=True, resume=True)
    trainer.train()
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, 13))
    assert len(list((run / "tensorboard").iterdir())) == 3  # one event file per start
    acc = EventAccumulator(str(run / "tensorboard"))  # the whole run, as TensorBoard reads it (purges applied)
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))  # the checkpoint steps 4 and 8 kept


def test_resume_on_changed_data_is_refused(data_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    config = small_config(data)
    new_trainer(config, tmp_path / "run").train(stop_at=4)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["documents"] += 1  # as if prepare-data --overwrite had run
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"the data in {data} changed since step_00000004 was written"):
        new_trainer(config, tmp_path / "run", resume=True)


def test_the_threads_setting_reaches_torch_and_the_log(data_dir, tmp_path, capsys, monkeypatch):
    from ipu_app.train.precision import resolve_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None) == (3, "OMP_NUM_THREADS") and resolve_threads(2) == (2, "training.threads")
    monkeypatch.delenv("OMP_NUM_THREADS")
    import os

    assert resolve_threads(None) == (len(os.sched_getaffinity(0)), "the cores this process may use")
    before = torch.get_num_threads()
    try:
        trainer = new_trainer(small_config(data_dir, "bert_tiny_sparse", "training.threads=1",
                                           "training.steps=2", "training.warmup_steps=1",
                                           "sparsity.segments=2"), tmp_path / "run")
        assert torch.get_num_threads() == 1
        summary = trainer.train()
    finally:
        torch.set_num_threads(before)
    assert summary["threads"] == 1
    assert "; CPU threads: 1 (training.threads)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="training.threads must be >= 1 or null, got 0"):
        small_config(data_dir, "bert_tiny_sparse", "training.threads=0")


def _scalar_reads(trainer, step):
    """Tensor-to-Python reads (``.item()``, ``float()``, ``int()``: a host sync on a GPU) in one step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Count.reads += 1
            return func(*args, **(kwargs or {}))

    with Count():
        trainer.train_step(step)
    return Count.reads


def test_host_reads_do_not_grow_with_micro_batches_and_prefetching_trains_alike(data_dir, tmp_path):
    reads = {}
    for micro in (8, 2):  # one micro-batch per step vs four
        for fixed in (False, True):  # exact rows (eager CPU) and the fixed-size masks (GPU, compile)
            config = small_config(data_dir, "bert_tiny_sparse", f"training.micro_batch_size={micro}",
                                  "training.log_every=100", f"data.fixed_size_masks={str(fixed).lower()}")
            trainer = new_trainer(config, tmp_path / f"m{micro}{fixed}")
            trainer.train_step(1)
            reads[micro, fixed] = _scalar_reads(trainer, 2)
    # The GPU path reads nothing per micro-batch (the loss sums stay on the device, masked tokens are
    # counted on the host, the attention mask needs no padding check); the eager CPU path keeps
    # transformers' padding check, one read per micro-batch, which costs nothing on a CPU.
    assert reads[2, True] == reads[8, True]
    assert reads[2, False] - reads[8, False] <= 3
    plain, ahead = tmp_path / "plain", tmp_path / "ahead"
    new_trainer(small_config(data_dir), plain).train()
    trainer = new_trainer(small_config(data_dir, "bert_tiny_sparse", "data.prefetch_batches=3"), ahead)
    assert type(trainer.state.batches).__name__ == "Prefetcher"
    trainer.train()
    assert trainer.state.batches._thread is None  # the finished run stopped its prefetch thread
    assert train_losses(ahead) == train_losses(plain)  # the same batches, bit for bit
    workers = tmp_path / "workers"
    trainer = new_trainer(small_config(data_dir, "bert_tiny_sparse", "data.num_workers=2"), workers)
    assert type(trainer.state.batches).__name__ == "WorkerLoader"
    trainer.train()
    assert trainer.state.batches._iterator is None  # the finished run stopped its worker processes
    assert train_losses(workers) == train_losses(plain)
    with pytest.raises(ConfigError, match="data.num_workers must be an integer >= 0, got -1"):
        small_config(data_dir, "bert_tiny_sparse", "data.num_workers=-1")


def test_the_trainer_prepares_no_data_it_names_the_command_that_does(tmp_path, monkeypatch):
    """Data is located or prepared by the command before the trainer is built (data.prepare.ready_data);
    a trainer given unprepared embedded data stops with one line naming prepare-data, writing nothing."""
    from ipu_app.data.corpus import CorpusError
    from ipu_app.data.prepare import located_data

    monkeypatch.setenv("IPU_APP_CACHE", str(tmp_path / "empty_cache"))
    config = load_config("bert_tiny_sparse", steps=4)
    with pytest.raises(CorpusError, match=r"embedded corpus is not prepared .* run python -m ipu_app prepare-data "
                                          r"--tokenizer bert-base-uncased --vocab-size 30522 first"):
        located_data(config.data)
    with pytest.raises(CorpusError, match="not prepared"):
        new_trainer(config, tmp_path / "run")
    assert not (tmp_path / "empty_cache").exists() and list((tmp_path / "run").iterdir()) == []
    with pytest.raises(CorpusError):  # a data.dir that is not prepared data
        located_data(load_config("bert_tiny_sparse", [f"data.dir={tmp_path / 'run'}"]).data)
