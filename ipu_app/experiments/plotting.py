"""The one way figures are drawn and saved: matplotlib's Agg backend, PNG at 120 dpi, written atomically."""

from __future__ import annotations

import io
from pathlib import Path

DPI = 120


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, *, tight_bbox: bool = True) -> bytes:
    """The figure as PNG bytes; the figure is closed (its memory freed)."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, **({"bbox_inches": "tight"} if tight_bbox else {}))
    plt.close(fig)
    return buffer.getvalue()


def save_png(fig, path: str | Path, *, tight_bbox: bool = True) -> Path:
    from ..io import atomic_write_bytes

    atomic_write_bytes(path, png_bytes(fig, tight_bbox=tight_bbox))
    return Path(path)
