"""What the benches share: round-robin median timing, the paper's epsilon, the break-even sparsity,
argument checks, CSV, and the command's frame (output folder, one-line errors)."""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path
from typing import Callable

import torch

from ...choices import BENCH_DTYPES
from ...ops import autotune

DTYPES = dict(zip(BENCH_DTYPES, (torch.float32, torch.bfloat16, torch.float16)))


class BenchError(ValueError):
    """Bad benchmark arguments."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                 warmup: int = 2) -> dict[str, float]:
    """Median wall time of each function, timed round-robin so that machine noise hits all alike."""
    return autotune.median_times(fns, repeats, warmup, sync=lambda: sync(device))


def epsilon(t_sparse: float, t_dense: float, density: float) -> float:
    """The paper's cost of a sparse FLOP relative to a dense one:
    ``(t_sparse / FLOPs_sparse) / (t_dense / FLOPs_dense) = t_sparse / (density * t_dense)``
    (sparse is faster than dense while epsilon < 1 / density)."""
    return t_sparse / (density * t_dense)


def break_even(sparsities: list[float], speedups: list[float]) -> str:
    """The sparsity above which sparse is faster than dense. Between measured points the time ratio
    sparse/dense is taken as linear in the sparsity (sparse time is close to affine in the density)."""
    points = sorted(zip(sparsities, speedups))
    if not points:
        return "n/a"
    if points[0][1] >= 1.0:
        return f"<= {points[0][0]:g}"
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v0 < 1.0 <= v1:
            r0, r1 = 1.0 / v0, 1.0 / v1
            return f"{s0 + (r0 - 1.0) * (s1 - s0) / (r0 - r1):.3f}"
    return f"> {points[-1][0]:g}"


def fmt(v: float, spec: str) -> str:
    return "n/a" if math.isnan(v) else format(v, spec)


def csv_bytes(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def device_named(name: str) -> torch.device:
    """``--device``: cpu, cuda or auto (a GPU when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA GPU here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {name}: use cpu, cuda or auto")
    return device


def check_positive(name: str, values: list) -> None:
    if any(v <= 0 for v in values):
        raise BenchError(f"{name} must be positive, got {values}")


def check_sparse_options(sparsities: list[float], block_sizes: list[int], allowed_blocks) -> None:
    bad_s = [s for s in sparsities if not 0.0 <= s < 1.0]
    if bad_s:
        raise BenchError(f"--sparsity values must be in [0, 1), got {bad_s}")
    bad_b = [b for b in block_sizes if b not in allowed_blocks]
    if bad_b:
        allowed = ", ".join(map(str, allowed_blocks[:-1]))
        raise BenchError(f"--block-size must be {allowed} or {allowed_blocks[-1]}, got {bad_b}")


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_bench(output: str, body: Callable[[Path], None]) -> int:
    """The frame of a bench command: the output folder made (never a file overwritten by it), ``body``
    run, a bad argument one ``error:`` line and exit code 2."""
    out = Path(output)
    try:
        if out.exists() and not out.is_dir():
            raise BenchError(f"--output {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        body(out)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say(f"written to {out}/")
    return 0
