"""``revalidate``: recompute finished runs' final validation into their summary.json."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("revalidate", help="recompute finished runs' final validation (runs written before "
                       "metrics_version 2 may hold NSP loss and MLM accuracy swapped) into their summary.json")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--force", action="store_true", help="also runs at the current metrics_version")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.revalidate import main as revalidate_main

    return revalidate_main(args.run_dirs, force=args.force)
