"""Graphcore IPU execution through PopTorch (``backend: ipu``).

Nothing here imports ``poptorch`` at module level: :func:`import_poptorch` does, when an IPU run
starts, and every function that needs it takes the module as an argument, so the host-side logic
(options, pipeline placement, the phase-boundary pattern upload, popsparse conversions, ``poprun``
command lines) is tested without the Poplar SDK against a recording stand-in.
"""

from __future__ import annotations


class IpuUnavailable(RuntimeError):
    """The Poplar SDK / PopTorch is not installed here; one actionable line."""


INSTALL_HINT = ("backend: ipu needs Graphcore's Poplar SDK and its PopTorch wheel: source the SDK's "
                "enable.sh, then `pip install $POPLAR_SDK_ENABLED/../poptorch-*.whl` (PopTorch is on no public "
                "package index)")


def import_poptorch():
    """The ``poptorch`` module, or :class:`IpuUnavailable` saying what to install."""
    try:
        import poptorch
    except ImportError:
        raise IpuUnavailable(INSTALL_HINT) from None
    return poptorch
