"""torchrun with 2 CPU processes (gloo): equivalence to one process, pattern checks, failure handling."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ipu_app.train.distributed import DistContext, PatternMismatchError, check_patterns_consistent
from ipu_app.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def common_args(data_dir, steps=12, extra=()):
    sets = [f"data.dir={data_dir}", "training.batch_size=8", "training.micro_batch_size=4",
            "sparsity.segments=4", "data.validation_sequences=16", "training.precision=fp32",
            "training.log_every=1", "training.warmup_steps=2", "training.validate_every=6",
            "training.dist_timeout_s=60", *extra]
    args = ["--steps", str(steps), "--no-progress"]
    for item in sets:
        args += ["--set", item]
    return args


def torchrun(*args, timeout=240, env=None, **kwargs):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "run_pretraining.py"), *args]
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, **kwargs)


def test_two_processes_match_one_process(data_dir, tmp_path):
    args = ["--config", "bert_tiny_sparse_rigl", *common_args(data_dir)]
    proc = torchrun(*args, "--output-dir", str(tmp_path / "ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from ipu_app.commands.train import main

    assert main([*args, "--output-dir", str(tmp_path / "single")]) == 0
    ddp, single = read_metrics(tmp_path / "ddp", "train"), read_metrics(tmp_path / "single", "train")
    assert [r["step"] for r in ddp] == list(range(1, 13))  # rank 0 alone writes metrics
    for a, b in zip(ddp, single):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for a, b in zip(read_metrics(tmp_path / "ddp", "val"), read_metrics(tmp_path / "single", "val")):
        assert a["mlm_loss"] == pytest.approx(b["mlm_loss"], abs=1e-5) and a["sequences"] == b["sequences"]
    assert len(read_metrics(tmp_path / "ddp", "update")) == 3
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    patterns = [k for k in wa if k.endswith(("block_rows", "block_cols"))]
    assert len(patterns) == 2 * 12 and all(torch.equal(wa[k], wb[k]) for k in patterns)
    import json

    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8


def test_rank_zero_measures_the_kernels_for_every_rank(data_dir, tmp_path):
    """auto's measuring on a CPU under torchrun: rank 0 times the kinds alone and the other ranks run
    its choices; the run records them once."""
    import json

    env = {"IPU_APP_AUTOTUNE": "1", "IPU_APP_AUTOTUNE_CACHE": str(tmp_path / "cache")}
    proc = torchrun("--config", "bert_tiny_sparse_b16", *common_args(data_dir, steps=4),
                    "--output-dir", str(tmp_path / "run"), env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "kernels.json").read_text())
    assert len(record["decisions"]) == 4  # three layer kinds and the attention
    cached = json.loads(next((tmp_path / "cache").glob("decisions_*.json")).read_text())["decisions"]
    assert set(cached) == {d["key"] for d in record["decisions"]}
    assert proc.stderr.count("sparse layers (backend auto") == 1 and "measured now" in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [c["choice"] for c in summary["kernel_choices"]] == [d["choice"] for d in record["decisions"]]


def test_resume_with_another_world_size_is_refused(data_dir, tmp_path):
    from ipu_app.commands.train import main

    args = ["--config", "bert_tiny_sparse", *common_args(data_dir, extra=["training.checkpoint_every=4"])]
    run = tmp_path / "run"
    from ipu_app.config import load_config
    from ipu_app.train.trainer import Trainer

    config = load_config("bert_tiny_sparse", [a for a in args if "=" in a], steps=12)
    run.mkdir()
    (run / "config.yaml").write_text(config.to_yaml())
    Trainer(config, run, progress=False, tensorboard=False).train(stop_at=4)
    proc = torchrun("--resume", str(run), timeout=120)
    assert proc.returncode != 0
    assert "written by 1 processes, this run has 2" in proc.stderr or "world size 1" in proc.stderr
    assert "Traceback" not in "\n".join(line for line in proc.stderr.splitlines() if line.startswith("error"))
    assert main(["--resume", str(run), "--no-progress"]) == 0  # the same world size resumes fine


def _worker_pids(marker: str) -> dict[int, int]:
    """LOCAL_RANK -> pid of the training processes whose command line contains ``marker``."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if marker in cmdline and "torch.distributed.run" not in cmdline:
            for entry in environ:
                if entry.startswith("LOCAL_RANK="):
                    found[int(entry.split("=", 1)[1])] = int(pid)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_killed_rank_ends_the_job(data_dir, tmp_path):
    run = tmp_path / "killed"
    args = ["--config", "bert_tiny_sparse", *common_args(data_dir, steps=5000, extra=["sparsity.segments=10"]),
            "--output-dir", str(run)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "run_pretraining.py"), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3:
                break
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        pids = _worker_pids(str(run))
        assert set(pids) == {0, 1}
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=90)  # the job must end, not hang on the dead peer
        assert proc.returncode != 0
        assert time.time() - killed_at < 90
        assert not (run / "summary.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------- pattern check, 2 spawned processes
def _tamper_worker(rank: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from ipu_app.model.sparse_linear import sparsify_
    from ipu_app.sparse.layer import sparse_weights

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ctx = DistContext(rank, 2, rank)
        model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 32))
        sparsify_(model, lambda name, module: True, sparsity=0.75, block_size=4, seed=3)
        layers = sparse_weights(model)
        check_patterns_consistent(ctx, layers, step=10)  # identical: passes
        if rank == 1:  # move one block of the second layer to a free column
            layer = layers[1][1]
            mask = layer.pattern.block_mask()
            row = int(layer.block_rows[0])
            free = int(torch.nonzero(~mask[row])[0])
            layer.block_cols[0] = free
            order = torch.argsort(layer.block_rows.long() * mask.shape[1] + layer.block_cols.long())
            layer.block_rows.copy_(layer.block_rows[order])
            layer.block_cols.copy_(layer.block_cols[order])
        try:
            check_patterns_consistent(ctx, layers, step=20)
            message = "no error"
        except PatternMismatchError as exc:
            message = str(exc)
        Path(result_dir, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def test_pattern_mismatch_is_a_hard_error_naming_the_layer(tmp_path):
    mp.spawn(_tamper_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("sparsity pattern of 1 differs between rank 0 and rank 1 after step 20")


def test_context_from_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ctx = DistContext.from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.enabled, ctx.is_main) == (2, 4, 0, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4 is outside WORLD_SIZE=4"):
        DistContext.from_env()
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    assert not DistContext.from_env().enabled


def test_a_config_error_under_torchrun_is_printed_once_and_ends_the_failure_block(data_dir):
    proc = torchrun("--config", "bert_tiny_sparse", *common_args(data_dir, extra=["training.batch_size=4"]),
                    "--output-dir", "/nonexistent/never-created", timeout=120)
    assert proc.returncode != 0
    message = "training.batch_size=4 is not a multiple of training.micro_batch_size=4 x world size 2"
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and message in ours[0]  # rank 0 alone prints it
    tail = [line.strip() for line in proc.stderr.strip().splitlines()[-12:]]
    assert any(line.endswith(f"error: {ours[0][len('error: '):]}") for line in tail[tail.index(
        "Root Cause (first observed failure):"):])
    assert "To enable traceback" not in proc.stderr
