"""``bench kernels``: forward and both gradients of one sparse linear (``y = x W^T``, ``dX``,
``dValues``) against the dense product in the same dtype (oneDNN on a CPU, cuBLAS on a GPU), for our
kernels (``cpu`` / ``triton``) and PyTorch's BSR tensors, over shapes x tokens x sparsity x block size:
the paper's epsilon per case and the break-even sparsity. Writes kernels.{csv,md,png} and
break_even.csv."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ...choices import BENCH_SHAPES, SUPPORTED_BLOCK_SIZES
from ...io import atomic_write_bytes
from ..plotting import save_png
from .common import DTYPES, break_even, check_positive, check_sparse_options, csv_bytes, device_named, epsilon, fmt, \
    median_times, run_bench, say


@dataclass
class KernelRow:
    shape: str
    in_features: int
    out_features: int
    tokens: int
    block_size: int
    sparsity: float
    dtype: str
    device: str
    method: str           # ours: cpu | triton; or torch_bsr
    dense_ms: float
    sparse_ms: float      # nan where the method does not run this case

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms

    @property
    def epsilon(self) -> float:
        return epsilon(self.sparse_ms, self.dense_ms, 1.0 - self.sparsity)


def _dense_step(x, w, gy):
    return lambda: torch.autograd.grad(F.linear(x, w), (x, w), gy)


def _ours_step(op, x, values, pattern, gy):
    return lambda: torch.autograd.grad(op(x, values, pattern), (x, values), gy)


def _bsr_step(x, values, pattern, gy):
    """PyTorch's BSR tensors: Y = W x^T, dX = W^T dY^T (a second BSR tensor, built once like our
    metadata) and dValues by ``sampled_addmm`` at the active elements. None where PyTorch has no
    such kernel for this dtype/device."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "BSR support is in beta state"
        w = pattern.to_bsr(values.detach())
        pattern_t, perm = pattern.transposed()
        w_t = pattern_t.to_bsr(values.detach()[perm].transpose(1, 2).contiguous())
        mask = torch.sparse_csr_tensor(*_element_csr(pattern, x.dtype), size=pattern.shape, check_invariants=False)

    def step():
        y = (w @ x.t()).t()
        dx = (w_t @ gy.t()).t()
        dv = torch.sparse.sampled_addmm(mask, gy.t(), x)
        return y, dx, dv

    try:
        step()
    except (RuntimeError, NotImplementedError):
        return None
    return step


def _element_csr(pattern, dtype: torch.dtype):
    """CSR (row pointers, columns, ones) of the pattern's active elements."""
    mask = pattern.mask()
    crow = torch.zeros(pattern.out_features + 1, dtype=torch.int64, device=mask.device)
    crow[1:] = mask.sum(1).cumsum(0)
    cols = mask.nonzero()[:, 1]
    return crow, cols, torch.ones(cols.numel(), dtype=dtype, device=mask.device)


def bench_kernels(shapes: list[str], tokens: list[int], sparsities: list[float], block_sizes: list[int],
                  dtype: str, device: torch.device, repeats: int, bsr: bool = True,
                  progress: Callable[[str], None] | None = None) -> list[KernelRow]:
    from ... import ops
    from ...sparse.init import random_pattern
    from ...sparse.pattern import BlockPattern

    torch_dtype = DTYPES[dtype]
    ours_name = "triton" if device.type == "cuda" else "cpu"
    ours = ops.get_backend(ours_name)
    covers = ops._module(ours_name).covers
    rows: list[KernelRow] = []
    g = torch.Generator().manual_seed(0)
    for shape in shapes:
        n_in, n_out = BENCH_SHAPES[shape]
        for T in tokens:
            x = torch.randn(T, n_in, generator=g).to(device, torch_dtype).requires_grad_()
            gy = torch.randn(T, n_out, generator=g).to(device, torch_dtype)
            w = (torch.randn(n_out, n_in, generator=g) * 0.02).to(device, torch_dtype).requires_grad_()
            dense = _dense_step(x, w, gy)
            for b in block_sizes:
                for s in sparsities:
                    p = random_pattern(n_out, n_in, b, s, g)
                    pattern = BlockPattern(n_out, n_in, b, p.rows.to(device), p.cols.to(device))
                    values = (torch.randn(pattern.nnz, b, b, generator=g) * 0.02).to(device, torch_dtype)
                    values.requires_grad_()
                    fns = {"dense": dense}
                    if covers(device.type, torch_dtype, b):
                        fns[ours_name] = _ours_step(ours, x, values, pattern, gy)
                    if bsr:
                        step = _bsr_step(x.detach(), values.detach(), pattern, gy)
                        if step is not None:
                            fns["torch_bsr"] = step
                    ms = {name: 1e3 * t for name, t in median_times(fns, device, repeats).items()}
                    base = dict(shape=shape, in_features=n_in, out_features=n_out, tokens=T, block_size=b,
                                sparsity=s, dtype=dtype, device=str(device), dense_ms=ms["dense"])
                    nan = float("nan")
                    rows.append(KernelRow(method=ours_name, sparse_ms=ms.get(ours_name, nan), **base))
                    if bsr:
                        rows.append(KernelRow(method="torch_bsr", sparse_ms=ms.get("torch_bsr", nan), **base))
                    if progress:
                        progress(_row_line(rows[-2] if bsr else rows[-1]))
    return rows


def _row_line(r: KernelRow) -> str:
    return (f"{r.shape} T={r.tokens} b={r.block_size} s={r.sparsity:g}: dense {r.dense_ms:.2f} ms, "
            f"{r.method} {fmt(r.sparse_ms, '.2f')} ms (x{fmt(r.speedup, '.2f')}, eps {fmt(r.epsilon, '.2f')})")


def kernel_break_even(rows: list[KernelRow]) -> list[dict]:
    groups: dict[tuple, list[KernelRow]] = {}
    for r in rows:
        groups.setdefault((r.shape, r.tokens, r.block_size, r.method), []).append(r)
    out = []
    for (shape, T, b, method), rs in groups.items():
        ok = [r for r in rs if not math.isnan(r.sparse_ms)]
        out.append({"shape": shape, "tokens": T, "block_size": b, "method": method,
                    "break_even_sparsity": break_even([r.sparsity for r in ok], [r.speedup for r in ok])})
    return out


def kernel_table(rows: list[KernelRow]) -> str:
    methods = sorted({r.method for r in rows})
    head = "| shape | tokens | b | s | dense ms | " + " | ".join(
        f"{m} ms | {m} speedup | {m} eps" for m in methods) + " |"
    lines = [head, "|" + "---|" * (5 + 3 * len(methods))]
    cases: dict[tuple, dict[str, KernelRow]] = {}
    for r in rows:
        cases.setdefault((r.shape, r.tokens, r.block_size, r.sparsity), {})[r.method] = r
    for (shape, T, b, s), by in cases.items():
        first = next(iter(by.values()))  # the dense time measured beside this case
        cells = []
        for m in methods:
            r = by.get(m)
            cells += ["n/a"] * 3 if r is None else [fmt(r.sparse_ms, ".2f"), fmt(r.speedup, ".2f"),
                                                    fmt(r.epsilon, ".2f")]
        lines.append(f"| {shape} | {T} | {b} | {s:g} | {first.dense_ms:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kernel_dicts(rows: list[KernelRow]) -> list[dict]:
    return [{**asdict(r), "speedup": r.speedup, "epsilon": r.epsilon} for r in rows]


def plot_kernels(rows: list[KernelRow], path: Path) -> None:
    from ..plotting import pyplot

    plt = pyplot()

    shapes = list(dict.fromkeys(r.shape for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False, sharey=True)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in rows if r.shape == shape]
        T = max(r.tokens for r in rs)
        rs = [r for r in rs if r.tokens == T]
        sparsities = sorted({r.sparsity for r in rs})
        for method, style in (("cpu", "-o"), ("triton", "-o"), ("torch_bsr", "--x")):
            for b in sorted({r.block_size for r in rs}):
                pts = sorted((r.sparsity, r.epsilon) for r in rs
                             if r.method == method and r.block_size == b and not math.isnan(r.epsilon))
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{method} b={b}")
        ax.plot(sparsities, [1 / (1 - s) for s in sparsities], ":", color="gray", label="break-even (1/density)")
        ax.axhline(1.2, color="red", lw=0.8, label="eps = 1.2")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_title(f"{shape} ({rs[0].in_features}->{rs[0].out_features}), {T} tokens", fontsize=9)
    axes[0][0].set_ylabel(f"epsilon (fwd+bwd, {rows[0].dtype}, {rows[0].device})")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, path, tight_bbox=False)


def main(args) -> int:
    return run_bench(args.output, lambda out: _run(args, out))


def _run(args, out: Path) -> None:
    device = device_named(args.device)
    check_positive("--tokens", args.tokens)
    check_positive("--repeats", [args.repeats])
    check_sparse_options(args.sparsity, args.block_size, SUPPORTED_BLOCK_SIZES)
    dtype = args.dtype
    if dtype == "auto":
        from ...train.precision import resolve_precision

        dtype = resolve_precision("auto", device).name
        say(f"--dtype auto: {dtype} (what training.precision=auto runs on this {device.type})")
    rows = bench_kernels(args.shapes, args.tokens, args.sparsity, args.block_size, dtype, device,
                         args.repeats, bsr=not args.no_bsr, progress=say)
    table, even = kernel_table(rows), kernel_break_even(rows)
    atomic_write_bytes(out / "kernels.csv", csv_bytes(_kernel_dicts(rows)))
    atomic_write_bytes(out / "break_even.csv", csv_bytes(even))
    even_md = "\n".join(["| shape | tokens | b | method | break-even sparsity |", "|---|---|---|---|---|"] + [
        f"| {e['shape']} | {e['tokens']} | {e['block_size']} | {e['method']} | {e['break_even_sparsity']} |"
        for e in even])
    atomic_write_bytes(out / "kernels.md", f"{table}\n\n{even_md}\n".encode())
    plot_kernels(rows, out / "kernels.png")
    print(table)
    print()
    print(even_md)
