"""The run configuration's schema: one dataclass per section (model, sparsity, training, optimizer,
data, ipu), ``RunConfig`` with the values derived from them, and ``FinetuneSettings``. Loading a YAML
file is ``config.loading``; the checks of ``RunConfig.validate`` are ``config.checks``."""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

import yaml

from ..choices import FINETUNE_PATTERNS, FINETUNE_SAVES, FINETUNE_TASK_TYPES, SPARSE_MODULES


class ConfigError(ValueError):
    """A config that cannot be loaded or would not train; the message is one actionable line."""


# ------------------------------------------------------------------------------------- schema
@dataclass
class ModelSection:
    size: str = "mini"
    dropout: float | None = None  # null: 0.1 above BERT-Small, 0 otherwise (the paper)
    nsp: bool = True
    max_position_embeddings: int = 512
    # the encoder's attention: sdpa (PyTorch's fused kernel) | eager (two matrix products and a softmax) |
    # auto (on a CPU the faster of the two, measured at the run's shape as the sparse kernels are; sdpa
    # elsewhere and with IPU_APP_AUTOTUNE=0)
    attention: str = "auto"


@dataclass
class SparsitySection:
    mode: str = "dense"  # dense | static | dynamic
    ratio: float = 0.9
    block_size: int = 1
    pruning_ratio: float = 0.5
    pruning_schedule: str = "cosine"
    # The paper's n: training is cut into n segments, the pattern changes at the n - 1 boundaries
    # (formerly num_updates, still read: RENAMED_KEYS).
    segments: int = 160
    # Steps between pattern updates; set, it replaces T / segments (updates at every multiple below T).
    update_every: int | None = None
    # Segments shorter than this warn at start-up: regrown blocks start at zero and are pruned again
    # before they grow (see docs/training.md, "How long a segment must be"). --steps keeps segments this long.
    min_segment_steps: int = 1000
    regrowth: str = "random"
    block_metric: str = "l1"
    init: str = "trunc_normal"
    modules: list[str] = field(default_factory=lambda: list(SPARSE_MODULES))
    inactive: str = "zero"  # zero | frozen (untrained non-zero values)
    group_lasso: float = 0.0  # Eq. 2 coefficient on the sparse values (0 = off)
    # Fig. 1b (dense mode only): a random fraction `ratio` of each weight in `modules` is untrained
    # in the first half (early: unfreeze at T/2) or the second half (late: freeze at T/2).
    freeze: str = "none"  # none | early | late
    # With training.init_from, the sparse layers' pattern: auto (the source's where its block size and
    # ratio are this run's, else magnitude) | keep | magnitude (the source weight's largest blocks) | random
    init_pattern: str = "auto"


@dataclass
class TrainingSection:
    steps: int = 757_000
    batch_size: int = 512  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # sequences per forward pass; null = batch_size
    learning_rate: float | str = "auto"
    warmup_steps: int = 10_000
    precision: str = "auto"  # auto: bf16 where the device supports it, else fp32
    log_every: int = 10
    validate_every: int = 10_000
    checkpoint_every: int = 10_000
    keep_checkpoints: int = 2
    # Optimizer steps in a row with non-finite gradients (all skipped) after which the run stops as
    # diverged, with a non-zero exit (fp16 loss scaling skips a few steps now and then; 0 = never stop).
    max_skipped_steps: int = 100
    dist_timeout_s: int = 600  # torchrun: a collective waiting longer on a dead rank fails the job
    # CPU threads of this process (torch's ops and the CPU kernels); null = OMP_NUM_THREADS when set,
    # else the cores this process may run on. On a shared machine, fewer threads than cores is faster.
    threads: int | None = None
    # torch.compile the model (inductor; the sparse kernels stay opaque custom ops, and a pattern
    # update causes no recompilation). Off by default: on a CPU the compiled step measured slower
    # than eager (docs/kernels.md, Benchmarks); on a GPU it is still to be measured.
    compile: bool = False
    # fp32 matrix products in TF32 on Ampere and newer GPUs (dense linears, attention, the Triton kernels).
    tf32: bool = True
    # Start from these weights instead of a random initialisation (--init-from): a run directory, a
    # checkpoint directory or a Hugging Face BERT folder; the optimizer and schedule start anew.
    init_from: str | None = None


@dataclass
class OptimizerSection:
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # gradient clipping threshold (0 = off)
    # Decoupled weight decay of the sparse encoder values alone (null: weight_decay); Fig. 6 sweeps it.
    sparse_weight_decay: float | None = None
    # Adam's bias correction for the sparse values of a dynamic run: per_slot (each slot counts its own
    # steps from its regrowth, so a regrown weight gets Adam's bias correction afresh; measured ahead of
    # global beyond noise, docs/experiments.md "Result") | global (the paper's: one step count, so
    # regrown weights restart with zero moments but no bias correction; the only one poptorch's
    # optimizer has) | auto (the default: per_slot on the host optimizer, global on an IPU; see
    # RunConfig.bias_correction). Dense and static runs have no regrown slots: all are plain AdamW there.
    bias_correction: str = "auto"
    loss_scale: float | str = "dynamic"  # fp16 only: a number or dynamic


@dataclass
class DataSection:
    dir: str | None = None  # prepared data (python -m ipu_app prepare-data); null = the embedded corpus
    # for the embedded corpus: bert-base-uncased | train | a Hugging Face WordPiece tokenizer folder (with
    # data.dir: the prepared data's, taken from its manifest)
    tokenizer: str = "bert-base-uncased"
    vocab_size: int = 30522
    seq_len: int = 128
    mask_prob: float = 0.15
    max_predictions: int = 20
    validation_sequences: int | None = None  # null = the whole validation split; N = a fixed random N of it
    # Batches built ahead by a background thread (pinned memory on a GPU) so the device never waits
    # for the host; null = 2 on a GPU, 0 (built in the loop) on a CPU, where the thread would only
    # take cores from the step.
    prefetch_batches: int | None = None
    # Processes building the training batches (a torch DataLoader: each builds whole batches,
    # prefetch_batches ahead (null: 2), pinned memory on a GPU); 0 = in the training process. The
    # batches are the same for any number; resume stays exact.
    num_workers: int = 0
    # The masked tokens as fixed-size [batch, max_predictions] positions (padding ignored) instead of
    # the exact rows found with nonzero: static shapes and no host sync; null = on a GPU or with
    # training.compile, off on an eager CPU run (the same loss either way, up to rounding).
    fixed_size_masks: bool | None = None


@dataclass
class IpuSection:
    """Graphcore IPU execution (``backend: ipu``); see ``ipu_app/ipu``."""

    replication_factor: int = 1  # replicas over all poprun instances
    device_iterations: int = 1
    layers_per_ipu: list[int] = field(default_factory=lambda: [-1])  # encoder layers per IPU; -1: the rest, evenly
    matmul_proportion: list[float] = field(default_factory=lambda: [0.6])  # available memory proportion per IPU
    recompute_checkpoint_every_layer: bool = True
    enable_half_partials: bool = False
    stochastic_rounding: bool = True
    optimizer_state_offchip: bool = False
    replicated_tensor_sharding: bool = False
    executable_cache_dir: str | None = None
    offline_target: bool = False  # compile only, no IPU attached
    # masked (values scattered into a dense weight) | popsparse (dynamic custom op) | popsparse_static
    sparse_op: str = "masked"
    sparse_available_memory: float = 0.9  # popsparse availableMemoryProportion
    meta_info_bucket_oversize: float = 0.2  # popsparse metaInfoBucketOversizeProportion
    instances: int = 1  # poprun host processes
    hosts: list[str] = field(default_factory=list)
    num_ilds: int = 1  # IPU-Link domains (IPU-POD64 = 1)
    vipu_server_host: str | None = None
    vipu_partition: str | None = None
    tcp_if_include: str = "eth0"  # network interface (or CIDR) for MPI between hosts


@dataclass
class FinetuneSettings:
    """``python -m ipu_app finetune``'s settings (its options by the same names; finetune/tuner.py)."""

    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_seq_len: int = 128
    pattern: str = "fixed"  # fixed | dynamic
    segments: int = 4  # dynamic: pattern updates at the segments - 1 inner boundaries
    pruning_ratio: float | None = None  # dynamic: None = the run's sparsity.pruning_ratio
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # steps between checkpoints; 0: at each epoch's end only (and at a stop)
    save: str = "last"  # last: the last epoch's model; best: the epoch best by `metric` on the (first) dev file
    metric: str | None = None  # None: accuracy (classification), pearson (regression)
    task_type: str = "auto"  # auto | classification | regression

    def validate(self) -> "FinetuneSettings":
        for name in ("epochs", "batch_size", "max_seq_len", "segments", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0 (0: at each epoch's end), got {self.checkpoint_every}")
        if self.save not in FINETUNE_SAVES:
            raise ConfigError(f"--save {self.save!r}: use one of {list(FINETUNE_SAVES)}")
        if self.task_type not in FINETUNE_TASK_TYPES:
            raise ConfigError(f"--task-type {self.task_type!r}: use one of {list(FINETUNE_TASK_TYPES)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.pattern not in FINETUNE_PATTERNS:
            raise ConfigError(f"--pattern {self.pattern!r}: use one of {list(FINETUNE_PATTERNS)}")
        if self.max_seq_len > 512:
            raise ConfigError(f"--max-seq-len {self.max_seq_len} is above BERT's 512 positions")
        return self


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    sparsity: SparsitySection = field(default_factory=SparsitySection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    data: DataSection = field(default_factory=DataSection)
    ipu: IpuSection = field(default_factory=IpuSection)
    backend: str = "reference"
    seed: int = 0
    name: str = ""  # the config's name (set when loaded)
    # Set by load_config, not saved: what --steps rescaled, {dotted key: (old, new)}.
    adjusted: typing.ClassVar[dict] = {}

    # ------------------------------------------------------------- derived values
    @property
    def micro_batch_size(self) -> int:
        return self.training.micro_batch_size or self.training.batch_size

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each process: batch = micro x accumulation x world."""
        per_process, rest = divmod(self.training.batch_size, self.micro_batch_size * world_size)
        if rest or per_process < 1:
            raise ConfigError(
                f"training.batch_size={self.training.batch_size} is not a multiple of "
                f"training.micro_batch_size={self.micro_batch_size} x world size {world_size}"
            )
        return per_process

    @property
    def effective_sparsity(self) -> float:
        return 0.0 if self.sparsity.mode == "dense" else self.sparsity.ratio

    @property
    def bias_correction(self) -> str:
        """``optimizer.bias_correction`` resolved: ``auto`` is per_slot on the host optimizer (CPU, GPU)
        and global (the paper's, the only one poptorch's Adam has) on an IPU."""
        setting = self.optimizer.bias_correction
        if setting != "auto":
            return setting
        return "global" if self.backend == "ipu" else "per_slot"

    def bias_correction_line(self) -> str | None:
        """The start-up and --describe line naming the bias correction (dynamic runs only)."""
        if self.sparsity.mode != "dynamic":
            return None
        how = {"per_slot": "per slot (each regrown weight's own step count)",
               "global": "global (one step count, the paper's)"}[self.bias_correction]
        return f"Adam bias correction: {how}" + (" (auto)" if self.optimizer.bias_correction == "auto" else "")

    # -------------------------------------------------------------------- checks
    def validate(self) -> "RunConfig":
        """Every section's values and their combinations checked (``config.checks``); the first
        problem raises ``ConfigError`` with one line."""
        from .checks import validate_run

        validate_run(self)
        return self

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        return asdict(self)

    def to_saved_dict(self) -> dict:
        """What ``config.yaml`` and ``--describe`` show: the ``ipu`` section only where ``backend: ipu``
        (loading fills it with the defaults again, so the config round-trips)."""
        saved = self.to_dict()
        if self.backend != "ipu":
            del saved["ipu"]
        return saved

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_saved_dict(), sort_keys=False)


SECTION_CLASSES = {f.name: f.default_factory for f in fields(RunConfig) if f.default_factory is not MISSING}

