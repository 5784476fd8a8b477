"""Whole training steps of the trainer: sparse vs dense, and one pattern update vs one step.

Builds the real ``Trainer`` for ``bert_<size>_sparse`` and ``bert_<size>_dense`` (reference
backend, embedded corpus, micro-batch = batch = 32 x 128) and times ``_train_step`` (forward,
backward, clipping, AdamW, scheduler, the updater's per-step bookkeeping; pattern updates run at
phase boundaries, so they are excluded). Dense and sparse steps are interleaved round by round
so that machine noise hits both alike; the median of each is reported. Then one pattern update
(``PatternUpdater.update``) is timed against one step. Prints ratios; nothing is asserted.

    python bench/train_step.py [--size mini] [--steps 20] [--precision fp32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipu_app.config import load_config  # noqa: E402
from ipu_app.train.trainer import Trainer  # noqa: E402


def build(name: str, precision: str, batch: int, run_dir: Path) -> Trainer:
    overrides = [f"training.batch_size={batch}", f"training.micro_batch_size={batch}",
                 f"training.precision={precision}", "data.validation_sequences=8", "backend=reference"]
    config = load_config(name, overrides, steps=10_000)
    run_dir.mkdir(parents=True)
    return Trainer(config, run_dir, progress=False, tensorboard=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mini")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sparse = build(f"bert_{args.size}_sparse", args.precision, args.batch, Path(tmp) / "sparse")
        dense = build(f"bert_{args.size}_dense", args.precision, args.batch, Path(tmp) / "dense")
        times = {"sparse": [], "dense": []}
        for trainer in (sparse, dense):  # warm-up
            for _ in range(2):
                trainer._train_step(trainer.step + 1)
        for _ in range(args.steps):
            for name, trainer in (("sparse", sparse), ("dense", dense)):
                start = time.perf_counter()
                trainer._train_step(trainer.step + 1)
                times[name].append(time.perf_counter() - start)
        step_sparse, step_dense = statistics.median(times["sparse"]), statistics.median(times["dense"])
        update_times = []
        for i in range(3):
            start = time.perf_counter()
            sparse.updater.update(sparse.step)
            update_times.append(time.perf_counter() - start)
        update = statistics.median(update_times)
        tokens = args.batch * sparse.config.data.seq_len
        print(f"BERT-{args.size}, {args.batch} x {sparse.config.data.seq_len} tokens, {args.precision}, "
              f"reference backend, median of {args.steps} steps each")
        print("| step | seconds | tokens/s |\n|---|---|---|")
        print(f"| dense | {step_dense:.4f} | {tokens / step_dense:,.0f} |")
        print(f"| DynSparse s=0.9 b=1 (no update) | {step_sparse:.4f} | {tokens / step_sparse:,.0f} |")
        print(f"| one pattern update ({len(sparse.sparse_layers)} sparse weights) | {update:.4f} | |")
        print(f"sparse / dense step time: {step_sparse / step_dense:.3f} "
              f"(bookkeeping overhead {100 * (step_sparse / step_dense - 1):+.1f}%)")
        print(f"one update / one sparse step: {update / step_sparse:.3f}")
        sparse.close()
        dense.close()


if __name__ == "__main__":
    main()
