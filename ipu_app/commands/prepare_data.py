"""``prepare-data``: text, JSON Lines, Parquet or datasets folders (or the embedded corpus) -> shards."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
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
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.prepare import prepare_embedded, prepare_files, prepared_counts, validation_warning
    from ..data.shards import load_manifest

    if args.input and not args.output:
        print("error: prepare-data --input needs --output DIR", file=sys.stderr)
        return 2
    if args.input:
        path = prepare_files(args.input, args.output, args.tokenizer, args.vocab_size, args.document_mode,
                             overwrite=args.overwrite, input_format=args.input_format, text_field=args.text_field,
                             id_field=args.id_field, dataset_split=args.dataset_split, workers=args.workers,
                             documents_per_shard=args.documents_per_shard, shard_bytes=int(args.shard_mb * 2**20))
    else:
        path = prepare_embedded(args.tokenizer, args.vocab_size, cache_dir=args.output)
    manifest = load_manifest(path)
    print(f"prepared {path}: {prepared_counts(manifest)}", file=sys.stderr)
    warning = validation_warning(manifest)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(path)
    return 0
