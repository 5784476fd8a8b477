"""``backend: ipu``: the phased trainer with each optimizer step run by a PopTorch executor.

Everything but the step is the CPU/GPU trainer's (data, schedule, metrics, checkpoints, resume,
signals). One executor call is one optimizer step: ``micro_batch_size x gradient accumulation x
local replicas`` sequences (``ipu.device_iterations`` must be 1, so phases end exactly where the
pattern is updated). After the call the learning-rate schedule steps on the host and is pushed with
``setOptimizer`` (no recompilation). At a phase boundary :class:`IpuPatternSync` moves weights and
moments to the host, runs the shared updater, and writes them back with the pattern buffers.
Validation and checkpoints read the weights from the device first; validation runs on the host.
"""

from __future__ import annotations

import copy

import torch

from ..config import ConfigError, RunConfig
from ..train.distributed import DistContext
from ..train.optim import parameter_groups, peak_learning_rate
from ..train.precision import resolve_precision
from ..train.sums import TRAIN_FIELDS, Sums
from ..train.state import StepContext
from ..train.step import StepResult, real_token_count
from ..train.trainer import Trainer
from . import import_poptorch
from ..data.batches import static_batch
from .model import IpuPretrainingModel, parallelize
from .options import build_options, plan
from .phase import IpuPatternSync, pattern_buffer_names


def import_popdist():
    """The SDK's ``popdist`` module under ``poprun`` (None when not installed or not under poprun)."""
    try:
        import popdist
        import popdist.poptorch  # noqa: F401
    except ImportError:
        return None
    return popdist if popdist.isPopdistEnvSet() else None


class InstanceContext(DistContext):
    """``poprun`` instances as the trainer's ranks: each reads its share of every global batch and
    instance 0 writes the run directory. The replicas are kept in step by the IPUs' own gradient
    all-reduce, and pattern updates agree because they are seeded and read identical weights, so no
    host collective is needed; logged training losses are instance 0's replicas'."""

    @property
    def enabled(self) -> bool:
        return False  # no torch.distributed process group, no DDP

    def all_gather_object(self, obj) -> list:
        return [obj] * self.world_size  # checkpoints keep instance 0's RNG state for every instance

    @classmethod
    def from_popdist(cls, popdist) -> "InstanceContext":
        if popdist is None:
            return cls(0, 1, 0)
        return cls(int(popdist.getInstanceIndex()), int(popdist.getNumInstances()), 0)


SPARSE_OPS = ("masked", "popsparse", "popsparse_static")


def check_ipu_config(config: RunConfig) -> None:
    """What an IPU run needs beyond the generic checks (one line each)."""
    plan(config)
    if config.ipu.device_iterations != 1:
        raise ConfigError("backend: ipu runs one optimizer step per executor call; set ipu.device_iterations=1 "
                          "(phases end at pattern updates)")
    if config.ipu.instances > 1 and config.sparsity.mode == "dynamic" and config.sparsity.regrowth == "gradient":
        raise ConfigError("RigL with several poprun instances is not supported: each instance would score its own "
                          "batch; use random regrowth (the paper's choice) or one instance")
    if config.ipu.sparse_op not in SPARSE_OPS:
        raise ConfigError(f"ipu.sparse_op={config.ipu.sparse_op!r} is not valid; use one of {list(SPARSE_OPS)}")
    if config.ipu.sparse_op == "popsparse_static" and config.sparsity.mode != "static":
        raise ConfigError("ipu.sparse_op=popsparse_static compiles the pattern into the graph and needs "
                          "sparsity.mode=static; use ipu.sparse_op=popsparse for DynSparse")
    if config.ipu.sparse_op == "popsparse_static":
        need = 16 if _half(config) else 8
        if config.sparsity.block_size % need or (config.micro_batch_size * config.data.seq_len) % 16:
            raise ConfigError(f"ipu.sparse_op=popsparse_static needs blocks divisible by {need} "
                              f"({'fp16' if _half(config) else 'fp32'}) and tokens per micro-batch divisible by 16")
        if config.sparsity.inactive != "zero":
            raise ConfigError("ipu.sparse_op=popsparse_static needs sparsity.inactive=zero")
    if config.ipu.sparse_op == "popsparse" and config.sparsity.mode != "dense":
        from .popsparse import PopsparseError, check_dynamic_block, sparse_matmul_options

        if config.sparsity.inactive != "zero":
            raise ConfigError("ipu.sparse_op=popsparse needs sparsity.inactive=zero; use ipu.sparse_op=masked")
        try:
            check_dynamic_block(config.sparsity.block_size, "float16" if _half(config) else "float32")
            sparse_matmul_options(partials="half" if config.ipu.enable_half_partials else "float",
                                  block_size=config.sparsity.block_size)
        except PopsparseError as exc:
            raise ConfigError(str(exc)) from None
    if config.sparsity.freeze != "none":
        raise ConfigError("sparsity.freeze is not supported with backend: ipu (it edits weights every step)")
    if config.sparsity.group_lasso > 0:
        raise ConfigError("sparsity.group_lasso is not supported with backend: ipu (it edits weights every step)")


def _half(config: RunConfig) -> bool:
    return config.training.precision in ("auto", "fp16")


class IpuStep:
    """The step backend of ``backend: ipu`` (see ``train.step``): one PopTorch executor call per
    optimizer step; pattern updates through :class:`IpuPatternSync`; the host reads the weights from
    the device before validation and checkpoints. The loop around it is the CPU/GPU trainer's."""

    shards_validation = False  # instance 0 validates on the whole set (no host all-reduce)

    def __init__(self, config: RunConfig, *, poptorch=None, popdist=None, popsparse_library=None) -> None:
        check_ipu_config(config)
        self.poptorch = poptorch if poptorch is not None else import_poptorch()
        self.popdist = popdist
        self.popsparse_library = popsparse_library
        self.plan = plan(config)
        self.half = _half(config)
        self.replicas_here = self.plan.replication_factor // config.ipu.instances
        self.micro_per_call = self.plan.gradient_accumulation * self.replicas_here
        self.popsparse = None
        self.static_popsparse = None
        self._last_batch = None

    def host_precision(self, config: RunConfig, device: torch.device):
        return resolve_precision("fp32", torch.device("cpu"))  # host-side validation

    def loss_divisor(self, accumulation: int, world_size: int) -> int:
        return self.micro_per_call  # window sums: this instance's micro-batches, not reduced

    def make_optimizer(self, model: torch.nn.Module, config: RunConfig):
        o = config.optimizer
        loss_scaling = o.loss_scale if isinstance(o.loss_scale, float) else None
        return self.poptorch.optim.AdamW(
            parameter_groups(model, o.weight_decay, o.sparse_weight_decay), lr=peak_learning_rate(config),
            betas=(o.beta1, o.beta2),
            eps=o.eps, weight_decay=o.weight_decay, loss_scaling=loss_scaling,
            max_grad_norm=o.max_grad_norm or None, bias_correction=True,
            accum_type=torch.float32, first_order_momentum_accum_type=torch.float32,
            second_order_momentum_accum_type=torch.float32)

    def attach(self, ctx: StepContext) -> None:
        config, state, poptorch = ctx.config, ctx.state, self.poptorch
        model = state.model
        if config.ipu.sparse_op == "popsparse" and state.sparse_layers:
            from .custom_ops import PopsparseLayers
            from .popsparse import sparse_matmul_options

            options = sparse_matmul_options(config.ipu.sparse_available_memory, config.ipu.meta_info_bucket_oversize,
                                            "half" if config.ipu.enable_half_partials else "float",
                                            config.sparsity.block_size)
            self.popsparse = PopsparseLayers(model, poptorch, config.micro_batch_size * config.data.seq_len,
                                             options, self.half, library=self.popsparse_library)
        if config.ipu.sparse_op == "popsparse_static" and state.sparse_layers:
            from .custom_ops import StaticPopsparseLayers

            self.static_popsparse = StaticPopsparseLayers(model, poptorch, config.micro_batch_size * config.data.seq_len,
                                                          "float16" if self.half else "float32")
        self.wrapper = IpuPretrainingModel(model, poptorch)
        self.hooks = parallelize(self.wrapper, self.plan.placement, poptorch,
                                 recompute_every_layer=config.ipu.recompute_checkpoint_every_layer)
        if self.half:
            self.wrapper.half()
        # The executor wraps ``self.wrapper``: PopART names of the model's tensors start with "model.".
        options = build_options(config, poptorch, pattern_buffer_names(model, "model."), popdist=self.popdist)
        self.executor = poptorch.trainingModel(self.wrapper, options=options, optimizer=state.optimizer)
        self.sync = (IpuPatternSync(self.executor, state.optimizer, state.updater, model,
                                    dense_gradient=self._host_dense_gradient, prefix="model.",
                                    on_pattern_change=self.popsparse.refresh if self.popsparse else None)
                     if state.updater is not None else None)

    # -------------------------------------------------------------------- one step
    def call_batch(self, ctx: StepContext) -> dict:
        """One executor call's input: ``micro_per_call`` micro-batches, concatenated."""
        micro = [static_batch(ctx.state.next_batch(), ctx.config.data.max_predictions)
                 for _ in range(self.micro_per_call)]
        batch = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
        self._last_batch = micro[-1]
        return batch

    def step(self, ctx: StepContext, step: int) -> StepResult:
        batch = self.call_batch(ctx)
        scheduler = ctx.state.scheduler
        lr = scheduler.get_last_lr()[0]
        # Outputs are per micro-batch of the call; summed here (no all-reduce: instances do not share
        # sums, so logged training losses are instance 0's replicas').
        loss, mlm, nsp, correct, masked = (torch.as_tensor(t).double().sum() for t in self.executor(**batch))
        scheduler.step()
        self.executor.setOptimizer(ctx.state.optimizer)  # the new learning rate, without recompiling
        sums = Sums(TRAIN_FIELDS).add(mlm_loss=mlm, nsp_loss=nsp, mlm_correct=correct)
        return StepResult(finite=bool(torch.isfinite(loss)), grad_norm=float("nan"), lr=lr, sums=sums,
                          masked=int(masked), tokens=batch["input_ids"].numel(), real_tokens=real_token_count(batch))

    def update_pattern(self, ctx: StepContext, step: int):
        return self.sync.step(step)

    def _host_dense_gradient(self, model, step: int) -> None:
        """RigL: the dense gradient of the step's last micro-batch, on the host."""
        saved = self.popsparse.stash() if self.popsparse else None
        host = model if not self.half else model.float()
        out = IpuPretrainingModel(host)(**self._last_batch)
        out[0].backward()
        if self.half:
            model.half()
        if saved is not None:
            self.popsparse.unstash(saved)

    # ------------------------------------------------------- validation, checkpoints
    @torch.no_grad()
    def evaluate(self, ctx: StepContext, final: bool, evaluate) -> dict:
        self.executor.copyWeightsToHost()
        if not ctx.dist.is_main:  # instance 0 validates on the whole set; the others go on
            nan = float("nan")
            return {"mlm_loss": nan, "mlm_accuracy": nan, "nsp_loss": nan, "sequences": 0}
        if not self.half:
            return evaluate(final)
        return evaluate(final, copy.deepcopy(ctx.state.model).float())  # validation runs in fp32 on the host

    def before_checkpoint(self, ctx: StepContext) -> None:
        self.executor.copyWeightsToHost()

    def close(self, ctx: StepContext) -> None:
        self.executor.destroy()


def IpuTrainer(config: RunConfig, run_dir, *, poptorch=None, popdist=None, popsparse_library=None,  # noqa: N802
               **kwargs) -> Trainer:
    """The trainer of ``backend: ipu``: the one loop with an :class:`IpuStep` (``trainer.backend``), on
    the host device, with ``poprun`` instances as its ranks."""
    backend = IpuStep(config, poptorch=poptorch, popdist=popdist, popsparse_library=popsparse_library)
    kwargs.setdefault("dist", InstanceContext.from_popdist(popdist))
    return Trainer(config, run_dir, device="cpu", backend=backend, **kwargs)
