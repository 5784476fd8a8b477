"""Block-sparse linear backends, all with the signature of ``reference.linear``:
``linear(x, values, pattern, bias=None, frozen=None) -> y``.

* ``reference``: scatter into a dense weight + ``F.linear``; the spec the others are tested against.
* ``cpu``: C kernels for CPUs: 16x16 tiles (AMX bf16, AVX-512 BF16 pair dot products, AVX-512 fp32)
  for block sizes that are multiples of 16, token panels (fp32, any block size, any CPU with a C
  compiler) for the rest; other bf16 runs them in fp32 on widened operands.
* ``triton``: Triton GPU kernels, block sizes 16, 32 and 64.
* ``auto``: on a CPU, what measuring found fastest for each layer kind (dense or one kernel path;
  :mod:`ops.autotune`); elsewhere, or with measuring off, by constant density limits (:func:`choose`).

A fast backend hands every call it does not cover (a frozen inactive subset, an unsupported dtype or
device, block sizes below 16 on a GPU) to ``reference``, so any backend trains any model.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

from ..choices import BACKEND_NAMES, SPARSE_BACKENDS
from ..sparse.pattern import BlockPattern
from . import reference
from .fast import compute_dtype

SparseLinearOp = Callable[..., torch.Tensor]

__all__ = ["BACKEND_NAMES", "BackendError", "auto_linear", "choose", "compute_dtype", "decisions_line", "describe",
           "get_backend", "known_decisions", "linear_for", "preload", "reference", "resolve_backend", "tune_layers"]

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
# bf16 on the AVX-512 BF16 kernels (pair dot products) against dense bf16, one training step of a layer
# at 4,096 tokens, Zen 4: the b = 16 tiles break even near s = 0.5 (1.03x), gain 1.3x at 0.7 and
# 2.4-3.3x at 0.9; the b = 4/8 token panels gain 1.7-2.2x at 0.9
BF16_PAIRS_MAX_DENSITY = 0.3


def auto_max_density(backend: str, dtype: torch.dtype, block_size: int = 16) -> float:
    """The highest density at which ``auto`` runs ``backend``'s kernels for such a call."""
    if backend == "cpu":
        cpu = _module("cpu")
        kernel_dtype = torch.float32 if cpu.converts(dtype, block_size) else dtype
        if cpu.path("cpu", dtype, block_size) in ("tiles_bf16", "panels_bf16"):
            return BF16_PAIRS_MAX_DENSITY
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
DENSE_LABEL = "reference"  # autotune's label of the dense GEMMs


def _auto_choice(device_type: str, dtype: torch.dtype, block_size: int, density: float, frozen: bool) -> str:
    name = _FAST.get(device_type)
    if name is None or density > auto_max_density(name, dtype, block_size):
        return "reference"
    if not _module(name).covers(device_type, dtype, block_size, frozen):
        return "reference"
    return name


def _measures(device_type: str, dtype: torch.dtype, block_size: int, frozen: bool) -> bool:
    """Whether ``auto`` decides such a call by measuring (:mod:`ops.autotune`): on a CPU whose kernels
    cover it, with measuring on."""
    from . import autotune

    return (device_type == "cpu" and not frozen and autotune.enabled()
            and _module("cpu").covers(device_type, dtype, block_size))


def choose(x: torch.Tensor, pattern: BlockPattern, frozen: torch.Tensor | None = None) -> str:
    """What ``auto`` runs this call on: on a CPU, what measuring found fastest for the call's kind
    (``"reference"`` or ``"cpu/<path>"``, measured on first meeting it; :mod:`ops.autotune`); where
    measuring is off or cannot run (inside ``torch.compile``), Triton on a GPU and the C kernels on a
    CPU where they cover the call and the pattern is sparse enough to gain, the reference op otherwise."""
    dtype = compute_dtype(x)
    if not torch.compiler.is_compiling() and _measures(x.device.type, dtype, pattern.block_size, frozen is not None):
        from . import autotune

        kind = autotune.LayerKind.of(pattern, dtype, x.numel() // max(1, pattern.in_features))
        return autotune.TUNER.decide(kind).choice
    return _auto_choice(x.device.type, dtype, pattern.block_size, pattern.density, frozen is not None)


def linear_for(choice: str) -> SparseLinearOp:
    """The op of a choice: a backend name, or ``"cpu/<path>"`` (one path of the CPU kernels)."""
    backend, _, kernels = choice.partition("/")
    if kernels:
        return functools.partial(_module(backend).linear, kernels=kernels)
    return _module(backend).linear


def auto_linear(x, values, pattern, bias=None, frozen=None):
    """``linear`` on what :func:`choose` picks."""
    return linear_for(choose(x, pattern, frozen))(x, values, pattern, bias, frozen)


def _measured_layers(layers, device: torch.device, dtype: torch.dtype, tokens: int, threads: int | None):
    """``(layer, kind)`` for each layer of ``layers`` that ``auto`` decides by measuring."""
    from . import autotune

    for layer in layers:
        pattern = layer.pattern
        if getattr(layer, "backend", None) == "auto" and _measures(device.type, dtype, pattern.block_size,
                                                                   layer.frozen is not None):
            yield layer, autotune.LayerKind.of(pattern, dtype, tokens, threads)


def tune_layers(layers, device: torch.device, dtype: torch.dtype, tokens: int, threads: int | None = None,
                progress: bool = False) -> list:
    """Decide, by measuring, what runs each ``auto`` layer of ``layers`` (modules with ``backend``,
    ``pattern`` and ``frozen``) for calls of ``tokens`` tokens in ``dtype``, and pin it on the layer
    (``layer.kernels``, which its forward then uses, compiled or not). Returns the decisions, one per
    layer kind, in the order the layers come; [] where measuring does not apply."""
    from . import autotune

    decisions: dict[str, object] = {}
    for layer, kind in _measured_layers(layers, device, dtype, tokens, threads):
        decision = decisions.get(kind.key) or autotune.TUNER.decide(kind, progress)
        decisions[kind.key] = decision
        layer.kernels = decision.choice
    return list(decisions.values())


def known_decisions(layers, device: torch.device, dtype: torch.dtype, tokens: int,
                    threads: int | None = None) -> list[tuple[object, object]]:
    """``(kind, decision or None)`` per ``auto`` layer kind, measuring nothing (for ``--describe``)."""
    from . import autotune

    found: dict[str, tuple] = {}
    for _, kind in _measured_layers(layers, device, dtype, tokens, threads):
        if kind.key not in found:
            found[kind.key] = (kind, autotune.TUNER.get(kind))
    return list(found.values())


def _choice_name(choice: str, dtype: torch.dtype, block_size: int) -> str:
    if choice.startswith("cpu/"):
        return "CPU kernels, " + _module("cpu").kernel_name(dtype, block_size, choice[4:])
    return "dense GEMMs (reference op)"


def decisions_line(kinds: list, dtype: torch.dtype) -> str:
    """The start-up line for measured ``auto`` layers: per kind, what runs it and its measured speed
    against dense. ``kinds``: decisions, or ``(kind, decision or None)`` pairs (``--describe``)."""
    parts, sources = [], set()
    for item in kinds:
        kind, d = (item, item) if not isinstance(item, tuple) else item
        kind = getattr(kind, "kind", kind)
        shape = f"{kind.out_features}x{kind.in_features}"
        if d is None:
            parts.append(f"{shape}: to be measured")
            sources.add("to be measured when a run starts")
            continue
        sources.add({"measured": "measured now", "cached": "measured before (cache)",
                     "run": "as the run recorded"}[d.source])
        if d.choice == "reference":
            best = d.best_kernel
            tail = f" (the best kernels: {d.ms[DENSE_LABEL] / d.ms[best]:.2f}x dense)" if best else ""
            parts.append(f"{shape}: {_choice_name(d.choice, dtype, kind.block_size)}{tail}")
        else:
            parts.append(f"{shape}: {_choice_name(d.choice, dtype, kind.block_size)}, {d.speedup:.2f}x dense")
    first = getattr(kinds[0], "kind", None) or kinds[0][0]
    return (f"sparse layers (backend auto, block size {first.block_size}, {first.dtype}, {first.tokens} tokens, "
            f"{first.threads} threads; {', '.join(sorted(sources))}): " + "; ".join(parts))


def kernel_line(config, device: torch.device, dtype: torch.dtype, decisions: list | None = None) -> str | None:
    """``describe`` for a run config's sparse layers on ``device`` in ``dtype`` (None: dense, or the IPU,
    whose layers run in its graph); ``decisions``: what ``auto`` measured per layer kind
    (:func:`tune_layers`, or :func:`known_decisions`' pairs). ``config`` is a ``RunConfig`` (read, not
    imported: ops sits below it)."""
    s = config.sparsity
    if config.backend == "ipu" or s.mode == "dense":
        return None
    if decisions:
        return decisions_line(decisions, dtype)
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
