"""``poptorch.Options`` and pipeline placement from a run config (host side, no SDK needed to test).

Placement: the embeddings run on IPU 0, encoder layer ``i`` on the IPU that ``layers_per_ipu``
gives it, and the pooler and the MLM/NSP heads back on IPU 0 (the MLM decoder is tied to the word
embedding). Consecutive blocks on the same IPU form one pipeline stage, so a replica over ``k > 1``
IPUs has ``k + 1`` stages (IPU 0 holds the first and the last); PopTorch needs at least as many
gradient-accumulation micro-batches as stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, RunConfig
from ..choices import MODEL_SIZES


def expand_layers_per_ipu(layers_per_ipu: list[int], num_layers: int) -> list[int]:
    """Encoder layers per IPU with ``-1`` wildcards resolved: the layers not given explicitly are
    shared evenly among the wildcard IPUs (earlier ones take one more when it does not divide)."""
    if not layers_per_ipu:
        raise ConfigError("ipu.layers_per_ipu must list at least one IPU")
    if any(n < -1 for n in layers_per_ipu):
        raise ConfigError(f"ipu.layers_per_ipu entries must be >= 0 or -1 (wildcard), got {layers_per_ipu}")
    fixed = sum(n for n in layers_per_ipu if n >= 0)
    wild = [i for i, n in enumerate(layers_per_ipu) if n == -1]
    rest = num_layers - fixed
    if rest < 0 or (rest > 0 and not wild) or (not wild and fixed != num_layers):
        raise ConfigError(f"ipu.layers_per_ipu={layers_per_ipu} places {fixed} encoder layers; the model has "
                          f"{num_layers} (use -1 for 'the rest')")
    counts = list(layers_per_ipu)
    for j, i in enumerate(wild):
        counts[i] = rest // len(wild) + (1 if j < rest % len(wild) else 0)
    return counts


def layer_ipus(layers_per_ipu: list[int], num_layers: int) -> list[int]:
    """The IPU of each encoder layer."""
    return [ipu for ipu, n in enumerate(expand_layers_per_ipu(layers_per_ipu, num_layers)) for _ in range(n)]


@dataclass(frozen=True)
class Placement:
    """Pipeline blocks in execution order, each ``(block id, ipu)``, and the stages they form."""

    blocks: list[tuple[str, int]]

    @classmethod
    def for_bert(cls, layer_to_ipu: list[int], nsp: bool = True) -> "Placement":
        blocks = [("Embedding", 0)] + [(f"Encoder{i}", ipu) for i, ipu in enumerate(layer_to_ipu)]
        if nsp:
            blocks.append(("Pooler", 0))
        blocks.append(("Heads", 0))
        return cls(blocks)

    @property
    def stages(self) -> list[tuple[list[str], int]]:
        """Consecutive blocks on one IPU merged: ``[(block ids, ipu), ...]``."""
        stages: list[tuple[list[str], int]] = []
        for block, ipu in self.blocks:
            if stages and stages[-1][1] == ipu:
                stages[-1][0].append(block)
            else:
                stages.append(([block], ipu))
        return stages

    @property
    def num_ipus(self) -> int:
        return max(ipu for _, ipu in self.blocks) + 1

    def ipu_of(self, block: str) -> int:
        return dict(self.blocks)[block]


@dataclass(frozen=True)
class IpuPlan:
    """Everything derived from a config for an IPU run."""

    placement: Placement
    ipus_per_replica: int
    replication_factor: int
    gradient_accumulation: int
    device_iterations: int
    micro_batch_size: int
    matmul_proportion: list[float]

    @property
    def total_ipus(self) -> int:
        return self.ipus_per_replica * self.replication_factor

    @property
    def samples_per_call(self) -> int:
        """Sequences one executor call consumes: micro x accumulation x replicas x device iterations."""
        return self.micro_batch_size * self.gradient_accumulation * self.replication_factor * self.device_iterations


def plan(config: RunConfig) -> IpuPlan:
    """Validate the ``ipu`` section against the model and batch and derive the run's layout."""
    ipu = config.ipu
    num_layers = MODEL_SIZES[config.model.size][0]
    placement = Placement.for_bert(layer_ipus(ipu.layers_per_ipu, num_layers), nsp=config.model.nsp)
    ipus = len(ipu.layers_per_ipu)
    if placement.num_ipus != ipus:  # trailing IPUs with no layer would sit idle
        raise ConfigError(f"ipu.layers_per_ipu={ipu.layers_per_ipu} leaves IPU {ipus - 1} without encoder layers; "
                          "drop it or give it layers")
    if ipu.replication_factor < 1 or ipu.device_iterations < 1:
        raise ConfigError("ipu.replication_factor and ipu.device_iterations must be >= 1")
    if ipu.instances < 1 or ipu.replication_factor % ipu.instances:
        raise ConfigError(f"ipu.replication_factor={ipu.replication_factor} must be a multiple of "
                          f"ipu.instances={ipu.instances} (each poprun instance drives whole replicas)")
    if ipu.hosts and ipu.instances % len(ipu.hosts):
        raise ConfigError(f"ipu.instances={ipu.instances} must be a multiple of the {len(ipu.hosts)} ipu.hosts")
    accumulation = config.accumulation_steps(ipu.replication_factor)
    stages = len(placement.stages)
    if ipus > 1 and accumulation < stages:
        raise ConfigError(
            f"pipelining over {ipus} IPUs has {stages} stages but gradient accumulation is {accumulation} "
            f"(batch {config.training.batch_size} = micro {config.micro_batch_size} x accumulation x "
            f"{ipu.replication_factor} replicas); raise training.batch_size or lower training.micro_batch_size "
            f"so accumulation >= {stages}")
    proportions = list(ipu.matmul_proportion)
    if len(proportions) == 1:
        proportions = proportions * ipus
    if len(proportions) != ipus or not all(0.0 < p <= 1.0 for p in proportions):
        raise ConfigError(f"ipu.matmul_proportion={ipu.matmul_proportion} needs one value in (0, 1] or one per "
                          f"IPU ({ipus})")
    return IpuPlan(placement, ipus, ipu.replication_factor, accumulation, ipu.device_iterations,
                   config.micro_batch_size, proportions)


def build_options(config: RunConfig, poptorch, updatable_buffers: list[str], *, for_training: bool = True,
                  popdist=None):
    """``poptorch.Options`` for this run (``poptorch`` is the module, or a stand-in in tests).

    Under ``poprun`` pass the ``popdist`` module: its ``popdist.poptorch.Options`` sets this
    instance's share of the replicas."""
    import torch

    p = plan(config)
    ipu = config.ipu
    if popdist is not None and popdist.isPopdistEnvSet():
        opts = popdist.poptorch.Options(ipus_per_replica=p.ipus_per_replica)
    else:
        opts = poptorch.Options()
        opts.replicationFactor(p.replication_factor)
    opts.deviceIterations(p.device_iterations)
    opts.randomSeed(config.seed)
    if for_training:
        opts.Training.gradientAccumulation(p.gradient_accumulation)
        opts.Training.accumulationAndReplicationReductionType(poptorch.ReductionType.Mean)
    opts.outputMode(poptorch.OutputMode.Sum if for_training else poptorch.OutputMode.All)
    if p.ipus_per_replica > 1:
        stages = [poptorch.Stage(*ids).ipu(ipu_id) for ids, ipu_id in p.placement.stages]
        opts.setExecutionStrategy(poptorch.PipelinedExecution(*stages))
    opts.setAvailableMemoryProportion({f"IPU{i}": v for i, v in enumerate(p.matmul_proportion)})
    if ipu.executable_cache_dir:
        opts.enableExecutableCaching(ipu.executable_cache_dir)
    if ipu.stochastic_rounding:
        opts.Precision.enableStochasticRounding(True)
    if ipu.enable_half_partials:
        opts.Precision.setPartialsType(torch.float16)
    if for_training and config.training.precision == "fp16" and config.optimizer.loss_scale == "dynamic":
        opts.Training.setAutomaticLossScaling(True)
    if ipu.optimizer_state_offchip or ipu.replicated_tensor_sharding:
        location = poptorch.TensorLocationSettings().useOnChipStorage(not ipu.optimizer_state_offchip)
        if ipu.replicated_tensor_sharding:
            location = location.useReplicatedTensorSharding(True)
        opts.TensorLocations.setOptimizerLocation(location)
    if for_training and updatable_buffers:
        opts.updatableNamedBuffers(list(updatable_buffers))  # SDK >= 3.3: pattern upload without recompiling
    if ipu.offline_target:
        opts.useOfflineIpuTarget(2)  # compile only (no IPU attached)
    return opts


def poprun_command(config: RunConfig, config_arg: str) -> list[str]:
    """The ``poprun`` argv that starts ``config`` as ``ipu.instances`` host processes driving
    ``ipu.replication_factor`` replicas of ``ipus_per_replica`` IPUs (``config_arg``: how
    ``run_pretraining.py --config`` names it on every host; paths must be the same on all hosts)."""
    p = plan(config)
    ipu = config.ipu
    cmd = ["poprun", "-vv", f"--num-instances={ipu.instances}", f"--num-replicas={p.replication_factor}",
           f"--ipus-per-replica={p.ipus_per_replica}", f"--num-ilds={ipu.num_ilds}", "--numa-aware=yes"]
    if ipu.hosts:
        cmd.append(f"--host={','.join(ipu.hosts)}")
    if ipu.vipu_server_host:
        cmd.append(f"--vipu-server-host={ipu.vipu_server_host}")
    if ipu.vipu_partition:
        cmd += [f"--vipu-partition={ipu.vipu_partition}", "--update-partition=yes", "--reset-partition=no"]
    cmd += ["--print-topology=yes", "--vipu-server-timeout=3600"]
    if len(ipu.hosts) > 1:
        nic = ipu.tcp_if_include
        cmd.append(f"--mpi-global-args=--tag-output --allow-run-as-root --mca oob_tcp_if_include {nic} "
                   f"--mca btl_tcp_if_include {nic}")
    cmd.append("--mpi-local-args=-x OPAL_PREFIX -x LD_LIBRARY_PATH -x PATH -x PYTHONPATH -x CPATH "
               "-x IPUOF_VIPU_API_TIMEOUT=3600 -x POPLAR_LOG_LEVEL=WARN -x POPLAR_SDK_ENABLED -x POPLAR_ENGINE_OPTIONS")
    cmd += ["python", "run_pretraining.py", "--config", config_arg]
    return cmd
