"""``bench kernels | train | data``: the sparse kernels, whole training steps, the data pipeline."""

from __future__ import annotations

from ..choices import BENCH_DTYPES, BENCH_SHAPES


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure the sparse kernels (bench kernels), training steps (bench train) or "
                                     "the data pipeline (bench data)")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    _add_kernels(bsub)
    _add_train(bsub)
    _add_data(bsub)


def run(args) -> int:
    from ..experiments.bench import data, kernels, train

    return {"kernels": kernels, "train": train, "data": data}[args.bench_command].main(args)


def _add_kernels(bsub) -> None:
    k = bsub.add_parser("kernels", help="forward+backward of one sparse linear vs dense and PyTorch BSR")
    k.add_argument("--shapes", nargs="+", default=list(BENCH_SHAPES), choices=list(BENCH_SHAPES))
    k.add_argument("--tokens", nargs="+", type=int, default=[4096, 8192, 16384])
    k.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.75, 0.9, 0.99])
    k.add_argument("--block-size", nargs="+", type=int, default=[1, 4, 8, 16])
    k.add_argument("--dtype", default="auto", choices=["auto", *BENCH_DTYPES],
                   help="auto: what training.precision=auto runs here (bf16 where the CPU or GPU has it, else fp32)")
    k.add_argument("--device", default="auto", help="cpu, cuda or auto (a GPU when there is one)")
    k.add_argument("--repeats", type=int, default=5, help="timed calls per case (the median is kept)")
    k.add_argument("--no-bsr", action="store_true", help="skip PyTorch's BSR tensors")
    k.add_argument("--output", default="bench_results/kernels", help="directory for kernels.{csv,md,png}")
    k.set_defaults(func=run)


def _add_train(bsub) -> None:
    t = bsub.add_parser("train", help="whole training steps of a sparse config on each backend vs dense")
    t.add_argument("--config", required=True, help="a sparse config, e.g. bert_mini_sparse")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--backends", nargs="+", default=["reference", "auto"])
    t.add_argument("--steps", type=int, default=10, help="timed steps per variant (the median is kept)")
    t.add_argument("--sparsity", nargs="+", type=float, default=None,
                   help="sparsities to run the config at (default: its own); several give a break-even")
    t.add_argument("--block-size", nargs="+", type=int, default=None,
                   help="block sizes to run the sparse config at (default: its own)")
    t.add_argument("--device", default="auto", help="cpu, cuda or auto (a GPU when there is one)")
    t.add_argument("--hf", action="store_true", help="add Hugging Face's BertForPreTraining (eager) of the same size")
    t.add_argument("--compile", action="store_true", help="add every variant compiled (training.compile)")
    t.add_argument("--fractions", action="store_true",
                   help="time the sparse linears alone: the share of the step they take")
    t.add_argument("--output", default="bench_results/train", help="directory for train.{csv,md,png}")
    t.set_defaults(func=run)


def _add_data(bsub) -> None:
    d = bsub.add_parser("data", help="prepare-data MB/s and peak memory at two corpus sizes, the tokenizer's raw "
                                     "speed, the sample index and loader tokens/s by workers")
    d.add_argument("--sizes", nargs="+", type=float, default=[64, 256],
                   help="synthetic corpus sizes in MiB (memory must stay flat from the first to the last)")
    d.add_argument("--workers", type=int, default=None, help="prepare-data --workers (default: the cores)")
    d.add_argument("--loader-workers", nargs="+", type=int, default=[0, 1, 2])
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--seq-len", type=int, default=128)
    d.add_argument("--batches", type=int, default=100, help="timed loader batches per worker count")
    d.add_argument("--work-dir", default=None, help="where the corpora and shards go (deleted after; default: "
                                                  "the system temp folder)")
    d.add_argument("--output", default="bench_results/data", help="directory for data.{json,md}")
    d.set_defaults(func=run)
