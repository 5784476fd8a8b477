import shlex

import pytest

from ipu_app.config import ConfigError, load_config
from ipu_app.ipu import IpuUnavailable, import_poptorch
from ipu_app.ipu.options import build_options, expand_layers_per_ipu, layer_ipus, plan, poprun_command

from .recorder import Recorder, calls

OPTS = "poptorch.Options()"


def base_pod(*extra):
    return load_config("bert_base_sparse", ["ipu.layers_per_ipu=[0,4,4,4]", "ipu.replication_factor=4",
                                            "training.micro_batch_size=8", *extra])


def test_layers_per_ipu_with_wildcards():
    assert expand_layers_per_ipu([-1], 12) == [12]
    assert expand_layers_per_ipu([0, 4, 4, 4], 12) == [0, 4, 4, 4]
    assert expand_layers_per_ipu([1, -1, -1], 8) == [1, 4, 3]  # 7 left: the first wildcard takes one more
    assert expand_layers_per_ipu([0, -1, 2], 8) == [0, 6, 2]
    assert layer_ipus([0, 2, -1], 4) == [1, 1, 2, 2]
    for bad, message in (([4, 4], "places 8 encoder layers; the model has 12"), ([13, -1], "places 13"),
                         ([-2, 4], ">= 0 or -1"), ([], "at least one IPU")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            expand_layers_per_ipu(bad, 12)


def test_plan_places_embeddings_and_heads_on_ipu0():
    p = plan(base_pod())
    assert p.placement.stages == [
        (["Embedding"], 0), ([f"Encoder{i}" for i in range(4)], 1), ([f"Encoder{i}" for i in range(4, 8)], 2),
        ([f"Encoder{i}" for i in range(8, 12)], 3), (["Pooler", "Heads"], 0)]
    assert p.ipus_per_replica == 4 and p.total_ipus == 16
    assert p.gradient_accumulation == 16  # 512 = 8 x 16 x 4
    assert p.samples_per_call == 512 and p.matmul_proportion == [0.6] * 4
    single = plan(load_config("bert_mini_sparse", []))
    assert single.placement.stages == [(["Embedding", "Encoder0", "Encoder1", "Encoder2", "Encoder3", "Pooler",
                                         "Heads"], 0)]


@pytest.mark.parametrize("extra, message", [
    (["training.micro_batch_size=32", "training.batch_size=512"],
     "pipelining over 4 IPUs has 5 stages but gradient accumulation is 4"),
    (["ipu.layers_per_ipu=[12, 0]"], "leaves IPU 1 without encoder layers"),
    (["ipu.matmul_proportion=[0.2, 0.3]"], "one value in (0, 1] or one per IPU (4)"),
    (["ipu.matmul_proportion=[1.5]"], "one value in (0, 1]"),
    (["ipu.instances=3"], "must be a multiple of ipu.instances=3"),
    (["ipu.instances=4", "ipu.hosts=[a, b, c]"], "multiple of the 3 ipu.hosts"),
    (["training.batch_size=520"], "not a multiple of training.micro_batch_size=8 x world size 4"),
])
def test_plan_errors(extra, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        plan(base_pod(*extra))


def test_options_for_a_pipelined_pod():
    log = []
    build_options(base_pod("ipu.executable_cache_dir=/cache", "ipu.enable_half_partials=true",
                           "ipu.optimizer_state_offchip=true", "ipu.replicated_tensor_sharding=true"),
                  Recorder(log, "poptorch"), ["bert.encoder.layer.0.attention.self.query.block_rows"])
    assert calls(log, f"{OPTS}.replicationFactor") == [((4,), {})]
    assert calls(log, f"{OPTS}.deviceIterations") == [((1,), {})]
    assert calls(log, f"{OPTS}.Training.gradientAccumulation") == [((16,), {})]
    assert [a for a, _ in calls(log, "poptorch.Stage")] == [
        ("Embedding",), tuple(f"Encoder{i}" for i in range(4)), tuple(f"Encoder{i}" for i in range(4, 8)),
        tuple(f"Encoder{i}" for i in range(8, 12)), ("Pooler", "Heads")]
    assert [a for a, _ in calls(log, "poptorch.Stage().ipu")] == [(0,), (1,), (2,), (3,), (0,)]
    (stages, _), = calls(log, "poptorch.PipelinedExecution")
    assert len(stages) == 5
    assert len(calls(log, f"{OPTS}.setExecutionStrategy")) == 1
    assert calls(log, f"{OPTS}.setAvailableMemoryProportion") == [
        (({"IPU0": 0.6, "IPU1": 0.6, "IPU2": 0.6, "IPU3": 0.6},), {})]
    assert calls(log, f"{OPTS}.enableExecutableCaching") == [(("/cache",), {})]
    assert calls(log, f"{OPTS}.Precision.enableStochasticRounding") == [((True,), {})]
    import torch
    assert calls(log, f"{OPTS}.Precision.setPartialsType") == [((torch.float16,), {})]
    assert calls(log, "poptorch.TensorLocationSettings().useOnChipStorage") == [((False,), {})]
    assert calls(log, "poptorch.TensorLocationSettings().useOnChipStorage().useReplicatedTensorSharding") == [
        ((True,), {})]
    assert calls(log, f"{OPTS}.updatableNamedBuffers") == [
        ((["bert.encoder.layer.0.attention.self.query.block_rows"],), {})]
    assert calls(log, f"{OPTS}.useOfflineIpuTarget") == []


def test_options_single_ipu_inference_and_popdist():
    log = []
    build_options(load_config("bert_mini_sparse", ["ipu.offline_target=true"]), Recorder(log, "poptorch"), ["b"],
                  for_training=False)
    assert calls(log, f"{OPTS}.setExecutionStrategy") == []  # one IPU: no pipeline
    assert calls(log, f"{OPTS}.Training.gradientAccumulation") == []
    assert calls(log, f"{OPTS}.updatableNamedBuffers") == []
    assert calls(log, f"{OPTS}.useOfflineIpuTarget") == [((2,), {})]
    log = []
    popdist = Recorder(log, "popdist", returns={"popdist.isPopdistEnvSet": True})
    build_options(base_pod("ipu.instances=2"), Recorder(log, "poptorch"), [], popdist=popdist)
    assert calls(log, "popdist.poptorch.Options") == [((), {"ipus_per_replica": 4})]
    assert calls(log, f"{OPTS}.replicationFactor") == []  # popdist sets this instance's replicas
    assert calls(log, "popdist.poptorch.Options().Training.gradientAccumulation") == [((16,), {})]


def test_poprun_command():
    cmd = poprun_command(base_pod("ipu.replication_factor=16", "ipu.instances=4", "ipu.hosts=[h1, h2]",
                                  "ipu.vipu_server_host=h1", "ipu.vipu_partition=pod64", "ipu.tcp_if_include=10.5.0.0/16",
                                  "training.batch_size=2048"), "bert_base_sparse_pod64")
    line = shlex.join(cmd)
    for flag in ("--num-instances=4", "--num-replicas=16", "--ipus-per-replica=4", "--host=h1,h2",
                 "--vipu-server-host=h1", "--vipu-partition=pod64", "--num-ilds=1",
                 "--mca btl_tcp_if_include 10.5.0.0/16", "-x POPLAR_ENGINE_OPTIONS"):
        assert flag in line
    assert cmd[-4:] == ["python", "run_pretraining.py", "--config", "bert_base_sparse_pod64"]
    single = shlex.join(poprun_command(base_pod(), "x"))
    assert "--host" not in single and "--mpi-global-args" not in single


def test_missing_sdk_is_one_line(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_poptorch(name, *args, **kwargs):
        if name == "poptorch":
            raise ImportError("No module named 'poptorch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_poptorch)
    with pytest.raises(IpuUnavailable, match="Poplar SDK") as info:
        import_poptorch()
    assert "\n" not in str(info.value) and "poptorch-*.whl" in str(info.value)


def test_describe_shows_the_ipu_plan(capsys):
    import json

    from ipu_app.commands.train import main

    assert main(["--config", "bert_medium_sparse_pod16", "--describe", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["gradient_accumulation"] == 4 and info["world_size"] == 8
    assert info["ipu"]["total_ipus"] == 16
    assert info["ipu"]["stages"][0] == {"ipu": 0, "blocks": ["Embedding", "Encoder0", "Encoder1", "Encoder2"]}
    assert main(["--config", "bert_medium_sparse_pod16", "--describe"]) == 0
    text = capsys.readouterr().out
    assert "16 micro x 4 accumulation x 8 replicas" in text and "IPU1: Encoder3..Encoder7" in text
