"""``summary.json``: what a finished run reports (every number recomputed by a test)."""

from __future__ import annotations

from ..machine import cpu_identity
from .evaluate import final_validation
from .build import run_flops
from .metrics import METRICS_VERSION
from .optim import peak_learning_rate


def run_summary(config, state, val: dict, *, machine: str, execution: dict) -> dict:
    """The summary of a run whose :class:`~.state.TrainState` is ``state`` after its final
    validation ``val``; ``machine``: the kind this process trains on; ``execution``: how it ran
    (precision, device, kernels, attention, threads, world size)."""
    c = state.counters
    flops = run_flops(config, state.model.active_encoder_weights())
    summary = {
        "config": config.name,
        "metrics_version": METRICS_VERSION,  # report flags runs without it
        "steps": state.step,
        **final_validation(val),
        "final_train_loss": c.last_train_loss,
        "non_embedding_flops_per_sequence": flops["non_embedding_flops_per_sequence"],
        "non_embedding_nonzero_params": flops["non_embedding_nonzero_params"],
        "total_non_embedding_flops": flops["total_training_flops"],
        "sparsity": config.effective_sparsity,
        "block_size": config.sparsity.block_size,
        "learning_rate": peak_learning_rate(config),
        "pattern_updates": c.pattern_updates,
        "skipped_steps": c.skipped_steps,
        "skipped_updates": c.skipped_updates,
        "tokens_per_second": c.train_tokens / max(c.train_seconds, 1e-9),
        "real_tokens_per_second": c.train_real_tokens / max(c.train_seconds, 1e-9),
        "train_time_s": c.train_seconds,
        "wall_time_s": c.wall_seconds,
        "machine": machine if len(c.machines) <= 1 else "several",
        "machines": list(c.machines),
        "cpu": cpu_identity()["model"],
        "cpu_isa": cpu_identity()["isa"],
        **execution,
        "global_batch_size": config.training.batch_size,
        "vocab_size": state.model.config.vocab_size,
        "init_from": c.init_from,
    }
    if state.updater is not None:
        summary["mean_explored_dof"] = state.updater.exploration.mean_explored_dof()
    return summary
