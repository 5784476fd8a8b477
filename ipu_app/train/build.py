"""Builders: the parts of a training run, each made from the config (the trainer only wires them).

The order the trainer calls them in is part of a run's numerics: the model is initialised from the
global generator right after ``torch.manual_seed(seed)``, so nothing may draw from it earlier.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..choices import MODEL_SIZES, SPARSE_MODULES
from ..config import ConfigError, RunConfig
from ..data.ahead import Prefetcher, WorkerLoader
from ..data.batches import BatchIterator, static_batch, validation_batches
from ..data.corpus import CorpusError
from ..data.sampling import MaskingConfig, PretrainingDataset
from ..model.bert import ModelConfig, SparseBertForPreTraining
from ..seeding import derive_seed
from ..sparse import flops
from ..sparse.freeze import PartialFreezer, freezable_linears
from ..sparse.schedule import UpdateSchedule
from ..sparse.updater import PatternUpdater, build_updater
from .distributed import DistContext


# ------------------------------------------------------------ what a config implies
def model_config(config: RunConfig, vocab_size: int | None = None) -> ModelConfig:
    """The ``ModelConfig`` of a run (the tokenizer's vocabulary size when given)."""
    return ModelConfig(
        size=config.model.size,
        vocab_size=vocab_size or config.data.vocab_size,
        max_position_embeddings=config.model.max_position_embeddings,
        dropout=config.model.dropout,
        nsp=config.model.nsp,
        sparsity_mode=config.sparsity.mode,
        sparsity=config.sparsity.ratio,
        block_size=config.sparsity.block_size,
        init=config.sparsity.init,
        sparse_modules=list(config.sparsity.modules),
        inactive=config.sparsity.inactive,
        backend="reference" if config.backend == "ipu" else config.backend,  # IPU: the masked path in the graph
        seed=config.seed,
    )


def update_schedule(config: RunConfig) -> UpdateSchedule:
    """The steps after which the pattern is updated (none unless ``sparsity.mode`` is dynamic)."""
    s, steps = config.sparsity, config.training.steps
    if s.mode != "dynamic":
        return UpdateSchedule.never(steps)
    if s.update_every is not None:
        return UpdateSchedule.every(steps, s.update_every)
    return UpdateSchedule.evenly_spaced(steps, s.segments)


def segment_steps(config: RunConfig) -> float | None:
    """Steps between pattern updates (None: no updates)."""
    schedule = update_schedule(config)
    return schedule.total_steps / (len(schedule) + 1) if len(schedule) else None


def schedule_warning(config: RunConfig) -> str | None:
    """One line when the update schedule is too dense for regrown blocks to mature, else None."""
    segment, least = segment_steps(config), config.sparsity.min_segment_steps
    if segment is None or segment >= least:
        return None
    return (f"pattern updates every {segment:.0f} steps, below sparsity.min_segment_steps={least}: regrown "
            "blocks start at zero and are mostly pruned again before they grow; set sparsity.update_every "
            "(or a lower sparsity.segments) or train longer")


def run_flops(config: RunConfig, active_weights: int) -> dict:
    """``sparse.flops.run_flops`` for a run's model, data and length (RigL's update steps add the
    dense gradient's cost)."""
    s = config.sparsity
    rigl_steps = len(update_schedule(config)) if s.mode == "dynamic" and s.regrowth == "gradient" else 0
    layers, hidden = MODEL_SIZES[config.model.size]
    return flops.run_flops(layers, hidden, config.data.seq_len, active_weights, config.training.steps,
                           config.training.batch_size, rigl_steps)


# ---------------------------------------------------------------------------- builders
def masking(config: RunConfig) -> MaskingConfig:
    d = config.data
    return MaskingConfig(d.seq_len, d.mask_prob, d.max_predictions)


def uses_static_masks(config: RunConfig, device: torch.device) -> bool:
    """Fixed-size masked positions (no data-dependent shape, no host sync) where a compiled graph or
    a GPU runs the model; the exact rows (nonzero) on an eager CPU run; ``data.fixed_size_masks`` decides
    when set."""
    fixed = config.data.fixed_size_masks
    return (device.type == "cuda" or config.training.compile) if fixed is None else fixed


@dataclass
class Loader:
    """The training batches (an iterator with ``state_dict``) and the transform the training thread
    still applies to each (None: the prefetch thread or the workers apply it)."""

    batches: object
    host_transform: Callable | None
    train_set: PretrainingDataset


def build_loader(config: RunConfig, data_dir: Path, dist: DistContext, device: torch.device,
                 static_masks: bool) -> Loader:
    train_set = PretrainingDataset(data_dir, "train", masking(config), seed=config.seed)
    transform = (functools.partial(static_batch, max_predictions=config.data.max_predictions)
                 if static_masks else None)
    global_micro = config.micro_batch_size * dist.world_size
    if len(train_set) < global_micro:
        raise CorpusError(f"{data_dir} has {len(train_set)} training samples of seq_len "
                          f"{config.data.seq_len}, fewer than one batch of {global_micro}; prepare more data "
                          "or lower training.micro_batch_size")
    batches = BatchIterator(train_set, config.micro_batch_size, dist.rank, dist.world_size)
    prefetch, pin = config.data.prefetch_batches, device.type == "cuda"
    if config.data.num_workers:
        batches = WorkerLoader(batches, config.data.num_workers, transform, pin_memory=pin,
                               prefetch=2 if prefetch is None else max(prefetch, 1))
    elif prefetch or (prefetch is None and pin):  # null: 2 ahead on a GPU, none on a CPU
        batches = Prefetcher(batches, prefetch or 2, transform, pin_memory=pin)
    return Loader(batches, transform if isinstance(batches, BatchIterator) else None, train_set)


def build_validation(config: RunConfig, data_dir: Path, dist: DistContext, static_masks: bool,
                     shard: bool = True) -> tuple[list[dict], int]:
    """This rank's validation batches (every ``world_size``-th: the sums are all-reduced; all of them
    with ``shard=False``) and the number of validation sequences over all ranks."""
    validation = validation_batches(data_dir, config.micro_batch_size, masking(config),
                                    max_sequences=config.data.validation_sequences)
    if static_masks:
        validation = [static_batch(b, config.data.max_predictions) for b in validation]
    mine = validation[dist.rank :: dist.world_size] if shard else validation
    if not mine:
        raise ConfigError(f"{data_dir} has no validation sequences; prepare more data")
    return mine, sum(b["input_ids"].shape[0] for b in validation)


def build_model(config: RunConfig, vocab_size: int, device: torch.device, dist: DistContext):
    """The model (seeded: identical weights and patterns on every rank) and what the training step
    calls (the DDP wrapper where distributed)."""
    torch.manual_seed(config.seed)  # dense initialisation and dropout draw from the global generator
    model = SparseBertForPreTraining(model_config(config, vocab_size)).to(device)
    if dist.rank > 0:  # identical weights and patterns on every rank; independent dropout streams
        torch.manual_seed(derive_seed(config.seed, 0xD15, dist.rank))
    forward_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (the patterns) are not broadcast: ranks keep them equal by construction and the
        # hash check after every update proves it, instead of rank 0 silently overwriting them.
        forward_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return model, forward_model


def initialize_model(config: RunConfig, model, data_dir: Path) -> dict:
    """``training.init_from``: the source's weights (and pattern) into the fresh model; the record
    the summary keeps."""
    from ..data.shards import load_manifest
    from .init_from import initialize_from, load_source

    source = load_source(config.training.init_from)
    return initialize_from(model, source, config.sparsity.init_pattern,
                           tokenizer_sha256=load_manifest(data_dir).get("tokenizer_sha256"))


def build_pattern_updater(config: RunConfig, model, optimizer, schedule, dist: DistContext) -> PatternUpdater | None:
    """The run's ``PatternUpdater`` (None for a dense run)."""
    s = config.sparsity
    if s.mode == "dense":
        return None
    return build_updater(model, optimizer, schedule, mode=s.mode, pruning_ratio=s.pruning_ratio,
                         pruning_schedule=s.pruning_schedule, regrowth=s.regrowth, block_metric=s.block_metric,
                         seed=config.seed, grad_reduce=dist.all_reduce_mean if dist.enabled else None)


def build_freezer(config: RunConfig, model) -> PartialFreezer | None:
    """Fig. 1b's partially untrained dense weights (None unless ``sparsity.freeze`` is set)."""
    s = config.sparsity
    if s.freeze == "none":
        return None
    paths = {SPARSE_MODULES[m] for m in s.modules}
    return PartialFreezer(freezable_linears(model.bert.encoder, paths, "bert.encoder."), s.freeze, s.ratio,
                          config.training.steps, config.seed)


def choose_kernels(config: RunConfig, model, sparse_layers: list, device: torch.device, dtype: torch.dtype,
                   threads: int, dist: DistContext, kernels_path: Path, resume: bool, progress: bool) -> list:
    """``backend: auto`` on a CPU: what runs each sparse layer kind and the attention, measured
    (``ops.autotune``) or, on a resume on the same CPU, as the run recorded in ``kernels_path`` (the
    same kernels compute the same numbers); the decisions are recorded there for the next resume.
    Rank 0 measures alone (ranks timing at once would time each other's load); the others adopt."""
    import sys

    from .. import ops
    from ..model.attention import choose_attention
    from ..ops import autotune

    if not autotune.enabled() or device.type != "cpu" or config.backend == "ipu":
        # the IPU's graph is compiled from the host model: nothing there is timed on the host
        choose_attention(model, config.model.attention, device, dtype, 1, 1, measure=False)
        return []

    def decide() -> list:
        decisions = ops.tune_layers([layer for _, layer in sparse_layers], device, dtype,
                                    config.micro_batch_size * config.data.seq_len, threads, progress=progress)
        attention = choose_attention(model, config.model.attention, device, dtype, config.micro_batch_size,
                                     config.data.seq_len, threads, progress)
        return decisions + ([attention] if attention is not None else [])

    recorded = autotune.read_record(kernels_path) if resume else None
    if recorded is not None:
        if recorded["identity"]["cpu"] == autotune.identity()["cpu"]:
            autotune.TUNER.adopt(recorded["decisions"])
        elif dist.is_main:
            print(f"note: this run's sparse kernels were chosen on {recorded['identity']['cpu']}; "
                  "measuring again on this CPU", file=sys.stderr)
    decisions = decide() if dist.is_main else []
    if dist.enabled:
        entries = dist.all_gather_object([d.to_dict() for d in decisions])[0]
        if not dist.is_main:
            autotune.TUNER.adopt(entries)
            decisions = decide()
    if decisions and dist.is_main:
        autotune.write_record(kernels_path, decisions)
    return decisions
