"""Run configuration: YAML files in the paper's vocabulary, ``base:`` inheritance, typed overrides.

A config is a YAML mapping with the sections of ``RunConfig``. ``base:`` (a name or a list)
names configs it extends; later bases and the file itself win, mappings merge key by key.
Names resolve against the directory of the file that uses them, then ``configs/``.
Every key is checked against the schema: an unknown key fails naming the closest valid one,
a value of the wrong type fails naming the expected type, and ``validate`` rejects
impossible combinations (ratio >= 1, a block size that does not divide the hidden size,
more pattern updates than steps, ...). All of these raise ``ConfigError`` with one line.
"""

from __future__ import annotations

import copy
import difflib
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .choices import (ATTENTION_IMPLEMENTATIONS, BACKEND_NAMES, BIAS_CORRECTIONS, BLOCK_METRICS, FINETUNE_PATTERNS,
                      FINETUNE_SAVES, FINETUNE_TASK_TYPES, FREEZE_MODES, INACTIVE_MODES, INIT_PATTERNS, PRECISIONS,
                      PRUNING_SCHEDULES, REGROWTH_RULES, SPARSITY_MODES, SUPPORTED_BLOCK_SIZES, VALUE_INITS)
from .model.sizes import MODEL_SIZES, SPARSE_MODULES
from .sparse.flops import non_embedding_params

# In the checkout a link to the top-level configs/; in an installed wheel the copy it carries.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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
    def learning_rate(self) -> float:
        """The peak learning rate; ``auto`` is the paper's dense law times the Eq. 3 sparsity factor."""
        lr = self.training.learning_rate
        if lr == "auto":
            return auto_learning_rate(self.model.size, self.effective_sparsity)
        return float(lr)

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

    def model_config(self, vocab_size: int | None = None):
        """The ``ModelConfig`` of this run (the tokenizer's vocabulary size when given)."""
        from .model.bert import ModelConfig

        return ModelConfig(
            size=self.model.size,
            vocab_size=vocab_size or self.data.vocab_size,
            max_position_embeddings=self.model.max_position_embeddings,
            dropout=self.model.dropout,
            nsp=self.model.nsp,
            sparsity_mode=self.sparsity.mode,
            sparsity=self.sparsity.ratio,
            block_size=self.sparsity.block_size,
            init=self.sparsity.init,
            sparse_modules=list(self.sparsity.modules),
            inactive=self.sparsity.inactive,
            backend="reference" if self.backend == "ipu" else self.backend,  # IPU: the masked path in the graph
            seed=self.seed,
        )

    def update_schedule(self):
        """The steps after which the pattern is updated (none unless ``sparsity.mode`` is dynamic)."""
        from .sparse.schedule import UpdateSchedule

        s, steps = self.sparsity, self.training.steps
        if s.mode != "dynamic":
            return UpdateSchedule.never(steps)
        if s.update_every is not None:
            return UpdateSchedule.every(steps, s.update_every)
        return UpdateSchedule.evenly_spaced(steps, s.segments)

    @property
    def dense_gradient_steps(self) -> int:
        """Steps that compute RigL's dense weight gradient (its update steps; 0 without RigL)."""
        s = self.sparsity
        return len(self.update_schedule()) if s.mode == "dynamic" and s.regrowth == "gradient" else 0

    def run_flops(self, active_weights: int) -> dict:
        """``sparse.flops.run_flops`` for this config's model, data and run length."""
        from .sparse.flops import run_flops

        layers, hidden = MODEL_SIZES[self.model.size]
        return run_flops(layers, hidden, self.data.seq_len, active_weights,
                         self.training.steps, self.training.batch_size, self.dense_gradient_steps)

    @property
    def segment_steps(self) -> float | None:
        """Steps between pattern updates (None: no updates)."""
        schedule = self.update_schedule()
        return schedule.total_steps / (len(schedule) + 1) if len(schedule) else None

    def schedule_warning(self) -> str | None:
        """One line when the update schedule is too dense for regrown blocks to mature, else None."""
        segment = self.segment_steps
        if segment is None or segment >= self.sparsity.min_segment_steps:
            return None
        return (f"pattern updates every {segment:.0f} steps, below sparsity.min_segment_steps="
                f"{self.sparsity.min_segment_steps}: regrown blocks start at zero and are mostly pruned again "
                "before they grow; set sparsity.update_every (or a lower sparsity.segments) or train longer")

    # -------------------------------------------------------------------- checks
    def validate(self) -> "RunConfig":
        m, s, t, o, d = self.model, self.sparsity, self.training, self.optimizer, self.data
        _choice("model.size", m.size, MODEL_SIZES)
        _choice("sparsity.mode", s.mode, SPARSITY_MODES)
        _choice("sparsity.pruning_schedule", s.pruning_schedule, PRUNING_SCHEDULES)
        _choice("sparsity.regrowth", s.regrowth, REGROWTH_RULES)
        _choice("sparsity.init_pattern", s.init_pattern, INIT_PATTERNS)
        _choice("sparsity.block_metric", s.block_metric, BLOCK_METRICS)
        _choice("sparsity.init", s.init, VALUE_INITS)
        _choice("sparsity.inactive", s.inactive, INACTIVE_MODES)
        _choice("training.precision", t.precision, PRECISIONS)
        _choice("model.attention", m.attention, ATTENTION_IMPLEMENTATIONS)
        for module in s.modules:
            _choice("sparsity.modules entry", module, SPARSE_MODULES)
        _choice("backend", self.backend, (*BACKEND_NAMES, "ipu"))
        hidden = MODEL_SIZES[m.size][1]
        _check(m.dropout is None or 0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
        _check(m.max_position_embeddings >= d.seq_len,
               f"model.max_position_embeddings={m.max_position_embeddings} is below data.seq_len={d.seq_len}")
        _check(0.0 <= s.ratio < 1.0, f"sparsity.ratio must be in [0, 1), got {s.ratio}")
        _check(s.block_size in SUPPORTED_BLOCK_SIZES,
               f"sparsity.block_size={s.block_size} is not supported; use one of {list(SUPPORTED_BLOCK_SIZES)}")
        _check(hidden % s.block_size == 0,
               f"sparsity.block_size={s.block_size} does not divide the hidden size {hidden} of BERT-{m.size}")
        _check(0.0 <= s.pruning_ratio <= 1.0, f"sparsity.pruning_ratio must be in [0, 1], got {s.pruning_ratio}")
        _check(s.group_lasso >= 0.0, f"sparsity.group_lasso must be >= 0, got {s.group_lasso}")
        _choice("sparsity.freeze", s.freeze, FREEZE_MODES)
        _check(s.freeze == "none" or s.mode == "dense",
               f"sparsity.freeze={s.freeze} needs sparsity.mode=dense (a random fraction sparsity.ratio of each "
               "dense weight is untrained for half the run)")
        _check(s.freeze == "none" or s.ratio > 0, "sparsity.freeze needs sparsity.ratio > 0 (the untrained fraction)")
        _check(t.steps >= 1, f"training.steps must be >= 1, got {t.steps}")
        if s.mode == "dynamic":
            _check(s.segments >= 1, f"sparsity.segments must be >= 1, got {s.segments}")
            _check(s.segments <= t.steps or s.update_every is not None,
                   f"sparsity.segments={s.segments} is more than training.steps={t.steps}; "
                   "use at most one update per step")
        if s.mode == "dynamic" and s.update_every is not None:
            _check(1 <= s.update_every < t.steps,
                   f"sparsity.update_every={s.update_every} must be in [1, training.steps={t.steps}) "
                   "(or null: training.steps / sparsity.segments)")
        _check(s.min_segment_steps >= 1, f"sparsity.min_segment_steps must be >= 1, got {s.min_segment_steps}")
        _check(t.batch_size >= 1, f"training.batch_size must be >= 1, got {t.batch_size}")
        _check(t.micro_batch_size is None or t.micro_batch_size >= 1,
               f"training.micro_batch_size must be >= 1, got {t.micro_batch_size}")
        self.accumulation_steps(1)
        _check(t.warmup_steps >= 0, f"training.warmup_steps must be >= 0, got {t.warmup_steps}")
        _check(t.warmup_steps < t.steps or t.steps == 1,
               f"training.warmup_steps={t.warmup_steps} is not below training.steps={t.steps}; lower the "
               "warmup or shorten the run with --steps (which scales the warmup with it)")
        if isinstance(t.learning_rate, str):
            _check(t.learning_rate == "auto",
                   f"training.learning_rate must be a number or 'auto', got {t.learning_rate!r}")
        else:
            _check(t.learning_rate > 0, f"training.learning_rate must be > 0, got {t.learning_rate}")
        for key in ("log_every", "validate_every", "checkpoint_every"):
            _check(getattr(t, key) >= 1, f"training.{key} must be >= 1, got {getattr(t, key)}")
        _check(t.threads is None or t.threads >= 1, f"training.threads must be >= 1 or null, got {t.threads}")
        _check(not (t.compile and self.backend == "ipu"),
               "training.compile is for the PyTorch path; backend: ipu compiles its own graph (poptorch)")
        _check(isinstance(d.num_workers, int) and d.num_workers >= 0,
               f"data.num_workers must be an integer >= 0, got {d.num_workers!r}")
        _check(d.prefetch_batches is None or d.prefetch_batches >= 0,
               f"data.prefetch_batches must be >= 0 or null, got {d.prefetch_batches}")
        _check(t.dist_timeout_s >= 1, f"training.dist_timeout_s must be >= 1, got {t.dist_timeout_s}")
        _check(t.max_skipped_steps >= 0, f"training.max_skipped_steps must be >= 0, got {t.max_skipped_steps}")
        _check(t.keep_checkpoints >= 1, f"training.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
        _check(0.0 <= o.beta1 < 1.0 and 0.0 <= o.beta2 < 1.0, "optimizer.beta1 and beta2 must be in [0, 1)")
        _check(o.eps > 0, f"optimizer.eps must be > 0, got {o.eps}")
        _check(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
        _check(o.sparse_weight_decay is None or o.sparse_weight_decay >= 0,
               f"optimizer.sparse_weight_decay must be >= 0 or null, got {o.sparse_weight_decay}")
        _choice("optimizer.bias_correction", o.bias_correction, BIAS_CORRECTIONS)
        _check(o.bias_correction != "per_slot" or self.backend != "ipu" or s.mode != "dynamic",
               "optimizer.bias_correction=per_slot runs on the host optimizer only; with backend: ipu set "
               "optimizer.bias_correction=global (the paper's) or auto")
        _check(o.max_grad_norm >= 0, f"optimizer.max_grad_norm must be >= 0, got {o.max_grad_norm}")
        if isinstance(o.loss_scale, str):
            _check(o.loss_scale == "dynamic", f"optimizer.loss_scale must be a number or 'dynamic', got {o.loss_scale!r}")
        else:
            _check(o.loss_scale > 0, f"optimizer.loss_scale must be > 0, got {o.loss_scale}")
        _check(d.seq_len >= 8, f"data.seq_len={d.seq_len} is too short; use at least 8")
        _check(0.0 < d.mask_prob < 1.0, f"data.mask_prob must be in (0, 1), got {d.mask_prob}")
        _check(d.max_predictions >= 1, f"data.max_predictions must be >= 1, got {d.max_predictions}")
        _check(d.vocab_size >= 8, f"data.vocab_size must be >= 8, got {d.vocab_size}")
        _check(d.validation_sequences is None or d.validation_sequences >= 1,
               f"data.validation_sequences must be >= 1 or null, got {d.validation_sequences}")
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
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


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; use one of {list(allowed)}")


# ------------------------------------------------------------------------ learning-rate law
def auto_learning_rate(size: str, sparsity: float) -> float:
    """Paper §2.3: dense law ``exp(-0.44 ln N - 0.47)`` (N = non-embedding parameters of the
    dense model) times Eq. 3's factor ``exp(1.969 s^2 + 0.2905 s)``."""
    layers, hidden = MODEL_SIZES[size]
    dense = math.exp(-0.44 * math.log(non_embedding_params(layers, hidden)) - 0.47)
    return dense * math.exp(1.969 * sparsity**2 + 0.2905 * sparsity)


# ---------------------------------------------------------------------------- loading
def config_names(directory: Path = CONFIG_DIR) -> list[str]:
    """The shipped configs (``configs/*.yaml``), by name."""
    return sorted(p.stem for p in directory.glob("*.yaml"))


# Keys renamed since configs were first written -> their names now. The old name is still read wherever a
# config comes from (config files, --set, sweep specs, saved run configs, checkpoints) and means the new one.
RENAMED_KEYS = {"sparsity.num_updates": "sparsity.segments"}


def canonical_key(dotted: str) -> str:
    """A dotted key under its current name (``sparsity.num_updates`` -> ``sparsity.segments``)."""
    return RENAMED_KEYS.get(dotted, dotted)


def rename_old_keys(raw: Any, where: str = "config") -> Any:
    """``raw`` with renamed keys under their current names (a new mapping where one was renamed); giving
    both the old and the new name is a ConfigError naming ``where``."""
    if not isinstance(raw, dict):
        return raw
    for old, new in RENAMED_KEYS.items():
        section, old_leaf = old.rsplit(".", 1)
        new_leaf = new.rsplit(".", 1)[1]
        node = raw.get(section)
        if isinstance(node, dict) and old_leaf in node:
            if new_leaf in node:
                raise ConfigError(f"{where}: {old} is the old name of {new}; give only {new}")
            raw = {**raw, section: {(new_leaf if k == old_leaf else k): v for k, v in node.items()}}
    return raw


def resolve_config_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A config name (``bert_mini_sparse``) or a path to a YAML file -> an existing path."""
    text = str(name_or_path)
    candidates = [Path(text)]
    if not text.endswith((".yaml", ".yml")):
        candidates.append(Path(text + ".yaml"))
    for directory in ([relative_to] if relative_to else []) + [CONFIG_DIR]:
        candidates += [directory / c for c in list(candidates) if not c.is_absolute()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    close = difflib.get_close_matches(Path(text).stem, config_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; shipped configs are in {CONFIG_DIR}"
    raise ConfigError(f"config {text!r} not found{hint}")


def parse_yaml(text: str, path: Path | str) -> Any:
    """``yaml.safe_load(text)``; a one-line ConfigError naming ``path`` and the line otherwise (the one
    way configs, saved configs and sweep specs report broken YAML)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def read_yaml(path: Path) -> dict:
    """A YAML file holding a mapping (empty -> {}); one-line ConfigError otherwise."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    data = parse_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not a {type(data).__name__}")
    return data


def differing_key(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """``(dotted key, a's value, b's value)`` at the first place (sorted keys) where two nested
    config dicts differ; None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return differing_key(a.get(key), b.get(key), f"{prefix}{key}.")
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The merged mapping of ``path`` and its ``base:`` chain (not yet typed)."""
    path = path.resolve()
    if path in _chain:
        raise ConfigError(f"config inheritance loop: {' -> '.join(p.stem for p in _chain + (path,))}")
    data = rename_old_keys(read_yaml(path), str(path))
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base must be a config name or a list of names")
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, load_raw(resolve_config_path(base, path.parent), _chain + (path,)))
    return _merge(merged, data)


def load_config(name_or_path: str | Path, overrides: list[str] = (), *, steps: int | None = None,
                seed: int | None = None, world_size: int = 1) -> RunConfig:
    """Load, override (``section.key=value``), type-check and validate a config.

    ``steps`` (the ``--steps`` shortcut) shortens or lengthens the run; unless
    ``training.warmup_steps`` is overridden too, the warmup keeps its fraction of the run
    (the paper's 10k of 757k steps), so a short run still reaches its peak learning rate. Unless
    ``sparsity.segments`` or ``sparsity.update_every`` is set too, the number of segments is
    lowered so that each lasts at least ``sparsity.min_segment_steps`` (see ``short_run_segments``).
    ``log_every``, ``validate_every`` and ``checkpoint_every`` are lowered (never raised) so that the
    run has at least ``SHORT_RUN_EVENTS`` of each. Explicit ``--set`` values always win; what changed
    is kept in ``config.adjusted`` (``--describe`` prints it).
    """
    path = resolve_config_path(name_or_path)
    raw = load_raw(path)
    overridden = set()
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key, value)
        overridden.add(key)
    adjusted = _rescale_to_steps(raw, steps, overridden) if steps is not None else {}
    adjusted.update(_fit_micro_batch(raw, overridden, world_size))
    if seed is not None:
        _set_path(raw, "seed", seed)
    config = from_dict(raw)
    config.name = config.name or path.stem
    config.adjusted = adjusted
    return config.validate()


# --steps N keeps at least this warmup where the recipe has one (a tenth of a shorter run, at least 2):
# rounded to 0, a fresh Adam starts at the peak learning rate (a phase II of a few dozen steps
# diverged so: MLM loss 7.89 -> 9.32 in two steps); at 1, lr_factor's first step is the peak as well.
MIN_SHORT_RUN_WARMUP = 10


def short_run_warmup(warmup: int, steps: int, new_steps: int) -> int:
    """The warmup of a run rescaled from ``steps`` to ``new_steps``: its fraction of the run, but where
    there is one, at least ``min(10, max(2, new_steps // 10))`` steps (and fewer than the run's)."""
    scaled = int(round(warmup * new_steps / steps))
    if warmup <= 0 or new_steps <= 2:
        return min(scaled, max(0, new_steps - 1))
    return min(max(scaled, min(MIN_SHORT_RUN_WARMUP, max(2, new_steps // 10))), new_steps - 1)


# --steps N keeps at least this many of each per run (capped at the config's own interval).
SHORT_RUN_EVENTS = {"log_every": 20, "validate_every": 4, "checkpoint_every": 4}


def _rescale_to_steps(raw: dict, steps: int, overridden: set[str]) -> dict[str, tuple[Any, Any]]:
    """Set ``training.steps`` and rescale what depends on the run length, unless set explicitly;
    returns ``{dotted key: (old, new)}`` for what changed."""
    changed: dict[str, tuple[Any, Any]] = {}

    def change(section: dict, key: str, new: Any, section_name: str) -> None:
        dotted = f"{section_name}.{key}"
        old = section.get(key, getattr(SECTION_CLASSES[section_name], key))
        if dotted not in overridden and old != new:
            changed[dotted] = (old, new)
            section[key] = new

    training = raw.setdefault("training", {})
    if not isinstance(training, dict):
        return changed  # validation reports it
    old_steps = training.get("steps", TrainingSection.steps)
    old_warmup = training.get("warmup_steps", TrainingSection.warmup_steps)
    if isinstance(old_steps, int) and isinstance(old_warmup, int) and old_steps > 0:
        change(training, "warmup_steps", short_run_warmup(old_warmup, old_steps, steps), "training")
    for key, events in SHORT_RUN_EVENTS.items():
        every = training.get(key, getattr(TrainingSection, key))
        if isinstance(every, int) and every > steps // events:
            change(training, key, max(1, steps // events), "training")
    _set_path(raw, "training.steps", steps)
    sparsity = raw.setdefault("sparsity", {})
    if (isinstance(sparsity, dict) and sparsity.get("update_every") is None
            and not overridden & {"sparsity.segments", "sparsity.update_every"}):
        change(sparsity, "segments", short_run_segments(
            steps, sparsity.get("segments", SparsitySection.segments),
            sparsity.get("min_segment_steps", SparsitySection.min_segment_steps)), "sparsity")
        if sparsity.get("mode", SparsitySection.mode) != "dynamic":
            # Inert without pattern updates: still set (saved configs, and so sweeps' stale checks, stay
            # as they were), but not reported as a change the run is subject to.
            changed.pop("sparsity.segments", None)
    return changed


def _fit_micro_batch(raw: dict, overridden: set[str], world_size: int) -> dict[str, tuple[Any, Any]]:
    """A batch set below (or off) the recipe's micro-batch shrinks the micro-batch to the largest divisor of
    the per-process batch no larger than it, unless the micro-batch was set explicitly too (then a batch
    that does not divide stays an error)."""
    training = raw.get("training")
    if (not isinstance(training, dict) or "training.batch_size" not in overridden
            or "training.micro_batch_size" in overridden):
        return {}
    batch, micro = training.get("batch_size"), training.get("micro_batch_size")
    if not (isinstance(batch, int) and isinstance(micro, int) and batch >= 1 and micro >= 1 and world_size >= 1):
        return {}
    per_process, rest = divmod(batch, world_size)
    if rest or per_process == 0 or per_process % micro == 0:
        return {}
    new = max(d for d in range(1, min(micro, per_process) + 1) if per_process % d == 0)
    training["micro_batch_size"] = new
    return {"training.micro_batch_size": (micro, new)}


def short_run_segments(steps: int, segments: Any, min_segment_steps: Any) -> Any:
    """The paper's ``n`` for a run of ``steps``: at most ``segments``, with segments of at least
    ``min_segment_steps`` steps, and at least 2 segments (one update) where the run has 2 steps."""
    if not (isinstance(segments, int) and isinstance(min_segment_steps, int) and min_segment_steps >= 1):
        return segments  # validation reports the bad value
    return max(min(2, steps), min(segments, steps // min_segment_steps))


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value``; the value is read as YAML (``0.9``, ``true``, ``null``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, text = item.split("=", 1)
    key = canonical_key(key.strip())
    if not key:
        raise ConfigError(f"--set {item!r}: the key is empty")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    _lookup_field(RunConfig, dotted.split("."), dotted)  # unknown keys fail here, with a suggestion
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _all_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        sub = _section_class(f)
        keys += _all_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]
    return keys


def _section_class(f) -> type | None:
    return f.default_factory if f.default_factory is not MISSING and hasattr(f.default_factory, "__dataclass_fields__") else None


def _lookup_field(cls, parts: list[str], dotted: str, section_ok: bool = False):
    by_name = {f.name: f for f in fields(cls)}
    f = by_name.get(parts[0])
    is_section = f is not None and bool(_section_class(f))
    if f is None or (len(parts) > 1 and not is_section) or (len(parts) == 1 and is_section and not section_ok):
        close = difflib.get_close_matches(dotted, _all_keys(), n=1, cutoff=0.5)
        if not close:
            close = difflib.get_close_matches(parts[-1], [k.split(".")[-1] for k in _all_keys()], n=1)
            close = [k for k in _all_keys() if close and k.endswith("." + close[0])][:1]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config key {dotted!r}{hint}")
    if len(parts) > 1:
        return _lookup_field(_section_class(f), parts[1:], dotted, section_ok)
    return f


def from_dict(raw: dict) -> RunConfig:
    """A typed RunConfig from a merged mapping (old key names read as their new ones); unknown keys and
    wrong types fail with one line."""
    return _build(RunConfig, rename_old_keys(raw), "")


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        f = _lookup_field(RunConfig, dotted.split("."), dotted, section_ok=True)
        sub = _section_class(f)
        kwargs[key] = _build(sub, value, dotted + ".") if sub else _coerce(dotted, value, hints[key])
    return cls(**kwargs)


def _coerce(key: str, value: Any, annotation) -> Any:
    """Check ``value`` against the field's annotation (ints are accepted where floats are)."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if isinstance(value, str) and (int in options or float in options):
        try:  # YAML 1.1 reads 1e-3 as a string, also where a name is allowed too ("auto" | a number)
            number = float(value)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            value = number
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is list and isinstance(value, list):
            (item,) = typing.get_args(option) or (str,)
            try:
                return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
            except ConfigError:
                pass
        if option is int and isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
            return int(value)  # 1e4 in YAML
    names = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{key} must be {names}, got {value!r} ({type(value).__name__})")


def _type_name(option) -> str:
    if option is type(None):
        return "null"
    if typing.get_origin(option) is list:
        (item,) = typing.get_args(option) or (str,)
        return {int: "a list of integers", float: "a list of numbers"}.get(item, "a list of names")
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(option, str(option))
