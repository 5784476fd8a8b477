"""``python -m ipu_app <command>``: the home of every command besides training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .choices import BENCH_DTYPES, BENCH_SHAPES, FINETUNE_PATTERNS, FINETUNE_SAVES, FINETUNE_TASK_TYPES
from .config import FinetuneSettings
from .experiments.figures import NAMES as FIGURE_NAMES


def _prepare_data(args) -> int:
    from .data.prepare import prepare_embedded, prepare_files

    if args.input:
        path = prepare_files(args.input, args.output, args.tokenizer, args.vocab_size, args.document_mode,
                             overwrite=args.overwrite, input_format=args.input_format, text_field=args.text_field,
                             id_field=args.id_field, dataset_split=args.dataset_split, workers=args.workers,
                             documents_per_shard=args.documents_per_shard, shard_bytes=int(args.shard_mb * 2**20))
    else:
        path = prepare_embedded(args.tokenizer, args.vocab_size, cache_dir=args.output)
    from .data.prepare import prepared_counts, validation_warning
    from .data.shards import load_manifest

    manifest = load_manifest(path)
    print(f"prepared {path}: {prepared_counts(manifest)}", file=sys.stderr)
    warning = validation_warning(manifest)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(path)
    return 0


def _revalidate(args) -> int:
    from .train.revalidate import main as revalidate_main

    return revalidate_main(args.run_dirs, force=args.force)


def _use_threads(threads: int | None) -> None:
    """``--threads`` of evaluate and finetune: checked, then torch's (default: OMP_NUM_THREADS or the cores)."""
    import torch

    from .train.precision import resolve_threads

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(resolve_threads(None, threads)[0])


def _evaluate(args) -> int:
    import json

    from .train.checkpoint import CheckpointError
    from .train.evaluate import evaluate_run

    _use_threads(args.threads)
    try:
        result = evaluate_run(args.run, checkpoint=args.checkpoint, data=args.data, sequences=args.sequences,
                              progress=not args.no_progress)
    except CheckpointError as exc:  # a damaged or foreign checkpoint: one line, as for any bad input
        raise ValueError(str(exc)) from None
    text = json.dumps(result)
    if args.output:
        from .io import atomic_write_bytes

        atomic_write_bytes(Path(args.output), (text + "\n").encode())
    print(text)
    return 0


def _finetune(args) -> int:
    import json

    from .finetune import Finetuner
    from .train.checkpoint import CheckpointError

    _use_threads(args.threads)
    request = _finetune_request(args)
    try:
        tuner = Finetuner(request, resume=args.resume is not None, progress=not args.no_progress)
        results = tuner.train()
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


FINETUNE_REQUEST_OPTIONS = ("model", "task", "output", "test", "checkpoint", "text_columns", "label_column",
                            "sparsity", "block_size")


def _finetune_request(args):
    """The fine-tune asked for: from the options, or (``--resume OUTPUT``) as it was first asked."""
    import dataclasses

    from .config import ConfigError, FinetuneSettings
    from .data.tasks import task_files
    from .finetune import Request

    fields = [f.name for f in dataclasses.fields(FinetuneSettings)]
    given = [name for name in (*FINETUNE_REQUEST_OPTIONS, *fields) if getattr(args, name, None) is not None]
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


def _demo_task(args) -> int:
    from .data.tasks import write_demo_task

    counts = write_demo_task(args.output, train=args.train, dev=args.dev, seed=args.seed)
    print(f"wrote {args.output}/train.tsv ({counts['train']:,} sentences) and dev.tsv ({counts['dev']:,}): "
          "State of the Union address or encyclopedia?", file=sys.stderr)
    return 0


def _export(args) -> int:
    from .model.export import export_hf, export_run

    if args.checkpoint is None or args.checkpoint == "final":
        print(export_run(args.run, args.output))
        return 0
    from .rundir import RunDir
    from .train.evaluate import evaluation_data, load_run_model

    run = RunDir(args.run)
    config = run.load_config()
    data_dir, manifest = evaluation_data(config, None)
    model, source, step = load_run_model(run, config, args.checkpoint, vocab_size=manifest["vocab_size"])
    tokenizer = run.tokenizer_dir if run.tokenizer_dir.is_dir() else data_dir / "tokenizer"  # unfinished: the data's
    print(f"exporting {run.path} ({source}, step {step})", file=sys.stderr)
    print(export_hf(model, args.output, tokenizer))
    return 0


def _sweep(args) -> int:
    from .experiments.sweep import SweepRunner, format_plan, format_results
    from .experiments.sweep_spec import load_sweep

    sweep = load_sweep(args.spec)
    directory = Path(args.output_dir or Path("runs") / "sweeps" / sweep.name)
    runner = SweepRunner(sweep, directory, jobs=args.jobs, only=args.only, devices=args.devices or [])
    if args.list:
        print(format_plan(runner))
        return 0
    results = runner.run()
    print(format_results(results))
    if runner.stopped:
        return 130
    failed = [name for name, r in results.items() if r.status in ("failed", "stale")]
    if failed:
        print(f"error: {len(failed)} of {len(results)} runs did not finish (see {directory / 'status.json'} "
              f"and {directory / 'logs'})", file=sys.stderr)
        return 1
    figure = f" --figure {sweep.figure}" if sweep.figure else ""
    print(f"report: python -m ipu_app report {directory}{figure} --output {directory / 'report'}", file=sys.stderr)
    return 0


def _report(args) -> int:
    from .experiments.report import build_report

    written = build_report(args.runs_dir, args.figure, args.output, layer=args.layer)
    for path in written:
        print(path)
    return 0


def _ipu_command(args) -> int:
    import shlex

    from .config import load_config
    from .ipu.options import plan, poprun_command

    config = load_config(args.config, args.overrides)
    if config.backend != "ipu":
        print(f"error: config {config.name!r} has backend: {config.backend}; IPU configs set backend: ipu "
              "(e.g. bert_base_sparse_pod16)", file=sys.stderr)
        return 1
    p = plan(config)
    ipu = config.ipu
    print(f"# {ipu.instances} instance(s) on {len(ipu.hosts) or 1} host(s), {p.replication_factor} replicas x "
          f"{p.ipus_per_replica} IPUs = {p.total_ipus} IPUs; batch {config.training.batch_size} = micro "
          f"{p.micro_batch_size} x accumulation {p.gradient_accumulation} x {p.replication_factor} replicas; "
          f"{len(p.placement.stages)} pipeline stage(s)")
    cmd = poprun_command(config, args.config)
    if args.overrides:
        cmd += [a for item in args.overrides for a in ("--set", item)]
    print(shlex.join(cmd))
    return 0


def _build_kernels(args) -> int:
    from .ops import cpu

    try:
        path = cpu.build(force=args.force)
    except cpu.KernelBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _bench(args) -> int:
    if args.bench_command == "data":
        from .experiments import bench_data

        return bench_data.main(args)
    from .experiments import bench

    return bench.main(args)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure the sparse kernels (bench kernels), training steps (bench train) or "
                                     "the data pipeline (bench data)")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    k = bsub.add_parser("kernels", help="forward+backward of one sparse linear vs dense and PyTorch BSR")
    k.add_argument("--shapes", nargs="+", default=list(BENCH_SHAPES), choices=list(BENCH_SHAPES))
    k.add_argument("--tokens", nargs="+", type=int, default=[4096, 8192, 16384])
    k.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.75, 0.9, 0.99])
    k.add_argument("--block-size", nargs="+", type=int, default=[1, 4, 8, 16])
    k.add_argument("--dtype", default="auto", choices=["auto", *BENCH_DTYPES],
                   help="auto: what training.precision=auto runs here (bf16 where the CPU or GPU has it, else fp32)")
    k.add_argument("--device", default="auto", help="cpu, cuda or auto (a GPU when there is one)")
    k.add_argument("--repeats", type=int, default=5, help="timed calls per case (the median is kept)")
    k.add_argument("--no-bsr", action="store_true", help="skip PyTorch's BSR tensors")
    k.add_argument("--output", default="bench_results/kernels", help="directory for kernels.{csv,md,png}")
    k.set_defaults(func=_bench)
    t = bsub.add_parser("train", help="whole training steps of a sparse config on each backend vs dense")
    t.add_argument("--config", required=True, help="a sparse config, e.g. bert_mini_sparse")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--backends", nargs="+", default=["reference", "auto"])
    t.add_argument("--steps", type=int, default=10, help="timed steps per variant (the median is kept)")
    t.add_argument("--sparsity", nargs="+", type=float, default=None,
                   help="sparsities to run the config at (default: its own); several give a break-even")
    t.add_argument("--block-size", nargs="+", type=int, default=None,
                   help="block sizes to run the sparse config at (default: its own)")
    t.add_argument("--device", default="auto", help="cpu, cuda or auto (a GPU when there is one)")
    t.add_argument("--hf", action="store_true", help="add Hugging Face's BertForPreTraining (eager) of the same size")
    t.add_argument("--compile", action="store_true", help="add every variant compiled (training.compile)")
    t.add_argument("--fractions", action="store_true",
                   help="time the sparse linears alone: the share of the step they take")
    t.add_argument("--output", default="bench_results/train", help="directory for train.{csv,md,png}")
    t.set_defaults(func=_bench)
    d = bsub.add_parser("data", help="prepare-data MB/s and peak memory at two corpus sizes, the tokenizer's raw "
                                     "speed, the sample index and loader tokens/s by workers")
    d.add_argument("--sizes", nargs="+", type=float, default=[64, 256],
                   help="synthetic corpus sizes in MiB (memory must stay flat from the first to the last)")
    d.add_argument("--workers", type=int, default=None, help="prepare-data --workers (default: the cores)")
    d.add_argument("--loader-workers", nargs="+", type=int, default=[0, 1, 2])
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--seq-len", type=int, default=128)
    d.add_argument("--batches", type=int, default=100, help="timed loader batches per worker count")
    d.add_argument("--work-dir", default=None, help="where the corpora and shards go (deleted after; default: "
                                                  "the system temp folder)")
    d.add_argument("--output", default="bench_results/data", help="directory for data.{json,md}")
    d.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ipu_app", description="DynSparse BERT tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare-data", help="text, JSON Lines, Parquet or datasets folders (or the embedded "
                                            "corpus) -> pre-training shards")
    p.add_argument("--input", nargs="*", default=[],
                   help="files (.txt, .jsonl, .parquet; .txt/.jsonl may be .gz), folders of them, or folders saved "
                        "with datasets' save_to_disk; none = the embedded corpus")
    p.add_argument("--input-format", default="auto", choices=["auto", "text", "jsonl", "parquet", "datasets"],
                   help="auto: by file suffix (a save_to_disk folder: datasets)")
    p.add_argument("--text-field", default="text", help="JSON Lines field / Parquet or datasets column of the text")
    p.add_argument("--id-field", default=None,
                   help="field / column of a document id (the train/validation split hashes it); default: the "
                        "document's position")
    p.add_argument("--dataset-split", default=None, help="the split of a saved DatasetDict (when it has several)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenising processes (default: the cores this process may use)")
    p.add_argument("--documents-per-shard", type=int, default=2000, help="a shard is closed at this many documents")
    p.add_argument("--shard-mb", type=float, default=32, help="... or at this many MiB of text")
    p.add_argument("--output", help="output directory (embedded corpus: the cache root)")
    p.add_argument("--tokenizer", default="bert-base-uncased", metavar="bert-base-uncased|train|FOLDER",
                   help="the standard vocabulary, one trained on the corpus (--vocab-size), or a Hugging Face "
                        "WordPiece tokenizer folder, cased or not (default: bert-base-uncased)")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--document-mode", default="blank_lines", choices=["blank_lines", "file"])
    p.add_argument("--overwrite", action="store_true",
                   help="replace prepared data of other input in --output (runs using it must not resume on it)")
    p.set_defaults(func=_prepare_data)
    sub.add_parser("train", help="train one config (the same as python run_pretraining.py; see train --help)",
                   add_help=False)
    p = sub.add_parser("sweep", help="run a grid of training runs from a sweep spec (configs/sweeps/)")
    p.add_argument("spec", help="a sweep spec YAML path or a name under configs/sweeps (e.g. pareto_cpu)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (CPU threads are split)")
    p.add_argument("--output-dir", help="the sweep directory (default runs/sweeps/NAME)")
    p.add_argument("--only", nargs="+", default=[], metavar="RUN", help="run only these runs of the sweep")
    p.add_argument("--devices", nargs="+", metavar="GPU",
                   help="GPUs to spread the runs over, e.g. 0,1 (each run sees one as cuda:0; with --jobs above "
                        "the number of GPUs several small runs share one)")
    p.add_argument("--list", action="store_true", help="list the runs and their state; train nothing")
    p.set_defaults(func=_sweep)
    p = sub.add_parser("report", help="tables and a figure from finished run directories (never trains)")
    p.add_argument("runs_dir", help="a sweep directory or any directory holding run directories")
    p.add_argument("--figure", choices=FIGURE_NAMES, metavar="FIGURE",
                   help=f"one of {', '.join(FIGURE_NAMES)} (default: the sweep's 'figure')")
    p.add_argument("--output", help="output directory (default RUNS_DIR/report)")
    p.add_argument("--layer", default=None,
                   help="exploration: the weight whose accumulated pattern is drawn (default layer 2's FFN up)")
    p.set_defaults(func=_report)
    p = sub.add_parser("ipu-command", help="print the poprun line that starts an IPU config on its hosts")
    p.add_argument("--config", required=True, help="an IPU config (backend: ipu), e.g. bert_base_sparse_pod64")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_ipu_command)
    p = sub.add_parser("build-kernels", help="compile the CPU kernels of backend cpu now (else on first use)")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached library exists")
    p.set_defaults(func=_build_kernels)
    _add_bench_parser(sub)
    p = sub.add_parser("revalidate", help="recompute finished runs' final validation (runs written before "
                       "metrics_version 2 may hold NSP loss and MLM accuracy swapped) into their summary.json")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--force", action="store_true", help="also runs at the current metrics_version")
    p.set_defaults(func=_revalidate)
    p = sub.add_parser("evaluate", help="MLM / NSP loss and accuracy of a run's model or checkpoint on a validation "
                                        "set (the code training validates with); JSON out")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--checkpoint", default=None,
                   help="final (RUN_DIR/model), latest or a step number (default: final if the run finished, else latest)")
    p.add_argument("--data", help="another prepared data directory (same tokenizer) whose validation split to use")
    p.add_argument("--sequences", type=int, help="a fixed random N of the validation sequences (default: the run's "
                                                 "data.validation_sequences on its own data, all on other data)")
    p.add_argument("--output", help="also write the JSON to this file")
    p.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS or the cores)")
    p.add_argument("--no-progress", action="store_true", help="no start-up line on stderr")
    p.set_defaults(func=_evaluate)
    tuned = FinetuneSettings()  # finetune's defaults
    p = sub.add_parser("finetune", help="fine-tune a pre-trained BERT (a run, a checkpoint, an export or a Hugging "
                                        "Face folder) on a GLUE-style classification or regression task, the "
                                        "encoder kept sparse (pattern fixed or DynSparse continued)")
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
    p.add_argument("--checkpoint", default=None,
                   help="of a run directory: final, latest or a step (default: final if the run finished)")
    p.add_argument("--seed", type=int, help=f"(default: {tuned.seed})")
    p.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS or the cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_finetune)
    p = sub.add_parser("demo-task", help="write a small classification task (train.tsv, dev.tsv) from the embedded "
                                         "corpus: is a sentence from a State of the Union address or an encyclopedia?")
    p.add_argument("--output", required=True, help="new, empty output directory")
    p.add_argument("--train", type=int, default=2000, help="training sentences (default: 2000)")
    p.add_argument("--dev", type=int, default=500, help="dev sentences (default: 500)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo_task)
    p = sub.add_parser("export", help="export a run's model as a dense Hugging Face folder + sparsity sidecar")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--output", required=True, help="new, empty output directory")
    p.add_argument("--checkpoint", metavar="final|latest|STEP",
                   help="what to export: the final model (default), the latest checkpoint or the one at STEP "
                        "(an unfinished run's too)")
    p.set_defaults(func=_export)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from .train.cli import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "prepare-data" and args.input and not args.output:
        print("error: prepare-data --input needs --output DIR", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
