"""``report``: tables and a figure from finished run directories (never trains)."""

from __future__ import annotations

from ..experiments.figures import NAMES as FIGURE_NAMES


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="tables and a figure from finished run directories (never trains)")
    p.add_argument("runs_dir", help="a sweep directory or any directory holding run directories")
    p.add_argument("--figure", choices=FIGURE_NAMES, metavar="FIGURE",
                   help=f"one of {', '.join(FIGURE_NAMES)} (default: the sweep's 'figure')")
    p.add_argument("--output", help="output directory (default RUNS_DIR/report)")
    p.add_argument("--layer", default=None,
                   help="exploration: the weight whose accumulated pattern is drawn (default layer 2's FFN up)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.report import build_report

    for path in build_report(args.runs_dir, args.figure, args.output, layer=args.layer):
        print(path)
    return 0
