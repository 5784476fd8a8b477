"""The researcher's pipeline (the README's chain at test size, tests/readme_chain.py): pre-train Tiny ->
continue at seq 512 (--init-from) -> evaluate -> sparse fine-tuning on a small task; every number
fine-tuning reports recomputed from its outputs."""

import json

import numpy as np
import pytest
import torch

from ipu_app.__main__ import main as app_main
from ipu_app.data.tasks import TaskError, label_names, read_task, write_demo_task
from ipu_app.finetune import classification_metrics
from ipu_app.model.bert import SparseBertForPreTraining
from ipu_app.sparse.layer import sparse_weights


ENCODER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                   "intermediate.dense", "output.dense")


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _encoder_zeros(model) -> float:
    """Zero weights over all of the dense model's encoder linears (what a fine-tuned sparse model holds)."""
    zeros = total = 0
    for layer in model.bert.encoder.layer:
        for path in ENCODER_LINEARS:
            weight = layer.get_submodule(path).weight
            zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
    return zeros / total


def test_pretrain_continue_at_512_evaluate_and_finetune_sparse(pipeline, capsys):
    phase2 = pipeline / "runs" / "tiny_512"
    summary = json.loads((phase2 / "summary.json").read_text())
    assert summary["init_from"]["positions"] is None and summary["init_from"]["pattern"] == "keep"
    assert json.loads((pipeline / "runs" / "bert_tiny_sparse" / "summary.json").read_text())["steps"] == 60

    capsys.readouterr()
    assert app_main(["evaluate", "--run", str(phase2), "--no-progress"]) == 0
    evaluated = _last_json(capsys)
    assert evaluated["mlm_loss"] == pytest.approx(summary["final_val_mlm_loss"], rel=1e-6)

    out = pipeline / "runs" / "ft"  # the README's fine-tuning line (3 epochs at 1e-3), run by the fixture
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(phase2) and results["settings"]["learning_rate"] == 1e-3
    assert results["steps"] == 3 * 63 and results["pattern_updates"] == 0
    assert results["dev"]["accuracy"] > 0.6  # chance is 0.5 on 500 balanced sentences (sd 0.022)
    assert results["encoder_sparsity"] == pytest.approx(0.9, abs=1e-4)

    # The saved folder is a plain Hugging Face model: as sparse as reported, with the pre-trained pattern
    from transformers import BertForSequenceClassification, BertTokenizerFast

    hf = BertForSequenceClassification.from_pretrained(str(out / "model")).eval()
    assert _encoder_zeros(hf) == pytest.approx(results["encoder_sparsity"], abs=1e-6)
    pretrained = dict(sparse_weights(SparseBertForPreTraining.load(phase2 / "model")))
    for name, layer in pretrained.items():
        weight = hf.get_submodule(name).weight
        assert torch.equal(weight != 0, layer.mask()), name  # nonzero exactly on the pre-trained pattern

    # dev_predictions.tsv holds HF's own predictions on dev.tsv, and the metrics follow from it
    dev = read_task(pipeline / "tasks" / "demo" / "dev.tsv")
    tokenizer = BertTokenizerFast.from_pretrained(str(out / "model"))
    with torch.no_grad():
        logits = torch.cat([hf(**tokenizer([t[0] for t in dev.texts[i:i + 100]], padding=True, truncation=True,
                                           max_length=128, return_tensors="pt")).logits for i in range(0, 500, 100)])
    rows = [line.split("\t") for line in (out / "dev_predictions.tsv").read_text().splitlines()[1:]]
    assert [r[1] for r in rows] == dev.labels
    predicted = [r[2] for r in rows]
    assert sum(a != hf.config.id2label[int(b)] for a, b in zip(predicted, logits.argmax(-1))) <= 1
    truth = np.array([r[1] == "encyclopedia" for r in rows], dtype=float)
    guess = np.array([p == "encyclopedia" for p in predicted], dtype=float)
    tp, fp, fn = (truth * guess).sum(), ((1 - truth) * guess).sum(), (truth * (1 - guess)).sum()
    assert results["dev"]["accuracy"] == pytest.approx((truth == guess).mean())
    assert results["dev"]["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert results["dev"]["matthews"] == pytest.approx(np.corrcoef(truth, guess)[0, 1])  # phi = Pearson's r
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["kind"] == "dev"] == [1, 2, 3]
    assert lines[-1] == {"kind": "dev", **results["dev"]}


def test_dynamic_finetuning_moves_the_pattern_and_keeps_the_sparsity(pipeline, capsys):
    out = pipeline / "dynamic"
    assert app_main(["finetune", "--run", str(pipeline / "runs" / "tiny_512"), "--task", str(pipeline / "tasks" / "demo" / "train.tsv"),
                     str(pipeline / "tasks" / "demo" / "dev.tsv"), "--output", str(out), "--epochs", "1", "--pattern", "dynamic",
                     "--segments", "3", "--batch-size", "64", "--learning-rate", "1e-3", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 32 and results["pattern_updates"] == 2
    assert results["encoder_sparsity"] == pytest.approx(0.9, abs=1e-4)
    from safetensors.torch import load_file

    patterns = load_file(str(out / "model" / "sparsity_patterns.safetensors"))
    before = dict(sparse_weights(SparseBertForPreTraining.load(pipeline / "runs" / "tiny_512" / "model")))
    moved = [name for name, layer in before.items()
             if not torch.equal(patterns[f"{name}.block_cols"], layer.block_cols.cpu())
             or not torch.equal(patterns[f"{name}.block_rows"], layer.block_rows.cpu())]
    assert len(moved) == len(before)  # every layer pruned and regrew


def test_bad_finetuning_requests_are_one_line_errors(pipeline, tmp_path, capsys):
    run = str(pipeline / "runs" / "tiny_512")
    task = pipeline / "tasks" / "demo"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert app_main(["finetune", "--run", run, "--task", str(task), "--output", str(tmp_path / "full")]) == 1
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert app_main(["finetune", "--run", run, "--task", str(task / "train.tsv"), "--output", str(tmp_path / "a")]) == 1
    assert "give a task folder (train.tsv + dev.tsv) or two files" in capsys.readouterr().err
    odd = tmp_path / "odd.tsv"
    odd.write_text("sentence\tlabel\nA new label here.\tpoem\n")
    assert app_main(["finetune", "--run", run, "--task", str(task / "train.tsv"), str(odd),
                     "--output", str(tmp_path / "b")]) == 1
    assert "has labels the training file does not: ['poem']" in capsys.readouterr().err
    assert app_main(["finetune", "--run", run, "--task", str(task), "--label-column", "gold",
                     "--output", str(tmp_path / "c")]) == 1
    assert "has no column 'gold'; its columns are ['sentence', 'label']" in capsys.readouterr().err
    assert app_main(["finetune", "--run", str(tmp_path), "--task", str(task), "--output", str(tmp_path / "d")]) == 1
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err
    assert app_main(["finetune", "--run", run, "--task", str(task), "--epochs", "0", "--output", str(tmp_path / "e")]) == 1
    assert "--epochs must be >= 1" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_task_files_in_glue_csv_and_jsonl_formats(tmp_path):
    pair = tmp_path / "mrpc.tsv"
    pair.write_text('sentence1\tsentence2\tlabel\n"Quoted" start.\tOther one.\t1\nA.\tB.\t0\nC.\tD.\t10\n')
    task = read_task(pair)
    assert task.columns == ("sentence1", "sentence2") and task.texts[0] == ('"Quoted" start.', "Other one.")
    assert label_names(task) == ["0", "1", "10"]  # numeric order
    csv_file = tmp_path / "t.csv"
    csv_file.write_text('question,sentence,label\n"Is it, really?",Yes it is.,entailment\n')
    assert read_task(csv_file).texts == [("Is it, really?", "Yes it is.")]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "one", "gold": "b"}\n\n{"text": "two", "gold": "a"}\n')
    task = read_task(jsonl, label_column="gold")
    assert task.texts == [("one",), ("two",)] and label_names(task) == ["a", "b"]
    for content, suffix, message in [("a\tlabel\nx\t1\n", ".tsv", "no known text column among"),
                                     ('{"text": 1}\nnot json\n', ".jsonl", "line 2 is not JSON"),
                                     ("sentence\tlabel\nx\t1\textra\n", ".tsv", "line 2 has more fields"),
                                     ("sentence\tlabel\nx\t\n", ".tsv", "line 2: a missing 'label'"),
                                     ("x", ".txt", "unknown task format")]:
        bad = tmp_path / f"bad{suffix}"
        bad.write_text(content)
        with pytest.raises(TaskError, match=message):
            read_task(bad)


def test_classification_metrics_against_their_definitions():
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    predictions[:120] = labels[:120]
    result = classification_metrics(labels, predictions, 3)
    assert result["accuracy"] == pytest.approx((labels == predictions).mean())
    # multi-class Matthews: the covariance form over one-hot vectors (Gorodkin)
    x, y = np.eye(3)[labels], np.eye(3)[predictions]
    cov = lambda a, b: ((a - a.mean(0)) * (b - b.mean(0))).sum()  # noqa: E731
    assert result["matthews"] == pytest.approx(cov(x, y) / np.sqrt(cov(x, x) * cov(y, y)))
    assert "f1" not in result
    binary = classification_metrics(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1]), 2)
    assert binary["f1"] == pytest.approx(2 / 3) and binary["accuracy"] == pytest.approx(0.6)
    assert classification_metrics(np.array([0, 1]), np.array([0, 0]), 2)["matthews"] == 0.0


def test_the_demo_task_is_balanced_and_refuses_to_overwrite(tmp_path):
    counts = write_demo_task(tmp_path / "t", train=40, dev=20, seed=1)
    assert counts == {"train": 40, "dev": 20}
    train, dev = read_task(tmp_path / "t" / "train.tsv"), read_task(tmp_path / "t" / "dev.tsv")
    assert sorted(set(train.labels)) == ["address", "encyclopedia"] and train.labels.count("address") == 20
    assert not set(train.texts) & set(dev.texts)
    with pytest.raises(TaskError, match="is not empty"):
        write_demo_task(tmp_path / "t")
