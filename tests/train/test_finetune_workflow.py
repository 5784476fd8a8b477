"""Fine-tuning as a run_glue.py user expects: a stop keeps a checkpoint and --resume continues
bit-exact; any BERT folder in; regression (STS-B), MNLI's two dev files, test predictions."""

import json
import os
import signal
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats

from ipu_app.__main__ import main as app_main
from ipu_app.data.tasks import read_task, task_files, task_kind
from ipu_app.finetune import Finetuner, regression_metrics



@pytest.fixture(scope="module")
def small_task(pipeline):
    """200 training sentences of the demo task (13 steps an epoch at batch 16) and 60 dev ones."""
    from ipu_app.data.tasks import write_demo_task

    write_demo_task(pipeline / "small", train=200, dev=60, seed=3)
    return pipeline / "small"


def _args(model, task, out, *extra):
    """finetune MODEL on TASK into OUT (batch 16 at 1e-3); ``model`` a path or the session's pipeline root."""
    model = model / "runs" / "bert_tiny_sparse" if (model / "runs").is_dir() else model
    return ["finetune", "--model", str(model), "--task", str(task), "--output", str(out),
            "--batch-size", "16", "--learning-rate", "1e-3", "--no-progress", *extra]


def _stop_at(monkeypatch, steps):
    """Deliver SIGINT (the real handler) right after each of ``steps``."""
    original = Finetuner._train_step

    def step(self, indices):
        original(self, indices)
        if self.step in steps:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Finetuner, "_train_step", step)


def _records(out, kind):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == kind]


def test_a_stopped_finetune_resumes_bit_exact(pipeline, small_task, tmp_path, monkeypatch, capsys):
    options = ("--epochs", "2", "--checkpoint-every", "5", "--save", "best", "--metric", "loss",
               "--pattern", "dynamic", "--segments", "3")
    straight = tmp_path / "straight"
    assert app_main(_args(pipeline, small_task, straight, *options)) == 0
    expected = json.loads((straight / "results.json").read_text())

    stopped = tmp_path / "stopped"
    _stop_at(monkeypatch, {7, 17})  # mid epoch 1 (past the step-5 checkpoint), mid epoch 2
    assert app_main(_args(pipeline, small_task, stopped, *options)) == 130
    err = capsys.readouterr().err
    assert ("stopped at step 7 (epoch 1); checkpoint written. Continue with: "
            f"python -m ipu_app finetune --resume {stopped}") in err
    assert (stopped / "checkpoints" / "step_00000007").is_dir()
    assert not (stopped / "results.json").exists() and not (stopped / "model").exists()
    # a stopped output is neither overwritten by a new fine-tune nor resumed with other options
    assert app_main(_args(pipeline, small_task, stopped)) == 1
    assert f"continue it with python -m ipu_app finetune --resume {stopped}" in capsys.readouterr().err
    assert app_main(["finetune", "--resume", str(stopped), "--epochs", "3"]) == 1
    assert "drop --epochs" in capsys.readouterr().err
    assert app_main(["finetune", "--resume", str(stopped), "--no-progress"]) == 130
    assert "stopped at step 17 (epoch 2)" in capsys.readouterr().err
    assert app_main(["finetune", "--resume", str(stopped), "--no-progress"]) == 0
    results = json.loads((stopped / "results.json").read_text())

    # the same numbers as the run that never stopped: every logged loss, every epoch, the weights
    assert _records(stopped, "train") == _records(straight, "train")
    assert _records(stopped, "dev") == _records(straight, "dev")
    assert results["epochs"] == expected["epochs"] and results["dev"] == expected["dev"]
    assert results["steps"] == 26 and results["pattern_updates"] == expected["pattern_updates"] == 2
    a, b = (load_file(str(out / "model" / "model.safetensors")) for out in (straight, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --save best --metric loss: the saved model is the epoch with the lowest dev loss
    best = min(expected["epochs"], key=lambda e: e["loss"])
    assert results["saved_epoch"] == best["epoch"] and results["dev"] == best
    assert app_main(["finetune", "--resume", str(stopped)]) == 1
    assert "has finished" in capsys.readouterr().err
    # outputs are readable by others (the umask's mode), and TensorBoard has the live scalars
    for path in (stopped / "model").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask(), path.name
    assert any((stopped / "tensorboard").iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _hf_folder(pipeline, path):
    """A plain Hugging Face BERT folder (BertForPreTraining, random weights) with phase 1's tokenizer."""
    import shutil

    from transformers import BertConfig, BertForPreTraining

    vocab = len((pipeline / "runs" / "bert_tiny_sparse" / "tokenizer" / "vocab.txt").read_text().splitlines())
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=512))
    model.save_pretrained(str(path))
    for name in ("vocab.txt", "tokenizer_config.json"):
        if (pipeline / "runs" / "bert_tiny_sparse" / "tokenizer" / name).is_file():
            shutil.copy(pipeline / "runs" / "bert_tiny_sparse" / "tokenizer" / name, path / name)
    return model


def test_any_bert_source(pipeline, small_task, tmp_path, capsys):
    run = pipeline / "runs" / "bert_tiny_sparse"
    # a checkpoint directory and an export folder: the run's pattern
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert app_main(_args(checkpoint, small_task, tmp_path / "ckpt", "--epochs", "1")) == 0
    source = json.loads((tmp_path / "ckpt" / "results.json").read_text())["source"]
    assert source.endswith(f"checkpoint {checkpoint.name}")
    assert app_main(["export", "--run", str(run), "--output", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    assert app_main(_args(tmp_path / "export", small_task, tmp_path / "from_export", "--epochs", "1")) == 0
    results = json.loads((tmp_path / "from_export" / "results.json").read_text())
    assert results["source"].startswith("export") and results["encoder_sparsity"] == pytest.approx(0.9, abs=1e-4)
    # --run is the same option
    assert app_main(["finetune", "--run", str(run), "--task", str(small_task), "--output", str(tmp_path / "r"),
                     "--epochs", "1", "--no-progress"]) == 0

    # a dense Hugging Face folder: dense unless --sparsity; with it, each linear's largest blocks
    hf = _hf_folder(pipeline, tmp_path / "hf")
    assert app_main(_args(tmp_path / "hf", small_task, tmp_path / "hf_dense", "--epochs", "1")) == 0
    assert json.loads((tmp_path / "hf_dense" / "results.json").read_text())["encoder_sparsity"] == 0.0
    assert app_main(_args(tmp_path / "hf", small_task, tmp_path / "hf_sparse", "--epochs", "1", "--sparsity", "0.9",
                          "--block-size", "4")) == 0
    results = json.loads((tmp_path / "hf_sparse" / "results.json").read_text())
    assert results["encoder_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert "pruned by magnitude to s = 0.9, block size 4" in results["source"]
    patterns = load_file(str(tmp_path / "hf_sparse" / "model" / "sparsity_patterns.safetensors"))
    name = "bert.encoder.layer.1.intermediate.dense"
    weight = hf.get_submodule(name).weight.detach()
    norms = weight.abs().reshape(512 // 4, 4, 128 // 4, 4).sum(dim=(1, 3))
    nnz = patterns[f"{name}.block_rows"].numel()
    chosen = set(zip(patterns[f"{name}.block_rows"].tolist(), patterns[f"{name}.block_cols"].tolist()))
    top = set(divmod(int(i), 128 // 4) for i in torch.topk(norms.flatten(), nnz).indices)
    assert chosen == top
    # a sparse source keeps its own sparsity
    args = _args(pipeline, small_task, tmp_path / "bad", "--sparsity", "0.5")
    assert app_main(args) == 1 and "is sparse already (sparsity 0.9)" in capsys.readouterr().err
    assert app_main(["finetune", "--model", str(tmp_path / "nowhere"), "--task", str(small_task), "--output",
                     str(tmp_path / "bad")]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _sentences(small_task):
    return [t[0] for t in read_task(small_task / "train.tsv").texts]


def test_regression_with_test_predictions(pipeline, small_task, tmp_path, capsys):
    """STS-B's raw layout: index, genre, sentence1, sentence2, score (floats), a test file without scores."""
    sentences = _sentences(small_task)
    rng = np.random.default_rng(0)
    folder = tmp_path / "stsb"
    folder.mkdir()
    for name, count in (("train", 96), ("dev", 40), ("test", 20)):
        lines = ["index\tgenre\tsentence1\tsentence2" + ("" if name == "test" else "\tscore")]
        for i in range(count):
            a, b = rng.choice(len(sentences), 2)
            score = "" if name == "test" else f"\t{min(5.0, len(sentences[a]) / 40):.3f}"
            lines.append(f"{100 + i}\tmain\t{sentences[a]}\t{sentences[b]}{score}")
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    assert task_kind(read_task(folder / "train.tsv")) == "regression"
    out = tmp_path / "out"
    args = _args(pipeline, folder, out, "--epochs", "2", "--test", str(folder / "test.tsv"))
    assert app_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["type"] == "regression" and results["task"]["label_column"] == "score"
    assert results["metric"] == "pearson" and set(results["dev"]) >= {"pearson", "spearman", "mse", "loss"}
    # --save last, the default: the last epoch's model and metrics, no best/ copy
    assert results["saved_epoch"] == 2 and results["dev"] == results["epochs"][-1] and not (out / "best").exists()

    from transformers import BertForSequenceClassification, BertTokenizerFast

    hf = BertForSequenceClassification.from_pretrained(str(out / "model")).eval()
    assert hf.config.num_labels == 1
    tokenizer = BertTokenizerFast.from_pretrained(str(out / "model"))
    dev = read_task(folder / "dev.tsv")
    with torch.no_grad():
        values = hf(**tokenizer([t[0] for t in dev.texts], [t[1] for t in dev.texts], padding=True, truncation=True,
                                max_length=128, return_tensors="pt")).logits[:, 0].numpy()
    labels = np.array([float(x) for x in dev.labels])
    assert results["dev"]["pearson"] == pytest.approx(stats.pearsonr(labels, values)[0], abs=1e-4)
    assert results["dev"]["spearman"] == pytest.approx(stats.spearmanr(labels, values)[0], abs=1e-4)
    assert results["dev"]["mse"] == pytest.approx(np.mean((labels - values) ** 2), rel=1e-4)
    rows = [line.split("\t") for line in (out / "test_predictions.tsv").read_text().splitlines()]
    assert rows[0] == ["index", "prediction"] and [r[0] for r in rows[1:]] == [str(100 + i) for i in range(20)]
    assert all(float(r[1]) == float(r[1]) for r in rows[1:])


def test_mnli_style_matched_and_mismatched_dev(pipeline, small_task, tmp_path):
    sentences = _sentences(small_task)
    rng = np.random.default_rng(1)
    folder = tmp_path / "mnli"
    folder.mkdir()
    classes = ("contradiction", "entailment", "neutral")
    for name, count in (("train", 90), ("dev_matched", 30), ("dev_mismatched", 30)):
        lines = ["index\tsentence1\tsentence2\tgold_label"]
        for i in range(count):
            a, b = rng.choice(len(sentences), 2)
            lines.append(f"{i}\t{sentences[a]}\t{sentences[b]}\t{classes[i % 3]}")
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    train, dev = task_files([str(folder)])
    assert [d.name for d in dev] == ["dev_matched.tsv", "dev_mismatched.tsv"]
    out = tmp_path / "out"
    assert app_main(_args(pipeline, folder, out, "--epochs", "1")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["labels"] == list(classes) and "f1" not in results["dev"]
    assert results["metric"] == "accuracy"  # what --save best would compare, by default, for classes
    for stem, key in (("dev", "accuracy"), ("dev_mismatched", "dev_mismatched_accuracy")):
        rows = [line.split("\t") for line in (out / f"{stem}_predictions.tsv").read_text().splitlines()[1:]]
        assert results["dev"][key] == pytest.approx(np.mean([r[1] == r[2] for r in rows]))


def test_regression_metrics_and_bad_options(tmp_path, pipeline, small_task, capsys):
    labels, predictions = np.array([1.0, 2.0, 3.5, 0.2]), np.array([1.1, 1.7, 3.0, 0.9])
    found = regression_metrics(labels, predictions)
    assert found["pearson"] == pytest.approx(np.corrcoef(labels, predictions)[0, 1])
    assert found["spearman"] == pytest.approx(stats.spearmanr(labels, predictions)[0])
    assert regression_metrics(labels, np.ones(4))["pearson"] == 0.0
    for extra, message in ((("--metric", "pearson"), "--metric 'pearson' is not a metric of this classification"),
                           (("--checkpoint-every", "-1"), "--checkpoint-every must be >= 0")):
        assert app_main(_args(pipeline, small_task, tmp_path / "x", *extra)) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's choices
        app_main(_args(pipeline, small_task, tmp_path / "x", "--save", "worst"))
    assert "invalid choice: 'worst'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert app_main(["finetune", "--task", str(small_task), "--output", str(tmp_path / "y")]) == 1
    assert "finetune needs --model (or --resume OUTPUT" in capsys.readouterr().err


def test_a_crash_before_the_first_checkpoint_is_named(pipeline, small_task, tmp_path, monkeypatch, capsys):
    def crash(self, indices):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Finetuner, "_train_step", crash)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="out of memory"):
        app_main(_args(pipeline, small_task, out))
    assert (out / "finetune.json").is_file() and not (out / "checkpoints").exists()
    assert app_main(["finetune", "--resume", str(out)]) == 1
    assert "no checkpoint to resume from (it stopped before its first)" in capsys.readouterr().err
    assert app_main(_args(pipeline, small_task, out)) == 1
    assert "stopped before its first checkpoint; delete it or choose a new output directory" in capsys.readouterr().err
