"""The pre-trained runs the fine-tuning tests share (built once per session)."""

import pytest

from ipu_app.data.tasks import write_demo_task
from ipu_app.train.cli import main as train_main


@pytest.fixture(scope="session")
def pipeline(data_dir, tmp_path_factory):
    """Phase I (seq 128, 60 steps at a learning rate the short run does not collapse at), phase II (seq 512, 4 steps, --init-from phase I) and the demo task."""
    root = tmp_path_factory.mktemp("pipeline")
    common = ["--config", "bert_tiny_sparse", "--no-progress", "--set", f"data.dir={data_dir}",
              "--set", "training.precision=fp32", "--set", "data.validation_sequences=8"]
    assert train_main([*common, "--steps", "60", "--set", "training.batch_size=16", "--set", "training.learning_rate=1e-3",
                       "--output-dir", str(root / "phase1")]) == 0
    assert train_main([*common, "--steps", "4", "--set", "training.batch_size=4", "--set", "data.seq_len=512",
                       "--set", "data.max_predictions=76", "--init-from", str(root / "phase1"),
                       "--output-dir", str(root / "phase2")]) == 0
    write_demo_task(root / "task", train=2000, dev=500, seed=0)
    return root
