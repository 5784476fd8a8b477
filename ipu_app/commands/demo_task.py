"""``demo-task``: a small classification task from the embedded corpus (State of the Union or encyclopedia?)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("demo-task", help="write a small classification task (train.tsv, dev.tsv) from the embedded "
                                         "corpus: is a sentence from a State of the Union address or an encyclopedia?")
    p.add_argument("--output", required=True, help="new, empty output directory")
    p.add_argument("--train", type=int, default=2000, help="training sentences (default: 2000)")
    p.add_argument("--dev", type=int, default=500, help="dev sentences (default: 500)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.tasks import write_demo_task

    counts = write_demo_task(args.output, train=args.train, dev=args.dev, seed=args.seed)
    print(f"wrote {args.output}/train.tsv ({counts['train']:,} sentences) and dev.tsv ({counts['dev']:,}): "
          "State of the Union address or encyclopedia?", file=sys.stderr)
    return 0
