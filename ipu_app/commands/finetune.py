"""``finetune``: a pre-trained BERT (a run, a checkpoint, an export or a Hugging Face folder) on a
GLUE-style classification or regression task, the encoder kept sparse; ``--resume OUTPUT`` continues."""

from __future__ import annotations

import dataclasses
import json
import sys

from ..choices import FINETUNE_PATTERNS, FINETUNE_SAVES, FINETUNE_TASK_TYPES
from ..config import ConfigError, FinetuneSettings
from ._threads import use_threads

# The options that make up a request besides FinetuneSettings' fields.
REQUEST_OPTIONS = ("model", "task", "output", "test", "checkpoint", "text_columns", "label_column", "sparsity",
                   "block_size")


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pre-trained BERT (a run, a checkpoint, an export or a Hugging "
                                        "Face folder) on a GLUE-style classification or regression task, the "
                                        "encoder kept sparse (pattern fixed or DynSparse continued)")
    _add_source_options(p)
    _add_settings(p, FinetuneSettings())
    p.set_defaults(func=run)


def _add_source_options(p) -> None:
    p.add_argument("--model", "--run", dest="model", metavar="PATH",
                   help="a run directory, a checkpoint (RUN/checkpoints/step_N), an export folder or a Hugging Face "
                        "BERT folder (--run is the same option)")
    p.add_argument("--task", nargs="+", metavar="PATH",
                   help="a task folder (train.tsv + dev.tsv, or MNLI's dev_matched + dev_mismatched; .csv / .jsonl "
                        "too) or the files TRAIN DEV [DEV ...]")
    p.add_argument("--output", help="new, empty output directory")
    p.add_argument("--resume", metavar="OUTPUT", help="continue a stopped fine-tune from its latest checkpoint")
    p.add_argument("--test", nargs="+", metavar="FILE",
                   help="unlabeled test file(s): predictions in GLUE's submission format (OUTPUT/STEM_predictions.tsv)")
    p.add_argument("--text-columns", nargs="+", metavar="COLUMN",
                   help="the text column(s) (default: GLUE's names: sentence, sentence1 sentence2, question "
                        "sentence, ...)")
    p.add_argument("--label-column", help="the label column (default: label, else score or gold_label)")
    p.add_argument("--task-type", choices=FINETUNE_TASK_TYPES,
                   help="classification or regression (default auto: regression when the labels are numbers and "
                        "not all integers, as STS-B's)")
    p.add_argument("--sparsity", type=float, help="a dense model: prune each encoder linear by block magnitude to "
                                                  "this sparsity first (default: a dense model stays dense)")
    p.add_argument("--block-size", type=int, help="with --sparsity: the block size (default 1)")
    p.add_argument("--checkpoint", default=None,
                   help="of a run directory: final, latest or a step (default: final if the run finished)")
    p.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS or the cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_settings(p, tuned: FinetuneSettings) -> None:
    p.add_argument("--pattern", choices=FINETUNE_PATTERNS,
                   help="fixed: the pre-trained pattern; dynamic: go on pruning and regrowing "
                        f"(default: {tuned.pattern})")
    p.add_argument("--segments", type=int,
                   help=f"--pattern dynamic: the training is cut into N segments, the pattern changes between them "
                        f"(default: {tuned.segments})")
    p.add_argument("--pruning-ratio", type=float, help="--pattern dynamic: pr (default: the run's)")
    for name in ("epochs", "batch_size", "learning_rate", "warmup_ratio", "weight_decay", "max_seq_len"):
        default = getattr(tuned, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), help=f"(default: {default})")
    p.add_argument("--save", choices=FINETUNE_SAVES,
                   help="the model kept: the last epoch's, or the best epoch's by --metric on the first dev file "
                        f"(default: {tuned.save})")
    p.add_argument("--metric", help="what --save best compares: accuracy, matthews, f1, loss (classification); "
                                    "pearson, spearman, mse, loss (regression) (default: accuracy / pearson)")
    p.add_argument("--log-every", type=int, help=f"steps between train records in metrics.jsonl (default: "
                                                 f"{tuned.log_every})")
    p.add_argument("--checkpoint-every", type=int,
                   help="steps between checkpoints (default 0: at each epoch's end; a stop always writes one)")
    p.add_argument("--seed", type=int, help=f"(default: {tuned.seed})")


def run(args) -> int:
    from ..finetune import Finetuner
    from ..train.checkpoint import CheckpointError

    use_threads(args.threads)
    request = request_from(args)
    try:
        results = Finetuner(request, resume=args.resume is not None, progress=not args.no_progress).train()
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        print("interrupted", file=sys.stderr)
        return 130
    if results is None:
        return 130
    print(json.dumps({"dev": results["dev"], "encoder_sparsity": results["encoder_sparsity"],
                      "output": request.output}))
    return 0


def request_from(args):
    """The fine-tune asked for: from the options, or (``--resume OUTPUT``) as it was first asked."""
    from ..data.tasks import task_files
    from ..finetune import Request

    fields = [f.name for f in dataclasses.fields(FinetuneSettings)]
    given = [name for name in (*REQUEST_OPTIONS, *fields) if getattr(args, name, None) is not None]
    if args.resume is not None:
        if given:
            raise ConfigError(f"--resume continues a fine-tune as it was asked; drop --{given[0].replace('_', '-')} "
                              "(only --threads and --no-progress go with it)")
        return Request.load(args.resume)
    missing = [name for name in ("model", "task", "output") if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"finetune needs --{missing[0]} (or --resume OUTPUT to continue a stopped one)")
    settings = FinetuneSettings(**{name: getattr(args, name) for name in fields
                                   if getattr(args, name, None) is not None})
    settings.validate()
    train, dev = task_files(args.task)
    return Request(model=args.model, train=str(train), dev=[str(d) for d in dev], output=args.output,
                   test=list(args.test or []), checkpoint=args.checkpoint, text_columns=args.text_columns,
                   label_column=args.label_column, sparsity=args.sparsity, block_size=args.block_size,
                   settings=dataclasses.asdict(settings))
