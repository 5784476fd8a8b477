"""One way to take over SIGINT/SIGTERM for a block of code (training, a sweep, start-up)."""

from __future__ import annotations

import contextlib
import signal
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def handling(handler: Callable[[int, object], None], signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[bool]:
    """Run the block with ``handler`` on ``signals``, restoring the previous handlers after it. Off the
    main thread (where Python allows no handlers) the signals are left alone; the block gets False."""
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield bool(previous)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
