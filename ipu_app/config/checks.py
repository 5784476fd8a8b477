"""``RunConfig.validate``: each section's values and the combinations that would not train. The
first problem raises ``ConfigError`` with one actionable line."""

from __future__ import annotations

from typing import Any

from ..choices import (ATTENTION_IMPLEMENTATIONS, BACKEND_NAMES, BIAS_CORRECTIONS, BLOCK_METRICS, FREEZE_MODES,
                       INACTIVE_MODES, INIT_PATTERNS, PRECISIONS, PRUNING_SCHEDULES, REGROWTH_RULES, SPARSITY_MODES,
                       SUPPORTED_BLOCK_SIZES, VALUE_INITS)
from ..choices import MODEL_SIZES, SPARSE_MODULES
from .schema import ConfigError, RunConfig


def validate_run(c: RunConfig) -> None:
    _names(c)
    _model(c)
    _sparsity(c)
    _training(c)
    _optimizer(c)
    _data(c)
    check(c.seed >= 0, f"seed must be >= 0, got {c.seed}")


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; use one of {list(allowed)}")


def _names(c: RunConfig) -> None:
    """Every value that names one of a fixed set, and the run length (what the other checks build on)."""
    m, s = c.model, c.sparsity
    choice("model.size", m.size, MODEL_SIZES)
    choice("sparsity.mode", s.mode, SPARSITY_MODES)
    choice("sparsity.pruning_schedule", s.pruning_schedule, PRUNING_SCHEDULES)
    choice("sparsity.regrowth", s.regrowth, REGROWTH_RULES)
    choice("sparsity.init_pattern", s.init_pattern, INIT_PATTERNS)
    choice("sparsity.block_metric", s.block_metric, BLOCK_METRICS)
    choice("sparsity.init", s.init, VALUE_INITS)
    choice("sparsity.inactive", s.inactive, INACTIVE_MODES)
    choice("training.precision", c.training.precision, PRECISIONS)
    choice("model.attention", m.attention, ATTENTION_IMPLEMENTATIONS)
    for module in s.modules:
        choice("sparsity.modules entry", module, SPARSE_MODULES)
    choice("backend", c.backend, (*BACKEND_NAMES, "ipu"))
    choice("sparsity.freeze", s.freeze, FREEZE_MODES)
    choice("optimizer.bias_correction", c.optimizer.bias_correction, BIAS_CORRECTIONS)
    check(c.training.steps >= 1, f"training.steps must be >= 1, got {c.training.steps}")


def _model(c: RunConfig) -> None:
    m = c.model
    check(m.dropout is None or 0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    check(m.max_position_embeddings >= c.data.seq_len,
          f"model.max_position_embeddings={m.max_position_embeddings} is below data.seq_len={c.data.seq_len}")


def _sparsity(c: RunConfig) -> None:
    s, steps = c.sparsity, c.training.steps
    hidden = MODEL_SIZES[c.model.size][1]
    check(0.0 <= s.ratio < 1.0, f"sparsity.ratio must be in [0, 1), got {s.ratio}")
    check(s.block_size in SUPPORTED_BLOCK_SIZES,
          f"sparsity.block_size={s.block_size} is not supported; use one of {list(SUPPORTED_BLOCK_SIZES)}")
    check(hidden % s.block_size == 0,
          f"sparsity.block_size={s.block_size} does not divide the hidden size {hidden} of BERT-{c.model.size}")
    check(0.0 <= s.pruning_ratio <= 1.0, f"sparsity.pruning_ratio must be in [0, 1], got {s.pruning_ratio}")
    check(s.group_lasso >= 0.0, f"sparsity.group_lasso must be >= 0, got {s.group_lasso}")
    check(s.freeze == "none" or s.mode == "dense",
          f"sparsity.freeze={s.freeze} needs sparsity.mode=dense (a random fraction sparsity.ratio of each "
          "dense weight is untrained for half the run)")
    check(s.freeze == "none" or s.ratio > 0, "sparsity.freeze needs sparsity.ratio > 0 (the untrained fraction)")
    if s.mode == "dynamic":
        check(s.segments >= 1, f"sparsity.segments must be >= 1, got {s.segments}")
        check(s.segments <= steps or s.update_every is not None,
              f"sparsity.segments={s.segments} is more than training.steps={steps}; use at most one update per step")
        check(s.update_every is None or 1 <= s.update_every < steps,
              f"sparsity.update_every={s.update_every} must be in [1, training.steps={steps}) "
              "(or null: training.steps / sparsity.segments)")
    check(s.min_segment_steps >= 1, f"sparsity.min_segment_steps must be >= 1, got {s.min_segment_steps}")


def _training(c: RunConfig) -> None:
    t = c.training
    check(t.batch_size >= 1, f"training.batch_size must be >= 1, got {t.batch_size}")
    check(t.micro_batch_size is None or t.micro_batch_size >= 1,
          f"training.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    c.accumulation_steps(1)
    check(t.warmup_steps >= 0, f"training.warmup_steps must be >= 0, got {t.warmup_steps}")
    check(t.warmup_steps < t.steps or t.steps == 1,
          f"training.warmup_steps={t.warmup_steps} is not below training.steps={t.steps}; lower the "
          "warmup or shorten the run with --steps (which scales the warmup with it)")
    if isinstance(t.learning_rate, str):
        check(t.learning_rate == "auto", f"training.learning_rate must be a number or 'auto', got {t.learning_rate!r}")
    else:
        check(t.learning_rate > 0, f"training.learning_rate must be > 0, got {t.learning_rate}")
    for key in ("log_every", "validate_every", "checkpoint_every"):
        check(getattr(t, key) >= 1, f"training.{key} must be >= 1, got {getattr(t, key)}")
    check(t.threads is None or t.threads >= 1, f"training.threads must be >= 1 or null, got {t.threads}")
    check(not (t.compile and c.backend == "ipu"),
          "training.compile is for the PyTorch path; backend: ipu compiles its own graph (poptorch)")
    check(t.dist_timeout_s >= 1, f"training.dist_timeout_s must be >= 1, got {t.dist_timeout_s}")
    check(t.max_skipped_steps >= 0, f"training.max_skipped_steps must be >= 0, got {t.max_skipped_steps}")
    check(t.keep_checkpoints >= 1, f"training.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")


def _optimizer(c: RunConfig) -> None:
    o = c.optimizer
    check(0.0 <= o.beta1 < 1.0 and 0.0 <= o.beta2 < 1.0, "optimizer.beta1 and beta2 must be in [0, 1)")
    check(o.eps > 0, f"optimizer.eps must be > 0, got {o.eps}")
    check(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    check(o.sparse_weight_decay is None or o.sparse_weight_decay >= 0,
          f"optimizer.sparse_weight_decay must be >= 0 or null, got {o.sparse_weight_decay}")
    check(o.bias_correction != "per_slot" or c.backend != "ipu" or c.sparsity.mode != "dynamic",
          "optimizer.bias_correction=per_slot runs on the host optimizer only; with backend: ipu set "
          "optimizer.bias_correction=global (the paper's) or auto")
    check(o.max_grad_norm >= 0, f"optimizer.max_grad_norm must be >= 0, got {o.max_grad_norm}")
    if isinstance(o.loss_scale, str):
        check(o.loss_scale == "dynamic", f"optimizer.loss_scale must be a number or 'dynamic', got {o.loss_scale!r}")
    else:
        check(o.loss_scale > 0, f"optimizer.loss_scale must be > 0, got {o.loss_scale}")


def _data(c: RunConfig) -> None:
    d = c.data
    check(isinstance(d.num_workers, int) and d.num_workers >= 0,
          f"data.num_workers must be an integer >= 0, got {d.num_workers!r}")
    check(d.prefetch_batches is None or d.prefetch_batches >= 0,
          f"data.prefetch_batches must be >= 0 or null, got {d.prefetch_batches}")
    check(d.seq_len >= 8, f"data.seq_len={d.seq_len} is too short; use at least 8")
    check(0.0 < d.mask_prob < 1.0, f"data.mask_prob must be in (0, 1), got {d.mask_prob}")
    check(d.max_predictions >= 1, f"data.max_predictions must be >= 1, got {d.max_predictions}")
    check(d.vocab_size >= 8, f"data.vocab_size must be >= 8, got {d.vocab_size}")
    check(d.validation_sequences is None or d.validation_sequences >= 1,
          f"data.validation_sequences must be >= 1 or null, got {d.validation_sequences}")
