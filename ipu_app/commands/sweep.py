"""``sweep``: a grid of training runs from a sweep spec (configs/sweeps/), resumable."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of training runs from a sweep spec (configs/sweeps/)")
    p.add_argument("spec", help="a sweep spec YAML path or a name under configs/sweeps (e.g. pareto_cpu)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (CPU threads are split)")
    p.add_argument("--output-dir", help="the sweep directory (default runs/sweeps/NAME)")
    p.add_argument("--only", nargs="+", default=[], metavar="RUN", help="run only these runs of the sweep")
    p.add_argument("--devices", nargs="+", metavar="GPU",
                   help="GPUs to spread the runs over, e.g. 0,1 (each run sees one as cuda:0; with --jobs above "
                        "the number of GPUs several small runs share one)")
    p.add_argument("--list", action="store_true", help="list the runs and their state; train nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.sweep import SweepRunner, format_plan, format_results
    from ..experiments.sweep_spec import load_sweep

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
