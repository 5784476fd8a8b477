"""Block-sparse linear backends, all with the signature of ``reference.linear``:
``linear(x, values, pattern, bias=None, frozen=None) -> y``.

* ``reference``: scatter into a dense weight + ``F.linear``; the spec the others are tested against.
* ``cpu``: C kernels for CPUs: 16x16 tiles (AMX bf16, AVX-512 fp32) for block sizes that are multiples
  of 16, token panels (fp32, any block size, any CPU with a C compiler) for the rest; bf16 without
  AMX runs them in fp32 on widened operands.
* ``triton``: Triton GPU kernels, block sizes 16, 32 and 64.
* ``auto``: per call, the fastest of these that covers the call (see :func:`choose`).

A fast backend hands every call it does not cover (a frozen inactive subset, an unsupported dtype or
device, block sizes below 16 on a GPU) to ``reference``, so any backend trains any model.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from ..choices import BACKEND_NAMES, SPARSE_BACKENDS
from ..sparse.pattern import BlockPattern
from . import reference
from .fast import compute_dtype

SparseLinearOp = Callable[..., torch.Tensor]

__all__ = ["BACKEND_NAMES", "BackendError", "auto_linear", "choose", "compute_dtype", "describe", "get_backend",
           "preload", "reference", "resolve_backend"]

_MODULES = {name: name for name in SPARSE_BACKENDS}

# ``auto`` uses a fast kernel only up to a density (1 - sparsity) where it still beats dense GEMMs,
# from the break-even sparsity that ``python -m ipu_app bench kernels`` measures (docs/ARCHITECTURE.md),
# with a margin. CPU 16x16 tiles: bf16 (AMX) breaks even at s = 0.24-0.43, fp32 (AVX-512) at s = 0.5
# or below. CPU token panels (fp32, AVX2 Zen 3, BERT-Medium FFN shapes, 4,096 tokens): b = 1 at
# s = 0.78-0.80, b = 4 at 0.60-0.62, b = 16 at 0.59. The GPU value is not measured yet.
AUTO_MAX_DENSITY = {("cpu", torch.bfloat16): 0.5, ("cpu", torch.float32): 0.4}
AUTO_MAX_DENSITY_DEFAULT = 0.5
# the CPU's token-panel kernels, by block size (b = 1 and 2: one row at a time; b >= 4: four rows)
PANEL_MAX_DENSITY = {1: 0.18, 2: 0.18}
PANEL_MAX_DENSITY_DEFAULT = 0.35
# bf16 that the CPU kernels run in fp32 (no AMX, or b < 16) races a dense bf16 GEMM: no faster than
# fp32 where bf16 is emulated (no AVX-512 BF16: on the Zen 3 machine PyTorch's bf16 products take 65x
# the fp32 time), about twice as fast with AVX-512 BF16 (Zen 4: 96 / 157 ms bf16 against 190 / 198
# ms fp32 for BERT-Medium's FFN products at 4,096 tokens), which halves the density at which the
# fp32 kernels still win; with AMX, dense bf16 is faster still and ``auto`` keeps the dense GEMMs.
NATIVE_BF16_DENSE_SPEEDUP = 2.0


def auto_max_density(backend: str, dtype: torch.dtype, block_size: int = 16) -> float:
    """The highest density at which ``auto`` runs ``backend``'s kernels for such a call."""
    if backend == "cpu":
        cpu = _module("cpu")
        kernel_dtype = torch.float32 if cpu.converts(dtype, block_size) else dtype
        if cpu.path("cpu", dtype, block_size) == "panels":
            limit = PANEL_MAX_DENSITY.get(block_size, PANEL_MAX_DENSITY_DEFAULT)
        else:
            limit = AUTO_MAX_DENSITY.get((backend, kernel_dtype), AUTO_MAX_DENSITY_DEFAULT)
        if kernel_dtype == dtype or not cpu.native_bf16():
            return limit
        return 0.0 if cpu.amx_available() else limit / NATIVE_BF16_DENSE_SPEEDUP
    return AUTO_MAX_DENSITY.get((backend, dtype), AUTO_MAX_DENSITY_DEFAULT)


class BackendError(ValueError):
    """A backend name is unknown or the backend cannot run here."""


_LOADED: dict[str, object] = {}


def _module(name: str):
    module = _LOADED.get(name)  # a dict lookup torch.compile traces (an import would break the graph)
    if module is None:
        module = _LOADED[name] = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return module


def preload() -> None:
    """Import every backend module now (``torch.compile`` then traces the backend choice without
    a graph break); a backend that cannot load here is skipped (its calls go to the reference op)."""
    for name in _MODULES:
        try:
            _module(name)
        except ImportError:
            pass


def resolve_backend(name: str) -> str:
    """Check a backend name and that it can run here; returns the name."""
    if name not in BACKEND_NAMES:
        raise BackendError(f"unknown sparse backend {name!r}; available: {list(BACKEND_NAMES)}")
    if name == "cpu":
        from . import cpu

        try:
            cpu.library()
        except cpu.KernelBuildError as exc:
            raise BackendError(str(exc)) from None
    if name == "triton":
        from . import triton

        if triton.triton is None:
            raise BackendError("backend triton needs the triton package (pip install triton); "
                               "use backend: auto or reference")
    return name


def get_backend(name: str) -> SparseLinearOp:
    """The op function of a backend."""
    if name == "auto":
        return auto_linear
    resolve_backend(name)
    return _module(name).linear


_FAST = {"cuda": "triton", "cpu": "cpu"}  # device type -> its fast backend


def _auto_choice(device_type: str, dtype: torch.dtype, block_size: int, density: float, frozen: bool) -> str:
    name = _FAST.get(device_type)
    if name is None or density > auto_max_density(name, dtype, block_size):
        return "reference"
    if not _module(name).covers(device_type, dtype, block_size, frozen):
        return "reference"
    return name


def choose(x: torch.Tensor, pattern: BlockPattern, frozen: torch.Tensor | None = None) -> str:
    """The backend ``auto`` runs this call on: Triton on a GPU, the C kernels on a CPU, each where it
    covers the call and the pattern is sparse enough to gain; the reference op otherwise."""
    return _auto_choice(x.device.type, compute_dtype(x), pattern.block_size, pattern.density, frozen is not None)


def auto_linear(x, values, pattern, bias=None, frozen=None):
    """``linear`` on the backend :func:`choose` picks."""
    return _module(choose(x, pattern, frozen)).linear(x, values, pattern, bias, frozen)


def kernel_line(config, device: torch.device, dtype: torch.dtype) -> str | None:
    """``describe`` for a run config's sparse layers on ``device`` in ``dtype`` (None: dense, or the IPU,
    whose layers run in its graph). ``config`` is a ``RunConfig`` (read, not imported: ops sits below it)."""
    s = config.sparsity
    if config.backend == "ipu" or s.mode == "dense":
        return None
    return describe(config.backend, device, dtype, s.block_size, s.ratio, frozen=s.inactive == "frozen")


def describe(name: str, device: torch.device, dtype: torch.dtype, block_size: int, sparsity: float,
             frozen: bool = False) -> str:
    """One line on what runs a model's sparse layers, for the training log."""
    if name == "auto":
        chosen = _auto_choice(device.type, dtype, block_size, 1.0 - sparsity, frozen)
    elif name in ("cpu", "triton"):
        chosen = name if _module(name).covers(device.type, dtype, block_size, frozen) else "reference"
    else:
        chosen = "reference"
    if chosen == "cpu":
        detail = "CPU kernels, " + _module("cpu").kernel_name(dtype, block_size)
    else:
        detail = {"reference": "dense GEMMs on the scattered weight (reference op)",
                  "triton": "Triton GPU kernels"}[chosen]
    why = ""
    if chosen == "reference" and name != "reference":
        if name != "auto":
            why = f"; {name} does not cover this"
        else:
            limit = auto_max_density(_FAST[device.type], dtype, block_size) if device.type in _FAST else None
            why = (f"; auto: density {1 - sparsity:.2f} > {limit:g}, where dense is faster"
                   if limit is not None and 1.0 - sparsity > limit else "; auto: no fast kernel covers this")
    return (f"sparse layers: {detail} (backend {name}, block size {block_size}, "
            f"{str(dtype).replace('torch.', '')}{why})")
