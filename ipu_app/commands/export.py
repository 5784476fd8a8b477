"""``export``: a run's model (final, latest or a step's checkpoint) as a dense Hugging Face folder plus
the sparsity sidecar."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a run's model as a dense Hugging Face folder + sparsity sidecar")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--output", required=True, help="new, empty output directory")
    p.add_argument("--checkpoint", metavar="final|latest|STEP",
                   help="what to export: the final model (default), the latest checkpoint or the one at STEP "
                        "(an unfinished run's too)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.checkpoint is None or args.checkpoint == "final":
        print(export_run(args.run, args.output))
        return 0
    from ..model.export import export_hf
    from ..rundir import RunDir
    from ..train.evaluate import evaluation_data, load_run_model

    run_dir = RunDir(args.run)
    config = run_dir.load_config()
    data_dir, manifest = evaluation_data(config, None)
    model, source, step = load_run_model(run_dir, config, args.checkpoint, vocab_size=manifest["vocab_size"])
    tokenizer = run_dir.tokenizer_dir if run_dir.tokenizer_dir.is_dir() else data_dir / "tokenizer"  # unfinished
    print(f"exporting {run_dir.path} ({source}, step {step})", file=sys.stderr)
    print(export_hf(model, args.output, tokenizer))
    return 0


def export_run(run_dir: str | Path, output_dir: str | Path) -> Path:
    """Export the model a run saved in ``RUN_DIR/model`` with the tokenizer in ``RUN_DIR/tokenizer``."""
    from ..model.bert import SparseBertForPreTraining
    from ..model.export import ExportError, export_hf
    from ..rundir import RunDir

    run = RunDir(run_dir)
    model_dir = run.model_dir
    if not (model_dir / "model.safetensors").is_file():
        raise ExportError(f"{run} holds no saved model (expected {model_dir}/model.safetensors)")
    tokenizer_dir = run.tokenizer_dir
    model = SparseBertForPreTraining.load(model_dir)
    return export_hf(model, output_dir, tokenizer_dir if tokenizer_dir.is_dir() else None)
