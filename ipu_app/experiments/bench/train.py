"""``bench train``: whole training steps of a sparse config, on each backend and block size, against
the same model made dense (and, with ``--hf``, Hugging Face's ``BertForPreTraining``), each also
compiled with ``--compile``; steps interleaved round-robin so that machine noise hits every variant
alike. Writes train.{csv,md,png}."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ...io import atomic_write_bytes
from ..plotting import save_png
from .common import BenchError, break_even, check_positive, check_sparse_options, csv_bytes, device_named, \
    median_times, run_bench, say, sync

BLOCK_SIZES = (1, 4, 8, 16, 32, 64)  # what a SparseLinear takes
HF_KERNELS = "Hugging Face BertForPreTraining, eager"


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


@dataclass
class Variant:
    """One timed variant: its name and settings, and once built, one training step to call."""
    name: str
    backend: str
    sparsity: float
    block_size: int
    config: object                     # the RunConfig it trains
    step: Callable[[], None] | None = None
    trainer: object = None             # ours (None for Hugging Face's model)


def bench_train(config_name: str, overrides: list[str], backends: list[str], steps: int,
                sparsities: list[float] | None = None, progress: Callable[[str], None] | None = None, *,
                device: torch.device | None = None, block_sizes: list[int] | None = None, hf: bool = False,
                compile: bool = False, fractions: bool = False) -> list[TrainRow]:
    """Median step time of the dense model and of the sparse config on each backend (at each of
    ``sparsities`` and ``block_sizes``; default the config's own). ``hf`` adds Hugging Face's
    ``BertForPreTraining``; ``compile`` adds each variant compiled (``training.compile``);
    ``fractions`` times the sparse linears alone (``sparse_fraction``)."""
    from ...data.prepare import ready_data
    from ...train.trainer import Trainer

    variants = _variants(config_name, overrides, backends, sparsities, block_sizes, compile)
    data_dir = ready_data(variants[0].config.data, progress=False)  # every variant trains on the same data
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, v in enumerate(variants):
                v.config.data.validation_sequences = 8
                (Path(tmp) / str(i)).mkdir()
                v.trainer = Trainer(v.config, Path(tmp) / str(i), progress=False, tensorboard=False, device=device,
                                    data_dir=data_dir)
                v.step = (lambda t: lambda: t.train_step(t.step + 1))(v.trainer)
            dense = variants[0].trainer
            if hf:
                variants.insert(0, Variant("hf", "hf", 0.0, 0, dense.config, step=hf_step(dense)))
            times = _time_interleaved(variants, steps, dense.device, progress)
            rows = [_row(v, times[v.name], dense, fractions) for v in variants]
        finally:
            for v in variants:
                if v.trainer is not None:
                    v.trainer.close()
    reference = next(r for r in rows if r.variant == "dense")
    for r in rows:
        r.speedup = reference.step_ms / r.step_ms
        r.epsilon = (r.step_ms / r.flops_per_sequence) / (reference.step_ms / reference.flops_per_sequence)
    return rows


def _variants(config_name: str, overrides: list[str], backends: list[str], sparsities, block_sizes,
              compile: bool) -> list[Variant]:
    """Dense first, then each backend x block size x sparsity, then (``compile``) each compiled."""
    from ...config import load_config

    base = load_config(config_name, overrides, steps=10_000)
    if base.sparsity.mode == "dense":
        raise BenchError(f"config {config_name!r} is dense; bench train compares a sparse config with its "
                         "dense counterpart (e.g. --config bert_mini_sparse)")
    ratios, sizes = sparsities or [base.sparsity.ratio], block_sizes or [base.sparsity.block_size]
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
    return [Variant(name, b, ratio, size, load_config(config_name, sets, steps=10_000))
            for name, b, ratio, size, sets in specs]


def _time_interleaved(variants: list[Variant], steps: int, device: torch.device,
                      progress: Callable[[str], None] | None) -> dict[str, list[float]]:
    """Two warm-up steps each (kernels built, metadata cached, graphs compiled), then ``steps`` rounds
    of one step of every variant."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for v in variants:
        if progress and "+compile" in v.name:
            progress(f"compiling {v.name} ...")
        for _ in range(2):
            v.step()
    for i in range(steps):
        for v in variants:
            sync(device)
            start = time.perf_counter()
            v.step()
            sync(device)
            times[v.name].append(time.perf_counter() - start)
        if progress:
            progress(f"step {i + 1}/{steps}: " + ", ".join(f"{n} {1e3 * t[-1]:.0f} ms" for n, t in times.items()))
    return times


def _row(v: Variant, times: list[float], dense, fractions: bool) -> TrainRow:
    from ...train.build import run_flops

    t = statistics.median(times)
    config = v.config
    tokens = config.training.batch_size * config.data.seq_len
    model = dense.model if v.trainer is None else v.trainer.model
    flops = run_flops(config, model.active_encoder_weights())["non_embedding_flops_per_sequence"]
    kernels = HF_KERNELS if v.trainer is None else (v.trainer.kernel_line or "dense")
    row = TrainRow(v.name, v.backend, v.sparsity, kernels, 1e3 * t, tokens / t, flops, block_size=v.block_size,
                   compiled="+compile" in v.name)
    if fractions and v.backend not in ("hf", "dense"):
        row.sparse_fraction = sparse_linear_seconds(v.trainer) / t
    return row


def hf_step(dense) -> Callable[[], None]:
    """One training step of Hugging Face's ``BertForPreTraining`` (eager, SDPA attention) of the dense
    trainer's size on one of its batches: what a user would otherwise run. AdamW (fused on a GPU),
    the same accumulation, clipping and one host sync per step, like ours; its MLM head scores every
    position (Hugging Face's way)."""
    from transformers import BertForPreTraining

    from ...data.ahead import Prefetcher
    from ...data.batches import BatchIterator

    device, precision, accumulation = dense.device, dense.precision, dense.accumulation
    torch.manual_seed(0)
    model = BertForPreTraining(dense.model.hf_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    loader = dense.state.batches
    ours = loader.batches if isinstance(loader, Prefetcher) else loader
    host = next(BatchIterator(ours.dataset, dense.config.micro_batch_size))
    names = {"input_ids": "input_ids", "token_type_ids": "token_type_ids", "attention_mask": "attention_mask",
             "labels": "mlm_labels", "next_sentence_label": "nsp_labels"}
    batch = {hf: host[key].to(device) for hf, key in names.items()}

    def step() -> None:
        model.train()
        for _ in range(accumulation):
            with precision.autocast():
                loss = model(**batch).loss / accumulation
            loss.backward()
        float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sparse_linear_seconds(trainer) -> float:
    """Seconds per optimizer step spent in the sparse linears' forward and backward: each layer's op
    timed alone on inputs of the shape it sees in training (micro-batch tokens x in_features, once
    per micro-batch)."""
    from ...sparse.layer import sparse_weights

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
    from ... import ops

    op = ops.get_backend(layer.backend)

    def step():
        with precision.autocast():  # as in the training step
            y = op(x, values, layer.pattern, layer.bias)
        return torch.autograd.grad(y, (x, values), gy.to(y.dtype))

    return step


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
    from ..plotting import pyplot

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


def main(args) -> int:
    return run_bench(args.output, lambda out: _run(args, out))


def _run(args, out: Path) -> None:
    check_positive("--steps", [args.steps])
    check_sparse_options(args.sparsity or [], args.block_size or [], BLOCK_SIZES)
    rows = bench_train(args.config, args.overrides, args.backends, args.steps, args.sparsity, progress=say,
                       device=device_named(args.device), block_sizes=args.block_size, hf=args.hf,
                       compile=args.compile, fractions=args.fractions)
    table = train_table(rows)
    if args.sparsity and len(args.sparsity) > 1:
        table += "\n\n| backend | break-even sparsity (whole step) |\n|---|---|\n" + "\n".join(
            f"| {e['backend']} | {e['break_even_sparsity']} |" for e in train_break_even(rows))
    atomic_write_bytes(out / "train.csv", csv_bytes([asdict(r) for r in rows]))
    atomic_write_bytes(out / "train.md", (table + "\n").encode())
    plot_train(rows, f"{args.config}: median training step", out / "train.png")
    print(table)
