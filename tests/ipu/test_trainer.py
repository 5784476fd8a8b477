import pytest
import torch

from ipu_app.config import ConfigError, load_config
from ipu_app.data.batches import static_batch
from ipu_app.ipu.model import IpuPretrainingModel
from ipu_app.ipu.trainer import IpuTrainer, check_ipu_config
from ipu_app.sparse.layer import sparse_weights
from ipu_app.train.metrics import read_metrics
from ipu_app.train.trainer import Trainer
from ipu_app.train.build import model_config

from .sim_poptorch import SimPoptorch


def small(data_dir, name="bert_tiny_sparse", *extra):
    return load_config(name, [
        f"data.dir={data_dir}", "training.steps=6", "training.batch_size=8", "training.micro_batch_size=4",
        "training.warmup_steps=1", "training.log_every=1", "training.validate_every=3", "training.checkpoint_every=100",
        "training.precision=fp32", "sparsity.segments=3", "data.validation_sequences=8",
        "optimizer.bias_correction=global", *extra])  # the paper's: poptorch's Adam has one step count


def cpu_and_ipu(data_dir, tmp_path, name, extra=(), ipu_extra=(), **ipu_kwargs):
    """Train ``name`` on the CPU trainer and on the IPU trainer (simulated PopTorch); both summaries,
    the simulation (its call log) and the IPU trainer. The IPU run's losses must match the CPU's."""
    for sub in ("cpu", "ipu"):
        (tmp_path / sub).mkdir()
    cpu = Trainer(small(data_dir, name, *extra), tmp_path / "cpu", progress=False, tensorboard=False).train()
    sim = SimPoptorch()
    trainer = IpuTrainer(small(data_dir, name, *extra, "backend=ipu", *ipu_extra), tmp_path / "ipu", poptorch=sim,
                         progress=False, tensorboard=False, **ipu_kwargs)
    ipu = trainer.train()
    cpu_losses = [r["loss"] for r in read_metrics(tmp_path / "cpu", "train")]
    ipu_losses = [r["loss"] for r in read_metrics(tmp_path / "ipu", "train")]
    assert ipu_losses == pytest.approx(cpu_losses, rel=2e-5)
    assert ipu["final_val_mlm_loss"] == pytest.approx(cpu["final_val_mlm_loss"], rel=1e-4)
    return cpu, ipu, sim, trainer


def test_static_graph_loss_equals_the_model(data_dir):
    from ipu_app.data.batches import BatchIterator
    from ipu_app.data.sampling import MaskingConfig, PretrainingDataset
    from ipu_app.model.bert import SparseBertForPreTraining
    config = small(data_dir)
    dataset = PretrainingDataset(data_dir, "train", MaskingConfig(128, 0.15, 20), seed=0)
    batch = next(BatchIterator(dataset, 4, 0, 1))
    torch.manual_seed(0)
    model = SparseBertForPreTraining(model_config(config, dataset.vocab_size)).eval()
    with torch.no_grad():
        expected = model(**batch)
    with torch.no_grad():
        loss, mlm, nsp, correct, masked = IpuPretrainingModel(model)(**static_batch(batch, 20))
    assert float(loss) == pytest.approx(float(expected.loss), rel=1e-5)
    assert float(mlm) == pytest.approx(float(expected.mlm_loss), rel=1e-5)
    assert int(masked) == expected.num_masked and int(correct) == int(expected.mlm_correct)
    with pytest.raises(ValueError, match="more than max_predictions=2"):
        static_batch(batch, 2)


def test_ipu_trainer_matches_the_cpu_trainer(data_dir, tmp_path):
    cpu, ipu, sim, trainer = cpu_and_ipu(data_dir, tmp_path, "bert_tiny_sparse")
    assert trainer.backend.micro_per_call == 2 and not trainer.backend.half
    assert ipu["pattern_updates"] == cpu["pattern_updates"] == 2
    names = [entry[0] for entry in sim.log]
    assert names.count("executor()") == 6 and names.count("executor.setOptimizer") == 6
    assert names.count("executor.copyNamedBuffersToDevice") == 2  # one per pattern update
    assert names.count("trainingModel") == 1  # compiled once
    assert ("BeginBlock", ("Heads",), {"ipu_id": 0}) in sim.log
    # The saved models carry identical patterns.
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "cpu" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ipu" / "model" / "model.safetensors"))
    rows = [k for k in a if k.endswith("block_rows") or k.endswith("block_cols")]
    assert rows and all(torch.equal(a[k], b[k]) for k in rows)


def test_ipu_config_checks():
    with pytest.raises(ConfigError, match="device_iterations=1"):
        check_ipu_config(load_config("bert_tiny_sparse", ["backend=ipu", "optimizer.bias_correction=global", "ipu.device_iterations=4"]))
    with pytest.raises(ConfigError, match="group_lasso is not supported"):
        check_ipu_config(load_config("bert_tiny_sparse", ["backend=ipu", "optimizer.bias_correction=global", "sparsity.group_lasso=0.1"]))


def test_backend_ipu_without_the_sdk_is_one_line(tmp_path, capsys):
    from ipu_app.commands.train import main

    run = tmp_path / "run"
    code = main(["--config", "bert_tiny_sparse", "--set", "backend=ipu", "--set", "optimizer.bias_correction=global", "--output-dir", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: backend: ipu needs Graphcore's Poplar SDK") and err.count("\n") == 1
    assert not run.exists()
    code = main(["--config", "bert_base_sparse", "--set", "backend=ipu", "--set", "optimizer.bias_correction=global", "--set", "ipu.layers_per_ipu=[0,4,4,4]",
                 "--describe"])
    assert code == 0  # describing an IPU config needs no SDK


def test_poprun_instances_share_the_batch_and_instance_0_writes(data_dir, tmp_path):
    from ipu_app.ipu.trainer import InstanceContext

    from .recorder import Recorder

    def popdist_for(index, sim=None):
        returns = {"popdist.isPopdistEnvSet": True, "popdist.getInstanceIndex": index, "popdist.getNumInstances": 2}
        if sim is not None:  # popdist.poptorch.Options(ipus_per_replica=...) builds the instance's options
            returns["popdist.poptorch.Options"] = lambda **kwargs: sim.Options()
        return Recorder([], "popdist", returns=returns)

    ctx = InstanceContext.from_popdist(popdist_for(1))
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (1, 2, False, False)
    assert ctx.all_gather_object("rng") == ["rng", "rng"]
    config = small(data_dir, "bert_tiny_sparse", "backend=ipu", "ipu.instances=2", "ipu.replication_factor=2",
                   "training.steps=2", "training.validate_every=100", "sparsity.segments=2")
    runs = {}
    for index in (0, 1):
        (tmp_path / str(index)).mkdir()
        sim = SimPoptorch()
        trainer = IpuTrainer(config, tmp_path / str(index), poptorch=sim, popdist=popdist_for(index, sim), progress=False,
                             tensorboard=False)
        assert trainer.backend.micro_per_call == 1  # accumulation 1 x 1 local replica: 8 = 4 micro x 1 x 2 replicas
        first = trainer.backend.call_batch(trainer)["input_ids"]
        runs[index] = first
        assert trainer.train() is not None
    assert not torch.equal(runs[0], runs[1])  # each instance reads its own share of the global batch
    assert (tmp_path / "0" / "summary.json").is_file() and not any((tmp_path / "1").iterdir())
    with pytest.raises(ConfigError, match="RigL with several poprun instances"):
        check_ipu_config(small(data_dir, "bert_tiny_sparse_rigl", "backend=ipu", "ipu.instances=2",
                               "ipu.replication_factor=2"))


def test_popsparse_op_path_matches_the_cpu_trainer(data_dir, tmp_path):
    from .fake_library import FakeLibrary

    cpu, ipu, sim, trainer = cpu_and_ipu(data_dir, tmp_path, "bert_tiny_sparse", ("sparsity.block_size=4",),
                                         ("ipu.sparse_op=popsparse",), popsparse_library=FakeLibrary())
    layer = sparse_weights(trainer.model)[0][1]
    assert layer.popsparse_metainfo.dtype == torch.float16 and layer.popsparse_nz_index.dtype == torch.int32
    updatable = trainer.backend.executor.options.updatable
    assert sum(n.endswith("popsparse_metainfo") for n in updatable) == 12
    assert all(n.startswith("model.bert.encoder.layer.") for n in updatable)
    (tmp_path / "fresh").mkdir()  # the same run, untrained: its nz order before any update
    fresh = IpuTrainer(small(data_dir, "bert_tiny_sparse", "sparsity.block_size=4", "backend=ipu",
                             "ipu.sparse_op=popsparse"), tmp_path / "fresh", poptorch=SimPoptorch(),
                       popsparse_library=FakeLibrary(), progress=False, tensorboard=False)
    before = sparse_weights(fresh.model)[0][1].popsparse_nz_index
    names = [entry[0] for entry in sim.log]
    assert names.count("custom_op") == 12 * 2 * 6  # every sparse layer, every micro-batch, every step
    assert not torch.equal(layer.popsparse_nz_index, before)  # re-derived after the pattern updates
    # The checkpoint and the exported model carry no popsparse buffers (they are derived).
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "ipu" / "model" / "model.safetensors"))
    assert not any("popsparse" in k for k in saved)
    with pytest.raises(ConfigError, match="needs sparsity.inactive=zero"):
        check_ipu_config(small(data_dir, "bert_tiny_sparse", "backend=ipu", "ipu.sparse_op=popsparse",
                               "sparsity.inactive=frozen"))
    with pytest.raises(ConfigError, match="half partials with 1x1"):
        check_ipu_config(small(data_dir, "bert_tiny_sparse", "backend=ipu", "ipu.sparse_op=popsparse",
                               "ipu.enable_half_partials=true"))


def test_static_popsparse_op_path_matches_the_cpu_trainer(data_dir, tmp_path):
    extra = ("sparsity.block_size=8",)
    _, _, sim, _ = cpu_and_ipu(data_dir, tmp_path, "bert_tiny_static", extra, ("ipu.sparse_op=popsparse_static",))
    names = [entry[0] for entry in sim.log]
    assert names.count("custom_op") == 12 * 2 * 6 and names.count("executor.copyNamedBuffersToDevice") == 0
    with pytest.raises(ConfigError, match="needs sparsity.mode=static"):
        check_ipu_config(small(data_dir, "bert_tiny_sparse", *extra, "backend=ipu", "ipu.sparse_op=popsparse_static"))
    with pytest.raises(ConfigError, match="blocks divisible by 16 \\(fp16\\)"):
        check_ipu_config(small(data_dir, "bert_tiny_static", *extra, "backend=ipu", "ipu.sparse_op=popsparse_static",
                               "training.precision=fp16"))


def test_ipu_run_resumes_exactly(data_dir, tmp_path):
    config = small(data_dir, "bert_tiny_sparse", "backend=ipu", "training.checkpoint_every=2")
    for sub in ("full", "part"):
        (tmp_path / sub).mkdir()
    IpuTrainer(config, tmp_path / "full", poptorch=SimPoptorch(), progress=False, tensorboard=False).train()
    sim = SimPoptorch()
    assert IpuTrainer(config, tmp_path / "part", poptorch=sim, progress=False, tensorboard=False).train(stop_at=3) is None
    assert [entry[0] for entry in sim.log].count("executor.copyWeightsToHost") >= 2  # before each checkpoint
    resumed = IpuTrainer(config, tmp_path / "part", resume=True, poptorch=SimPoptorch(), progress=False,
                         tensorboard=False)
    assert resumed.step == 3
    resumed.train()
    losses = [[r["loss"] for r in read_metrics(tmp_path / sub, "train")] for sub in ("full", "part")]
    assert losses[0] == losses[1]


def test_ipu_steps_skip_and_stop_a_diverged_run_like_the_torch_step(data_dir, tmp_path):
    """The IPU step shares the torch step's bookkeeping: non-finite steps are logged as skipped, counted
    in a row, and training.max_skipped_steps of them stop the run with TrainingDiverged."""
    from ipu_app.train.trainer import TrainingDiverged

    trainer = IpuTrainer(small(data_dir, "bert_tiny_sparse", "backend=ipu", "training.max_skipped_steps=2"), tmp_path,
                         poptorch=SimPoptorch(), progress=False, tensorboard=False)
    executor = trainer.backend.executor

    class NonFinite:
        """The device's step, reporting a non-finite loss."""

        def __call__(self, **batch):
            loss, *rest = executor(**batch)
            return (loss * float("nan"), *rest)

        def __getattr__(self, name):
            return getattr(executor, name)

    trainer.backend.executor = NonFinite()
    with pytest.raises(TrainingDiverged, match=r"the 2 optimizer steps 1\.\.2 all had non-finite gradients"):
        trainer.train()
    assert [r["step"] for r in read_metrics(tmp_path, "skip")] == [1, 2]
    assert read_metrics(tmp_path, "diverged")[0]["skipped_in_a_row"] == 2
    assert trainer.counters.skipped_steps == 2
