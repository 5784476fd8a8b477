"""Every number a run reports, recomputed independently.

One small real run (BERT-Tiny, DynSparse, two pattern updates, gradient accumulation over two
micro-batches, no dropout, fp32) is trained in stages so that the test can see what the run saw:
the weights before a logged step and that step's batches, and the patterns before and after each
update. Then each reported value is recomputed another way:

- validation MLM loss, MLM accuracy and NSP loss: with Hugging Face's ``BertForPreTraining`` loaded
  from the run's export, on the run's validation batches (its own cross-entropy, argmax and NSP head);
- a logged step's loss, MLM/NSP loss, MLM accuracy and gradient norm: with Hugging Face's model at
  the weights before that step, on that step's micro-batches (the gradient of a sparse weight is its
  dense gradient at the active positions);
- tokens/s and real tokens/s from the batches' shapes and attention masks and the logged seconds;
- FLOPs from the paper's formula and the saved patterns;
- explored DOF, pruned blocks, pruned_recently_grown and grown_pruned_again from the patterns;
- and the same values in metrics.jsonl, summary.json and TensorBoard.
"""

import json
import math

import numpy as np
import pytest
import torch

from ipu_app.config import load_config
from ipu_app.data.batches import BatchIterator, validation_batches
from ipu_app.data.sampling import MaskingConfig
from ipu_app.commands.export import export_run
from ipu_app.model.export import export_hf
from ipu_app.sparse.layer import sparse_weights
from ipu_app.train.metrics import read_metrics
from ipu_app.train.trainer import Trainer

STEPS, BATCH, MICRO, SEQ = 12, 8, 4, 128
CHECKED_STEP = 3  # a logged step recomputed from its batches
VALIDATION = 5  # of the 6 this corpus holds: two batches (4 + 1), a random subset


def _config(data_dir, *extra):
    return load_config("bert_tiny_sparse", [
        f"data.dir={data_dir}", f"training.steps={STEPS}", f"training.batch_size={BATCH}",
        f"training.micro_batch_size={MICRO}", "training.warmup_steps=2", "training.log_every=1",
        "training.validate_every=6", "training.checkpoint_every=6", "training.precision=fp32",
        "model.dropout=0.0", "sparsity.segments=3", f"data.validation_sequences={VALIDATION}",
        "training.learning_rate=0.002", *extra])


def _patterns(model) -> dict[str, set[int]]:
    """Each sparse layer's active blocks as flat indices."""
    out = {}
    for name, layer in sparse_weights(model):
        cols = layer.in_features // layer.block_size
        out[name] = set((layer.block_rows.long() * cols + layer.block_cols.long()).tolist())
    return out


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """The run, trained in stages; what the test needs to see of it on the way."""
    root = tmp_path_factory.mktemp("reported")
    run_dir = root / "run"
    run_dir.mkdir()
    trainer = Trainer(_config(data_dir), run_dir, progress=False, tensorboard=True)
    seen = {"accumulation": trainer.accumulation}
    assert trainer.train(stop_at=CHECKED_STEP - 1) is None
    seen["before_step"] = export_hf(trainer.model, root / "before_step")  # the weights step 3 starts from
    batches = BatchIterator(trainer.state.batches.dataset, MICRO, 0, 1)
    batches.load_state_dict(trainer.state.batches.state_dict())
    seen["step_batches"] = [next(batches) for _ in range(trainer.accumulation)]
    seen["step_patterns"] = _patterns(trainer.model)
    update_steps = list(trainer.state.schedule.steps)
    assert update_steps == [4, 8]  # n = 3 segments of 12 steps
    seen["update_steps"], seen["block_size"] = update_steps, trainer.config.sparsity.block_size
    patterns = []
    for step in update_steps:  # stop just before each update (it runs at the end of its step)
        assert trainer.train(stop_at=step - 1) is None
        patterns.append(_patterns(trainer.model))
    summary = trainer.train()
    patterns.append(_patterns(trainer.model))
    seen.update(run_dir=run_dir, summary=summary, patterns=patterns, hf=export_run(run_dir, root / "hf"),
                vocab_size=trainer.model.config.vocab_size)
    return seen


def _hf(path):
    from transformers import BertForPreTraining

    model = BertForPreTraining.from_pretrained(str(path))
    model.config._attn_implementation = "eager"  # not the path the run took (SDPA)
    return model.float()


def _hf_sums(model, batch) -> dict:
    """Hugging Face's losses and counts on one batch: MLM cross-entropy summed over the masked
    tokens, the number predicted exactly, NSP cross-entropy summed over the sequences."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"])
    labels = batch["mlm_labels"]
    keep = labels != -100
    logits = out.prediction_logits[keep]
    return {
        "mlm": torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum"),
        "correct": int((logits.argmax(-1) == labels[keep]).sum()),
        "masked": int(keep.sum()),
        "nsp": torch.nn.functional.cross_entropy(out.seq_relationship_logits, batch["nsp_labels"], reduction="sum"),
        "nsp_correct": int((out.seq_relationship_logits.argmax(-1) == batch["nsp_labels"]).sum()),
        "sequences": labels.shape[0],
    }


def _tensorboard(run_dir) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


@torch.no_grad()
def test_validation_metrics_equal_hugging_face_on_the_same_batches(run, data_dir):
    config = _config(data_dir)
    masking = MaskingConfig(config.data.seq_len, config.data.mask_prob, config.data.max_predictions)
    batches = validation_batches(data_dir, MICRO, masking, max_sequences=VALIDATION)
    model = _hf(run["hf"]).eval()
    totals = {"mlm": 0.0, "correct": 0, "masked": 0, "nsp": 0.0, "nsp_correct": 0, "sequences": 0}
    for batch in batches:
        for key, value in _hf_sums(model, batch).items():
            totals[key] += float(value) if torch.is_tensor(value) else value
    expected = {"mlm_loss": totals["mlm"] / totals["masked"], "mlm_accuracy": totals["correct"] / totals["masked"],
                "nsp_loss": totals["nsp"] / totals["sequences"], "nsp_accuracy": totals["nsp_correct"] / totals["sequences"]}
    summary = run["summary"]
    saved = json.loads((run["run_dir"] / "summary.json").read_text())
    last_val = read_metrics(run["run_dir"], "val")[-1]
    board = _tensorboard(run["run_dir"])
    assert last_val["step"] == STEPS and last_val["sequences"] == totals["sequences"] == VALIDATION
    assert last_val["masked_tokens"] == totals["masked"]
    for key, value in expected.items():
        assert summary[f"final_val_{key}"] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        assert saved[f"final_val_{key}"] == summary[f"final_val_{key}"]
        assert last_val[key] == summary[f"final_val_{key}"]
        assert board[(f"val/{key}", STEPS)] == pytest.approx(summary[f"final_val_{key}"], rel=1e-6)
    # Plausible for a model this young: NSP near chance (ln 2), accuracy a probability.
    assert 0.0 <= summary["final_val_mlm_accuracy"] <= 1.0
    assert abs(summary["final_val_nsp_loss"] - math.log(2)) < 0.2


def test_a_logged_step_equals_hugging_face_on_its_batches(run):
    model = _hf(run["before_step"]).train()  # dropout is 0: train mode is deterministic
    sums = [_hf_sums(model, batch) for batch in run["step_batches"]]
    accumulation = run["accumulation"]
    # The step's loss is the mean over micro-batches of each one's mean MLM + NSP loss.
    mlm = sum(float(s["mlm"].detach()) / s["masked"] for s in sums) / accumulation
    nsp = sum(float(s["nsp"].detach()) / s["sequences"] for s in sums) / accumulation
    loss = sum(s["mlm"] / s["masked"] + s["nsp"] / s["sequences"] for s in sums) / accumulation
    loss.backward()
    # Gradient norm over what the run trains: a sparse weight's gradient is its dense gradient at the
    # active blocks (the rest is no parameter); the tied decoder counts once.
    squares = 0.0
    patterns = run["step_patterns"]
    for name, param in model.named_parameters():
        grad = param.grad
        layer = name.removesuffix(".weight")
        if layer in patterns:
            rows, cols = grad.shape
            b = run["block_size"]
            mask = torch.zeros(rows // b * (cols // b), dtype=torch.bool)
            mask[list(patterns[layer])] = True
            mask = mask.reshape(rows // b, cols // b).repeat_interleave(b, 0).repeat_interleave(b, 1)
            grad = grad * mask
        squares += float(grad.double().pow(2).sum())
    record = next(r for r in read_metrics(run["run_dir"], "train") if r["step"] == CHECKED_STEP)
    assert record["mlm_loss"] == pytest.approx(mlm, rel=1e-4)
    assert record["nsp_loss"] == pytest.approx(nsp, rel=1e-4)
    assert record["loss"] == pytest.approx(mlm + nsp, rel=1e-4)
    assert record["mlm_accuracy"] == pytest.approx(sum(s["correct"] for s in sums) / sum(s["masked"] for s in sums))
    assert record["grad_norm"] == pytest.approx(math.sqrt(squares), rel=1e-3)
    # tokens/s: every position of the step's batches over the step's seconds; real tokens/s the
    # positions the attention mask keeps.
    tokens = sum(b["input_ids"].numel() for b in run["step_batches"])
    real = sum(int(b["attention_mask"].sum()) for b in run["step_batches"])
    assert tokens == BATCH * SEQ and real < tokens  # this corpus pads
    assert record["tokens_per_second"] == pytest.approx(tokens / record["seconds"], rel=1e-9)
    assert record["real_tokens_per_second"] == pytest.approx(real / record["seconds"], rel=1e-9)
    board = _tensorboard(run["run_dir"])
    for key in ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "grad_norm", "learning_rate", "tokens_per_second"):
        assert board[(f"train/{key}", CHECKED_STEP)] == pytest.approx(record[key], rel=1e-6), key


def test_run_totals_add_up(run):
    summary = run["summary"]
    records = read_metrics(run["run_dir"], "train")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert summary["train_time_s"] == pytest.approx(sum(r["seconds"] for r in records), rel=1e-6)
    assert summary["tokens_per_second"] * summary["train_time_s"] == pytest.approx(STEPS * BATCH * SEQ)
    real = sum(r["real_tokens_per_second"] * r["seconds"] for r in records)
    assert summary["real_tokens_per_second"] * summary["train_time_s"] == pytest.approx(real)
    assert summary["wall_time_s"] >= summary["train_time_s"]
    last = records[-1]
    assert summary["final_train_loss"] == pytest.approx(last["loss"], rel=1e-9)
    assert summary["vocab_size"] == run["vocab_size"]
    assert summary["metrics_version"] == 2
    # The machine, as lscpu names it (results pair only within one machine kind).
    import shutil
    import subprocess

    if shutil.which("lscpu"):
        fields = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                      .stdout.splitlines() if ":" in line)
        flags = fields.get("Flags", "").split()
        assert summary["cpu"] == fields["Model name"].strip()
        assert summary["cpu_isa"] == [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
        assert summary["cpu"] in summary["machine"] and summary["machines"] == [summary["machine"]]
    assert summary["precision"] == "fp32"


def test_flops_follow_the_papers_formula(run):
    """``6 · (active encoder weights) · S + 12 · L · S² · H`` with the active weights counted from the
    saved patterns (Tiny: L = 2, H = 128, blocks of 1)."""
    layers, hidden = 2, 128
    active = sum(len(blocks) for blocks in run["patterns"][-1].values())
    assert len(run["patterns"][-1]) == 6 * layers
    expected = 6 * active * SEQ + 12 * layers * SEQ**2 * hidden
    summary = run["summary"]
    assert summary["non_embedding_nonzero_params"] == active
    assert summary["non_embedding_flops_per_sequence"] == pytest.approx(expected, rel=1e-12)
    assert summary["total_non_embedding_flops"] == pytest.approx(expected * STEPS * BATCH, rel=1e-12)
    # 90 % sparse: active weights are 10 % of 12 L H² (each layer rounds its own count).
    assert active == pytest.approx(0.1 * 12 * layers * hidden**2, rel=1e-3)


def test_update_statistics_equal_the_patterns_before_and_after(run):
    from safetensors.numpy import load_file

    before_first, before_second, final = run["patterns"]
    updates = read_metrics(run["run_dir"], "update")
    assert [u["step"] for u in updates] == run["update_steps"]
    # The first update: between the first two snapshots; the second: between the last two.
    after_first = before_second
    grown_first = {k: after_first[k] - before_first[k] for k in final}
    pruned_second = {k: before_second[k] - final[k] for k in final}
    assert updates[0]["pruned_blocks"] == sum(len(before_first[k] - after_first[k]) for k in final)
    assert updates[1]["pruned_blocks"] == sum(len(v) for v in pruned_second.values())
    prg = np.mean([len(pruned_second[k] & grown_first[k]) / len(pruned_second[k]) for k in final])
    again = np.mean([len(pruned_second[k] & grown_first[k]) / len(grown_first[k]) for k in final])
    # (the updater takes each layer's fraction in float32)
    assert updates[1]["mean_pruned_recently_grown"] == pytest.approx(prg, rel=1e-6)
    assert updates[1]["mean_grown_pruned_again"] == pytest.approx(again, rel=1e-6)
    assert updates[0]["mean_pruned_recently_grown"] is None  # nothing grown before the first update (NaN)
    # Explored DOF: every block active at some time, as a fraction of the layer's blocks.
    explored = load_file(str(run["run_dir"] / "explored.safetensors"))
    fractions = []
    for name in final:
        ever = before_first[name] | after_first[name] | final[name]
        saved = explored[name]
        assert set(np.flatnonzero(saved.reshape(-1)).tolist()) == ever
        fractions.append(len(ever) / saved.size)
    assert run["summary"]["mean_explored_dof"] == pytest.approx(np.mean(fractions), rel=1e-6)
    assert updates[1]["mean_explored_dof"] == pytest.approx(np.mean(fractions), rel=1e-6)
    board = _tensorboard(run["run_dir"])
    for record in updates:
        assert board[("update/mean_explored_dof", record["step"])] == pytest.approx(record["mean_explored_dof"])


def test_an_untrained_model_validates_at_chance(data_dir, tmp_path):
    """Before any step: NSP loss near ln 2, MLM loss near ln(vocabulary), accuracy near 0."""
    trainer = Trainer(_config(data_dir), tmp_path, progress=False, tensorboard=False)
    result = trainer.evaluate()
    vocab = trainer.model.config.vocab_size
    assert abs(result["nsp_loss"] - math.log(2)) < 0.05
    assert abs(result["mlm_loss"] - math.log(vocab)) < 0.5
    assert 0.0 <= result["mlm_accuracy"] < 0.01
    assert result["sequences"] == VALIDATION
    trainer.close()


def test_wall_time_after_a_resume_counts_every_process(data_dir, tmp_path):
    config = _config(data_dir, "training.steps=6", "sparsity.segments=2")
    first = Trainer(config, tmp_path, progress=False, tensorboard=False)
    assert first.train(stop_at=4) is None
    first.close()
    summary = Trainer(config, tmp_path, resume=True, progress=False, tensorboard=False).train()
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0
    records = read_metrics(tmp_path, "train")
    assert summary["train_time_s"] == pytest.approx(sum(r["seconds"] for r in records), rel=1e-6)


def test_revalidate_recomputes_an_old_runs_summary(run, data_dir, tmp_path, capsys):
    """A run written before metrics_version 2 (simulated: the version key dropped, NSP loss and
    accuracy swapped as the old reader did) gets the right values back, the old ones kept beside."""
    import shutil

    from ipu_app.__main__ import main as app_main

    old = tmp_path / "old"
    shutil.copytree(run["run_dir"], old)
    (old / "config.yaml").write_text(_config(data_dir).to_yaml())  # what run_pretraining.py writes
    summary = json.loads((old / "summary.json").read_text())
    right = {k: summary[k] for k in ("final_val_mlm_loss", "final_val_nsp_loss", "final_val_mlm_accuracy")}
    del summary["metrics_version"]
    summary["final_val_nsp_loss"], summary["final_val_mlm_accuracy"] = 14.25, 0.0003
    (old / "summary.json").write_text(json.dumps(summary))
    assert app_main(["revalidate", str(old)]) == 0
    fixed = json.loads((old / "summary.json").read_text())
    for key, value in right.items():
        assert fixed[key] == pytest.approx(value, rel=1e-6), key
    assert fixed["metrics_version"] == 2
    assert fixed["revalidated"][0]["previous"]["final_val_nsp_loss"] == 14.25
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["final_val_mlm_accuracy"] == pytest.approx(
        right["final_val_mlm_accuracy"], rel=1e-6)
    # At the current version it changes nothing; a directory that is no finished run is one line, exit 1.
    assert app_main(["revalidate", str(old)]) == 0
    assert json.loads((old / "summary.json").read_text()) == fixed
    assert app_main(["revalidate", str(tmp_path / "nothing")]) == 1
    assert "is not a finished run (no summary.json)" in capsys.readouterr().err


def test_evaluate_command_recomputes_the_final_validation_and_evaluates_checkpoints(run, data_dir, tmp_path, capsys):
    """``python -m ipu_app evaluate`` on the final model gives the run's own final validation (the same
    code); a checkpoint and another sequence count are evaluated too; bad requests are one line."""
    import shutil

    from ipu_app.__main__ import main as app_main

    summary = run["summary"]
    run_dir = tmp_path / "run"
    shutil.copytree(run["run_dir"], run_dir)
    (run_dir / "config.yaml").write_text(_config(data_dir).to_yaml())  # what run_pretraining.py writes
    run = {"run_dir": run_dir}
    out_file = tmp_path / "eval.json"
    assert app_main(["evaluate", "--run", str(run["run_dir"]), "--output", str(out_file), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out_file.read_text()) == result
    assert result["model"] == "final model" and result["step"] == STEPS and result["sequences"] == VALIDATION
    for key in ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"):
        assert result[key] == pytest.approx(summary[f"final_val_{key}"], rel=1e-6), key
    # the last checkpoint is the final step's weights: the same numbers
    assert app_main(["evaluate", "--run", str(run["run_dir"]), "--checkpoint", str(STEPS), "--no-progress"]) == 0
    at_last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert at_last["model"].startswith("checkpoint step_") and at_last["mlm_loss"] == pytest.approx(result["mlm_loss"], rel=1e-6)
    assert app_main(["evaluate", "--run", str(run["run_dir"]), "--sequences", "3", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sequences"] == 3
    assert app_main(["evaluate", "--run", str(run["run_dir"]), "--checkpoint", "5", "--no-progress"]) == 1
    assert "has no checkpoint at step 5; it has" in capsys.readouterr().err
    assert app_main(["evaluate", "--run", str(tmp_path), "--no-progress"]) == 1
    assert "is not a run directory" in capsys.readouterr().err
    # export --checkpoint: the last checkpoint holds the final weights, so both exports are equal
    from safetensors.torch import load_file

    assert app_main(["export", "--run", str(run["run_dir"]), "--output", str(tmp_path / "final")]) == 0
    assert app_main(["export", "--run", str(run["run_dir"]), "--output", str(tmp_path / "ckpt"),
                     "--checkpoint", str(STEPS)]) == 0
    assert f"(checkpoint step_{STEPS:08d}, step {STEPS})" in capsys.readouterr().err
    final, ckpt = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("final", "ckpt"))
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)
    assert (tmp_path / "ckpt" / "vocab.txt").is_file()
    assert app_main(["export", "--run", str(run["run_dir"]), "--output", str(tmp_path / "x"), "--checkpoint", "5"]) == 1
    assert "has no checkpoint at step 5" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # data of another tokenizer: the two identities named (sizes alone can be equal)
    from ipu_app.data.prepare import prepare_files
    from ipu_app.data.tokenizer import tokenizer_hash
    from tests.data.test_tokenizer_folder import TEXT, _folder

    cased = _folder(tmp_path / "cased_tok", lowercase=False)
    (tmp_path / "other.txt").write_text(TEXT)
    other = prepare_files([tmp_path / "other.txt"], tmp_path / "other", tokenizer=str(cased), progress=False,
                          workers=1)
    assert app_main(["evaluate", "--run", str(run["run_dir"]), "--data", str(other), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"was tokenised with another tokenizer (sha256 {tokenizer_hash(cased)[:12]}, " in err
    assert "than the run's (sha256 " in err and len(err.strip().splitlines()) == 1
