import json

import pytest
import torch
from transformers import BertForMaskedLM, BertForPreTraining, BertTokenizerFast
from transformers.utils import logging

from ipu_app.__main__ import main
from ipu_app.data.tokenizer import build_standard_tokenizer
from ipu_app.model.bert import ModelConfig, SparseBertForPreTraining
from ipu_app.model.export import ExportError, export_hf, load_sparse_export
from ipu_app.sparse.layer import sparse_weights

logging.set_verbosity_error()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory with a model whose values moved away from their init."""
    run = tmp_path_factory.mktemp("run")
    model = SparseBertForPreTraining(ModelConfig(size="tiny", block_size=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(1000, 5000, (2, 16))
    labels = torch.where(torch.rand(2, 16) < 0.3, ids, -100)
    for _ in range(2):
        optimizer.zero_grad()
        model(ids, torch.zeros_like(ids), torch.ones_like(ids), labels, torch.tensor([0, 1])).loss.backward()
        optimizer.step()
    model.save(run / "model")
    build_standard_tokenizer(run / "tokenizer")
    return run, model.eval()


def test_cli_export_loads_in_hugging_face_with_equal_logits(trained_run, tmp_path):
    run, model = trained_run
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "hf")]) == 0
    hf = BertForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(1000, 5000, (3, 20))
    types, attention = torch.zeros_like(ids), torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, 2:8] = ids[:, 2:8]
    ours = model(ids, types, attention, labels)
    theirs = hf(ids, attention_mask=attention, token_type_ids=types)
    torch.testing.assert_close(theirs.prediction_logits[:, 2:8].reshape(-1, 30522), ours.mlm_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs.seq_relationship_logits, ours.nsp_logits, rtol=0, atol=1e-5)
    mlm = BertForMaskedLM.from_pretrained(str(tmp_path / "hf")).eval()
    torch.testing.assert_close(mlm(ids, attention_mask=attention, token_type_ids=types).logits, theirs.prediction_logits,
                               rtol=0, atol=1e-5)
    tokenizer = BertTokenizerFast.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer("straw")["input_ids"] == [101, 13137, 102]


def test_sidecar_rebuilds_the_sparse_model(trained_run, tmp_path):
    _, model = trained_run
    export_hf(model, tmp_path / "hf")
    sidecar = json.loads((tmp_path / "hf" / "sparsity.json").read_text())
    layers = sparse_weights(model)
    assert [entry["weight"] for entry in sidecar["layers"]] == [f"{n}.weight" for n, _ in layers]
    assert sidecar["block_size"] == 4 and sidecar["layers"][0]["nnz_blocks"] == layers[0][1].nnz
    rebuilt = load_sparse_export(tmp_path / "hf")
    for (_, a), (_, b) in zip(layers, sparse_weights(rebuilt)):
        assert a.pattern.equal(b.pattern) and torch.equal(a.values, b.values)


def test_export_refuses_to_overwrite_and_reports_bad_runs(trained_run, tmp_path, capsys):
    _, model = trained_run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_hf(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main(["export", "--run", str(tmp_path), "--output", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "holds no saved model" in err and "\n" not in err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_export_of_a_damaged_model_file_names_it(trained_run, tmp_path, capsys, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    weights = run / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": bytes(range(256)) * 8, "empty": b""}[damage])
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {weights} is damaged") and "\n" not in err
    assert not (tmp_path / "hf").exists()


def test_files_are_written_with_the_umask_mode(trained_run, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        trained_run[1].save(tmp_path / "model")
        export_hf(trained_run[1], tmp_path / "hf")
    finally:
        os.umask(old)
    files = [tmp_path / "model" / "model.safetensors", *(tmp_path / "hf").glob("*.safetensors")]
    assert len(files) >= 3  # ours, Hugging Face's weights, the patterns
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {oct(0o644)}


def test_a_full_disk_during_export_leaves_no_half_written_folder(trained_run, tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    code = main(["export", "--run", str(trained_run[0]), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after Hugging Face's own progress bar
    assert code == 1 and err.startswith("error: cannot write ") and err.endswith(": No space left on device")
    assert not (tmp_path / "hf").exists()
