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
from pathlib import Path

import torch
from tqdm import tqdm

from .. import ops, signals
from ..config import RunConfig
from ..data.ahead import Prefetcher, WorkerLoader
from ..data.prepare import located_data
from ..data.tokenizer import file_sha256
from ..machine import machine_key
from ..model.attention import attention_line
from ..rundir import RunDir
from ..sparse.layer import sparse_weights
from ..sparse.updater import PRG_WARN
from .build import (build_freezer, build_loader, build_model, build_pattern_updater, build_validation,
                    choose_kernels, initialize_model, schedule_warning, update_schedule,
                    uses_static_masks)
from .checkpoint import CheckpointError, CheckpointManager, Expected, latest_checkpoint
from .distributed import DistContext, check_patterns_consistent
from .evaluate import evaluate_batches
from .init_from import init_line
from .metrics import MetricsLogger, NullLogger
from .optim import build_scheduler
from .precision import Precision, resolve_threads
from .state import Counters, StepContext, TrainState, Window
from .step import StepBackend, TorchStep
from .summary import run_summary
from .sums import Sums

__all__ = ["Trainer", "TrainingDiverged", "evaluate_batches"]


class TrainingDiverged(RuntimeError):
    """``training.max_skipped_steps`` optimizer steps in a row had non-finite gradients."""


class Trainer:
    """Pre-trains ``SparseBertForPreTraining`` as ``config`` says, writing into ``run_dir``: builds the
    run's :class:`TrainState` and advances it, each step on the ``backend`` (a ``StepBackend``)."""

    def __init__(self, config: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 device: str | torch.device | None = None, tensorboard: bool = True,
                 dist: DistContext = DistContext(), backend: StepBackend | None = None,
                 threads: int | None = None, data_dir: str | Path | None = None) -> None:
        self.config = config
        self.run = RunDir(run_dir)
        self.run_dir = self.run.path
        self.dist = dist
        self.backend = backend if backend is not None else TorchStep()
        self.progress = progress and dist.is_main
        self.device = torch.device(device) if device else dist.device()
        self.precision: Precision = self.backend.host_precision(config, self.device)
        self.threads, threads_from = resolve_threads(config.training.threads, threads)
        torch.set_num_threads(self.threads)  # torch's CPU ops and the CPU kernels (they ask torch)
        self.threads_line = f"CPU threads: {self.threads} ({threads_from})"
        self.total_steps = config.training.steps
        self.accumulation = config.accumulation_steps(dist.world_size)

        loader = self._build_data(config, dist, data_dir)
        self.state = self._build_state(config, dist, resume, loader)
        self.context = StepContext(self.state, config, self.device, self.precision, dist, self.accumulation)
        self.checkpoints = CheckpointManager(self.run_dir, self.model, config.to_dict(), {
            "data_manifest_sha256": Expected(file_sha256(self.data_dir / "manifest.json"),
                                             f"the data in {self.data_dir} changed since {{checkpoint}} was written "
                                             "(its manifest.json differs): resume on the data the run started with, "
                                             "or start a new run"),
            **self.state.checkpoint_parts(dist, self.device)}, keep=config.training.keep_checkpoints, dist=dist)
        self._stop_requested = False
        self._last_prg = float("nan")  # mean pruned_recently_grown of the latest pattern update
        self._wall_start: float | None = None  # while train() runs: when it (or the final part) started
        resume_step = None
        if resume:
            resume_step, _ = self.checkpoints.restore()
            self.state.step = resume_step
            for _, layer in self.state.sparse_layers:
                layer.pattern_changed()  # kernels rebuild their metadata for the loaded patterns
        self.metrics = (MetricsLogger(self.run_dir, resume_step=resume_step, tensorboard=tensorboard)
                        if dist.is_main else NullLogger())
        # Losses differ between machines (precision: auto, kernels, rounding): a run records each kind
        # that trained it, and reports pair runs of one machine and precision only.
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.machine = machine_key(self.device.type, gpu)
        if self.machine not in self.state.counters.machines:
            self.state.counters.machines.append(self.machine)
        self.backend.attach(self.context)

    def _build_data(self, config: RunConfig, dist: DistContext, data_dir: str | Path | None):
        """The training loader and the validation set of the prepared data (``data_dir``, else where the
        config's data section says: the command prepared it, ``data.prepare.ready_data``)."""
        self.data_dir = Path(data_dir) if data_dir is not None else located_data(config.data)
        self.static_masks = uses_static_masks(config, self.device)
        loader = build_loader(config, self.data_dir, dist, self.device, self.static_masks)
        self.validation, self.validation_sequences = build_validation(
            config, self.data_dir, dist, self.static_masks, shard=self.backend.shards_validation)
        self._local_validation_sequences = sum(b["input_ids"].shape[0] for b in self.validation)
        return loader

    def _build_state(self, config: RunConfig, dist: DistContext, resume: bool, loader) -> TrainState:
        """The model (initialised from ``training.init_from`` on a new run), compiled where asked, its
        optimizer, schedules, pattern updater, freezer and kernel choices, at step 0."""
        t = config.training
        model, forward_model = build_model(config, loader.train_set.vocab_size, self.device, dist)
        init_record = None
        if t.init_from and not resume:  # a resumed run's checkpoint holds its weights
            init_record = initialize_model(config, model, self.data_dir)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
            torch.backends.cudnn.allow_tf32 = t.tf32
        # torch.compile: the training forward (DDP-wrapped where distributed) and the eval forward.
        # Steps that record RigL's dense gradient (hooks) run eagerly instead of compiling a variant.
        if t.compile:
            ops.preload()  # dynamo traces the backend choice as a dict lookup, not an import (no graph break)
        optimizer = self.backend.make_optimizer(model, config)
        schedule = update_schedule(config)
        sparse_layers = sparse_weights(model)
        # What runs the sparse layers (the backend, or the reference op where it does not apply).
        self.kernel_decisions = choose_kernels(config, model, sparse_layers, self.device, self.precision.dtype,
                                               self.threads, dist, self.run.kernels_path, resume, self.progress)
        layer_decisions = [d for d in self.kernel_decisions if d.kind.baseline == ops.DENSE_LABEL]
        self.kernel_line = (ops.kernel_line(config, self.device, self.precision.dtype, layer_decisions)
                            if sparse_layers else None)
        self.attention_line = attention_line(model, self.kernel_decisions)
        return TrainState(
            model=model, forward_model=forward_model,
            compiled_model=torch.compile(forward_model) if t.compile else forward_model,
            compiled_eval=torch.compile(model) if t.compile else model,
            optimizer=optimizer, scheduler=build_scheduler(optimizer, config),
            scaler=self.precision.grad_scaler(config.optimizer.loss_scale), schedule=schedule,
            updater=build_pattern_updater(config, model, optimizer, schedule, dist),
            freezer=build_freezer(config, model), sparse_layers=sparse_layers,
            batches=loader.batches, host_transform=loader.host_transform,
            loss_divisor=self.backend.loss_divisor(self.accumulation, dist.world_size),
            counters=Counters(init_from=init_record))

    # the parts most callers read
    model = property(lambda self: self.state.model)
    step = property(lambda self: self.state.step)
    counters = property(lambda self: self.state.counters)
    updater = property(lambda self: self.state.updater)
    optimizer = property(lambda self: self.state.optimizer)

    # ==================================================================== the loop
    def train(self, stop_at: int | None = None) -> dict | None:
        """Train to the end (returns the summary), or until ``stop_at`` steps / a signal
        (writes a checkpoint and returns None)."""
        self._wall_start = time.perf_counter()
        if self.dist.is_main:
            print("; ".join(filter(None, [self.kernel_line, self.attention_line, self.threads_line,
                                          self.config.bias_correction_line()])), file=sys.stderr)
        warning = schedule_warning(self.config)
        if warning and self.dist.is_main and self.step == 0:
            print(f"warning: {warning}", file=sys.stderr)
        if self.counters.init_from and self.dist.is_main and self.step == 0:
            print(init_line(self.counters.init_from), file=sys.stderr)
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
        next_update = self.state.schedule.next_update_step(step) if self.config.sparsity.mode == "dynamic" else None
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
            if self.state.last_step_finite:
                stats = self.update_pattern(step)
                check_patterns_consistent(self.dist, self.state.sparse_layers, step)
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
            print(f"step {stats.step}: pattern update {stats.update_index + 1}/{len(self.state.schedule)}, "
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
        return self.backend.update_pattern(self.context, step)

    def train_step(self, step: int) -> None:
        """Optimizer step number ``step`` on the backend, then its bookkeeping, the same for every
        backend (``TrainState.record``; a non-finite step's skip record and the divergence stop): what
        the loop runs between phase boundaries (and what ``bench train`` times)."""
        started = time.perf_counter()
        result = self.backend.step(self.context, step)
        self.state.record(step, result, time.perf_counter() - started)
        if not result.finite:
            if self.updater is not None:
                self.updater.discard_dense_grads()
            self.metrics.log("skip", step, what="optimizer_step", reason="non-finite gradients",
                             grad_norm=result.grad_norm)
            self._check_divergence(step)

    def _read_sums(self, sums: Sums, **host: float) -> dict[str, float]:
        """``sums`` and the ``host`` counts summed over ranks, in one read (a host sync)."""
        return sums.read(self.dist.all_reduce_sum, **host)

    def _read_last_loss(self) -> None:
        """``counters.last_train_loss`` from the latest step's sums (read when a checkpoint or the summary needs it)."""
        if self.state.last_sums is not None:
            read = self._read_sums(self.state.last_sums)
            self.counters.last_train_loss = (read["mlm_loss"] + read["nsp_loss"]) / self.state.loss_divisor
            self.state.last_sums = None

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

    def _log_train(self, bar) -> None:
        w = self.state.window
        if w.steps == 0:
            return
        read = self._read_sums(w.sums, masked=w.masked)  # the window's one read
        per_step = self.state.loss_divisor * w.steps  # the sums add one mean per micro-batch and rank
        mlm, nsp = read["mlm_loss"] / per_step, read["nsp_loss"] / per_step
        record = self.metrics.log(
            "train", self.step,
            loss=mlm + nsp, mlm_loss=mlm, nsp_loss=nsp,
            mlm_accuracy=read["mlm_correct"] / max(read["masked"], 1), grad_norm=w.grad_norm / w.steps,
            learning_rate=self.state.last_lr,
            tokens_per_second=w.tokens / max(w.seconds, 1e-9),
            real_tokens_per_second=w.real_tokens / max(w.seconds, 1e-9), steps=w.steps, seconds=w.seconds,
        )
        if self.dist.is_main and (bar is None or bar.disable):  # logs without a bar (sweeps) get a line
            parts = f"mlm {mlm:.4f}, nsp {nsp:.4f}" if self.config.model.nsp else "MLM only"
            print(f"step {self.step}/{self.total_steps}: loss {record['loss']:.4f} ({parts}), "
                  f"mlm accuracy {record['mlm_accuracy']:.4f}, lr {self.state.last_lr:.3g}, "
                  f"{record['tokens_per_second']:,.0f} tokens/s", file=sys.stderr)
        extra = {} if math.isnan(self._last_prg) else {"prg": f"{self._last_prg:.2f}"}
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:,.0f}", **extra,
                        refresh=False)
        self.state.window = Window()

    # ============================================================== validation
    def evaluate(self, final: bool = False) -> dict:
        """MLM loss, NSP loss and MLM accuracy on the fixed validation set (``evaluate_batches``), on
        the host model once the backend has made it current."""
        return self.backend.evaluate(self.context, final, self._evaluate_host)

    def _evaluate_host(self, final: bool, model: torch.nn.Module | None = None) -> dict:
        """Validation on ``model`` (None: the run's model, compiled where asked)."""
        model = self.state.compiled_eval if model is None else model
        model.eval()
        if final and not self.progress and self.dist.is_main:
            print(f"final validation: {self.validation_sequences:,} sequences", file=sys.stderr)
        bar = tqdm(total=self._local_validation_sequences, unit="seq", dynamic_ncols=True, leave=final,
                   disable=not self.progress,
                   desc="final validation" if final else f"validation @ {self.step}")
        result = evaluate_batches(model, self.validation, device=self.device,
                                  autocast=self.precision.autocast, reduce=self.dist.all_reduce_sum,
                                  nsp=self.config.model.nsp, on_batch=bar.update)
        bar.close()
        self.metrics.log("val", self.step, **result)
        return result

    # ============================================================ checkpoints
    def save_checkpoint(self) -> Path | None:
        """A checkpoint of the run's every part (``checkpoints``, a ``CheckpointManager``); rank 0 writes."""
        self.backend.before_checkpoint(self.context)
        self._read_last_loss()
        self._count_wall_time(restart=True)  # the checkpoint holds the wall time so far
        return self.checkpoints.save(self.state.step)

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
        return run_summary(self.config, self.state, val, machine=self.machine, execution={
            "precision": self.precision.name, "device": str(self.device), "sparse_kernels": self.kernel_line,
            "kernel_choices": [d.to_dict() for d in self.kernel_decisions],  # auto: measured per kind
            "attention": self.attention_line, "threads": self.threads, "world_size": self.dist.world_size})

    def close(self) -> None:
        self.metrics.close()
        if isinstance(self.state.batches, (Prefetcher, WorkerLoader)):
            self.state.batches.close()  # stop the thread or the processes building batches ahead
        self.backend.close(self.context)

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
