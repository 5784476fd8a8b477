import json

import pytest
import yaml

from ipu_app.__main__ import main as app_main
from ipu_app.experiments.sweep import SweepRunner
from ipu_app.experiments.sweep_spec import SweepError, load_sweep
from ipu_app.rundir import RunDir

SHIPPED = sorted((__import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "sweeps").glob("*.yaml"))


def write_spec(tmp_path, spec, name="grid"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False) if isinstance(spec, dict) else spec)
    return path


def test_grid_expansion_and_names(tmp_path):
    spec = write_spec(tmp_path, {
        "figure": "prune_ratio_updates",
        "set": {"training.steps": 400, "training.batch_size": 32},
        "grid": [
            {"config": ["bert_tiny_dense", "bert_mini_dense"]},
            {"config": "bert_mini_sparse", "sparsity.pruning_ratio": [0.25, 0.5], "sparsity.segments": [40, 80],
             "seed": [0, 1]},
            {"config": "bert_mini_sparse", "label": "attn_only", "sparsity.modules": [["query", "key"]]},
        ]})
    sweep = load_sweep(spec)
    assert sweep.name == "grid" and sweep.figure == "prune_ratio_updates"
    names = [r.name for r in sweep.runs]
    assert len(names) == 2 + 8 + 1
    assert names[:3] == ["bert_tiny_dense", "bert_mini_dense", "bert_mini_sparse,pruning_ratio=0.25,segments=40,seed=0"]
    assert names[-1] == "attn_only,modules=query+key"
    run = sweep.runs[3]
    config = run.resolve()
    assert config.training.steps == 400 and config.seed == 1 and config.sparsity.pruning_ratio == 0.25
    assert config.name == run.name
    assert sweep.runs[-1].resolve().sparsity.modules == ["query", "key"]
    command = run.command(tmp_path / "r", resume=False)
    assert command[-2:] == ["--set", f"name={run.name}"] and "--steps" in command and "--seed" in command
    assert sweep.runs[0].command(tmp_path / "r", resume=True)[-2:] == ["--resume", str(tmp_path / "r")]


def test_seeds_run_every_arm_per_seed_seeds_outermost(tmp_path):
    arms = [{"config": ["bert_tiny_static", "bert_tiny_sparse"]},
            {"config": "bert_tiny_sparse", "label": "rigl", "sparsity.regrowth": "gradient"}]
    sweep = load_sweep(write_spec(tmp_path, {"seeds": [7, 3], "set": {"training.steps": 20}, "grid": arms}))
    names = [r.name for r in sweep.runs]
    assert names == ["bert_tiny_static,seed=7", "bert_tiny_sparse,seed=7", "rigl,regrowth=gradient,seed=7",
                     "bert_tiny_static,seed=3", "bert_tiny_sparse,seed=3", "rigl,regrowth=gradient,seed=3"]
    assert [r.resolve().seed for r in sweep.runs] == [7, 7, 7, 3, 3, 3]
    ranged = load_sweep(write_spec(tmp_path, {"seeds": {"from": 200, "count": 3}, "grid": arms[:1]}, "r"))
    assert [r.seed for r in ranged.runs] == [200, 200, 201, 201, 202, 202]


@pytest.mark.parametrize("spec, message", [
    ({"seeds": [1, 1], "grid": [{"config": "bert_tiny_dense"}]}, "lists a seed twice"),
    ({"seeds": [], "grid": [{"config": "bert_tiny_dense"}]}, "'seeds' must be a list of integers"),
    ({"seeds": ["a"], "grid": [{"config": "bert_tiny_dense"}]}, "'seeds' must be a list of integers"),
    ({"seeds": {"from": 1}, "grid": [{"config": "bert_tiny_dense"}]}, "'seeds' must be a list of integers"),
    ({"seeds": {"from": 1, "count": 0}, "grid": [{"config": "bert_tiny_dense"}]}, "needs integers, K >= 1"),
    ({"seeds": [1], "grid": [{"config": "bert_tiny_dense", "seed": 2}]}, "either in 'seeds' or as a 'seed' key"),
    ({"seeds": [1], "set": {"seed": 2}, "grid": [{"config": "bert_tiny_dense"}]}, "either in 'seeds'"),
])
def test_bad_seeds_are_one_line(tmp_path, spec, message):
    with pytest.raises(SweepError, match=__import__("re").escape(message)):
        load_sweep(write_spec(tmp_path, spec))


@pytest.mark.parametrize("spec, message", [
    ("grid: [", "is not valid YAML"),
    ("- 1\n- 2\n", "must be a YAML mapping"),
    ({"grid": [{"config": "bert_tiny_dense"}], "figures": "pareto"}, "unknown key 'figures'"),
    ({"grid": [{"sparsity.ratio": 0.5}]}, "needs 'config'"),
    ({"grid": []}, "'grid' must be a list"),
    ({"grid": [{"config": "bert_tiny_dense", "seed": []}]}, "'seed' has an empty list"),
    ({"grid": [{"config": ["bert_tiny_dense", "bert_tiny_dense"]}]}, "two runs are both named 'bert_tiny_dense'"),
    ({"grid": [{"config": "bert_tiny_sparse", "sparsity.ratio": [0.5, 1.5]}]},
     "run bert_tiny_sparse,ratio=1.5: sparsity.ratio must be in [0, 1)"),
    ({"grid": [{"config": "bert_tiny_sparse", "sparsity.rato": 0.5}]}, "did you mean"),
])
def test_bad_specs_are_one_line(tmp_path, spec, message):
    with pytest.raises(SweepError, match=__import__("re").escape(message)) as info:
        load_sweep(write_spec(tmp_path, spec))
    assert "\n" not in str(info.value)


def test_unknown_spec_name_lists_the_shipped_ones():
    with pytest.raises(SweepError, match="pareto_cpu"):
        load_sweep("no_such_sweep")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_specs_load(path):
    sweep = load_sweep(path)
    assert sweep.runs and sweep.figure is not None
    from ipu_app.experiments.report import FIGURES
    assert sweep.figure in FIGURES


def test_sweeps_measured_or_reproducing_the_paper_keep_its_bias_correction():
    # per_slot became the default after these sweeps were measured; their DynSparse arms keep the
    # paper's global Adam step unless a run names per_slot, so re-running them reproduces the record.
    for path in SHIPPED:
        for run in load_sweep(path).runs:
            config = run.resolve()
            if config.sparsity.mode == "dynamic":
                expected = "per_slot" if "perslot" in run.name else "global"
                assert config.optimizer.bias_correction == expected, (path.stem, run.name)
    arms = {run.name.split(",")[0] for run in load_sweep("proxy_paired_cpu").runs}
    assert arms == {"proxy_tiny_static", "proxy_tiny_sparse", "proxy_tiny_sparse_perslot"}


def test_sweep_runs_skips_resumes_and_records_failures(tmp_path, data_dir, capsys):
    spec = write_spec(tmp_path, {
        "figure": "pareto",
        "set": {"training.steps": 4, "training.batch_size": 4, "training.micro_batch_size": 4, "sparsity.segments": 2,
                "data.validation_sequences": 8,
                "training.checkpoint_every": 2, "training.precision": "fp32", "data.dir": str(data_dir)},
        "grid": [{"config": ["bert_tiny_dense", "bert_tiny_sparse"]},
                 {"config": "bert_tiny_static", "label": "broken", "data.dir": str(tmp_path / "no_data")}],
    })
    out = tmp_path / "sweep"
    code = app_main(["sweep", str(spec), "--jobs", "2", "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and "1 of 3 runs did not finish" in captured.err
    status = json.loads((out / "status.json").read_text())["runs"]
    assert status["bert_tiny_dense"]["status"] == "finished" and status["bert_tiny_sparse"]["status"] == "finished"
    broken = "broken,dir=no_data"  # a path value is named by its last component
    assert status[broken]["status"] == "failed" and status[broken]["rc"] == 1
    assert "prepare-data" in status[broken]["error"] or "manifest" in status[broken]["error"]
    assert (out / "runs" / "bert_tiny_sparse" / "summary.json").is_file()
    assert (out / "runs" / "bert_tiny_sparse" / "explored.safetensors").is_file()
    assert (out / "sweep.yaml").read_text() == spec.read_text()
    assert (out / "logs" / f"{broken}.log").is_file()
    # A finished run's time is its own wall time (summary.json), the same on this listing as on later ones.
    wall = json.loads((out / "runs" / "bert_tiny_dense" / "summary.json").read_text())["wall_time_s"]
    assert status["bert_tiny_dense"]["seconds"] == wall

    # Again: finished runs are skipped (no new attempt); the failed one is tried again.
    code = app_main(["sweep", str(spec), "--output-dir", str(out), "--only", broken])
    status = json.loads((out / "status.json").read_text())["runs"]
    assert code == 1 and status[broken]["attempts"] == 2
    code = app_main(["sweep", str(spec), "--output-dir", str(out), "--only", "bert_tiny_dense"])
    status = json.loads((out / "status.json").read_text())["runs"]
    assert code == 0 and status["bert_tiny_dense"]["attempts"] == 1 and status["bert_tiny_dense"]["status"] == "finished"
    assert status["bert_tiny_dense"]["seconds"] == wall

    # The report reads the sweep's runs (two finished; the failed one left no summary).
    code = app_main(["report", str(out), "--figure", "exploration"])
    assert code == 0 and (out / "report" / "exploration.png").is_file()

    # A run that died before its first checkpoint is set aside and restarted; one with a checkpoint resumes.
    sparse = out / "runs" / "bert_tiny_sparse"
    (sparse / "summary.json").unlink()
    assert RunDir(sparse).state() == "resumable"
    runner = SweepRunner(load_sweep(spec), out, only=["bert_tiny_sparse"], echo=lambda m: None)
    assert runner.plan()[0][1] == "resumable"
    results = runner.run()
    assert results["bert_tiny_sparse"].status == "finished"
    log = (out / "logs" / "bert_tiny_sparse.log").read_text()
    assert "resume: " in log and "--resume" in log

    # A spec whose config no longer matches a run directory: stale, untouched, non-zero exit.
    changed = spec.read_text().replace("training.steps: 4", "training.steps: 6")
    spec.write_text(changed)
    before = (out / "runs" / "bert_tiny_dense" / "summary.json").read_text()
    code = app_main(["sweep", str(spec), "--output-dir", str(out), "--only", "bert_tiny_dense"])
    captured = capsys.readouterr()
    assert code == 1 and "stale" in captured.out and "training.steps (saved 4, spec 6)" in captured.out
    assert (out / "runs" / "bert_tiny_dense" / "summary.json").read_text() == before


def test_partial_run_is_set_aside(tmp_path):
    spec = write_spec(tmp_path, {"grid": [{"config": "bert_tiny_dense"}], "figure": "pareto"})
    out = tmp_path / "sweep"
    partial = out / "runs" / "bert_tiny_dense"
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text("")
    assert RunDir(partial).state() == "partial"
    runner = SweepRunner(load_sweep(spec), out, echo=lambda m: None)
    runner._execute = lambda queue: None  # plan and set aside only; train nothing
    runner.run()
    assert not partial.exists() and (out / "attempts" / "bert_tiny_dense.1" / "metrics.jsonl").is_file()
    with pytest.raises(SweepError, match="--only 'nope' is not a run"):
        SweepRunner(load_sweep(spec), out, only=["nope"])
    with pytest.raises(SweepError, match="--jobs must be >= 1"):
        SweepRunner(load_sweep(spec), out, jobs=0)


def test_relative_sweep_dir_is_made_absolute(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, {"grid": [{"config": "bert_tiny_dense"}], "figure": "pareto"})
    monkeypatch.chdir(tmp_path)
    runner = SweepRunner(load_sweep(spec), "rel/sweep")
    assert runner.directory == tmp_path / "rel" / "sweep"  # runs start in this directory, not elsewhere
    assert runner.run_dir(runner.sweep.runs[0]).is_absolute()


def test_ctrl_c_checkpoints_and_the_next_start_resumes(tmp_path, data_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = write_spec(tmp_path, {
        "figure": "pareto",
        "set": {"training.steps": 400, "training.batch_size": 2, "training.micro_batch_size": 2,
                "data.validation_sequences": 4, "training.checkpoint_every": 1000, "training.precision": "fp32",
                "data.dir": str(data_dir)},
        "grid": [{"config": "bert_tiny_dense"}],
    })
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ipu_app", "sweep", str(spec), "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "runs" / "bert_tiny_dense" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count('"train"') >= 1):  # training has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "stopped bert_tiny_dense (checkpointed" in output
    status = json.loads((out / "status.json").read_text())["runs"]["bert_tiny_dense"]
    assert status["status"] == "interrupted"
    assert RunDir(out / "runs" / "bert_tiny_dense").state() == "resumable"
    # The next start resumes from the checkpoint the signal wrote (shortened so the test is quick).
    runner = SweepRunner(load_sweep(spec), out, echo=lambda m: None)
    assert runner.plan()[0][1] == "resumable"
    assert os.path.isdir(out / "runs" / "bert_tiny_dense" / "checkpoints")


def test_devices_spread_runs_over_gpus_several_per_gpu(tmp_path, monkeypatch):
    import sys

    import torch

    from ipu_app.experiments.sweep_spec import RunSpec

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    spec = write_spec(tmp_path, {"grid": [{"config": "bert_tiny_dense", "seed": [0, 1, 2, 3, 4]}], "figure": "pareto"})
    # Each "run" records the GPU it was given and sleeps, so that the runs overlap.
    script = ("import os, sys, time; d = sys.argv[1]; os.makedirs(d, exist_ok=True); "
              "open(os.path.join(d, 'gpu'), 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '-')); time.sleep(0.5)")
    monkeypatch.setattr(RunSpec, "command", lambda self, run_dir, resume: [sys.executable, "-c", script, str(run_dir)])
    lines = []
    runner = SweepRunner(load_sweep(spec), tmp_path / "sweep", jobs=4, devices=["0,1"], echo=lines.append)
    runner.run()
    gpus = [(tmp_path / "sweep" / "runs" / r.name / "gpu").read_text() for r in runner.sweep.runs]
    # 4 at a time over 2 GPUs: two per GPU, then the fifth goes to the first GPU freed (both free: GPU 0)
    assert sorted(gpus[:4]) == ["0", "0", "1", "1"] and gpus[4] in ("0", "1")
    assert any("(GPU 1)" in line for line in lines)
    log = (tmp_path / "sweep" / "logs" / f"{runner.sweep.runs[1].name}.log").read_text()
    assert "start on GPU 1:" in log


@pytest.mark.parametrize("devices, count, message", [
    (["0"], 0, "no CUDA GPU is visible"),
    (["0,2"], 2, "GPU 2 does not exist; this machine has 2"),
    (["0", "0"], 2, "lists a GPU twice"),
    (["cuda:0"], 2, "is not a GPU index or UUID"),
])
def test_bad_devices_are_one_line(devices, count, message):
    from ipu_app.experiments.sweep import check_devices

    with pytest.raises(SweepError, match=message):
        check_devices(devices, gpu_count=count)
    assert check_devices(["1, 0", "GPU-4b2c"], gpu_count=2) == ["1", "0", "GPU-4b2c"]
