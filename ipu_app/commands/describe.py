"""``--describe``: what a config would train, without training it."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import ops
from ..config import RunConfig
from ..model.bert import SparseBertForPreTraining
from ..sparse.flops import non_embedding_params
from ..sparse.updater import PRG_WARN
from ..train.build import model_config, run_flops, schedule_warning, segment_steps, update_schedule
from ..train.optim import peak_learning_rate


def encoder_share(config: RunConfig, model: SparseBertForPreTraining, trained: int, rows: list[dict]) -> dict:
    """How much of the model the sparse encoder linears are: their trained (non-zero) weights as a
    fraction of all trained parameters, and their training FLOPs per sequence as a fraction of the
    whole step's matrix products (attention, the MLM head on ``max_predictions`` positions and the
    NSP head included; embedding lookups are free). Sparsity acts on this part only: where it is
    small, the encoder's capacity hardly decides the loss."""
    from ..sparse.flops import training_flops_ledger

    active = sum(r["active_weights"] for r in rows)
    layers, hidden = model.config.num_layers, model.config.hidden_size
    density_sparsity = 1.0 - active / non_embedding_params(layers, hidden)
    ledger = training_flops_ledger(layers, hidden, config.data.seq_len, density_sparsity,
                                   vocab_size=model.config.vocab_size, masked_per_sequence=config.data.max_predictions,
                                   nsp=config.model.nsp)
    return {"params": active / trained, "flops": ledger.sparse_linears / ledger.total,
            "encoder_weights": active, "flops_per_sequence": ledger.total}


def describe(config: RunConfig, world_size: int = 1, threads: int | None = None) -> dict:
    """The resolved config plus parameter counts, per-layer sparsity and FLOPs (builds the model on CPU);
    ``threads``: ``--threads`` (what a run started with it would use)."""
    if config.backend == "ipu":  # the batch is split over replicas, not processes
        world_size = config.ipu.replication_factor
    from ..data.prepare import data_vocabulary

    vocabulary = data_vocabulary(config.data)  # the data's tokenizer, not the config's request
    model = SparseBertForPreTraining(model_config(config, vocabulary["vocab_size"]), initialize=False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = model.layer_sparsity()
    t, s = config.training, config.sparsity
    updates = len(update_schedule(config))
    return {
        "config": config.to_saved_dict(),
        "learning_rate": peak_learning_rate(config),
        "global_batch_size": t.batch_size,
        "micro_batch_size": config.micro_batch_size,
        "gradient_accumulation": config.accumulation_steps(world_size),
        "world_size": world_size,
        "pattern_updates": updates,
        "bias_correction": config.bias_correction if s.mode == "dynamic" else None,
        "bias_correction_line": config.bias_correction_line(),
        "freeze": (None if s.freeze == "none" else
                   {"mode": s.freeze, "fraction": s.ratio, "switch_step": t.steps // 2,
                    "untrained_steps": f"1..{t.steps // 2}" if s.freeze == "early" else f"{t.steps // 2 + 1}..{t.steps}"}),
        "steps_between_updates": segment_steps(config),
        "schedule_warning": schedule_warning(config),
        # What the run's update records report as mean_pruned_recently_grown (fraction of pruned blocks
        # grown at the previous update): chance level (age-blind pruning) is about the fraction of the
        # active blocks that update regrew, ~pr(t); near 1 means regrown blocks never mature.
        "expect_pruned_recently_grown": (
            f"at most ~{s.pruning_ratio:g} (chance: pr(t)); above {PRG_WARN:g} at two updates in a row warns"
            if updates else None),
        # The same model with dense encoder weights (what Hugging Face's BertForPreTraining holds,
        # the tied decoder counted once), and the numbers the optimizer trains: a sparse weight
        # contributes its active values only.
        "dense_model_params": trained + sum(r["shape"][0] * r["shape"][1] - r["active_weights"] for r in rows),
        "trained_params": trained,
        "non_embedding_params": non_embedding_params(model.config.num_layers, model.config.hidden_size),
        "layers": rows,
        **run_flops(config, model.active_encoder_weights()),
        "encoder_share": encoder_share(config, model, trained, rows),
        "intervals": {key: getattr(t, key) for key in ("log_every", "validate_every", "checkpoint_every")},
        "adjusted": {key: list(change) for key, change in config.adjusted.items()},
        "validation": validation_size(config),
        "vocabulary": vocabulary,
        # training.init_from: the weights the run starts from (loaded when it starts, not here)
        "init_from": ({"path": t.init_from, "pattern": config.sparsity.init_pattern} if t.init_from else None),
        "ipu": _ipu_plan(config) if config.backend == "ipu" else None,
        "sparse_kernels": _local_kernel_line(config, model, threads),
        "threads": _threads(config, threads),
    }


def validation_size(config: RunConfig) -> dict:
    """How many validation sequences the data holds and how many a run validates on (``available``
    is None while the data is not prepared: ``--describe`` prepares nothing)."""
    from ..data.sampling import VALIDATION_SEED, MaskingConfig, PretrainingDataset
    from ..data.prepare import embedded_data_dir

    d = config.data
    path = Path(d.dir) if d.dir else embedded_data_dir(d.tokenizer, d.vocab_size)
    available = None
    if (path / "manifest.json").is_file():
        try:
            masking = MaskingConfig(d.seq_len, d.mask_prob, d.max_predictions)
            available = len(PretrainingDataset(path, "validation", masking, seed=VALIDATION_SEED))
        except (OSError, ValueError):
            available = None
    if available is None or d.validation_sequences is None:
        used = available if d.validation_sequences is None else d.validation_sequences
    else:
        used = min(available, d.validation_sequences)
    return {"data_dir": str(path), "available": available, "used": used, "setting": "data.validation_sequences"}


def _threads(config: RunConfig, run_time: int | None = None) -> dict:
    from ..train.precision import resolve_threads

    threads, source = resolve_threads(config.training.threads, run_time)
    return {"threads": threads, "from": source}


def _local_kernel_line(config: RunConfig, model, threads: int | None = None) -> str | None:
    """``kernel_line`` for the device and precision a run started here would get: with backend auto on
    a CPU, per layer kind what measuring chose before (the cache) or "to be measured"."""
    from ..config import ConfigError
    from ..sparse.layer import sparse_weights
    from ..train.precision import resolve_precision, resolve_threads

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dtype = resolve_precision(config.training.precision, device).dtype
    except ConfigError as exc:
        return f"(not on this machine: {exc})"
    known = ops.known_decisions([layer for _, layer in sparse_weights(model)], device, dtype,
                                config.micro_batch_size * config.data.seq_len,
                                resolve_threads(config.training.threads, threads)[0])
    return ops.kernel_line(config, device, dtype, known)


def _ipu_plan(config: RunConfig) -> dict:
    from ..ipu.options import plan

    p = plan(config)
    return {"ipus_per_replica": p.ipus_per_replica, "replication_factor": p.replication_factor,
            "total_ipus": p.total_ipus, "gradient_accumulation": p.gradient_accumulation,
            "instances": config.ipu.instances, "sparse_op": config.ipu.sparse_op,
            "stages": [{"ipu": ipu, "blocks": blocks} for blocks, ipu in p.placement.stages]}


def _ipu_lines(ipu: dict | None) -> list[str]:
    if not ipu:
        return []
    stages = "; ".join(f"IPU{s['ipu']}: {s['blocks'][0]}" + (f"..{s['blocks'][-1]}" if len(s["blocks"]) > 1 else "")
                       for s in ipu["stages"])
    return [f"IPUs                             {ipu['replication_factor']} replicas x {ipu['ipus_per_replica']} = "
            f"{ipu['total_ipus']} ({ipu['instances']} instance(s)), accumulation {ipu['gradient_accumulation']}, "
            f"sparse op {ipu['sparse_op']}",
            f"pipeline stages                  {stages}"]


def _validation_text(v: dict) -> str:
    if v["available"] is None:
        used = "all" if v["used"] is None else f"a fixed random {v['used']}"
        return f"{used} (data not prepared yet: {v['data_dir']})"
    return (f"{v['used']:,} of {v['available']:,}" + (" (all)" if v["used"] == v["available"] else "")
            + f"; set {v['setting']}=N to validate on a fixed random N (the same for every run on this data)")


def _vocabulary_text(v: dict, data: dict) -> str:
    text = f"{v['vocab_size']:,} tokens ({v['tokenizer']})"
    if v["from"] == "config":
        return text + " as asked (the embedded corpus is not prepared yet; a trained vocabulary may be smaller)"
    if not data.get("dir") and v["vocab_size"] != data["vocab_size"]:
        return text + f", trained on the corpus (asked for {data['vocab_size']:,})"
    return text + (f", from {data['dir']}" if data.get("dir") else "")


def format_description(info: dict) -> str:
    """A human-readable ``--describe`` report."""
    import yaml

    c = info["config"]
    lines = [f"# {c['name']}", yaml.safe_dump({k: v for k, v in c.items() if k != "name"}, sort_keys=False).rstrip(), ""]
    lines += [
        f"learning rate (peak)             {info['learning_rate']:.6g}"
        + ("  (auto: dense law x Eq. 3)" if c["training"]["learning_rate"] == "auto" else ""),
        f"batch                            {info['global_batch_size']} = {info['micro_batch_size']} micro x "
        f"{info['gradient_accumulation']} accumulation x {info['world_size']} "
        f"{'replicas' if info.get('ipu') else 'processes'}",
        f"pattern updates                  {info['pattern_updates']}"
        + (f" (every {info['steps_between_updates']:.1f} steps)" if info["pattern_updates"] else ""),
        *([f"Adam bias correction             {info['bias_correction_line'].split(': ', 1)[1]}"]
          if info.get("bias_correction_line") else []),
        *([f"pruned_recently_grown expected   {info['expect_pruned_recently_grown']}"]
          if info.get("expect_pruned_recently_grown") else []),
        *([f"warning                          {info['schedule_warning']}"] if info.get("schedule_warning") else []),
        *([f"untrained subset                 {info['freeze']['fraction']:g} of each encoder weight, steps "
           f"{info['freeze']['untrained_steps']} ({info['freeze']['mode']})"] if info.get("freeze") else []),
        "log / validate / checkpoint      every {log_every} / {validate_every} / {checkpoint_every} steps".format(
            **info["intervals"]),
        *(["rescaled (--steps, batch)       " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in
                                                         info["adjusted"].items())]
          if info.get("adjusted") else []),
        f"validation sequences             {_validation_text(info['validation'])}",
        f"vocabulary                       {_vocabulary_text(info['vocabulary'], c['data'])}",
        *([f"starts from                      {info['init_from']['path']} (pattern: "
           f"{info['init_from']['pattern']}; new optimizer and schedule)"] if info.get("init_from") else []),
        *_ipu_lines(info.get("ipu")),
        *([f"kernels (here)                   {info['sparse_kernels']}"] if info.get("sparse_kernels") else []),
        f"CPU threads (here)               {info['threads']['threads']} ({info['threads']['from']}; "
        "set training.threads=N)",
        f"params of the dense model        {info['dense_model_params']:,}",
        f"params trained                   {info['trained_params']:,}"
        + ("  (sparse weights: active values only)" if info["trained_params"] != info["dense_model_params"] else ""),
        f"non-embedding params (dense)     {info['non_embedding_params']:,}",
        f"non-embedding non-zero params    {info['non_embedding_nonzero_params']:,}",
        f"non-embedding FLOPs / sequence   {info['non_embedding_flops_per_sequence']:.4g}",
        f"sparse encoder linears' share    {info['encoder_share']['params']:.1%} of the trained params, "
        f"{info['encoder_share']['flops']:.1%} of the step's FLOPs (measure its time share: bench train --fractions)",
        f"total training FLOPs             {info['total_training_flops']:.4g}"
        + (f" (incl. {info['dense_gradient_steps']} RigL dense-gradient steps)" if info["dense_gradient_steps"] else ""),
        "",
        "per-layer sparsity:",
    ]
    by_kind: dict[tuple, list[dict]] = {}
    for row in info["layers"]:
        kind = row["name"].split(".", 4)[-1]
        by_kind.setdefault((kind, tuple(row["shape"]), row["block_size"]), []).append(row)
    for (kind, shape, block), rows in by_kind.items():
        sparsities = [r["sparsity"] for r in rows]
        lo, hi = min(sparsities), max(sparsities)
        spread = f"{lo:.4f}" if math.isclose(lo, hi) else f"{lo:.4f}..{hi:.4f}"
        lines.append(f"  {kind:<32} {len(rows):>2} x {shape[0]}x{shape[1]}  block {block or '-':<2}  sparsity {spread}")
    return "\n".join(lines)
