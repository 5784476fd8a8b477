"""``python -m ipu_app bench kernels|train``: measured speed of the sparse kernels and training steps.

``bench kernels`` times forward + both gradients of one sparse linear (``y = x W^T``, ``dX``,
``dValues``) against the dense product in the same dtype (oneDNN on a CPU, cuBLAS on a GPU), for our
kernels (``cpu`` / ``triton``) and PyTorch's BSR tensors, over shapes x tokens x sparsity x block
size. It reports the paper's

    epsilon = (t_sparse / FLOPs_sparse) / (t_dense / FLOPs_dense) = t_sparse / (density * t_dense)

(1 = a sparse FLOP costs what a dense one does; sparse is faster than dense while epsilon < 1/density)
and the break-even sparsity above which sparse beats dense. ``bench train`` does the same for whole
training steps of a config: the sparse model on each backend against the same model made dense.
Both print a table and write CSV, Markdown and a plot. Timings are medians over repeats, taken in
one process on one machine; compare numbers only within one run.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..choices import BENCH_DTYPES, BENCH_SHAPES, SUPPORTED_BLOCK_SIZES
from ..io import atomic_write_bytes
from ..ops import autotune
from .plotting import save_png

SHAPES = BENCH_SHAPES  # name: (in_features, out_features)
DTYPES = dict(zip(BENCH_DTYPES, (torch.float32, torch.bfloat16, torch.float16)))


class BenchError(ValueError):
    """Bad benchmark arguments."""


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                 warmup: int = 2) -> dict[str, float]:
    """Median wall time of each function, timed round-robin so that machine noise hits all alike."""
    return autotune.median_times(fns, repeats, warmup, sync=lambda: _sync(device))


def epsilon(t_sparse: float, t_dense: float, density: float) -> float:
    """The paper's cost of a sparse FLOP relative to a dense one."""
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


# ---------------------------------------------------------------------------------------- kernels
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
    from .. import ops
    from ..sparse.init import random_pattern
    from ..sparse.pattern import BlockPattern

    torch_dtype = DTYPES[dtype]
    ours_name = "triton" if device.type == "cuda" else "cpu"
    ours = ops.get_backend(ours_name)
    covers = ops._module(ours_name).covers
    rows: list[KernelRow] = []
    g = torch.Generator().manual_seed(0)
    for shape in shapes:
        n_in, n_out = SHAPES[shape]
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


def _fmt(v: float, spec: str) -> str:
    return "n/a" if math.isnan(v) else format(v, spec)


def _row_line(r: KernelRow) -> str:
    return (f"{r.shape} T={r.tokens} b={r.block_size} s={r.sparsity:g}: dense {r.dense_ms:.2f} ms, "
            f"{r.method} {_fmt(r.sparse_ms, '.2f')} ms (x{_fmt(r.speedup, '.2f')}, eps {_fmt(r.epsilon, '.2f')})")


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
            cells += ["n/a"] * 3 if r is None else [_fmt(r.sparse_ms, ".2f"), _fmt(r.speedup, ".2f"),
                                                    _fmt(r.epsilon, ".2f")]
        lines.append(f"| {shape} | {T} | {b} | {s:g} | {first.dense_ms:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _kernel_dicts(rows: list[KernelRow]) -> list[dict]:
    return [{**asdict(r), "speedup": r.speedup, "epsilon": r.epsilon} for r in rows]


def plot_kernels(rows: list[KernelRow], path: Path) -> None:
    from .plotting import pyplot

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


# ------------------------------------------------------------------------------------------ train
@dataclass
class TrainRow:
    variant: str          # hf | dense[+compile] | sparse/<backend>[ b=<b>][ s=<sparsity>][+compile]
    backend: str          # hf | dense | the sparse config's backend
    sparsity: float
    kernels: str          # what ran the sparse layers
    step_ms: float
    tokens_per_second: float
    flops_per_sequence: float
    speedup: float = float("nan")   # dense step time / this step time
    epsilon: float = float("nan")
    block_size: int = 0
    compiled: bool = False
    sparse_fraction: float = float("nan")  # of the step spent in the sparse linears (timed alone)


class _HfStep:
    """A training step of Hugging Face's ``BertForPreTraining`` (eager, SDPA attention) of the same
    size on one batch of the dense trainer: what a user would otherwise run. AdamW (fused on a GPU),
    clipping and one host sync per step, like ours; its MLM head scores every position (HF's way)."""

    kernel_line = "Hugging Face BertForPreTraining, eager"

    def __init__(self, dense) -> None:
        from transformers import BertForPreTraining

        self.device, self.precision, self.config = dense.device, dense.precision, dense.config
        torch.manual_seed(0)
        self.model = BertForPreTraining(dense.model.hf_config).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=self.device.type == "cuda")
        from ..data.loader import BatchIterator, Prefetcher

        ours = dense.batches.batches if isinstance(dense.batches, Prefetcher) else dense.batches
        host = next(BatchIterator(ours.dataset, dense.config.micro_batch_size))
        self.batch = {"input_ids": host["input_ids"], "token_type_ids": host["token_type_ids"],
                      "attention_mask": host["attention_mask"], "labels": host["mlm_labels"],
                      "next_sentence_label": host["nsp_labels"]}
        self.batch = {k: v.to(self.device) for k, v in self.batch.items()}
        self.accumulation = dense.accumulation
        self.step = 0

    def train_step(self, step: int) -> None:
        self.model.train()
        for _ in range(self.accumulation):
            with self.precision.autocast():
                loss = self.model(**self.batch).loss / self.accumulation
            loss.backward()
        float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step

    def close(self) -> None:
        pass


def sparse_linear_seconds(trainer) -> float:
    """Seconds per optimizer step spent in the sparse linears' forward and backward: each layer's op
    timed alone on inputs of the shape it sees in training (micro-batch tokens x in_features, once
    per micro-batch)."""
    from ..sparse.layer import sparse_weights

    tokens = trainer.config.micro_batch_size * trainer.config.data.seq_len
    dtype, fns = trainer.precision.dtype, {}
    for i, (_, layer) in enumerate(sparse_weights(trainer.model)):
        x = torch.randn(tokens, layer.in_features, device=trainer.device, dtype=dtype, requires_grad=True)
        values = layer.values.detach().clone().requires_grad_(True)  # the parameter's dtype, as in training
        gy = torch.randn(tokens, layer.out_features, device=trainer.device, dtype=dtype)
        fns[str(i)] = _layer_step(layer, x, values, gy, trainer.precision)
    if not fns:
        return 0.0
    times = median_times(fns, trainer.device, repeats=3, warmup=1)
    return trainer.accumulation * sum(times.values())


def _layer_step(layer, x, values, gy, precision):
    from .. import ops

    op = ops.get_backend(layer.backend)

    def step():
        with precision.autocast():  # as in the training step
            y = op(x, values, layer.pattern, layer.bias)
        return torch.autograd.grad(y, (x, values), gy.to(y.dtype))

    return step


def bench_train(config_name: str, overrides: list[str], backends: list[str], steps: int,
                sparsities: list[float] | None = None, progress: Callable[[str], None] | None = None, *,
                device: torch.device | None = None, block_sizes: list[int] | None = None, hf: bool = False,
                compile: bool = False, fractions: bool = False) -> list[TrainRow]:
    """Median step time of the dense model and of the sparse config on each backend (at each of
    ``sparsities`` and ``block_sizes``; default the config's own), steps interleaved round-robin.
    ``hf`` adds Hugging Face's ``BertForPreTraining``; ``compile`` adds each variant compiled
    (``training.compile``); ``fractions`` times the sparse linears alone (``sparse_fraction``)."""
    from ..config import load_config
    from ..train.trainer import Trainer

    base = load_config(config_name, overrides, steps=10_000)
    if base.sparsity.mode == "dense":
        raise BenchError(f"config {config_name!r} is dense; bench train compares a sparse config with its "
                         "dense counterpart (e.g. --config bert_mini_sparse)")
    ratios = sparsities or [base.sparsity.ratio]
    sizes = block_sizes or [base.sparsity.block_size]
    specs = [("dense", "dense", 0.0, 0, [*overrides, "sparsity.mode=dense", "backend=reference"])]
    for b in backends:
        for size in sizes:
            for ratio in ratios:
                name = (f"sparse/{b}" + (f" b={size}" if len(sizes) > 1 else "")
                        + (f" s={ratio:g}" if len(ratios) > 1 else ""))
                specs.append((name, b, ratio, size, [*overrides, f"backend={b}", f"sparsity.ratio={ratio}",
                                                     f"sparsity.block_size={size}"]))
    if compile:
        specs += [(f"{name}+compile", b, ratio, size, [*sets, "training.compile=true"])
                  for name, b, ratio, size, sets in list(specs)]
    variants = [(name, b, ratio, size, load_config(config_name, sets, steps=10_000))
                for name, b, ratio, size, sets in specs]
    trainers = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, (name, _, _, _, config) in enumerate(variants):
                config.data.validation_sequences = 8
                run_dir = Path(tmp) / str(i)
                run_dir.mkdir()
                trainers.append((name, Trainer(config, run_dir, progress=False, tensorboard=False, device=device)))
            dense = trainers[0][1]
            if hf:
                trainers.insert(0, ("hf", _HfStep(dense)))
                variants.insert(0, ("hf", "hf", 0.0, 0, dense.config))
            times: dict[str, list[float]] = {name: [] for name, _ in trainers}
            for name, trainer in trainers:  # warm-up (kernels built, metadata cached, graphs compiled)
                if progress and "+compile" in name:
                    progress(f"compiling {name} ...")
                for _ in range(2):
                    trainer.train_step(trainer.step + 1)
            for i in range(steps):  # interleaved, so machine noise hits every variant alike
                for name, trainer in trainers:
                    _sync(dense.device)
                    start = time.perf_counter()
                    trainer.train_step(trainer.step + 1)
                    _sync(dense.device)
                    times[name].append(time.perf_counter() - start)
                if progress:
                    progress(f"step {i + 1}/{steps}: " + ", ".join(f"{n} {1e3 * t[-1]:.0f} ms" for n, t in times.items()))
            rows = []
            for (name, trainer), (_, backend, ratio, size, config) in zip(trainers, variants):
                t = statistics.median(times[name])
                tokens = config.training.batch_size * config.data.seq_len
                model = dense.model if backend == "hf" else trainer.model
                flops = config.run_flops(model.active_encoder_weights())["non_embedding_flops_per_sequence"]
                row = TrainRow(name, backend, ratio, trainer.kernel_line or "dense", 1e3 * t, tokens / t, flops,
                               block_size=size, compiled="+compile" in name)
                if fractions and backend not in ("hf", "dense"):
                    row.sparse_fraction = sparse_linear_seconds(trainer) / t
                rows.append(row)
        finally:
            for _, trainer in trainers:
                trainer.close()
    reference = next(r for r in rows if r.variant == "dense")
    for r in rows:
        r.speedup = reference.step_ms / r.step_ms
        r.epsilon = (r.step_ms / r.flops_per_sequence) / (reference.step_ms / reference.flops_per_sequence)
    return rows


def train_break_even(rows: list[TrainRow]) -> list[dict]:
    """Per backend, the sparsity above which a whole sparse step beats the dense one."""
    out = []
    for backend in dict.fromkeys(r.backend for r in rows if r.backend != "dense"):
        rs = [r for r in rows if r.backend == backend]
        out.append({"backend": backend, "break_even_sparsity": break_even([r.sparsity for r in rs],
                                                                          [r.speedup for r in rs])})
    return out


def train_table(rows: list[TrainRow]) -> str:
    fractions = any(not math.isnan(r.sparse_fraction) for r in rows)
    head = "| variant | step ms | tokens/s | non-emb. FLOPs/seq | speedup vs dense | eps |"
    lines = [head + (" in sparse linears |" if fractions else "") + " kernels |",
             "|---|---|---|---|---|---|" + ("---|" if fractions else "") + "---|"]
    for r in rows:
        share = (" - |" if math.isnan(r.sparse_fraction) else f" {r.sparse_fraction:.0%} |") if fractions else ""
        lines.append(f"| {r.variant} | {r.step_ms:.1f} | {r.tokens_per_second:,.0f} | {r.flops_per_sequence:.3g} | "
                     f"{r.speedup:.2f} | {r.epsilon:.2f} |{share} {r.kernels} |")
    return "\n".join(lines)


def plot_train(rows: list[TrainRow], title: str, path: Path) -> None:
    from .plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.4))
    bars = ax.bar([r.variant for r in rows], [r.step_ms for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        ax.annotate(f"x{r.speedup:.2f}\neps {r.epsilon:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("median step time (ms)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, tight_bbox=False)


# -------------------------------------------------------------------------------------------- CLI
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA GPU here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {name}: use cpu, cuda or auto")
    return device


def _check_positive(name: str, values: list) -> None:
    if any(v <= 0 for v in values):
        raise BenchError(f"{name} must be positive, got {values}")


def main(args) -> int:
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    out = Path(args.output)
    try:
        if out.exists() and not out.is_dir():
            raise BenchError(f"--output {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        if args.bench_command == "kernels":
            device = _device(args.device)
            _check_positive("--tokens", args.tokens)
            _check_positive("--repeats", [args.repeats])
            bad_s = [s for s in args.sparsity if not 0.0 <= s < 1.0]
            if bad_s:
                raise BenchError(f"--sparsity values must be in [0, 1), got {bad_s}")
            bad_b = [b for b in args.block_size if b not in SUPPORTED_BLOCK_SIZES]
            if bad_b:
                raise BenchError(f"--block-size must be among {list(SUPPORTED_BLOCK_SIZES)}, got {bad_b}")
            dtype = args.dtype
            if dtype == "auto":
                from ..train.precision import resolve_precision
                dtype = resolve_precision("auto", device).name
                say(f"--dtype auto: {dtype} (what training.precision=auto runs on this {device.type})")
            rows = bench_kernels(args.shapes, args.tokens, args.sparsity, args.block_size, dtype, device,
                                 args.repeats, bsr=not args.no_bsr, progress=say)
            table, even = kernel_table(rows), kernel_break_even(rows)
            atomic_write_bytes(out / "kernels.csv", _csv(_kernel_dicts(rows)))
            atomic_write_bytes(out / "break_even.csv", _csv(even))
            even_md = "\n".join(["| shape | tokens | b | method | break-even sparsity |", "|---|---|---|---|---|"] + [
                f"| {e['shape']} | {e['tokens']} | {e['block_size']} | {e['method']} | {e['break_even_sparsity']} |"
                for e in even])
            atomic_write_bytes(out / "kernels.md", f"{table}\n\n{even_md}\n".encode())
            plot_kernels(rows, out / "kernels.png")
            print(table)
            print()
            print(even_md)
        else:
            _check_positive("--steps", [args.steps])
            bad_s = [s for s in args.sparsity or [] if not 0.0 <= s < 1.0]
            if bad_s:
                raise BenchError(f"--sparsity values must be in [0, 1), got {bad_s}")
            bad_b = [b for b in args.block_size or [] if b not in (1, 4, 8, 16, 32, 64)]
            if bad_b:
                raise BenchError(f"--block-size must be 1, 4, 8, 16, 32 or 64, got {bad_b}")
            rows = bench_train(args.config, args.overrides, args.backends, args.steps, args.sparsity, progress=say,
                               device=_device(args.device), block_sizes=args.block_size, hf=args.hf,
                               compile=args.compile, fractions=args.fractions)
            table = train_table(rows)
            if args.sparsity and len(args.sparsity) > 1:
                table += "\n\n| backend | break-even sparsity (whole step) |\n|---|---|\n" + "\n".join(
                    f"| {e['backend']} | {e['break_even_sparsity']} |" for e in train_break_even(rows))
            atomic_write_bytes(out / "train.csv", _csv([asdict(r) for r in rows]))
            atomic_write_bytes(out / "train.md", (table + "\n").encode())
            plot_train(rows, f"{args.config}: median training step", out / "train.png")
            print(table)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say(f"written to {out}/")
    return 0


