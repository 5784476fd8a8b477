"""The fine-tuning loop: epochs over the training file, evaluation on the dev file(s) after each, a
checkpoint at each epoch's end (and every ``--checkpoint-every`` steps, and at a stop), resumed
bit-exact by ``finetune --resume OUTPUT``.

The pre-trained encoder (its ``SparseLinear`` layers and their kernels) goes into Hugging Face's
``BertForSequenceClassification`` in place of its dense ``bert``: HF's pooler (the run's own where it
has NSP), head and loss (cross-entropy over the classes, or MSE with one output for a regression);
the encoder stays sparse because a sparse layer stores only its active values. ``pattern: fixed``
trains those values on the pre-trained pattern; ``dynamic`` goes on pruning and regrowing it (the
run's DynSparse settings, random regrowth) at ``segments - 1`` evenly spaced steps. AdamW (BERT's
decay rule), linear warmup and decay, gradient clipping.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import signals
from ..config import ConfigError, FinetuneSettings, RunConfig
from ..data.tasks import TaskData, TaskError, check_labels, label_names, read_task, task_kind
from ..io import atomic_write_bytes
from ..rundir import RunDir
from .metrics import better, check_metric, classification_metrics, default_metric, regression_metrics

REQUEST = "finetune.json"
BEST = "best"


@dataclass
class Request:
    """What a fine-tune was asked (``OUTPUT/finetune.json``): ``--resume`` rebuilds it from this."""

    model: str
    train: str
    dev: list[str]
    output: str
    test: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    sparsity: float | None = None
    block_size: int | None = None
    settings: dict = field(default_factory=lambda: asdict(FinetuneSettings()))

    @classmethod
    def load(cls, output: str | Path) -> "Request":
        path = Path(output) / REQUEST
        if not path.is_file():
            raise ConfigError(f"--resume {output}: no {REQUEST} there; it is not a fine-tuning output directory")
        try:
            raw = json.loads(path.read_text())
            request = cls(**raw)
            FinetuneSettings(**request.settings)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is damaged ({exc}); start the fine-tune again in a new directory") from None
        request.output = str(Path(output))
        return request


class Finetuner:
    """Fine-tunes one pre-trained model on one task into ``request.output`` (see the module docstring)."""

    def __init__(self, request: Request, *, resume: bool = False, progress: bool = True,
                 device: str | None = None) -> None:
        from ..train.precision import resolve_precision
        from .source import load_pretrained

        self.request, self.progress = request, progress
        self.settings = s = FinetuneSettings(**request.settings).validate()
        self.output = Path(request.output)
        self._check_output(resume)
        self.train_set = read_task(request.train, request.text_columns, request.label_column)
        self.dev_sets = [read_task(p, self.train_set.columns, self.train_set.label_column) for p in request.dev]
        self.test_sets = [read_task(p, self.train_set.columns, labeled=False) for p in request.test]
        self.kind = task_kind(self.train_set) if s.task_type == "auto" else s.task_type
        self.labels = self._labels()
        self.metric = check_metric(s.metric or default_metric(self.kind), self.kind, len(self.labels) or 1)
        pretrained = load_pretrained(request.model, request.checkpoint, sparsity=request.sparsity,
                                     block_size=request.block_size)
        self.pretrained = pretrained
        self.run_config = pretrained.run_config or RunConfig()
        from ..data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(pretrained.tokenizer_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(self.run_config.training.precision if pretrained.run_config else "auto",
                                           self.device)
        torch.manual_seed(s.seed)  # the head (and a pooler the model lacks)
        self.model = self._classifier(pretrained.model).to(self.device)
        self.steps_per_epoch = math.ceil(len(self.train_set) / s.batch_size)
        self.total_steps = self.steps_per_epoch * s.epochs
        self.optimizer, self.scheduler = self._optimizer()
        self.scaler = self.precision.grad_scaler("dynamic")
        self.updater = self._updater()
        self.generator = torch.Generator().manual_seed(s.seed)
        self.step, self.epoch, self.position, self.order = 0, 1, 0, None
        self.window, self.history, self.best, self.updates, self.seconds = [], [], None, 0, 0.0
        self._stop, self.resumed, self.lock, self.metrics = False, resume, None, None
        self.dev_outputs = None  # predict's outputs on the dev files after the last epoch (this process's)

    # ------------------------------------------------------------------ set-up
    def _check_output(self, resume: bool) -> None:
        run = RunDir(self.output)
        if resume:
            if (self.output / "results.json").is_file():
                raise ConfigError(f"{self.output} has finished (results.json); nothing to resume")
            if not run.checkpoints():
                raise ConfigError(f"{self.output} has no checkpoint to resume from (it stopped before its first); "
                                  "start the fine-tune again in a new directory")
            return
        if self.output.exists() and any(self.output.iterdir()):
            if (self.output / REQUEST).is_file() and not (self.output / "results.json").is_file():
                if not run.checkpoints():
                    raise ConfigError(f"{self.output} holds a fine-tune that stopped before its first checkpoint; "
                                      "delete it or choose a new output directory (nothing was overwritten)")
                raise ConfigError(f"{self.output} holds a fine-tune that did not finish; continue it with python -m "
                                  f"ipu_app finetune --resume {self.output} (nothing was overwritten)")
            raise ConfigError(f"{self.output} is not empty; choose a new output directory (nothing was overwritten)")

    def _start(self) -> None:
        """Create the output directory, save the request and open the metrics (every check has passed)."""
        from ..train.metrics import MetricsLogger

        if not self.resumed:
            self.output.mkdir(parents=True, exist_ok=True)
        self.lock = RunDir(self.output).lock()
        if self.resumed:
            self._restore()
        else:
            atomic_write_bytes(self.output / REQUEST, (json.dumps(asdict(self.request), indent=2) + "\n").encode())
        self.metrics = MetricsLogger(self.output, resume_step=self.step if self.resumed else None)

    def _labels(self) -> list[str]:
        if self.kind == "regression":
            try:
                for split in (self.train_set, *self.dev_sets):
                    [float(label) for label in split.labels]
            except ValueError as exc:
                raise TaskError(f"--task-type regression needs numeric labels ({exc})") from None
            return []
        labels = label_names(self.train_set)
        if len(labels) < 2:
            raise TaskError(f"{self.train_set.path} has one label only ({labels[0]!r}): nothing to classify")
        for split in self.dev_sets:
            check_labels(split, labels)
        return labels

    def _classifier(self, pretrained):
        from transformers import BertForSequenceClassification

        hf_config = copy.deepcopy(pretrained.hf_config)
        if self.kind == "regression":
            hf_config.num_labels, hf_config.problem_type = 1, "regression"
        else:
            hf_config.num_labels = len(self.labels)
            hf_config.problem_type = "single_label_classification"
            hf_config.id2label = dict(enumerate(self.labels))
            hf_config.label2id = {name: i for i, name in enumerate(self.labels)}
        model = BertForSequenceClassification(hf_config)
        if pretrained.bert.pooler is None:  # pre-trained without NSP: HF's freshly initialised pooler
            pretrained.bert.pooler = model.bert.pooler
        model.bert = pretrained.bert  # the pre-trained encoder, sparse layers and all
        self.model_config = pretrained.config
        return model

    def _optimizer(self):
        from ..train.optim import adamw, warmup_decay

        s = self.settings
        per_slot = s.pattern == "dynamic" and self.run_config.bias_correction == "per_slot"  # a host optimizer
        optimizer = adamw(self.model, s.learning_rate, self.run_config.optimizer, weight_decay=s.weight_decay,
                          per_slot=per_slot)
        return optimizer, warmup_decay(optimizer, int(s.warmup_ratio * self.total_steps), self.total_steps)

    def _updater(self):
        from ..sparse.layer import sparse_weights
        from ..sparse.schedule import UpdateSchedule
        from ..sparse.updater import build_updater

        s = self.settings
        if s.pattern == "dynamic" and not sparse_weights(self.model):
            self._say("note: the model is dense; --pattern dynamic has nothing to update")
        if s.pattern != "dynamic" or not sparse_weights(self.model):
            return None
        if s.segments > self.total_steps:
            raise ConfigError(f"--segments {s.segments} is more than the {self.total_steps} fine-tuning steps")
        schedule = UpdateSchedule.evenly_spaced(self.total_steps, segments=s.segments)
        sp = self.run_config.sparsity
        return build_updater(self.model, self.optimizer, schedule, mode="dynamic",
                             pruning_ratio=sp.pruning_ratio if s.pruning_ratio is None else s.pruning_ratio,
                             pruning_schedule=sp.pruning_schedule, regrowth="random", block_metric=sp.block_metric,
                             seed=s.seed)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict | None:
        """Train to the end (returns the results) or until a signal (checkpoint written; None)."""
        try:
            self._start()
            return self._train()
        finally:
            if self.metrics is not None:
                self.metrics.close()
            if self.lock is not None:
                self.lock.release()

    def _train(self) -> dict | None:
        s = self.settings
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not self.progress, desc="finetune")
        what = f"{len(self.labels)} classes" if self.kind != "regression" else "regression"
        self._say(f"fine-tuning {self.pretrained.description} (step {self.pretrained.step}) on {self.train_set.path} "
                  f"({len(self.train_set):,} examples, {what}), {self.total_steps} steps, pattern {s.pattern}, "
                  f"{self.precision.name}" + (f"; resumed at step {self.step}" if self.step else ""))
        start = time.perf_counter() - self.seconds
        with signals.handling(self._request_stop):
            while self.epoch <= s.epochs:
                if self.order is None:
                    order = torch.randperm(len(self.train_set), generator=self.generator)
                    self.order, self.position = order.tolist(), 0
                while self.position < len(self.order):
                    self._train_step(self.order[self.position:self.position + s.batch_size])
                    bar.update(1)
                    if self.position < len(self.order) and self._stop:
                        return self._stopped(bar, start)
                    if self.position < len(self.order) and s.checkpoint_every and self.step % s.checkpoint_every == 0:
                        self._checkpoint(start)
                self._end_epoch()
                if self._stop and self.epoch <= s.epochs:
                    return self._stopped(bar, start)
                self._checkpoint(start)
            bar.close()
            return self._finish(time.perf_counter() - start)

    def _train_step(self, indices: list[int]) -> None:
        self.window.append(self._step(indices))
        self.position += len(indices)
        self.step += 1
        if self.updater is not None and self.updater.step(self.step) is not None:
            self.updates += 1
        if self.step % self.settings.log_every == 0 or self.position >= len(self.order):
            self.metrics.log("train", self.step, epoch=self.epoch, loss=float(np.mean(self.window)),
                             lr=self.scheduler.get_last_lr()[0])
            self.window = []

    def _end_epoch(self) -> None:
        self.dev_outputs = [self.predict(split) for split in self.dev_sets]
        results = [self.scores(split, outputs) for split, outputs in zip(self.dev_sets, self.dev_outputs)]
        record = {"epoch": self.epoch, "step": self.step, **results[0]}
        for split, extra in zip(self.dev_sets[1:], results[1:]):
            record.update({f"{split.path.stem}_{k}": v for k, v in extra.items()})
        self.history.append(record)
        self.metrics.log("dev", self.step, **{k: v for k, v in record.items() if k != "step"})
        self._say(f"epoch {self.epoch}/{self.settings.epochs}: dev " + ", ".join(
            f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "step")))
        if self.settings.save == "best" and better(self.metric, results[0][self.metric],
                                                   None if self.best is None else self.best[self.metric]):
            self.best = record
            self._save_weights(self.output / BEST)
        self.epoch += 1
        self.order = None

    def _step(self, indices) -> float:
        s = self.settings
        batch = self._batch(self.train_set, indices)
        targets = self._targets(self.train_set, indices)
        with self.precision.autocast():
            loss = self.model(**batch, labels=targets).loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _batch(self, split: TaskData, indices) -> dict:
        first = [split.texts[i][0] for i in indices]
        second = [split.texts[i][1] for i in indices] if len(split.columns) > 1 else None
        encoded = self.tokenizer(first, second, truncation=True, max_length=self.settings.max_seq_len, padding=True,
                                 return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items()}

    def _targets(self, split: TaskData, indices) -> torch.Tensor:
        if self.kind == "regression":
            return torch.tensor([float(split.labels[i]) for i in indices], device=self.device)
        return torch.tensor([self.model.config.label2id[split.labels[i]] for i in indices], device=self.device)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, split: TaskData) -> np.ndarray:
        """The model's outputs over ``split``: class indices, or the regression's values."""
        self.model.eval()
        outputs = []
        size = self.settings.batch_size
        for first in range(0, len(split), size):
            with self.precision.autocast():
                logits = self.model(**self._batch(split, range(first, min(first + size, len(split))))).logits.float()
            outputs.append(logits[:, 0] if self.kind == "regression" else logits)
        self.model.train()
        return torch.cat(outputs).cpu().numpy()

    def scores(self, split: TaskData, outputs: np.ndarray) -> dict:
        """The task's metrics and mean loss of ``predict``'s ``outputs`` over a labeled split."""
        if self.kind == "regression":
            labels = np.array([float(x) for x in split.labels])
            return {"loss": float(np.mean((outputs - labels) ** 2)), **regression_metrics(labels, outputs)}
        labels = np.array([self.model.config.label2id[x] for x in split.labels])
        logits = torch.from_numpy(outputs)
        loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)))
        return {"loss": loss, **classification_metrics(labels, outputs.argmax(-1), len(self.labels))}

    def prediction_text(self, outputs: np.ndarray) -> list[str]:
        if self.kind == "regression":
            return [f"{value:.3f}" for value in outputs]
        return [self.labels[i] for i in outputs.argmax(-1)]

    def encoder_sparsity(self) -> float:
        """Zero weights of the encoder's fully-connected layers over their total (dense layers count as 0)."""
        from ..model.bert import encoder_layer_sparsity

        rows = encoder_layer_sparsity(self.model.bert)
        return 1.0 - sum(r["active_weights"] for r in rows) / sum(r["shape"][0] * r["shape"][1] for r in rows)

    # ------------------------------------------------------------------ stops and checkpoints
    def _request_stop(self, signum, frame) -> None:
        if self._stop:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop = True

    def _stopped(self, bar, start: float) -> None:
        bar.close()
        self._checkpoint(start)
        self._say(f"stopped at step {self.step} (epoch {self.epoch}); checkpoint written. Continue with: "
                  f"python -m ipu_app finetune --resume {self.output}")
        return None

    @property
    def stopped_by_signal(self) -> bool:
        return self._stop

    def _checkpoints(self):
        """The fine-tune's every stateful part by its key in the checkpoint (``CheckpointManager``)."""
        from ..train.checkpoint import Attr, CheckpointManager, Generator, ProcessRng
        from ..train.distributed import DistContext

        parts = {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
                 "updater": self.updater, **{name: Attr(self, name) for name in ("epoch", "position", "order")},
                 "window": Attr(self, "window", load=list),
                 **{name: Attr(self, name, save=json.dumps, load=json.loads) for name in ("history", "best")},
                 "updates": Attr(self, "updates"), "seconds": Attr(self, "seconds"),
                 "generator": Generator(self.generator), "rng": ProcessRng()}
        return CheckpointManager(self.output, self.model, None, parts, keep=1, dist=DistContext(),
                                 resume=f"python -m ipu_app finetune --resume {self.output}")

    def _checkpoint(self, start: float) -> None:
        self.seconds = time.perf_counter() - start  # the training time so far
        self._checkpoints().save(self.step)

    def _restore(self) -> None:
        self.step, _ = self._checkpoints().restore()
        self._patterns_loaded()

    def _patterns_loaded(self) -> None:
        from ..sparse.layer import sparse_weights

        for _, layer in sparse_weights(self.model):
            layer.pattern_changed()  # kernels rebuild their metadata for the loaded patterns

    def _save_weights(self, directory: Path) -> None:
        from ..io import write_safetensors

        directory.mkdir(exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        write_safetensors(tensors, directory / "model.safetensors", metadata={"step": str(self.step)})

    def _load_weights(self, directory: Path) -> None:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(directory / "model.safetensors"), device=str(self.device)))
        self._patterns_loaded()

    # ------------------------------------------------------------------ the end
    def _finish(self, seconds: float) -> dict:
        from .outputs import write_outputs

        if self.settings.save == "best" and self.best is not None:
            self._load_weights(self.output / BEST)
            self.dev_outputs = None  # another epoch's model: its predictions are made anew
        chosen = self.best if self.settings.save == "best" and self.best is not None else self.history[-1]
        results = self._results(chosen, seconds)
        write_outputs(self, results)
        return results

    def _results(self, chosen: dict, seconds: float) -> dict:
        from ..machine import cpu_identity

        return {
            "model": self.request.model, "source": self.pretrained.description, "pretrained_step": self.pretrained.step,
            "task": {"train": str(self.train_set.path), "dev": [str(d.path) for d in self.dev_sets],
                     "test": [str(t.path) for t in self.test_sets], "type": self.kind,
                     "text_columns": list(self.train_set.columns), "label_column": self.train_set.label_column,
                     "labels": self.labels, "train_examples": len(self.train_set),
                     "dev_examples": [len(d) for d in self.dev_sets]},
            "settings": asdict(self.settings), "metric": self.metric, "saved_epoch": chosen["epoch"],
            "dev": chosen, "epochs": self.history, "steps": self.step, "pattern_updates": self.updates,
            "encoder_sparsity": self.encoder_sparsity(), "train_time_s": seconds,
            "precision": self.precision.name, "device": str(self.device), "threads": torch.get_num_threads(),
            "cpu": cpu_identity()["model"],
        }

    def _say(self, line: str) -> None:
        print(line, file=sys.stderr)
