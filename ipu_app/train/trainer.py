"""The pre-training loop, in phases.

A *phase* is a run of training steps during which nothing but the weights changes. Phases end
at the steps where something else must happen: a scheduled pattern update, a validation, a
checkpoint, or the end of the run. At a phase boundary the trainer

1. validates on the fixed validation set (before an update prunes the model the phase trained),
2. runs the ``PatternUpdater`` if the schedule says so (unless that step's gradients were
   non-finite: then the update is skipped and logged like the optimizer step),
3. writes a checkpoint.

This is the structure an accelerator needs (a compiled step that is re-entered after host-side
work) and it keeps the loop readable. Steps count completed optimizer steps, from 1.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import ops, signals
from ..config import RunConfig
from ..data.ahead import Prefetcher, WorkerLoader
from ..data.tokenizer import file_sha256
from ..io import first_line
from ..machine import cpu_identity, machine_key
from ..model.attention import attention_line, choose_attention
from ..rundir import RunDir
from ..sparse.layer import sparse_weights
from ..sparse.updater import PRG_WARN
from .build import (build_freezer, build_loader, build_model, build_pattern_updater, build_validation,
                    initialize_model, resolve_data_dir, uses_static_masks)
from .checkpoint import (CheckpointDamaged, CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                         rng_state, save_checkpoint, set_rng_state)
from .distributed import DistContext, check_patterns_consistent
from .evaluate import evaluate_batches, final_validation
from .metrics import METRICS_VERSION, MetricsLogger, NullLogger
from .optim import build_scheduler
from .precision import Precision, resolve_precision, resolve_threads
from .step import StepBackend, TorchStep
from .sums import TRAIN_FIELDS, Sums

__all__ = ["Trainer", "TrainingDiverged", "evaluate_batches", "resolve_data_dir"]


@dataclass
class _Window:
    """Sums over the training steps since the last ``train`` log record. The loss sums stay where
    the model runs (``sums``: this rank's MLM loss, NSP loss and correct predictions by name, summed
    over micro-batches and steps) and are read once, at the log interval: no host sync per micro-batch.
    ``tokens`` counts every position of the batches (padding included), ``real_tokens`` the positions
    the attention mask keeps."""

    steps: int = 0
    masked: int = 0
    grad_norm: float = 0.0
    seconds: float = 0.0
    tokens: int = 0
    real_tokens: int = 0
    sums: Sums | None = None

    def add(self, sums: Sums, **values) -> None:
        if self.sums is None:
            self.sums = sums.clone()
        else:
            self.sums += sums
        for key, value in values.items():
            setattr(self, key, getattr(self, key) + value)

    def state_dict(self) -> dict:
        state = {k: v for k, v in vars(self).items() if k != "sums"}
        state["sums"] = None if self.sums is None else self.sums.state_dict()
        return state

    @classmethod
    def from_state(cls, state: dict, divisor: int) -> "_Window":
        state = dict(state)
        if "loss" in state:  # a checkpoint of an older version held the averaged losses
            state = {"sums": [state["mlm_loss"] * divisor, state["nsp_loss"] * divisor, float(state["correct"])],
                     **{k: state[k] for k in ("steps", "masked", "grad_norm", "seconds", "tokens")}}
        sums = state.pop("sums")
        return cls(**state, sums=None if sums is None else Sums.from_state(sums, TRAIN_FIELDS))


class TrainingDiverged(RuntimeError):
    """``training.max_skipped_steps`` optimizer steps in a row had non-finite gradients."""


@dataclass
class _Counters:
    skipped_steps: int = 0
    skipped_updates: int = 0
    pattern_updates: int = 0
    train_seconds: float = 0.0
    train_tokens: int = 0
    train_real_tokens: int = 0  # positions the attention mask keeps (train_tokens less padding)
    last_train_loss: float = float("nan")
    wall_seconds: float = 0.0
    high_prg_updates: int = 0  # consecutive updates with mean pruned_recently_grown > PRG_WARN
    skipped_in_a_row: int = 0  # consecutive optimizer steps skipped for non-finite gradients
    prg_warned: bool = False
    machines: list = field(default_factory=list)  # every machine kind (machine_key) that trained the run
    init_from: dict | None = None  # training.init_from: what was loaded (source, step, pattern, positions)


class Trainer:
    """Pre-trains ``SparseBertForPreTraining`` as ``config`` says, writing into ``run_dir``."""

    def __init__(self, config: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 device: str | torch.device | None = None, tensorboard: bool = True,
                 dist: DistContext = DistContext(), backend: StepBackend | None = None,
                 threads: int | None = None) -> None:
        self.config = config
        self.run = RunDir(run_dir)
        self.run_dir = self.run.path
        self.dist = dist
        self.backend = backend if backend is not None else TorchStep()
        self.progress = progress and dist.is_main
        self.device = torch.device(device) if device else dist.device()
        self.precision: Precision = resolve_precision(config.training.precision, self.device)
        self.threads, threads_from = resolve_threads(config.training.threads, threads)
        torch.set_num_threads(self.threads)  # torch's CPU ops and the CPU kernels (they ask torch)
        self.threads_line = f"CPU threads: {self.threads} ({threads_from})"
        t = config.training
        self.total_steps = t.steps
        self.accumulation = config.accumulation_steps(dist.world_size)

        vocab_size = self._build_data(config, dist, progress)
        init_record = self._build_model(config, dist, resume, vocab_size)
        self._init_state(config, dist, init_record)

        resume_step = None
        if resume:
            resume_step = self._resume()
        self.metrics = (MetricsLogger(self.run_dir, resume_step=resume_step, tensorboard=tensorboard)
                        if dist.is_main else NullLogger())
        # Losses differ between machines (precision: auto, kernels, rounding): a run records each kind
        # that trained it, and reports pair runs of one machine and precision only.
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.machine = machine_key(self.device.type, gpu)
        if self.machine not in self.counters.machines:
            self.counters.machines.append(self.machine)
        self.backend.attach(self)

    def _build_data(self, config: RunConfig, dist: DistContext, progress: bool) -> int:
        """The prepared data (prepared first where it is the embedded corpus), the training batches and
        the validation set; returns the vocabulary size."""
        self.data_dir = resolve_data_dir(config, progress)
        self.data_manifest_sha256 = file_sha256(self.data_dir / "manifest.json")  # recorded in checkpoints
        self.static_masks = uses_static_masks(config, self.device)
        loader = build_loader(config, self.data_dir, dist, self.device, self.static_masks)
        self.batches, self._host_transform = loader.batches, loader.host_transform
        self.validation, self.validation_sequences = build_validation(config, self.data_dir, dist, self.static_masks)
        self._local_validation_sequences = sum(b["input_ids"].shape[0] for b in self.validation)
        return loader.train_set.vocab_size

    def _build_model(self, config: RunConfig, dist: DistContext, resume: bool, vocab_size: int):
        """The model (initialised from ``training.init_from`` on a new run), compiled where asked, its
        optimizer, schedules, pattern updater and kernel choices; returns the init-from record."""
        t = config.training
        self.model, self.forward_model = build_model(config, vocab_size, self.device, dist)
        init_record = None
        if t.init_from and not resume:  # a resumed run's checkpoint holds its weights
            init_record = initialize_model(config, self.model, self.data_dir)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
            torch.backends.cudnn.allow_tf32 = t.tf32
        # torch.compile: the training forward (DDP-wrapped where distributed) and the eval forward.
        # Steps that record RigL's dense gradient (hooks) run eagerly instead of compiling a variant.
        if t.compile:
            ops.preload()  # dynamo traces the backend choice as a dict lookup, not an import (no graph break)
        self.compiled_model = torch.compile(self.forward_model) if t.compile else self.forward_model
        self.compiled_eval = torch.compile(self.model) if t.compile else self.model
        self.optimizer = self.backend.make_optimizer(self)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.scaler = self.precision.grad_scaler(config.optimizer.loss_scale)
        self.schedule = config.update_schedule()
        self.updater = build_pattern_updater(config, self.model, self.optimizer, self.schedule, dist)
        self.sparse_layers = sparse_weights(self.model)
        # What runs the sparse layers (the backend, or the reference op where it does not apply).
        self.kernel_decisions = self._tune_kernels(resume)  # and the attention's
        layer_decisions = [d for d in self.kernel_decisions if d.kind.baseline == ops.DENSE_LABEL]
        self.kernel_line = (ops.kernel_line(config, self.device, self.precision.dtype, layer_decisions)
                            if self.sparse_layers else None)
        self.attention_line = attention_line(self.model, self.kernel_decisions)
        return init_record

    def _init_state(self, config: RunConfig, dist: DistContext, init_record) -> None:
        """The counters and the loss window of a run at step 0."""
        self.freezer = build_freezer(config, self.model)
        self.step = 0
        self.window = _Window()
        self._loss_divisor = self.accumulation * dist.world_size  # summed micro-batch means -> a mean
        self._last_sums: Sums | None = None  # the latest step's loss sums, on the device
        self.counters = _Counters(init_from=init_record)
        self._stop_requested = False
        self._last_step_finite = True
        self._last_lr = float("nan")  # the learning rate of the latest step
        self._last_prg = float("nan")  # mean pruned_recently_grown of the latest pattern update
        self._wall_start: float | None = None  # while train() runs: when it (or the final part) started

    def _tune_kernels(self, resume: bool) -> list:
        """backend auto on a CPU: what runs each sparse layer kind, measured (ops.autotune) or, on a
        resume on the same CPU, as the run recorded in kernels.json (the same kernels compute the same
        numbers); the decisions are recorded there for the next resume."""
        from ..ops import autotune

        if not autotune.enabled() or self.device.type != "cpu" or self.config.backend == "ipu":
            # the IPU's graph is compiled from the host model: nothing there is timed on the host
            choose_attention(self.model, self.config.model.attention, self.device, self.precision.dtype, 1, 1,
                             measure=False)
            return []
        recorded = autotune.read_record(self.run.kernels_path) if resume else None
        if recorded is not None:
            if recorded["identity"]["cpu"] == autotune.identity()["cpu"]:
                autotune.TUNER.adopt(recorded["decisions"])
            elif self.dist.is_main:
                print(f"note: this run's sparse kernels were chosen on {recorded['identity']['cpu']}; "
                      "measuring again on this CPU", file=sys.stderr)
        decisions = self._decide() if self.dist.is_main else []
        if self.dist.enabled:  # rank 0 measures alone (ranks timing at once would time each other's load)
            entries = self.dist.all_gather_object([d.to_dict() for d in decisions])[0]
            if not self.dist.is_main:
                autotune.TUNER.adopt(entries)
                decisions = self._decide()
        if decisions and self.dist.is_main:
            autotune.write_record(self.run.kernels_path, decisions)
        return decisions

    def _decide(self) -> list:
        """Tune the sparse layers and the attention (pinning the choices on the model); the decisions."""
        c = self.config
        decisions = ops.tune_layers([layer for _, layer in self.sparse_layers], self.device, self.precision.dtype,
                                    c.micro_batch_size * c.data.seq_len, self.threads, progress=self.progress)
        attention = choose_attention(self.model, c.model.attention, self.device, self.precision.dtype,
                                     c.micro_batch_size, c.data.seq_len, self.threads, self.progress)
        return decisions + ([attention] if attention is not None else [])

    def stateful(self) -> dict:
        """Every part whose ``state_dict`` a checkpoint holds, by its key in the checkpoint (None: the
        run has no such part), in the order they are restored."""
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
                "updater": self.updater, "freezer": self.freezer, "data": self.batches}

    # ==================================================================== the loop
    def train(self, stop_at: int | None = None) -> dict | None:
        """Train to the end (returns the summary), or until ``stop_at`` steps / a signal
        (writes a checkpoint and returns None)."""
        self._wall_start = time.perf_counter()
        if self.dist.is_main:
            print("; ".join(filter(None, [self.kernel_line, self.attention_line, self.threads_line,
                                          self.config.bias_correction_line()])), file=sys.stderr)
        warning = self.config.schedule_warning()
        if warning and self.dist.is_main and self.step == 0:
            print(f"warning: {warning}", file=sys.stderr)
        init = self.counters.init_from
        if init and self.dist.is_main and self.step == 0:
            print(f"starting from {init['path']} ({init['kind']}{'' if init['step'] is None else ', step %d' % init['step']}"
                  f"): pattern {init['pattern'] or '-'}, position embeddings {init['positions'] or 'as saved'}"
                  + (f", freshly initialised: {', '.join(init['fresh'])}" if init["fresh"] else ""), file=sys.stderr)
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not self.progress, desc=self.config.name or "train")
        try:
            with self._signals_to_checkpoint():
                while self.step < self.total_steps:
                    end = self._phase_end(self.step, stop_at)
                    self._run_phase(end, bar)
                    self._phase_boundary(bar)
                    self._stop_requested = self.dist.any(self._stop_requested)
                    if self._stop_requested or (stop_at is not None and self.step >= stop_at):
                        self.save_checkpoint()
                        return None
                bar.close()
                self._count_wall_time()
                return self._finish()  # a signal now waits until the outputs are written (a second one stops)
        finally:
            bar.close()
            self._count_wall_time()

    def _count_wall_time(self, restart: bool = False) -> None:
        """Add the time since ``train`` (or the final validation) started to ``wall_seconds``;
        ``restart``: go on counting from now (a checkpoint records the wall time so far, so that a
        resumed run's ``wall_time_s`` covers every process that trained it)."""
        if self._wall_start is not None:
            now = time.perf_counter()
            self.counters.wall_seconds += now - self._wall_start
            self._wall_start = now if restart else None

    def _phase_end(self, step: int, stop_at: int | None) -> int:
        """The step at which the phase starting after ``step`` ends."""
        t = self.config.training
        ends = [self.total_steps, _next_multiple(step, t.validate_every), _next_multiple(step, t.checkpoint_every)]
        next_update = self.schedule.next_update_step(step) if self.config.sparsity.mode == "dynamic" else None
        if next_update is not None:
            ends.append(next_update)
        if stop_at is not None and stop_at > step:
            ends.append(stop_at)
        return min(ends)

    def _run_phase(self, end: int, bar) -> None:
        while self.step < end:
            self._stop_requested = self.dist.any(self._stop_requested)  # every rank stops after the same step
            if self._stop_requested:
                break
            self.train_step(self.step + 1)
            bar.update(1)
            if self.step % self.config.training.log_every == 0 or self.step == self.total_steps:
                self._log_train(bar)

    def _phase_boundary(self, bar=None) -> None:
        step = self.step
        t = self.config.training
        # Validation sees the model the phase trained, before an update prunes it.
        if step % t.validate_every == 0 and step < self.total_steps:
            self.evaluate()
        if self.updater is not None and self.updater.is_update_step(step):
            if self._last_step_finite:
                stats = self.update_pattern(step)
                check_patterns_consistent(self.dist, self.sparse_layers, step)
                self.counters.pattern_updates += 1
                self.metrics.log("update", step, **_update_record(stats))
                self._watch_regrowth(stats, bar)
            else:
                self.counters.skipped_updates += 1
                self.metrics.log("skip", step, what="pattern_update", reason="non-finite gradients")
        if step % t.checkpoint_every == 0 and step < self.total_steps:
            self.save_checkpoint()

    def _watch_regrowth(self, stats, bar) -> None:
        """Show pruned_recently_grown; warn once when it stays above PRG_WARN (regrown blocks never mature)."""
        prg = stats.mean_pruned_recently_grown
        if not math.isnan(prg):
            self._last_prg = prg  # shown beside the loss in the progress bar
        has_bar = bar is not None and not bar.disable
        if self.dist.is_main and not has_bar:  # logs without a bar (sweeps) get a line
            print(f"step {stats.step}: pattern update {stats.update_index + 1}/{len(self.schedule)}, "
                  f"pr(t) {stats.pruning_ratio:.3f}, {stats.pruned} blocks pruned, pruned_recently_grown "
                  f"{'-' if math.isnan(prg) else f'{prg:.2f}'}, explored DOF {stats.mean_explored_dof:.3f}",
                  file=sys.stderr)
        high = not math.isnan(prg) and prg > PRG_WARN
        self.counters.high_prg_updates = self.counters.high_prg_updates + 1 if high else 0
        if self.counters.high_prg_updates == 2 and not self.counters.prg_warned:
            self.counters.prg_warned = True
            message = (f"warning: at steps {stats.step} and the update before, {prg:.0%} of the pruned blocks had been "
                       f"grown at the previous update (above {PRG_WARN:.0%}): regrown blocks are pruned before they "
                       "grow; use longer segments (sparsity.update_every) or a lower sparsity.pruning_ratio")
            self.metrics.log("warning", stats.step, what="pruned_recently_grown", value=prg, message=message)
            if self.dist.is_main:
                (tqdm.write if has_bar else print)(message, file=sys.stderr)

    # ================================================================ one step
    def update_pattern(self, step: int):
        """The scheduled pattern update after step ``step`` (the backend moves its state)."""
        return self.backend.update_pattern(self, step)

    def train_step(self, step: int) -> None:
        """Optimizer step number ``step`` on the backend, then its bookkeeping: what the loop runs
        between phase boundaries (and what ``bench train`` times)."""
        started = time.perf_counter()
        result = self.backend.step(self, step)
        self.end_step(step, finite=result.finite, grad_norm=result.grad_norm, lr=result.lr, sums=result.sums,
                      masked=result.masked, tokens=result.tokens, real_tokens=result.real_tokens,
                      seconds=time.perf_counter() - started)

    def end_step(self, step: int, *, finite: bool, grad_norm: float, lr: float, sums: Sums, masked: int,
                 tokens: int, real_tokens: int, seconds: float) -> None:
        """The bookkeeping of optimizer step ``step``, the same for every backend: the skip record and
        the non-finite-steps-in-a-row count with its divergence stop, time and token counters, and the
        log window. ``tokens`` and ``real_tokens`` are global (all ranks), ``sums`` and ``masked`` this
        rank's; ``grad_norm`` is NaN where the backend does not report it."""
        self.step = step
        self._last_lr = lr
        self._last_step_finite = finite
        if not finite:
            self.counters.skipped_steps += 1
            self.counters.skipped_in_a_row += 1
            if self.updater is not None:
                self.updater.discard_dense_grads()
            self.metrics_log_skip(step, grad_norm)
            self._check_divergence(step)
        else:
            self.counters.skipped_in_a_row = 0
        self.counters.train_seconds += seconds
        self.counters.train_tokens += tokens
        self.counters.train_real_tokens += real_tokens
        self._last_sums = sums
        self.window.add(sums, steps=1, masked=masked, grad_norm=grad_norm if finite else 0.0, seconds=seconds,
                        tokens=tokens, real_tokens=real_tokens)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next training micro-batch of this rank, on the host."""
        batch = next(self.batches)
        return self._host_transform(batch) if self._host_transform is not None else batch

    def _read_sums(self, sums: Sums, **host: float) -> dict[str, float]:
        """``sums`` and the ``host`` counts summed over ranks, in one read (a host sync)."""
        return sums.read(self.dist.all_reduce_sum, **host)

    def _read_last_loss(self) -> None:
        """``counters.last_train_loss`` from the latest step's sums (read when a checkpoint or the summary needs it)."""
        if self._last_sums is not None:
            read = self._read_sums(self._last_sums)
            self.counters.last_train_loss = (read["mlm_loss"] + read["nsp_loss"]) / self._loss_divisor
            self._last_sums = None

    def _check_divergence(self, step: int) -> None:
        """Stop a run whose every step is skipped (NaN weights, a learning rate far too high)."""
        limit, run = self.config.training.max_skipped_steps, self.counters.skipped_in_a_row
        if not limit or run < limit:
            return
        found = latest_checkpoint(self.run_dir)
        self.metrics.log("diverged", step, skipped_in_a_row=run)
        self.metrics.close()
        where = (f"the last checkpoint is {found[1]} (step {found[0]})" if found else "no checkpoint was written")
        raise TrainingDiverged(
            f"training diverged: the {run} optimizer steps {step - run + 1}..{step} all had non-finite gradients "
            f"and were skipped; {where}; lower training.learning_rate (or raise training.max_skipped_steps)")

    def metrics_log_skip(self, step: int, grad_norm: float) -> None:
        self.metrics.log("skip", step, what="optimizer_step", reason="non-finite gradients", grad_norm=grad_norm)

    def _log_train(self, bar) -> None:
        w = self.window
        if w.steps == 0:
            return
        read = self._read_sums(w.sums, masked=w.masked)  # the window's one read
        per_step = self._loss_divisor * w.steps  # the sums add one mean per micro-batch and rank
        mlm, nsp = read["mlm_loss"] / per_step, read["nsp_loss"] / per_step
        record = self.metrics.log(
            "train", self.step,
            loss=mlm + nsp, mlm_loss=mlm, nsp_loss=nsp,
            mlm_accuracy=read["mlm_correct"] / max(read["masked"], 1), grad_norm=w.grad_norm / w.steps,
            learning_rate=self._last_lr,
            tokens_per_second=w.tokens / max(w.seconds, 1e-9),
            real_tokens_per_second=w.real_tokens / max(w.seconds, 1e-9), steps=w.steps, seconds=w.seconds,
        )
        if self.dist.is_main and (bar is None or bar.disable):  # logs without a bar (sweeps) get a line
            print(f"step {self.step}/{self.total_steps}: loss {record['loss']:.4f} (mlm {mlm:.4f}, nsp {nsp:.4f}), "
                  f"mlm accuracy {record['mlm_accuracy']:.4f}, lr {self._last_lr:.3g}, "
                  f"{record['tokens_per_second']:,.0f} tokens/s", file=sys.stderr)
        extra = {} if math.isnan(self._last_prg) else {"prg": f"{self._last_prg:.2f}"}
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:,.0f}", **extra,
                        refresh=False)
        self.window = _Window()

    # ============================================================== validation
    def evaluate(self, final: bool = False) -> dict:
        """MLM loss, NSP loss and MLM accuracy on the fixed validation set (``evaluate_batches``), on
        the host model once the backend has made it current."""
        return self.backend.evaluate(self, final, self._evaluate_host)

    def _evaluate_host(self, final: bool) -> dict:
        self.model.eval()
        if final and not self.progress and self.dist.is_main:
            print(f"final validation: {self.validation_sequences:,} sequences", file=sys.stderr)
        bar = tqdm(total=self._local_validation_sequences, unit="seq", dynamic_ncols=True, leave=final,
                   disable=not self.progress,
                   desc="final validation" if final else f"validation @ {self.step}")
        result = evaluate_batches(self.compiled_eval, self.validation, device=self.device,
                                  autocast=self.precision.autocast, reduce=self.dist.all_reduce_sum,
                                  nsp=self.config.model.nsp, on_batch=bar.update)
        bar.close()
        self.metrics.log("val", self.step, **result)
        return result

    # ============================================================ checkpoints
    def _state(self) -> dict:
        self._read_last_loss()
        self._count_wall_time(restart=True)  # the checkpoint holds the wall time so far
        return {
            "config": self.config.to_dict(),
            **{key: part.state_dict() if part else None for key, part in self.stateful().items()},
            "rng": self.dist.all_gather_object(rng_state()),  # one entry per rank
            "window": self.window.state_dict(),
            "counters": vars(self.counters).copy(),
            "last_step_finite": self._last_step_finite,
            "last_lr": self._last_lr,
            "data_manifest_sha256": self.data_manifest_sha256,
        }

    def save_checkpoint(self) -> Path | None:
        """Every rank contributes its RNG state; rank 0 writes."""
        self.backend.before_checkpoint(self)
        state = self._state()
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.run_dir, self.step, self.model, state, self.config.training.keep_checkpoints)
        self.dist.barrier()
        return path

    def _resume(self) -> int:
        path, state = self._load_latest_intact_checkpoint()
        recorded = state.get("data_manifest_sha256")  # absent in checkpoints of older versions
        if recorded is not None and recorded != self.data_manifest_sha256:
            raise CheckpointError(f"the data in {self.data_dir} changed since {path.name} was written (its "
                                  "manifest.json differs): resume on the data the run started with, or start a "
                                  "new run")
        try:
            for key, part in self.stateful().items():
                if part and state[key] is not None:
                    part.load_state_dict(state[key])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this run: {first_line(exc)}") from None
        for _, layer in self.sparse_layers:
            layer.pattern_version += 1  # kernels must rebuild their metadata for the loaded patterns
        if len(state["rng"]) != self.dist.world_size:
            raise CheckpointError(f"checkpoint {path} was written by {len(state['rng'])} processes, this run has "
                                  f"{self.dist.world_size}; resume with the same number of processes")
        set_rng_state(state["rng"][self.dist.rank])
        self.window = _Window.from_state(state["window"], self._loss_divisor)
        if self.window.sums is not None:
            self.window.sums = self.window.sums.to(self.device)
        self.counters = _Counters(**state["counters"])
        self._last_step_finite = bool(state["last_step_finite"])
        self._last_lr = float(state["last_lr"])
        self.step = int(state["step"])
        return self.step

    def _load_latest_intact_checkpoint(self) -> tuple[Path, dict]:
        """The newest checkpoint that loads; a damaged one (a crash, a full disk) is passed over with
        a warning for the one before it. A checkpoint of another config is an error, not passed over."""
        found = list_checkpoints(self.run_dir)
        if not found:
            raise CheckpointError(f"{self.run_dir} has no checkpoint to resume from (checkpoints/step_*)")
        damaged = []
        for _, path in reversed(found):
            try:
                state = load_checkpoint(path, self.model, config=self.config.to_dict())
            except CheckpointDamaged as exc:
                damaged.append(str(exc))
                continue
            if damaged and self.dist.is_main:
                for message in damaged:
                    print(f"warning: {message}; resuming from the older {path.name}", file=sys.stderr)
            return path, state
        raise CheckpointError(f"no intact checkpoint in {self.run_dir}: {damaged[0]}"
                              + (f" (and {len(damaged) - 1} older)" if len(damaged) > 1 else ""))

    # ================================================================== finish
    def _finish(self) -> dict:
        self._wall_start = time.perf_counter()  # the final validation and checkpoint count as wall time
        val = self.evaluate(final=True)
        self.save_checkpoint()
        self._count_wall_time()
        summary = self.summary(val)
        if self.dist.is_main:
            from ..data.tokenizer import copy_tokenizer

            try:
                self.model.save(self.run.model_dir)
                if self.updater is not None:
                    self.updater.exploration.save(self.run.explored_path)
                copy_tokenizer(self.data_dir / "tokenizer", self.run.tokenizer_dir)
                self.run.write_summary(_json(summary) + "\n")
            except OSError as exc:  # summary.json comes last: without it the run resumes and writes again
                raise CheckpointError(f"{exc}; the final checkpoint (step {self.step}) is in place: free space and "
                                      f"write the outputs with python run_pretraining.py --resume {self.run_dir}"
                                      ) from None
        self.close()
        self.dist.barrier()
        return summary

    def summary(self, val: dict) -> dict:
        self._read_last_loss()
        c = self.counters
        flops = self.config.run_flops(self.model.active_encoder_weights())
        summary = {
            "config": self.config.name,
            "metrics_version": METRICS_VERSION,  # report flags runs without it
            "steps": self.step,
            **final_validation(val),
            "final_train_loss": c.last_train_loss,
            "non_embedding_flops_per_sequence": flops["non_embedding_flops_per_sequence"],
            "non_embedding_nonzero_params": flops["non_embedding_nonzero_params"],
            "total_non_embedding_flops": flops["total_training_flops"],
            "sparsity": self.config.effective_sparsity,
            "block_size": self.config.sparsity.block_size,
            "learning_rate": self.config.learning_rate,
            "pattern_updates": c.pattern_updates,
            "skipped_steps": c.skipped_steps,
            "skipped_updates": c.skipped_updates,
            "tokens_per_second": c.train_tokens / max(c.train_seconds, 1e-9),
            "real_tokens_per_second": c.train_real_tokens / max(c.train_seconds, 1e-9),
            "train_time_s": c.train_seconds,
            "wall_time_s": c.wall_seconds,
            "precision": self.precision.name,
            "device": str(self.device),
            "machine": self.machine if len(c.machines) <= 1 else "several",
            "machines": list(c.machines),
            "cpu": cpu_identity()["model"],
            "cpu_isa": cpu_identity()["isa"],
            "sparse_kernels": self.kernel_line,
            "kernel_choices": [d.to_dict() for d in self.kernel_decisions],  # auto: measured per kind
            "attention": self.attention_line,
            "threads": self.threads,
            "world_size": self.dist.world_size,
            "global_batch_size": self.config.training.batch_size,
            "vocab_size": self.model.config.vocab_size,
            "init_from": c.init_from,
        }
        if self.updater is not None:
            summary["mean_explored_dof"] = self.updater.exploration.mean_explored_dof()
        return summary

    def close(self) -> None:
        self.metrics.close()
        if isinstance(self.batches, (Prefetcher, WorkerLoader)):
            self.batches.close()  # stop the thread or the processes building batches ahead
        self.backend.close(self)

    # ================================================================ signals
    def _signals_to_checkpoint(self):
        """SIGINT/SIGTERM finish the current step, write a checkpoint and stop; once the last step is
        done (final validation and writes) a signal waits for the outputs. A second signal stops at once."""
        def request_stop(signum, frame):
            if self._stop_requested:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_requested = True

        return signals.handling(request_stop)

    @property
    def stopped_by_signal(self) -> bool:
        return self._stop_requested


@torch.no_grad()
def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


def _update_record(stats) -> dict:
    record = stats.as_dict()
    record.pop("step", None)
    return record


def _json(value) -> str:
    import json

    from .metrics import json_safe

    return json.dumps(json_safe(value), indent=2, allow_nan=False)
