"""Cost of one DynSparse pattern update next to one training pass, at BERT-Medium shapes.

Builds the 48 sparse encoder weights of BERT-Medium (8 layers x Q, K, V, O, FFN up,
FFN down; H = 512), s = 0.9, with Adam state, and times
  * one forward + backward through all 48 SparseLinears (reference op) on
    batch x seq tokens, input gradients included, and
  * one PatternUpdater.update over all 48 (random and gradient regrowth).
Prints the times and their ratio. Timing is never asserted.

    python bench/update_cost.py [--block-sizes 1 16] [--tokens 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipu_app.model.sparse_linear import SparseLinear  # noqa: E402
from ipu_app.sparse.schedule import UpdateSchedule  # noqa: E402
from ipu_app.sparse.updater import build_updater  # noqa: E402


def medium_layers(block_size: int, sparsity: float, hidden: int = 512, num_layers: int = 8) -> nn.ModuleList:
    g = torch.Generator().manual_seed(0)
    shapes = [(hidden, hidden)] * 4 + [(hidden, 4 * hidden), (4 * hidden, hidden)]  # (in, out)
    return nn.ModuleList(
        SparseLinear(i, o, sparsity=sparsity, block_size=block_size, generator=g)
        for _ in range(num_layers)
        for i, o in shapes
    )


def fwd_bwd(layers: nn.ModuleList, inputs: dict[int, torch.Tensor]) -> None:
    loss = sum(layer(inputs[layer.in_features]).float().sum() for layer in layers)
    loss.backward()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--tokens", type=int, default=32 * 128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, s={args.sparsity}")
    print(f"{'b':>3} {'fwd+bwd s':>10} {'update random s':>16} {'ratio':>7} {'update rigl s':>14} {'ratio':>7}")
    for b in args.block_sizes:
        layers = medium_layers(b, args.sparsity)
        optimizer = torch.optim.Adam(layers.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        inputs = {w: torch.randn(args.tokens, w, generator=g, requires_grad=True) for w in (512, 2048)}
        fwd_bwd(layers, inputs)  # warm-up, and Adam state to operate on
        optimizer.step()
        optimizer.zero_grad()
        t_pass = timed(lambda: fwd_bwd(layers, inputs), args.repeats)
        optimizer.zero_grad()
        schedule = UpdateSchedule.evenly_spaced(1000, 100)
        random_updater = build_updater(layers, optimizer, schedule, regrowth="random")
        t_random = timed(lambda: random_updater.update(10), args.repeats)
        rigl = build_updater(layers, optimizer, schedule, regrowth="gradient")
        grads = {id(m): torch.randn(m.out_features, m.in_features) for m in layers}

        def rigl_update():
            for m in layers:
                m.dense_grad = grads[id(m)].clone()
            rigl.update(10)

        t_rigl = timed(rigl_update, args.repeats)
        print(f"{b:>3} {t_pass:>10.3f} {t_random:>16.3f} {t_random / t_pass:>7.3f} {t_rigl:>14.3f} {t_rigl / t_pass:>7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
