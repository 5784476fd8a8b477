"""``python -m ipu_app COMMAND``: dispatches to ``ipu_app.commands`` (one module per command)."""

from __future__ import annotations

from .commands import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
