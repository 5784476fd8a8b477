"""``python -m ipu_app <command>``: the home of every command besides training."""

from __future__ import annotations

import argparse
import sys


def _prepare_data(args) -> int:
    from .data.prepare import prepare_embedded, prepare_files

    if args.input:
        path = prepare_files(args.input, args.output, args.tokenizer, args.vocab_size, args.document_mode)
    else:
        path = prepare_embedded(args.tokenizer, args.vocab_size, cache_dir=args.output)
    print(path)
    return 0


def _export(args) -> int:
    from .model.export import export_run

    print(export_run(args.run, args.output))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ipu_app", description="DynSparse BERT tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare-data", help="text files (or the embedded corpus) -> pre-training shards")
    p.add_argument("--input", nargs="*", default=[], help="UTF-8 text files; none = the embedded corpus")
    p.add_argument("--output", help="output directory (embedded corpus: the cache root)")
    p.add_argument("--tokenizer", default="bert-base-uncased", choices=["bert-base-uncased", "train"])
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--document-mode", default="blank_lines", choices=["blank_lines", "file"])
    p.set_defaults(func=_prepare_data)
    p = sub.add_parser("export", help="export a run's model as a dense Hugging Face folder + sparsity sidecar")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--output", required=True, help="new, empty output directory")
    p.set_defaults(func=_export)
    return parser


def main(argv=None) -> int:
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
