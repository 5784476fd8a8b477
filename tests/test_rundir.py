"""The run directory: its layout, its state, its config and its rules, in one place."""

import os

import pytest

from ipu_app.config import ConfigError, load_config
from ipu_app.rundir import RUN_STATES, RunDir, RunLock


def test_the_parts_of_a_run_are_named_once(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.config_path == tmp_path / "r" / "config.yaml"
    assert run.summary_path == tmp_path / "r" / "summary.json"
    assert run.metrics_path == tmp_path / "r" / "metrics.jsonl"
    assert run.checkpoints_dir == tmp_path / "r" / "checkpoints"
    assert run.checkpoint_path(1200) == tmp_path / "r" / "checkpoints" / "step_00001200"
    assert run.model_dir.name == "model" and run.tokenizer_dir.name == "tokenizer"
    assert run.explored_path.name == "explored.safetensors" and run.lock_path.name == ".lock"
    assert os.fspath(run) == str(tmp_path / "r") and RunDir(str(tmp_path / "r")) == run


def test_state_follows_what_is_on_disk(tmp_path):
    run = RunDir(tmp_path / "r")
    seen = [run.state()]
    run.path.mkdir()
    seen.append(run.state())  # empty: still new
    run.config_path.write_text("seed: 0\n")
    seen.append(run.state())  # died before its first checkpoint
    (run.checkpoints_dir / ".step_00000004.tmp").mkdir(parents=True)
    seen.append(run.state())  # a checkpoint being written is not one
    run.checkpoint_path(4).mkdir()
    seen.append(run.state())
    run.summary_path.write_text("{}")
    seen.append(run.state())
    assert seen == ["new", "new", "partial", "partial", "resumable", "finished"]
    assert set(seen) == set(RUN_STATES)


def test_checkpoints_are_listed_by_step_oldest_first(tmp_path):
    run = RunDir(tmp_path)
    for step in (30, 4, 100):
        run.checkpoint_path(step).mkdir(parents=True)
    (run.checkpoints_dir / "step_00000007").write_text("a file, not a checkpoint")
    (run.checkpoints_dir / "notes").mkdir()
    assert [step for step, _ in run.checkpoints()] == [4, 30, 100]
    assert run.checkpoints()[-1][1] == run.checkpoint_path(100)


def test_is_run_needs_a_config_and_a_record(tmp_path):
    run = RunDir(tmp_path)
    run.config_path.write_text("seed: 0\n")
    assert not run.is_run()
    run.metrics_path.write_text("")
    assert run.is_run()


def test_a_saved_config_round_trips_and_a_missing_one_is_one_line(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(ConfigError, match=r"is not a run directory \(no config.yaml\); start it with --config"):
        run.load_config()
    config = load_config("bert_tiny_sparse", ["sparsity.ratio=0.8"], steps=40, seed=3)
    run.prepare()
    run.write_config(config)
    loaded = run.load_config()
    assert loaded.to_dict() == config.to_dict() and loaded.name == "bert_tiny_sparse"


def test_a_new_run_never_lands_on_anything(tmp_path):
    taken = RunDir(tmp_path / "taken")
    taken.path.mkdir()
    (taken.path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        taken.prepare()
    assert (taken.path / "keep.txt").read_text() == "mine"
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        RunDir(file).check_new()
    fresh = RunDir(tmp_path / "a" / "b")
    fresh.prepare()
    assert fresh.path.is_dir() and not any(fresh.path.iterdir())


def test_remove_new_and_forget_progress(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare()
    run.config_path.write_text("seed: 0\n")
    run.metrics_path.write_text("{}\n")
    run.tensorboard_dir.mkdir()
    run.forget_progress()
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml"]
    run.remove_new(created=False)
    assert run.path.is_dir() and not any(run.path.iterdir())
    run.remove_new(created=True)
    assert not run.path.exists()


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path):
    run = RunDir(tmp_path)
    lock = run.lock()
    try:
        with pytest.raises(ConfigError, match=rf"being trained by another process \(pid {os.getpid()}\)"):
            RunLock(tmp_path)
    finally:
        lock.release()
    RunLock(run).release()  # released: free again

