import csv
import math
import subprocess
import sys

import pytest
import torch

from ipu_app.experiments.bench import common, kernels
from ipu_app.experiments.bench import train as train_bench


def test_epsilon_and_break_even():
    # a sparse FLOP as cheap as a dense one: eps 1; twice the time at density 0.1: eps 20
    assert common.epsilon(10.0, 100.0, 0.1) == pytest.approx(1.0)
    assert common.epsilon(200.0, 100.0, 0.1) == pytest.approx(20.0)
    # time ratio 2 at s = 0.5 and 2/3 at s = 0.75: equal to dense at 0.5 + 0.25 * (2 - 1) / (2 - 2/3)
    assert common.break_even([0.5, 0.75, 0.9], [0.5, 1.5, 3.0]) == "0.688"
    assert common.break_even([0.9, 0.5, 0.75], [3.0, 1.2, 2.0]) == "<= 0.5"  # unsorted input
    assert common.break_even([0.5, 0.9], [0.2, 0.8]) == "> 0.9"
    assert common.break_even([], []) == "n/a"


def test_kernel_rows_table_and_break_even_from_real_timings():
    rows = kernels.bench_kernels(["medium_up"], [64], [0.5, 0.9], [1, 16], "fp32", torch.device("cpu"), repeats=1)
    methods = {r.method for r in rows}
    assert methods == {"cpu", "torch_bsr"}
    for r in rows:
        assert r.dense_ms > 0 and r.sparse_ms > 0 and r.in_features == 512 and r.out_features == 2048
        assert r.epsilon == pytest.approx(r.sparse_ms / ((1 - r.sparsity) * r.dense_ms))
    table = kernels.kernel_table(rows)
    assert table.count("\n") == 1 + 4  # header, rule, one line per (T, b, s)
    even = kernels.kernel_break_even(rows)
    assert {(e["method"], e["block_size"]) for e in even} == {(m, b) for m in ("cpu", "torch_bsr") for b in (1, 16)}


def test_bf16_bsr_is_reported_as_not_available():
    rows = kernels.bench_kernels(["medium_up"], [32], [0.9], [32], "bf16", torch.device("cpu"), repeats=1)
    bsr = next(r for r in rows if r.method == "torch_bsr")
    assert math.isnan(bsr.sparse_ms)  # PyTorch has no CPU bf16 BSR matmul
    assert "n/a" in kernels.kernel_table(rows)


def test_cli_writes_csv_markdown_and_plot(tmp_path):
    out = tmp_path / "k"
    proc = subprocess.run([sys.executable, "-m", "ipu_app", "bench", "kernels", "--shapes", "medium_down",
                           "--tokens", "32", "--sparsity", "0.75", "0.99", "--block-size", "16", "64",
                           "--dtype", "fp32", "--repeats", "1", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(out / "kernels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 and {r["method"] for r in rows} == {"cpu", "torch_bsr"}
    assert all(float(r["epsilon"]) > 0 for r in rows)
    assert (out / "kernels.png").read_bytes()[:4] == b"\x89PNG"
    assert "break-even sparsity" in (out / "kernels.md").read_text()
    assert "| medium_down | 32 | 64 | 0.99 |" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--block-size", "3"], "--block-size must be 1, 2, 4, 8, 16, 32 or 64, got [3]"),
    (["--sparsity", "1.0"], "--sparsity values must be in [0, 1)"),
    (["--tokens", "0"], "--tokens must be positive"),
    (["--device", "cuda"], "no CUDA GPU here"),
])
def test_cli_rejects_bad_arguments(tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    proc = subprocess.run([sys.executable, "-m", "ipu_app", "bench", "kernels", *args, "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "kernels.csv").exists()


def test_train_bench_compares_backends_with_dense(data_dir, tmp_path):
    # fp32: the CPU kernels cover it on any CPU (bf16 needs AMX)
    overrides = [f"data.dir={data_dir}", "training.batch_size=4", "training.micro_batch_size=4",
                 "training.precision=fp32"]
    rows = train_bench.bench_train("bert_tiny_sparse_b16", overrides, ["reference", "cpu"], steps=2)
    assert [r.variant for r in rows] == ["dense", "sparse/reference", "sparse/cpu"]
    assert rows[0].speedup == pytest.approx(1.0) and rows[0].epsilon == pytest.approx(1.0)
    assert rows[1].flops_per_sequence < rows[0].flops_per_sequence
    assert "reference op" in rows[1].kernels and "CPU kernels" in rows[2].kernels
    for r in rows:
        assert r.step_ms > 0 and r.tokens_per_second > 0
    train_bench.plot_train(rows, "t", tmp_path / "train.png")
    assert (tmp_path / "train.png").stat().st_size > 0
    assert train_bench.train_table(rows).count("\n") == len(rows) + 1


def test_train_bench_break_even_over_sparsities(data_dir):
    overrides = [f"data.dir={data_dir}", "training.batch_size=4", "training.micro_batch_size=4"]
    rows = train_bench.bench_train("bert_tiny_sparse_b16", overrides, ["cpu"], steps=1, sparsities=[0.5, 0.9])
    assert [(r.variant, r.backend, r.sparsity) for r in rows] == [
        ("dense", "dense", 0.0), ("sparse/cpu s=0.5", "cpu", 0.5), ("sparse/cpu s=0.9", "cpu", 0.9)]
    assert rows[2].flops_per_sequence < rows[1].flops_per_sequence < rows[0].flops_per_sequence
    (even,) = train_bench.train_break_even(rows)
    assert even["backend"] == "cpu" and even["break_even_sparsity"] == common.break_even(
        [0.5, 0.9], [rows[1].speedup, rows[2].speedup])


def test_train_bench_refuses_a_dense_config():
    with pytest.raises(common.BenchError, match="is dense"):
        train_bench.bench_train("bert_tiny_dense", [], ["auto"], steps=1)


def test_train_bench_adds_hf_block_sizes_and_the_sparse_linear_share(data_dir):
    overrides = [f"data.dir={data_dir}", "training.batch_size=4", "training.micro_batch_size=2",
                 "training.precision=fp32"]
    rows = train_bench.bench_train("bert_tiny_sparse_b16", overrides, ["cpu"], steps=1, block_sizes=[16, 32], hf=True,
                             fractions=True)
    assert [(r.variant, r.block_size) for r in rows] == [("hf", 0), ("dense", 0), ("sparse/cpu b=16", 16),
                                                          ("sparse/cpu b=32", 32)]
    assert "BertForPreTraining" in rows[0].kernels and rows[0].flops_per_sequence == rows[1].flops_per_sequence
    assert rows[1].speedup == pytest.approx(1.0)
    for r in rows[2:]:
        assert 0.0 < r.sparse_fraction < 1.0  # two micro-batches of 2 x 128 tokens through 12 sparse linears
    assert all(math.isnan(r.sparse_fraction) for r in rows[:2])
    table = train_bench.train_table(rows)
    assert "in sparse linears" in table and "| - |" in table


def test_train_bench_cli_rejects_a_block_size_and_a_missing_gpu(tmp_path, capsys):
    from ipu_app.__main__ import main as app_main

    assert app_main(["bench", "train", "--config", "bert_tiny_sparse", "--block-size", "3",
                     "--output", str(tmp_path / "o")]) == 2
    assert "--block-size must be 1, 4, 8, 16, 32 or 64" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert app_main(["bench", "train", "--config", "bert_tiny_sparse", "--device", "cuda",
                         "--output", str(tmp_path / "o")]) == 2
        assert "no CUDA GPU here" in capsys.readouterr().err


def test_data_bench_measures_preparation_memory_the_ceiling_the_index_and_the_loader(tmp_path, capsys):
    import json

    from ipu_app.__main__ import main

    out = tmp_path / "out"
    assert main(["bench", "data", "--sizes", "1", "0.5", "--workers", "1", "--loader-workers", "0", "1",
                 "--batches", "3", "--batch-size", "4", "--work-dir", str(tmp_path), "--output", str(out)]) == 0
    result = json.loads((out / "data.json").read_text())
    prep = result["prepare"]
    assert [r["corpus_mb"] for r in prep] == [0.5, 1.0]  # smallest first: the growth is last minus first
    assert prep[1]["tokens"] > 1.5 * prep[0]["tokens"] > 0
    assert all(r["mb_per_s"] > 0 and r["peak_rss_mb"] > 20 for r in prep)  # the process tree was sampled
    assert result["ceiling_mb_per_s"] > 0 and result["index"]["samples"] > 100
    assert [r["workers"] for r in result["loader"]] == [0, 1] and all(r["tokens_per_s"] > 0 for r in result["loader"])
    table = capsys.readouterr().out
    assert "% of raw tokenizer" in table and "CPU:" in table and (out / "data.md").read_text().strip() == table.strip()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the corpora and shards were deleted
    assert main(["bench", "data", "--sizes", "0", "--output", str(out)]) == 2
    assert "--sizes must be positive" in capsys.readouterr().err
