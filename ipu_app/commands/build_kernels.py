"""``build-kernels``: compile the CPU kernels of backend cpu now (else on first use)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("build-kernels", help="compile the CPU kernels of backend cpu now (else on first use)")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached library exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ops import cpu

    try:
        path = cpu.build(force=args.force)
    except cpu.KernelBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
