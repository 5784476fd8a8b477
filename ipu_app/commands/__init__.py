"""Every command of the tool, one module each: ``add_parser(subparsers)`` declares its options and sets
``func`` to its handler, which returns the exit code. ``python -m ipu_app`` and ``run_pretraining.py``
only dispatch here. Importing a command module imports no torch: handlers import what they run.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# In the order ``--help`` lists them.
COMMANDS = ("prepare_data", "train", "sweep", "report", "ipu_command", "build_kernels", "bench", "revalidate",
            "evaluate", "finetune", "demo_task", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ipu_app", description="DynSparse BERT tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    """``python -m ipu_app COMMAND ...``: bad input is one ``error:`` line and exit code 1."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
