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

from ..config import ConfigError, RunConfig
from ..data.ahead import Prefetcher, WorkerLoader
from ..data.batches import BatchIterator, static_batch, validation_batches
from ..data.corpus import CorpusError
from ..data.sampling import MaskingConfig, PretrainingDataset
from ..model.bert import SparseBertForPreTraining
from ..seeding import derive_seed
from ..sparse.freeze import PartialFreezer, freezable_linears
from ..sparse.updater import PatternUpdater, build_updater
from .distributed import DistContext


def resolve_data_dir(config: RunConfig, progress: bool = True) -> Path:
    """``data.dir`` if given (it must be prepared), else the embedded corpus (prepared once, cached)."""
    from ..data.prepare import prepare_embedded
    from ..data.shards import load_manifest

    if config.data.dir:
        path = Path(config.data.dir)
        load_manifest(path)  # one-line error when it is not prepared data
        return path
    return prepare_embedded(config.data.tokenizer, config.data.vocab_size, progress=progress)


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
    model = SparseBertForPreTraining(config.model_config(vocab_size)).to(device)
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
    from ..model.sizes import SPARSE_MODULES

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
