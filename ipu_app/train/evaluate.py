"""Evaluating a model on a validation set: the one code path that training's validation, ``revalidate``
and ``python -m ipu_app evaluate`` share, and the loading of a run's model (final or any checkpoint) and
of the data to evaluate it on (its own, or another prepared corpus with the same tokenizer)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig
from ..rundir import RunDir
from .step import masked_tokens
from .sums import Sums, output_sums

EVAL_FIELDS = ("mlm_loss", "nsp_loss", "mlm_correct", "nsp_correct")


def evaluate_batches(model, batches, *, device: torch.device, autocast=contextlib.nullcontext,
                     reduce=None, nsp: bool = True, on_batch=None) -> dict:
    """MLM loss and accuracy over the masked tokens of ``batches`` (token-weighted), NSP loss and
    accuracy over their sequences: ``{"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy" (with
    ``nsp``), "sequences", "masked_tokens"}``. ``reduce`` sums over ranks; ``on_batch(sequences)`` is
    called after each batch (a progress bar)."""
    sums = Sums(EVAL_FIELDS, device)
    masked = sequences = 0
    for batch in batches:
        n, m = batch["input_ids"].shape[0], masked_tokens(batch)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            out = model(**batch)
        got = output_sums(out)  # batch means: weighted by their counts here
        nsp_correct = ((out.nsp_logits.argmax(-1) == batch["nsp_labels"]).sum()
                       if nsp and out.nsp_logits is not None else torch.zeros((), device=device))
        sums.add(mlm_loss=got["mlm_loss"] * m, nsp_loss=got["nsp_loss"] * n, mlm_correct=got["mlm_correct"],
                 nsp_correct=nsp_correct)
        masked, sequences = masked + m, sequences + n
        if on_batch is not None:
            on_batch(n)
    read = sums.read(reduce, masked=masked, sequences=sequences)
    masked, sequences = int(read["masked"]), int(read["sequences"])
    result = {"mlm_loss": read["mlm_loss"] / max(masked, 1), "mlm_accuracy": read["mlm_correct"] / max(masked, 1),
              "sequences": sequences, "masked_tokens": masked}
    if nsp:
        result["nsp_loss"] = read["nsp_loss"] / max(sequences, 1)
        result["nsp_accuracy"] = read["nsp_correct"] / max(sequences, 1)
    return result


def final_validation(result: dict) -> dict:
    """``summary.json``'s ``final_val_*`` values from an ``evaluate_batches`` result (the trainer's
    summary and ``revalidate`` both write them)."""
    return {"final_val_mlm_loss": result["mlm_loss"], "final_val_nsp_loss": result.get("nsp_loss"),
            "final_val_mlm_accuracy": result["mlm_accuracy"], "final_val_nsp_accuracy": result.get("nsp_accuracy"),
            "final_val_sequences": result["sequences"]}


def load_run_model(run: RunDir, config: RunConfig, checkpoint: str | int | None = None,
                   vocab_size: int | None = None):
    """``(model, what it is, step)`` of a run: ``checkpoint`` ``final`` (``RUN_DIR/model``), ``latest``,
    a step number, or None (the final model of a finished run, else the latest checkpoint)."""
    from ..model.bert import SparseBertForPreTraining
    from .build import model_config
    from .checkpoint import list_checkpoints, load_checkpoint

    saved = list_checkpoints(run.path)
    if checkpoint is None:
        checkpoint = "final" if run.is_finished() and run.model_dir.is_dir() else "latest"
    if checkpoint == "final":
        if not run.model_dir.is_dir():
            raise ConfigError(f"{run} has no final model yet ({run.model_dir} is missing); finish it with "
                              f"python run_pretraining.py --resume {run.path}, or give --checkpoint latest")
        try:
            return SparseBertForPreTraining.load(run.model_dir).eval(), "final model", config.training.steps
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
    if not saved:
        raise ConfigError(f"{run} has no checkpoint to evaluate")
    if checkpoint == "latest":
        step, path = saved[-1]
    else:
        try:
            step = int(checkpoint)
        except ValueError:
            raise ConfigError(f"--checkpoint {checkpoint!r}: give final, latest or a step number") from None
        found = dict(saved)
        if step not in found:
            raise ConfigError(f"{run} has no checkpoint at step {step}; it has {', '.join(str(s) for s, _ in saved)}")
        path = found[step]
    model = SparseBertForPreTraining(model_config(config, vocab_size), initialize=False)
    load_checkpoint(path, model, config=config.to_dict())
    return model.eval(), f"checkpoint {path.name}", step


def use_recorded_kernels(run: RunDir, model, dtype: torch.dtype) -> None:
    """Run ``model`` on the sparse kernels and the attention the run recorded (``kernels.json``, when it
    was measured on this CPU), so that an evaluation computes what the run's own validation did;
    elsewhere ``auto`` decides anew."""
    from ..model.attention import set_attention
    from ..ops import autotune
    from ..sparse.layer import sparse_weights

    record = autotune.read_record(run.kernels_path)
    if record is None or record["identity"].get("cpu") != autotune.identity()["cpu"]:
        return
    name = autotune.dtype_name(dtype)
    chosen = {}
    for entry in record["decisions"]:
        kind = entry.get("kind") or {}
        if kind.get("dtype") != name:
            continue
        if "head_dim" in kind:
            set_attention(model, entry["choice"])
        elif {"out_features", "in_features", "block_size", "nnz"} <= set(kind):
            chosen[(kind["out_features"], kind["in_features"], kind["block_size"], kind["nnz"])] = entry["choice"]
    for _, layer in sparse_weights(model):
        p = layer.pattern
        choice = chosen.get((p.out_features, p.in_features, p.block_size, p.nnz))
        if choice is not None and getattr(layer, "backend", None) == "auto":
            layer.kernels = choice


def evaluation_data(config: RunConfig, data: str | Path | None, progress: bool = False) -> tuple[Path, dict]:
    """``(the data to evaluate on, its manifest)``: the run's own, or another prepared corpus, which must
    have been tokenised with the run's tokenizer (checked by the tokenizer's hash)."""
    from ..data.shards import load_manifest
    from ..data.prepare import ready_data

    own = ready_data(config.data, progress)
    if data is None:
        return own, load_manifest(own)
    data = Path(data)
    manifest, own_manifest = load_manifest(data), load_manifest(own)
    if manifest.get("tokenizer_sha256") != own_manifest.get("tokenizer_sha256"):
        def identity(m: dict) -> str:
            return f"sha256 {str(m.get('tokenizer_sha256'))[:12]}, {m.get('vocab_size')} tokens"

        raise ConfigError(  # the hashes tell apart vocabularies of one size, or one vocabulary cased and not
            f"{data} was tokenised with another tokenizer ({identity(manifest)}) than the run's "
            f"({identity(own_manifest)}); evaluate on data prepared with the run's tokenizer "
            f"(the one in {own / 'tokenizer'})")
    return data, manifest


def evaluate_run(run_dir: str | Path, *, checkpoint: str | int | None = None, data: str | Path | None = None,
                 sequences: int | None = None, progress: bool = False) -> dict:
    """Evaluate a run's final model or one of its checkpoints on its validation set (or another prepared
    corpus's), with the code training validates with. ``sequences``: a fixed random N of the split (the
    default is the run's ``data.validation_sequences`` on its own data, the whole split on other data)."""
    from ..data.batches import validation_batches
    from .build import masking
    from .precision import resolve_precision

    run = RunDir(run_dir)
    config = run.load_config()
    if sequences is not None and sequences < 1:
        raise ConfigError(f"--sequences must be >= 1, got {sequences}")
    data_dir, manifest = evaluation_data(config, data, progress)
    if sequences is None and data is None:
        sequences = config.data.validation_sequences
    model, source, step = load_run_model(run, config, checkpoint, vocab_size=manifest["vocab_size"])
    batches = validation_batches(data_dir, config.micro_batch_size, masking(config), max_sequences=sequences)
    device = torch.device("cpu")
    precision = resolve_precision(config.training.precision, device)
    use_recorded_kernels(run, model, precision.dtype)
    if progress:
        print(f"evaluating {run.path} ({source}, step {step}) on {data_dir}: "
              f"{sum(b['input_ids'].shape[0] for b in batches):,} sequences, {precision.name}", file=sys.stderr)
    with torch.no_grad():
        result = evaluate_batches(model, batches, device=device, autocast=precision.autocast, nsp=config.model.nsp)
    return {"run": str(run.path), "model": source, "step": step, "data": str(data_dir),
            "precision": precision.name, **result}
