import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipu_app.sparse.flops import non_embedding_training_flops_per_sequence
from ipu_app.commands.train import main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def small_run_args(data_dir, run_dir, steps=6):
    return ["--config", "bert_tiny_sparse", "--steps", str(steps), "--output-dir", str(run_dir), "--no-progress",
            "--set", f"data.dir={data_dir}", "--set", "training.batch_size=4", "--set", "training.micro_batch_size=4",
            "--set", "sparsity.segments=3", "--set", "data.validation_sequences=8",
            "--set", "training.checkpoint_every=2", "--set", "training.precision=fp32"]


def test_describe_json_reports_sizes_and_flops(capsys):
    code, out, _ = run_cli(capsys, "--config", "bert_medium_sparse", "--describe", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["config"]["sparsity"]["ratio"] == 0.9 and info["config"]["name"] == "bert_medium_sparse"
    assert info["non_embedding_params"] == 12 * 8 * 512 * 512
    assert info["non_embedding_nonzero_params"] == pytest.approx(0.1 * info["non_embedding_params"], rel=1e-4)
    assert info["non_embedding_flops_per_sequence"] == pytest.approx(2.738e9, rel=1e-3)  # paper Table A.8
    assert info["total_training_flops"] == pytest.approx(info["non_embedding_flops_per_sequence"] * 757_000 * 512)
    assert info["learning_rate"] == pytest.approx(2.217e-3, rel=1e-3)
    assert (info["pattern_updates"], info["gradient_accumulation"]) == (159, 16)
    assert len(info["layers"]) == 48 and all(r["sparsity"] == pytest.approx(0.9, abs=1e-4) for r in info["layers"])
    # the whole-model count: embeddings and heads stay dense, the encoder keeps 10%
    dense = json.loads(run_cli(capsys, "--config", "bert_medium_dense", "--describe", "--json")[1])
    removed = dense["trained_params"] - info["trained_params"]
    assert removed == info["non_embedding_params"] - info["non_embedding_nonzero_params"]
    # the dense model's count is the same for both, and is Hugging Face's BertForPreTraining's
    assert info["dense_model_params"] == dense["dense_model_params"] == dense["trained_params"]
    from transformers import BertForPreTraining

    from ipu_app.model.bert import ModelConfig

    hf = BertForPreTraining(ModelConfig(size="medium", sparsity_mode="dense").hf_config())
    assert info["dense_model_params"] == sum(p.numel() for p in hf.parameters())


def test_describe_rigl_counts_dense_gradient_steps(capsys):
    info = json.loads(run_cli(capsys, "--config", "bert_small_sparse_rigl", "--describe", "--json")[1])
    base = non_embedding_training_flops_per_sequence(4, 512, 128, 0.9)
    assert info["dense_gradient_steps"] == 159
    extra = info["total_training_flops"] - info["non_embedding_flops_per_sequence"] * 757_000 * 512
    assert extra == pytest.approx(2 * 12 * 4 * 512**2 * 128 * 159 * 512)
    assert info["non_embedding_flops_per_sequence"] == pytest.approx(base, rel=1e-4)


def test_describe_text(capsys):
    code, out, _ = run_cli(capsys, "--config", "bert_tiny_sparse_b16", "--describe", "--set", "sparsity.ratio=0.75")
    assert code == 0
    assert "ratio: 0.75" in out and "non-embedding FLOPs / sequence" in out
    assert "intermediate.dense" in out and "block 16" in out and "sparsity 0.7500" in out
    assert "kernels (here)" in out and "block size 16" in out


def test_describe_counts_the_threads_a_run_would_use(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    info = json.loads(run_cli(capsys, "--config", "bert_tiny_sparse", "--describe", "--json", "--threads", "1")[1])
    assert info["threads"] == {"threads": 1, "from": "--threads"}
    info = json.loads(run_cli(capsys, "--config", "bert_tiny_sparse", "--describe", "--json",
                              "--set", "training.threads=3")[1])
    assert info["threads"] == {"threads": 3, "from": "training.threads"}


def test_describe_names_the_kernels(capsys, cpu_kind):
    """What runs the sparse layers, as each CPU kind would run them (simulated; the host too)."""
    def kernels(config, *sets):
        return json.loads(run_cli(capsys, "--config", config, "--describe", "--json",
                                  *(a for s in sets for a in ("--set", s)))[1])["sparse_kernels"]

    line = kernels("bert_tiny_sparse_b16", "training.precision=fp32")
    tiles = "AVX-512" if cpu_kind.avx512 else "fp32 token panels"
    assert f"CPU kernels, {tiles} (backend auto" in line, line
    line = kernels("bert_tiny_sparse", "training.precision=fp32")
    assert "CPU kernels, fp32 token panels (backend auto" in line and "block size 1" in line, line
    line = kernels("bert_tiny_sparse_b16", "training.precision=bf16")
    tiles = ("AMX" if cpu_kind.amx else "AVX-512 BF16 tiles" if cpu_kind.bf16_tiles
             else "AVX-512 (bf16 widened to fp32)" if cpu_kind.avx512 else "fp32 token panels (bf16 widened to fp32)")
    assert f"CPU kernels, {tiles} (backend auto" in line, line
    # bf16 at b = 1 runs the fp32 panels on widened operands where they beat dense bf16: everywhere bf16
    # is emulated; with AVX-512 BF16 (dense twice as fast) or AMX, s = 0.9 is not sparse enough
    line = kernels("bert_tiny_sparse", "training.precision=bf16")
    if cpu_kind.bf16:
        assert "reference op" in line and "where dense is faster" in line, line
    else:
        assert "CPU kernels, fp32 token panels (bf16 widened to fp32)" in line, line
    # precision: auto follows the CPU
    line = kernels("bert_tiny_sparse_b16", "training.precision=auto")
    assert ("bfloat16" if cpu_kind.bf16 else "float32") in line, line
    line = kernels("bert_tiny_sparse", "sparsity.inactive=frozen", "training.precision=fp32")
    assert "reference op" in line and "no fast kernel covers this" in line
    assert kernels("bert_tiny_dense") is None


@pytest.mark.parametrize("argv, message", [
    (["--config", "bert_tiny_sparce"], "did you mean 'bert_tiny_sparse'"),
    (["--config", "bert_tiny_sparse", "--set", "sparsity.ratio=1"], "sparsity.ratio must be in [0, 1)"),
    (["--config", "bert_tiny_sparse", "--set", "training.batch_size=ten"], "training.batch_size must be an integer"),
    (["--config", "bert_tiny_sparse", "--steps", "100", "--set", "sparsity.segments=160"],
     "sparsity.segments=160 is more than training.steps=100"),
    (["--config", "bert_tiny_sparse", "--set", "sparsity.update_every=757000"], "sparsity.update_every=757000 must be in [1"),
    (["--config", "bert_tiny_sparse", "--set", "optimizer.bias_correction=fresh"], "optimizer.bias_correction='fresh' is not valid"),
    (["--config", "bert_tiny_sparse", "--set", "sparsity.blocksize=4"], "did you mean 'sparsity.block_size'"),
    ([], "give --config NAME"),
    (["--resume", "x", "--config", "bert_tiny_sparse"], "drop --config"),
    (["--config", "bert_tiny_sparse", "--json"], "--json goes with --describe"),
    (["--resume", "/nonexistent/run"], "is not a run directory"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "--config", "bert_tiny_sparse", "--output-dir", str(blocker / "run"))
    assert code == 1 and "cannot write to" in err and "choose another --output-dir" in err
    code, _, err = run_cli(capsys, "--config", "bert_tiny_sparse", "--output-dir", str(blocker))
    assert code == 1 and "is not a directory" in err


def test_bad_data_dir_leaves_no_run_dir(capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "--config", "bert_tiny_sparse", "--output-dir", str(run),
                           "--set", f"data.dir={tmp_path / 'nothing'}", "--no-progress")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert "prepare-data" in err or "manifest" in err
    assert not run.exists()  # the next attempt is not refused as "already holds a run"


def test_a_corpus_smaller_than_one_batch_is_one_line_and_leaves_no_run_dir(capsys, tmp_path, small_documents,
                                                                           tokenizer_dir):
    from ipu_app.data.shards import prepare_data

    data = tmp_path / "tiny"
    prepare_data(small_documents[:12], tokenizer_dir, data, progress=False)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "--config", "bert_tiny_sparse", "--output-dir", str(run), "--no-progress",
                           "--set", f"data.dir={data}", "--set", "training.micro_batch_size=64",
                           "--set", "training.batch_size=64")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert "fewer than one batch of 64" in err and not run.exists()


def test_train_refuse_existing_and_resume(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *small_run_args(data_dir, run))
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"final_val_mlm_loss", "total_non_embedding_flops", "tokens_per_second", "wall_time_s"}
    summary = (run / "summary.json").read_text()
    assert "steps: 6" in (run / "config.yaml").read_text()
    assert any((run / "tensorboard").iterdir())  # TensorBoard event file
    # A second start into the same directory refuses and changes nothing.
    code, _, err = run_cli(capsys, *small_run_args(data_dir, run))
    assert code == 1 and "already holds a run" in err and f"--resume {run}" in err
    assert (run / "summary.json").read_text() == summary
    # Resuming a finished run does nothing.
    code, _, err = run_cli(capsys, "--resume", str(run))
    assert code == 0 and "finished already" in err
    # --threads applies on resume too (--set is refused there: the config is the saved one).
    (run / "summary.json").unlink()
    code, _, err = run_cli(capsys, "--resume", str(run), "--set", "training.threads=1")
    assert code == 1 and "drop --set" in err
    code, _, err = run_cli(capsys, "--resume", str(run), "--threads", "0")
    assert code == 1 and "--threads must be >= 1, got 0" in err
    code, _, err = run_cli(capsys, "--resume", str(run), "--threads", "1")
    assert code == 0, err
    assert "CPU threads: 1 (--threads)" in err and json.loads((run / "summary.json").read_text())["threads"] == 1
    # A hand-edited config that no longer matches the checkpoints is refused.
    (run / "summary.json").unlink()
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("ratio: 0.9", "ratio: 0.8"))
    code, _, err = run_cli(capsys, "--resume", str(run))
    assert code == 1 and "different config (sparsity.ratio: 0.9 in the checkpoint, 0.8 now)" in err


def test_entry_point_script(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run_pretraining.py"), "--config", "nope"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: config 'nope' not found")
    assert "Traceback" not in proc.stderr
    help_text = subprocess.run([sys.executable, str(ROOT / "run_pretraining.py"), "--help"],
                               capture_output=True, text=True).stdout
    assert "--describe" in help_text and "--resume" in help_text


def test_help_and_config_checks_import_no_torch():
    # --help of every command, and loading and checking a config, stay fast: nothing imports torch.
    code = ("import sys; from ipu_app.commands.train import build_parser; import ipu_app.__main__ as m; "
            "build_parser().format_help(); m.build_parser().format_help(); "
            "from ipu_app.config import load_config; c = load_config('bert_medium_sparse', steps=3000); "
            "from ipu_app.sparse.flops import auto_learning_rate; auto_learning_rate(c.model.size, 0.9); "
            "print(sorted(k for k in ('torch', 'numpy', 'transformers') "
            "if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_describe_freeze(capsys):
    code, out, _ = run_cli(capsys, "--config", "bert_mini_dense", "--steps", "400", "--set", "sparsity.freeze=early",
                           "--describe", "--json")
    assert code == 0
    assert json.loads(out)["freeze"] == {"mode": "early", "fraction": 0.9, "switch_step": 200,
                                         "untrained_steps": "1..200"}
    code, _, err = run_cli(capsys, "--config", "bert_mini_static", "--set", "sparsity.freeze=late", "--describe")
    assert code == 1 and "sparsity.freeze=late needs sparsity.mode=dense" in err and err.count("\n") == 1


def test_describe_shows_the_schedule_and_its_warning(capsys):
    code, out, _ = run_cli(capsys, "--config", "bert_tiny_sparse", "--steps", "300", "--describe")
    assert code == 0
    assert "pattern updates                  1 (every 150.0 steps)" in out
    assert "pruned_recently_grown expected   at most ~0.5" in out
    assert "warning                          pattern updates every 150 steps, below sparsity.min_segment_steps" in out
    code, out, _ = run_cli(capsys, "--config", "bert_tiny_sparse", "--steps", "5000", "--describe")
    assert "pattern updates                  4 (every 1000.0 steps)" in out and "warning " not in out


def test_describe_says_what_steps_rescaled_and_the_validation_size(capsys, data_dir):
    info = json.loads(run_cli(capsys, "--config", "bert_medium_sparse", "--steps", "2000", "--describe", "--json",
                              "--set", "training.checkpoint_every=300", "--set", f"data.dir={data_dir}")[1])
    assert info["intervals"] == {"log_every": 100, "validate_every": 500, "checkpoint_every": 300}
    assert info["adjusted"] == {"training.warmup_steps": [10000, 26], "training.validate_every": [10000, 500],
                                         "sparsity.segments": [160, 2]}  # checkpoint_every was set: it wins
    from ipu_app.data.batches import validation_batches

    available = sum(b["input_ids"].shape[0] for b in validation_batches(data_dir, 64))
    assert info["validation"]["available"] == available == info["validation"]["used"] > 0
    code, out, _ = run_cli(capsys, "--config", "bert_medium_sparse", "--steps", "2000", "--describe",
                           "--set", f"data.dir={data_dir}", "--set", "data.validation_sequences=3")
    assert f"validation sequences             3 of {available:,}; set data.validation_sequences=N" in out
    assert "rescaled (--steps, batch)       training.warmup_steps 10000 -> 26, training.validate_every" in out
    assert "log / validate / checkpoint      every 100 / 500 / 500 steps" in out
    assert "params of the dense model" in out and "params trained" in out and "active values only" in out
    # Without --steps nothing is rescaled, and the config dump of a CPU config has no ipu section.
    info = json.loads(run_cli(capsys, "--config", "bert_medium_sparse", "--describe", "--json")[1])
    assert info["adjusted"] == {} and "ipu" not in info["config"]


@pytest.mark.parametrize("damage", ["other_vocab", "missing"])
def test_a_tokenizer_that_does_not_match_the_shards_is_one_line(capsys, tmp_path, data_dir, damage):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    vocab = data / "tokenizer" / "vocab.txt"
    if damage == "missing":
        vocab.unlink()
    else:
        vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *small_run_args(data, run))
    assert code == 1 and out == "" and err.count("\n") == 1
    if damage == "missing":
        assert "the shards' tokenizer is gone" in err
    else:
        assert f"{data / 'tokenizer'} is not the tokenizer the shards were made with (vocab.txt: 5 tokens" in err
    assert not run.exists()


def test_a_run_directory_in_use_is_refused(capsys, tmp_path, data_dir):
    from ipu_app.rundir import RunLock

    run = tmp_path / "run"
    assert run_cli(capsys, *small_run_args(data_dir, run, steps=4))[0] == 0
    (run / "summary.json").unlink()  # as if it were still running
    before = sorted(p.name for p in run.iterdir())
    lock = RunLock(run)  # another process trains it
    try:
        code, out, err = run_cli(capsys, "--resume", str(run))
    finally:
        lock.release()
    assert code == 1 and out == "" and err.count("\n") == 1
    assert f"{run} is being trained by another process (pid {os.getpid()})" in err
    assert sorted(p.name for p in run.iterdir()) == before
    assert run_cli(capsys, "--resume", str(run))[0] == 0  # released: it resumes


def test_a_run_stopped_before_its_first_checkpoint_starts_again_in_place(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    args = small_run_args(data_dir, run, steps=4) + ["--set", "training.checkpoint_every=100"]
    from ipu_app.config import load_config

    config = load_config("bert_tiny_sparse", [a for a in args if "=" in a and not a.startswith("--")], steps=4)
    run.mkdir()
    (run / "config.yaml").write_text(config.to_yaml())  # what a kill during start-up leaves
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 99.0}\n')
    code, out, err = run_cli(capsys, "--resume", str(run))
    assert code == 0, err
    assert f"{run} has no checkpoint yet: starting it again from step 0" in err
    from ipu_app.train.metrics import read_metrics

    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == list(range(1, 5)) and train[0]["loss"] != 99.0
    assert (run / "summary.json").is_file()


def test_sigterm_during_start_up_leaves_no_run_directory(capsys, tmp_path, data_dir, monkeypatch):
    import signal

    from ipu_app.train import trainer as trainer_module

    original = trainer_module.Trainer.__init__

    def terminated_while_building(self, *args, **kwargs):
        original(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", terminated_while_building)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *small_run_args(data_dir, run))
    assert code == 130 and err.strip().endswith("interrupted") and not run.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_a_signal_during_the_final_validation_waits_for_the_outputs(capsys, tmp_path, data_dir, monkeypatch):
    import signal

    from ipu_app.train import trainer as trainer_module

    original = trainer_module.Trainer.evaluate

    def interrupted(self, final=False):
        if final:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, final)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", interrupted)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *small_run_args(data_dir, run, steps=4))
    assert code == 0 and json.loads(out)["final_val_mlm_loss"] > 0
    assert (run / "summary.json").is_file() and (run / "model" / "model.safetensors").is_file()


def test_describe_config_yaml_and_summary_use_the_datas_vocabulary(capsys, tmp_path, small_documents):
    """Data prepared with a trained tokenizer: --describe counts, config.yaml records and the run
    builds the data's vocabulary, not the config's 30,522 tokens; --no-progress logs training lines."""
    from transformers import BertConfig, BertForPreTraining

    from ipu_app.data.shards import prepare_data
    from ipu_app.data.tokenizer import train_tokenizer, vocab_tokens

    tokenizer = train_tokenizer(small_documents, tmp_path / "tok", vocab_size=2000)
    data = tmp_path / "data"
    prepare_data(small_documents, tokenizer, data, documents_per_shard=40, progress=False)
    vocab = vocab_tokens(data / "tokenizer")
    assert vocab != 30522
    info = json.loads(run_cli(capsys, "--config", "bert_tiny_dense", "--describe", "--json",
                              "--set", f"data.dir={data}")[1])
    assert info["vocabulary"] == {"tokenizer": "train", "vocab_size": vocab, "from": "data"}
    assert info["config"]["data"]["vocab_size"] == vocab and info["config"]["data"]["tokenizer"] == "train"
    hf = BertForPreTraining(BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=512, max_position_embeddings=512))
    assert info["dense_model_params"] == info["trained_params"] == sum(p.numel() for p in hf.parameters())
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *small_run_args(data, run, steps=3), "--set", "training.log_every=1")
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["vocab_size"] == vocab and saved["data"]["tokenizer"] == "train"
    assert json.loads((run / "summary.json").read_text())["vocab_size"] == vocab
    lines = [line for line in err.splitlines() if line.startswith("step ") and "/" in line.split(":")[0]]
    assert [line.split(":")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"] and "mlm accuracy" in lines[0]


def test_the_cpu_proxy_is_encoder_dominated(capsys):
    """proxy_tiny_*: Tiny with a 4,096-token vocabulary; the encoder linears' share that --describe
    shows, recomputed from Hugging Face's parameter count and the FLOPs of each matrix product."""
    from transformers import BertConfig, BertForPreTraining

    info = json.loads(run_cli(capsys, "--config", "proxy_tiny_dense", "--describe", "--json")[1])
    assert info["vocabulary"]["vocab_size"] == 4096 and info["vocabulary"]["tokenizer"] == "train"
    L, H, S, V, P = 2, 128, 128, 4096, 20
    hf = BertForPreTraining(BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=2,
                                       intermediate_size=4 * H, max_position_embeddings=512))
    encoder = 12 * L * H * H
    assert info["encoder_share"]["params"] == pytest.approx(encoder / sum(p.numel() for p in hf.parameters()))
    linears, attention = 6 * encoder * S, 12 * L * S * S * H
    heads = 6 * P * (H * H + H * V) + 6 * (H * H + 2 * H)  # MLM head on the masked positions, NSP head
    assert info["encoder_share"]["flops"] == pytest.approx(linears / (linears + attention + heads))
    assert info["encoder_share"]["params"] > 0.35 and info["encoder_share"]["flops"] > 0.7
    standard = json.loads(run_cli(capsys, "--config", "bert_tiny_dense", "--describe", "--json")[1])
    assert standard["encoder_share"]["params"] < 0.1  # what the proxy is for
    sparse = json.loads(run_cli(capsys, "--config", "proxy_tiny_sparse", "--describe", "--json")[1])
    assert sparse["steps_between_updates"] == 500 and sparse["schedule_warning"] is None
