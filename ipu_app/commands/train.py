"""``train`` (= ``python run_pretraining.py``): train one config into one run directory. The backend is
chosen here: the torch trainer, or the IPU trainer for ``backend: ipu``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config
from ..rundir import RunDir

DESCRIPTION = "DynSparse BERT pre-training"
EPILOG = """examples:
  python run_pretraining.py --config bert_medium_sparse
  python run_pretraining.py --config bert_tiny_sparse --steps 300 --set training.batch_size=32
  python run_pretraining.py --config bert_mini_sparse --describe --json
  python run_pretraining.py --resume runs/bert_medium_sparse
  python run_pretraining.py --config bert_tiny_sparse --init-from runs/bert_tiny_sparse \
      --set data.seq_len=512 --set data.max_predictions=76 --output-dir runs/bert_tiny_sparse_512
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a config name from configs/ (e.g. bert_medium_sparse) or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set sparsity.ratio=0.8")
    parser.add_argument("--steps", type=int, help="training steps (the warmup keeps its fraction of the run)")
    parser.add_argument("--seed", type=int, help="random seed (patterns, initialisation, data order)")
    parser.add_argument("--output-dir", help="the run directory (default: runs/CONFIG_NAME); must be new or empty")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    parser.add_argument("--init-from", metavar="PATH",
                        help="a new run starting from these weights: a run directory (its final model, else its "
                             "latest checkpoint), a checkpoint directory, an export or a Hugging Face BERT folder; "
                             "new optimizer and schedule (sets training.init_from; the pattern: "
                             "sparsity.init_pattern)")
    parser.add_argument("--describe", action="store_true", help="report the resolved config, sizes and FLOPs; train nothing")
    parser.add_argument("--json", action="store_true", help="with --describe: one JSON object on stdout")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for this process (new runs and --resume; overrides training.threads "
                             "and OMP_NUM_THREADS). On a machine shared with other jobs use fewer than the cores")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """``run_pretraining.py``'s parser: the train command's options on their own."""
    parser = argparse.ArgumentParser(prog="run_pretraining.py", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train one config (the same as python run_pretraining.py)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if args.resume:
        extra = [flag for flag, value in (("--config", args.config), ("--set", args.overrides), ("--steps", args.steps),
                                          ("--seed", args.seed), ("--output-dir", args.output_dir),
                                          ("--init-from", args.init_from)) if value]
        if extra:
            raise ConfigError(f"--resume continues the run with its saved config; drop {', '.join(extra)}")
    elif not args.config:
        raise ConfigError("give --config NAME (see configs/) or --resume RUN_DIR")
    if args.json and not args.describe:
        raise ConfigError("--json goes with --describe")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")


def main(argv=None) -> int:
    """``python run_pretraining.py ...``."""
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    """Train (or describe); bad input is one ``error:`` line and exit code 1, a stop 130."""
    try:
        with _terminate_as_interrupt():
            return _main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user-facing errors are one line; bugs keep their traceback
        if not _is_user_error(exc):
            raise
        report_error(f"error: {exc}")
        return 1


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler's stop) is handled like Ctrl-C outside the training loop too: during
    start-up the new run directory is removed again and the exit code is 130 (the loop itself and
    the final writes turn both signals into "checkpoint, then stop")."""
    import signal

    from .. import signals

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    with signals.handling(interrupt, (signal.SIGTERM,)):
        yield


def report_error(line: str) -> None:
    """Print a one-line error; under torchrun, rank 0 alone prints it and every rank hands it to
    torchrun's error file, so that torchrun's failure block ends with it (its "Root Cause")
    instead of the "To enable traceback" hint."""
    import os

    if os.environ.get("RANK", "0") in ("0", ""):
        print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import time

        try:
            Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
        except OSError:
            pass


def _is_user_error(exc: Exception) -> bool:
    from ..data.corpus import CorpusError
    from ..ipu import IpuUnavailable
    from ..ops import BackendError
    from ..sparse.updater import UpdaterError
    from ..train.checkpoint import CheckpointError
    from ..train.distributed import PatternMismatchError
    from ..train.init_from import InitFromError
    from ..train.metrics import MetricsError
    from ..train.trainer import TrainingDiverged

    return isinstance(exc, (ConfigError, CorpusError, CheckpointError, BackendError, UpdaterError,
                            PatternMismatchError, IpuUnavailable, OSError, MetricsError, TrainingDiverged,
                            InitFromError))


def _main(args) -> int:
    from ..train.distributed import DistContext

    _check_args(args)
    ctx = DistContext.from_env()  # torchrun sets RANK / WORLD_SIZE; one process otherwise
    if args.resume:
        run = RunDir(args.resume)
        config = run.load_config()
    else:
        config = load_config(args.config, args.overrides, steps=args.steps, seed=args.seed,
                             world_size=ctx.world_size)
        if args.init_from:
            config.training.init_from = str(Path(args.init_from).resolve())
        if config.training.init_from and not Path(config.training.init_from).is_dir():
            raise ConfigError(f"training.init_from={config.training.init_from}: no such directory (a run, a "
                              "checkpoint or a Hugging Face BERT folder)")
        run = RunDir(args.output_dir or Path("runs") / config.name)
        if "training.micro_batch_size" in config.adjusted and ctx.is_main and not args.describe:
            old, new = config.adjusted["training.micro_batch_size"]
            print(f"note: training.micro_batch_size {old} -> {new} to fit training.batch_size="
                  f"{config.training.batch_size} (set training.micro_batch_size to choose)", file=sys.stderr)
        _adopt_data_vocabulary(config)
    config.accumulation_steps(ctx.world_size)  # batch = micro x accumulation x processes, or a clear error
    if args.describe:
        from .describe import describe, format_description

        if ctx.is_main:
            info = describe(config, world_size=ctx.world_size, threads=args.threads)
            print(json.dumps(info) if args.json else format_description(info))
        return 0
    if config.backend == "ipu":  # before any run directory exists: no SDK is one line, nothing written
        from ..ipu import import_poptorch
        from ..ipu.trainer import check_ipu_config

        check_ipu_config(config)
        import_poptorch()
    if args.resume and run.is_finished():
        if ctx.is_main:
            print(f"{run} finished already ({RunDir.SUMMARY}); nothing to resume", file=sys.stderr)
        return 0
    if not args.resume:
        run.check_new()  # on every rank, before any rank creates it
    ctx.init(config.training.dist_timeout_s)
    try:
        return _train(args, ctx, config, run)
    finally:
        ctx.shutdown()


def _adopt_data_vocabulary(config: RunConfig) -> None:
    """With ``data.dir``, ``data.tokenizer`` and ``data.vocab_size`` are the prepared data's (its
    manifest), so that ``config.yaml`` and ``--describe`` record the model actually built; for the
    embedded corpus they stay what was asked (they name its cache)."""
    from ..data.prepare import data_vocabulary

    if config.data.dir:
        found = data_vocabulary(config.data)
        if found["from"] == "data":
            config.data.tokenizer, config.data.vocab_size = found["tokenizer"], found["vocab_size"]


def _train(args, ctx, config: RunConfig, run: RunDir) -> int:
    created = not run.path.exists()
    ctx.barrier()  # every rank has checked the directory
    if not args.resume and ctx.is_main:
        run.prepare()
        run.write_config(config)
    lock = run.lock() if ctx.is_main else None  # one process trains a run directory at a time
    ctx.barrier()
    try:
        return _train_locked(args, ctx, config, run, created)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(args, ctx, config: RunConfig, run: RunDir, created: bool) -> int:
    from ..train.trainer import Trainer

    run_dir = run.path
    resume = bool(args.resume)
    if resume and not run.has_checkpoint():
        # Stopped before its first checkpoint: nothing to continue, so it starts again in place.
        if ctx.is_main:
            print(f"{run_dir} has no checkpoint yet: starting it again from step 0 with its saved config",
                  file=sys.stderr)
        resume = False
        if ctx.is_main:
            run.forget_progress()
    try:
        from ..data.prepare import ready_data

        data_dir = ready_data(config.data, progress=not args.no_progress and ctx.is_main)  # before the trainer
        if config.backend == "ipu":
            from ..ipu.trainer import IpuTrainer, import_popdist

            trainer = IpuTrainer(config, run_dir, resume=resume, progress=not args.no_progress,
                                 popdist=import_popdist(), threads=args.threads, data_dir=data_dir)
        else:
            trainer = Trainer(config, run_dir, resume=resume, progress=not args.no_progress, dist=ctx,
                              threads=args.threads, data_dir=data_dir)
    except BaseException:
        if not args.resume and ctx.is_main:  # the run never started: leave no half-made run directory
            run.remove_new(created)
        raise
    summary = trainer.train()
    if not ctx.is_main:
        return 0 if summary is not None or not trainer.stopped_by_signal else 130
    if summary is None:
        print(f"stopped at step {trainer.step}; checkpoint written. Continue with: "
              f"python run_pretraining.py --resume {run_dir}", file=sys.stderr)
        return 130 if trainer.stopped_by_signal else 0
    print(json.dumps({k: summary[k] for k in ("final_val_mlm_loss", "total_non_embedding_flops",
                                               "tokens_per_second", "wall_time_s")}))
    print(f"run written to {run_dir} (export: python -m ipu_app export --run {run_dir} --output DIR)", file=sys.stderr)
    return 0
