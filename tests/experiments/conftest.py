"""Synthetic run directories: what training writes (config.yaml, summary.json, metrics.jsonl,
explored.safetensors), with chosen numbers, so reports can be checked exactly."""

import json
from pathlib import Path

import numpy as np
import pytest

from ipu_app.config import load_config
from ipu_app.choices import MODEL_SIZES
from ipu_app.sparse.flops import non_embedding_params, non_embedding_training_flops_per_sequence
from ipu_app.train.optim import peak_learning_rate


def make_run(root: Path, name: str, config: str, loss: float, *, lr: float | None = None, seed: int = 0,
             overrides: tuple = (), summary: dict | None = None, metrics: list | None = None,
             explored: dict | None = None, block_size: int = 1) -> Path:
    sets = list(overrides) + [f"seed={seed}"]
    if lr is not None:
        sets.append(f"training.learning_rate={lr}")
    cfg = load_config(config, sets)
    cfg.name = name
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    layers, hidden = MODEL_SIZES[cfg.model.size]
    s = cfg.effective_sparsity
    data = {
        "config": name, "steps": cfg.training.steps, "final_val_mlm_loss": loss, "final_val_nsp_loss": 0.69,
        "final_train_loss": loss + 0.7, "sparsity": s, "block_size": cfg.sparsity.block_size,
        "learning_rate": peak_learning_rate(cfg),
        "non_embedding_flops_per_sequence": non_embedding_training_flops_per_sequence(layers, hidden, 128, s),
        "non_embedding_nonzero_params": round(non_embedding_params(layers, hidden) * (1 - s)),
        "pattern_updates": 0, "metrics_version": 2,
    }
    data.update(summary or {})
    (run / "summary.json").write_text(json.dumps(data))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (metrics or [])))
    if explored is not None:
        from safetensors.numpy import save_file

        save_file({k: v.astype(np.uint8) for k, v in explored.items()}, str(run / "explored.safetensors"),
                  metadata={"format": "ipu_app.explored/1", "block_size": str(block_size)})
    return run


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "sweep" / "runs"
    root.mkdir(parents=True)
    return root
