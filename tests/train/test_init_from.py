"""``--init-from``: a new run starting from a run, a checkpoint, an export or a Hugging Face BERT."""

import json

import pytest
import torch

from ipu_app.config import load_config
from ipu_app.model.bert import SparseBertForPreTraining
from ipu_app.commands.export import export_run
from ipu_app.sparse.layer import sparse_weights
from ipu_app.sparse.scoring import dense_block_norms
from ipu_app.train.init_from import InitFromError, initialize_from, load_source
from ipu_app.train.trainer import Trainer
from ipu_app.train.build import model_config

SOURCE_STEPS = 4


def _config(data_dir, *extra, config="bert_tiny_sparse"):
    return load_config(config, [
        f"data.dir={data_dir}", f"training.steps={SOURCE_STEPS}", "training.batch_size=4", "training.warmup_steps=1",
        "training.log_every=1", "training.validate_every=100", "training.checkpoint_every=2",
        "training.precision=fp32", "model.dropout=0.0", "sparsity.segments=2", "data.validation_sequences=4",
        "sparsity.min_segment_steps=1", *extra])


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _blocks(layer) -> set:
    return set(zip(layer.block_rows.tolist(), layer.block_cols.tolist()))


@pytest.fixture(scope="module")
def source(data_dir, tmp_path_factory):
    """A finished sparse BERT-Tiny run (position embeddings for 128 tokens only) and its summary."""
    run_dir = tmp_path_factory.mktemp("init") / "source"
    run_dir.mkdir()
    config = _config(data_dir, "model.max_position_embeddings=128", "training.learning_rate=0.003")
    summary = Trainer(config, run_dir, progress=False, tensorboard=False).train()
    return {"dir": run_dir, "summary": summary, "model": SparseBertForPreTraining.load(run_dir / "model")}


def test_a_run_continues_from_a_finished_runs_weights_and_pattern(source, data_dir, tmp_path):
    """Same config, --init-from the run: every tensor and every pattern is the source's, so the model
    validates exactly as the source's final validation did; the optimizer and schedule start anew."""
    config = _config(data_dir, "model.max_position_embeddings=128", f"training.init_from={source['dir']}")
    (tmp_path / "run").mkdir()
    trainer = Trainer(config, tmp_path / "run", progress=False, tensorboard=False)
    ours, theirs = _state(trainer.model), _state(source["model"])
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert trainer.step == 0 and not trainer.optimizer.state
    val = trainer.evaluate()
    assert val["mlm_loss"] == pytest.approx(source["summary"]["final_val_mlm_loss"], rel=1e-5)
    assert val["nsp_loss"] == pytest.approx(source["summary"]["final_val_nsp_loss"], rel=1e-5)
    summary = trainer.train()
    assert summary["init_from"] == {"path": str(source["dir"]), "kind": "run", "step": SOURCE_STEPS,
                                    "positions": None, "pattern": "keep", "fresh": []}
    assert summary["steps"] == SOURCE_STEPS  # its own schedule, from step 0


def test_phase_two_at_seq_512_extends_the_position_embeddings(source, data_dir, tmp_path):
    """BERT's phase II: seq_len 512 from a model with 128 positions. The first 128 rows are the
    source's, the rest repeat them; the encoder keeps its pattern and sparsity while training."""
    config = _config(data_dir, "data.seq_len=512", "data.max_predictions=76", "training.steps=2",
                     f"training.init_from={source['dir']}")
    (tmp_path / "run512").mkdir()
    trainer = Trainer(config, tmp_path / "run512", progress=False, tensorboard=False)
    positions = trainer.model.bert.embeddings.position_embeddings.weight.detach()
    learned = source["model"].bert.embeddings.position_embeddings.weight.detach()
    assert positions.shape == (512, 128) and learned.shape == (128, 128)
    for start in range(0, 512, 128):
        assert torch.equal(positions[start:start + 128], learned)
    before = {name: _blocks(layer) for name, layer in sparse_weights(trainer.model)}
    assert before == {name: _blocks(layer) for name, layer in sparse_weights(source["model"])}
    summary = trainer.train()
    assert summary["init_from"]["positions"] == "128 -> 512"
    assert all(layer.sparsity == pytest.approx(0.9, abs=0.01) for _, layer in sparse_weights(trainer.model))
    assert trainer.config.data.seq_len == 512 and summary["steps"] == 2


def test_a_checkpoint_and_an_export_are_sources_too(source, data_dir, tmp_path):
    """A checkpoint directory gives the weights of its step; an export folder gives the final model
    with its patterns (the sidecar)."""
    checkpoint = load_source(source["dir"] / "checkpoints" / "step_00000002")
    assert checkpoint.kind == "checkpoint" and checkpoint.step == 2
    assert not torch.equal(checkpoint.state["bert.encoder.layer.0.output.dense.weight"],
                           load_source(source["dir"]).state["bert.encoder.layer.0.output.dense.weight"])
    export = load_source(export_run(source["dir"], tmp_path / "export"))
    assert export.kind == "export" and export.tokenizer_sha256 is not None
    run = load_source(source["dir"])
    assert export.state.keys() == run.state.keys()
    for key in run.state:
        assert torch.equal(export.state[key], run.state[key]), key
    for name, pattern in run.patterns.items():
        assert torch.equal(export.patterns[name].rows, pattern.rows) and torch.equal(export.patterns[name].cols, pattern.cols)


def _hf_folder(path, masked_lm=False):
    """A dense Hugging Face BERT-Tiny with the standard vocabulary, as save_pretrained writes it."""
    from transformers import BertForMaskedLM, BertForPreTraining

    from ipu_app.model.bert import ModelConfig

    torch.manual_seed(3)
    model = (BertForMaskedLM if masked_lm else BertForPreTraining)(ModelConfig(size="tiny").hf_config())
    model.save_pretrained(str(path))
    return model


def test_a_hugging_face_folder_loads_without_transformers_report(tmp_path, capfd):
    """transformers' load report and progress bar stay out of the log (the start-up line names the source)."""
    from transformers.utils import logging as hf_logging

    _hf_folder(tmp_path / "hf", masked_lm=True)  # no NSP head: the report would list it as missing
    capfd.readouterr()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    source = load_source(tmp_path / "hf")
    out, err = capfd.readouterr()
    assert source.kind == "huggingface" and "LOAD REPORT" not in out + err and "Loading weights" not in out + err
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)  # restored


def test_a_dense_hugging_face_model_is_pruned_by_magnitude(data_dir, tmp_path):
    """A dense source has no pattern: auto takes each weight's largest-L1 blocks (here b = 4), with the
    source's values at them; ``random`` keeps the run's own random pattern with the source's values."""
    hf = _hf_folder(tmp_path / "hf")
    weights = dict(hf.state_dict())
    config = _config(data_dir, "sparsity.block_size=4", f"training.init_from={tmp_path / 'hf'}")
    model = SparseBertForPreTraining(model_config(config, 30522))
    record = initialize_from(model, load_source(tmp_path / "hf"), "auto")
    assert record["kind"] == "huggingface" and record["pattern"] == "magnitude" and record["fresh"] == []
    for name, layer in sparse_weights(model):
        weight = weights[f"{name}.weight"]
        norms = dense_block_norms(weight, 4, "l1").flatten()
        chosen = norms[layer.block_rows.long() * (layer.in_features // 4) + layer.block_cols.long()]
        assert chosen.min() >= norms.topk(layer.nnz).values.min()  # the nnz largest blocks
        assert torch.equal(layer.to_dense(), weight * layer.mask())
        assert torch.equal(layer.bias, weights[f"{name}.bias"])
    assert torch.equal(model.cls.seq_relationship.weight, weights["cls.seq_relationship.weight"])

    drawn = SparseBertForPreTraining(model_config(config, 30522))
    own = {name: _blocks(layer) for name, layer in sparse_weights(drawn)}
    assert initialize_from(drawn, load_source(tmp_path / "hf"), "random")["pattern"] == "random"
    for name, layer in sparse_weights(drawn):
        assert _blocks(layer) == own[name]
        assert torch.equal(layer.to_dense(), weights[f"{name}.weight"] * layer.mask())


def test_a_masked_lm_folder_leaves_the_nsp_head_fresh_and_says_so(tmp_path):
    _hf_folder(tmp_path / "mlm", masked_lm=True)
    model = SparseBertForPreTraining(model_config(_config("unused"), 30522))
    fresh_head = model.cls.seq_relationship.weight.detach().clone()
    record = initialize_from(model, load_source(tmp_path / "mlm"))
    assert "cls.seq_relationship.weight" in record["fresh"] and "bert.pooler.dense.weight" in record["fresh"]
    assert torch.equal(model.cls.seq_relationship.weight, fresh_head)


def test_sources_that_do_not_fit_are_one_line_errors(source, tmp_path):
    hf = tmp_path / "hf"
    _hf_folder(hf)
    with pytest.raises(InitFromError, match="sparsity.init_pattern=keep: a dense source has no pattern"):
        initialize_from(SparseBertForPreTraining(model_config(_config("x"), 30522)), load_source(hf), "keep")
    mini = SparseBertForPreTraining(model_config(_config("x", "model.size=mini"), 30522))
    with pytest.raises(InitFromError, match=r"word_embeddings.weight is \(30522, 128\) there, \(30522, 256\) in this "
                                            r"run's model; the model sizes differ \(set model.size to the source's\)"):
        initialize_from(mini, load_source(hf))
    other_vocab = SparseBertForPreTraining(model_config(_config("x"), 1000))
    with pytest.raises(InitFromError, match="another vocabulary"):
        initialize_from(other_vocab, load_source(hf))
    b4 = SparseBertForPreTraining(model_config(_config("x", "sparsity.block_size=4"), 30522))
    with pytest.raises(InitFromError, match="blocks of 1, this run .* of 4; use magnitude or random"):
        initialize_from(b4, load_source(source["dir"]), "keep")
    with pytest.raises(InitFromError, match="not a run directory"):
        load_source(tmp_path)
    with pytest.raises(InitFromError, match="no such directory"):
        load_source(tmp_path / "missing")


def test_the_command_line_records_the_source_and_refuses_bad_ones(source, data_dir, tmp_path, capsys):
    from ipu_app.commands.train import main

    common = ["--config", "bert_tiny_sparse", "--steps", "2", "--no-progress", "--set", f"data.dir={data_dir}",
              "--set", "training.batch_size=4", "--set", "data.validation_sequences=4",
              "--set", "model.max_position_embeddings=128", "--set", "training.precision=fp32"]
    out = tmp_path / "continued"
    capsys.readouterr()
    assert main([*common, "--init-from", str(source["dir"]), "--output-dir", str(out)]) == 0
    assert f"starting from {source['dir'].resolve()} (run, step {SOURCE_STEPS}): pattern keep, position embeddings " \
           "as saved" in capsys.readouterr().err
    saved = load_config(out / "config.yaml")
    assert saved.training.init_from == str(source["dir"].resolve())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init_from"]["kind"] == "run" and summary["init_from"]["pattern"] == "keep"

    capsys.readouterr()
    assert main([*common, "--init-from", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "a")]) == 1
    assert "no such directory" in capsys.readouterr().err and not (tmp_path / "a").exists()
    big = ["--set", "model.size=mini"]
    assert main([*common, *big, "--init-from", str(source["dir"]), "--output-dir", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --init-from") and "model sizes differ" in err[-1] and not (tmp_path / "b").exists()
    assert main(["--resume", str(out), "--init-from", str(source["dir"])]) == 1
    assert "drop --init-from" in capsys.readouterr().err
