"""``python -m ipu_app finetune``: sparse fine-tuning of a pre-trained run on a classification task.

The run's encoder (its ``SparseLinear`` layers and their kernels) goes into Hugging Face's
``BertForSequenceClassification`` in place of its dense ``bert``: HF's pooler (the run's own where it
has NSP), classifier head and loss; the encoder stays sparse because a sparse layer stores only its
active values. ``pattern: fixed`` trains those values on the pre-trained pattern; ``dynamic`` goes
on pruning and regrowing it (the run's DynSparse settings, random regrowth) at ``segments - 1``
evenly spaced steps. AdamW (BERT's decay rule), linear warmup and decay, gradient clipping at 1.

The output directory gets ``results.json`` (final dev metrics, every epoch's, the encoder's sparsity,
settings), ``metrics.jsonl``, ``dev_predictions.tsv`` and ``model/``: the fine-tuned model as a dense
Hugging Face folder (``BertForSequenceClassification.from_pretrained`` loads it) with the tokenizer
and the patterns beside it (``sparsity.json``, as ``export`` writes).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import ConfigError, FinetuneSettings
from ..data.tasks import TaskData, TaskError, check_labels, label_names, read_task
from ..io import atomic_write_bytes
from ..rundir import RunDir

TASK_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")


def task_files(task: list[str]) -> tuple[Path, Path]:
    """``--task``: a folder with ``train.*`` and ``dev.*`` (GLUE's layout; ``dev_matched`` too), or the
    training and dev files."""
    paths = [Path(p) for p in task]
    if len(paths) == 2:
        return paths[0], paths[1]
    if len(paths) == 1 and paths[0].is_dir():
        found = {}
        for split, names in (("train", ("train",)), ("dev", ("dev", "dev_matched", "validation"))):
            found[split] = next((paths[0] / f"{n}{s}" for n in names for s in TASK_SUFFIXES
                                 if (paths[0] / f"{n}{s}").is_file()), None)
            if found[split] is None:
                raise TaskError(f"{paths[0]} has no {split} file ({names[0]}.tsv, .csv or .jsonl)")
        return found["train"], found["dev"]
    if len(paths) == 1:
        raise TaskError(f"--task {paths[0]}: give a task folder (train.tsv + dev.tsv) or two files, TRAIN DEV")
    raise TaskError(f"--task takes a folder or two files, got {len(paths)}")


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """Accuracy; Matthews correlation (over all classes, Gorodkin's R_K); F1 of class 1 (binary tasks)."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(confusion, (labels, predictions), 1)
    total, correct = confusion.sum(), np.trace(confusion)
    true, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    denominator = math.sqrt((total**2 - predicted @ predicted) * (total**2 - true @ true))
    result = {"accuracy": float(correct / total),
              "matthews": float((correct * total - true @ predicted) / denominator) if denominator else 0.0}
    if num_classes == 2:
        tp, fp, fn = confusion[1, 1], confusion[0, 1], confusion[1, 0]
        result["f1"] = float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0
    return result


def _tokenize(tokenizer, split: TaskData, indices, max_len: int) -> dict:
    first = [split.texts[i][0] for i in indices]
    second = [split.texts[i][1] for i in indices] if len(split.columns) > 1 else None
    return dict(tokenizer(first, second, truncation=True, max_length=max_len, padding=True, return_tensors="pt"))


class Finetuner:
    """Fine-tunes a run's model on one task into ``output_dir`` (see the module docstring)."""

    def __init__(self, run_dir: str | Path, train_file: str | Path, dev_file: str | Path, output_dir: str | Path,
                 settings: FinetuneSettings = FinetuneSettings(), *, text_columns=None, label_column: str = "label",
                 checkpoint: str | int | None = None, progress: bool = True, device: str | None = None) -> None:
        from .evaluate import evaluation_data, load_run_model
        from .precision import resolve_precision

        self.settings = settings.validate()
        self.output = Path(output_dir)
        if self.output.exists() and any(self.output.iterdir()):
            raise ConfigError(f"{self.output} is not empty; choose a new output directory (nothing was overwritten)")
        self.run = RunDir(run_dir)
        if not self.run.config_path.is_file():
            raise ConfigError(f"{self.run} is not a run directory (no {RunDir.CONFIG})")
        config = self.run.load_config()
        self.train_set = read_task(train_file, text_columns, label_column)
        self.dev_set = read_task(dev_file, self.train_set.columns, label_column)
        self.labels = label_names(self.train_set)
        if len(self.labels) < 2:
            raise TaskError(f"{train_file} has one label only ({self.labels[0]!r}): nothing to classify")
        check_labels(self.dev_set, self.labels)
        data_dir, manifest = evaluation_data(config, None)
        from ..data.tokenizer import has_vocabulary, load_tokenizer

        self.tokenizer_dir = self.run.tokenizer_dir if has_vocabulary(self.run.tokenizer_dir) else data_dir / "tokenizer"

        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(config.training.precision, self.device)
        pretrained, self.source, self.source_step = load_run_model(self.run, config, checkpoint,
                                                                   vocab_size=manifest["vocab_size"])
        self.config = config
        self.progress = progress
        torch.manual_seed(settings.seed)  # the classifier head (and a pooler the run lacks)
        self.model = self._classifier(pretrained).to(self.device)
        self.steps_per_epoch = math.ceil(len(self.train_set) / settings.batch_size)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.optimizer, self.scheduler = self._optimizer()
        self.scaler = self.precision.grad_scaler("dynamic")
        self.updater = self._updater()

    def _classifier(self, pretrained):
        from transformers import BertForSequenceClassification

        hf_config = copy.deepcopy(pretrained.hf_config)
        hf_config.num_labels = len(self.labels)
        hf_config.id2label = dict(enumerate(self.labels))
        hf_config.label2id = {name: i for i, name in enumerate(self.labels)}
        model = BertForSequenceClassification(hf_config)
        if pretrained.bert.pooler is None:  # pre-trained without NSP: HF's freshly initialised pooler
            pretrained.bert.pooler = model.bert.pooler
        model.bert = pretrained.bert  # the run's encoder, sparse layers and all
        self.model_config = pretrained.config
        return model

    def _optimizer(self):
        from .optim import adamw, warmup_decay

        s = self.settings
        per_slot = s.pattern == "dynamic" and self.config.optimizer.bias_correction == "per_slot"
        optimizer = adamw(self.model, s.learning_rate, self.config.optimizer, weight_decay=s.weight_decay,
                          per_slot=per_slot)
        return optimizer, warmup_decay(optimizer, int(s.warmup_ratio * self.total_steps), self.total_steps)

    def _updater(self):
        from ..sparse.layer import sparse_weights
        from ..sparse.schedule import UpdateSchedule
        from ..sparse.updater import build_updater

        s = self.settings
        if s.pattern == "dynamic" and not sparse_weights(self.model):
            self._say("note: the run's model is dense; --pattern dynamic has nothing to update")
        if s.pattern != "dynamic" or not sparse_weights(self.model):
            return None
        if s.segments > self.total_steps:
            raise ConfigError(f"--segments {s.segments} is more than the {self.total_steps} fine-tuning steps")
        schedule = UpdateSchedule.evenly_spaced(self.total_steps, segments=s.segments)
        sp = self.config.sparsity
        return build_updater(self.model, self.optimizer, schedule, mode="dynamic",
                             pruning_ratio=sp.pruning_ratio if s.pruning_ratio is None else s.pruning_ratio,
                             pruning_schedule=sp.pruning_schedule, regrowth="random", block_metric=sp.block_metric,
                             seed=s.seed)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        s = self.settings
        records, history, updates = [], [], 0
        generator = torch.Generator().manual_seed(s.seed)
        bar = tqdm(total=self.total_steps, unit="step", dynamic_ncols=True, disable=not self.progress,
                   desc="finetune")
        start, step, window = time.perf_counter(), 0, []
        self._say(f"fine-tuning {self.run.path} ({self.source}, step {self.source_step}) on {self.train_set.path} "
                  f"({len(self.train_set):,} examples, {len(self.labels)} classes), {self.total_steps} steps, "
                  f"pattern {s.pattern}, {self.precision.name}")
        for epoch in range(1, s.epochs + 1):
            self.model.train()
            order = torch.randperm(len(self.train_set), generator=generator).tolist()
            for first in range(0, len(order), s.batch_size):
                window.append(self._step(order[first:first + s.batch_size]))
                step += 1
                if self.updater is not None and self.updater.step(step) is not None:
                    updates += 1
                bar.update(1)
                if step % s.log_every == 0 or step == self.total_steps:
                    records.append({"kind": "train", "step": step, "epoch": epoch, "loss": float(np.mean(window)),
                                    "lr": self.scheduler.get_last_lr()[0]})
                    window = []
            labels, predictions, loss = self.predict(self.dev_set)
            result = {"epoch": epoch, "step": step, "loss": loss,
                      **classification_metrics(labels, predictions, len(self.labels))}
            history.append(result)
            records.append({"kind": "dev", **result})
            self._say(f"epoch {epoch}/{s.epochs}: dev " + ", ".join(
                f"{k} {v:.4f}" for k, v in result.items() if k not in ("epoch", "step")))
        bar.close()
        seconds = time.perf_counter() - start
        results = self._results(history, updates, seconds, step)
        self._write(records, results, labels, predictions)
        return results

    def _step(self, indices) -> float:
        s = self.settings
        batch = {k: v.to(self.device) for k, v in _tokenize(self.tokenizer, self.train_set, indices,
                                                             s.max_seq_len).items()}
        targets = torch.tensor([self.model.config.label2id[self.train_set.labels[i]] for i in indices],
                               device=self.device)
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

    @torch.no_grad()
    def predict(self, split: TaskData) -> tuple[np.ndarray, np.ndarray, float]:
        """Class indices of the labels and of the predictions over ``split``, and the mean loss."""
        self.model.eval()
        labels = np.array([self.model.config.label2id[label] for label in split.labels])
        predictions, loss_sum = [], 0.0
        size = self.settings.batch_size
        for first in range(0, len(split), size):
            indices = range(first, min(first + size, len(split)))
            batch = {k: v.to(self.device) for k, v in _tokenize(self.tokenizer, split, indices,
                                                                 self.settings.max_seq_len).items()}
            with self.precision.autocast():
                logits = self.model(**batch).logits.float()
            targets = torch.from_numpy(labels[first:first + len(indices)]).to(self.device)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            predictions.append(logits.argmax(-1).cpu().numpy())
        self.model.train()
        return labels, np.concatenate(predictions), loss_sum / len(split)

    def encoder_sparsity(self) -> float:
        """Zero weights of the encoder's fully-connected layers over their total (dense layers count as 0)."""
        from ..model.bert import encoder_layer_sparsity

        rows = encoder_layer_sparsity(self.model.bert)
        return 1.0 - sum(r["active_weights"] for r in rows) / sum(r["shape"][0] * r["shape"][1] for r in rows)

    def _results(self, history: list[dict], updates: int, seconds: float, steps: int) -> dict:
        from ..machine import cpu_identity

        return {
            "run": str(self.run.path), "model": self.source, "pretrained_step": self.source_step,
            "task": {"train": str(self.train_set.path), "dev": str(self.dev_set.path),
                     "text_columns": list(self.train_set.columns), "label_column": self.train_set.label_column,
                     "labels": self.labels, "train_examples": len(self.train_set), "dev_examples": len(self.dev_set)},
            "settings": asdict(self.settings),
            "dev": history[-1], "epochs": history, "steps": steps, "pattern_updates": updates,
            "encoder_sparsity": self.encoder_sparsity(), "train_time_s": seconds,
            "precision": self.precision.name, "device": str(self.device), "threads": torch.get_num_threads(),
            "cpu": cpu_identity()["model"],
        }

    def _write(self, records: list[dict], results: dict, labels: np.ndarray, predictions: np.ndarray) -> None:
        from ..data.tokenizer import copy_tokenizer
        from ..model.export import sparsity_sidecar, write_sidecar
        from ..model.sparse_linear import dense_copy
        from .metrics import json_safe

        if not self.progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # save_pretrained's shard bar
        model_dir = self.output / "model"
        self.output.mkdir(parents=True, exist_ok=True)
        sidecar, patterns = sparsity_sidecar(self.model, self.model_config)
        dense_copy(self.model).save_pretrained(str(model_dir))
        write_sidecar(model_dir, sidecar, patterns)
        copy_tokenizer(self.tokenizer_dir, model_dir)
        lines = ["index\tlabel\tprediction\n"] + [f"{i}\t{self.labels[a]}\t{self.labels[b]}\n"
                                                  for i, (a, b) in enumerate(zip(labels, predictions))]
        atomic_write_bytes(self.output / "dev_predictions.tsv", "".join(lines).encode())
        atomic_write_bytes(self.output / "metrics.jsonl",
                           "".join(json.dumps(json_safe(r)) + "\n" for r in records).encode())
        atomic_write_bytes(self.output / "results.json", (json.dumps(json_safe(results), indent=2) + "\n").encode())

    def _say(self, line: str) -> None:
        print(line, file=sys.stderr)
