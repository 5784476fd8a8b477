"""``auto`` by measurement (ops/autotune.py): what it times, what it keeps, where it remembers it."""

import json

import pytest
import torch

from ipu_app import ops
from ipu_app.ops import autotune, cpu, reference
from ipu_app.sparse.init import random_pattern
from ipu_app.train.build import model_config

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels do not build here")


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """Measuring on, into a cache of this test's own; the process's decisions forgotten around it."""
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "cache"))
    autotune.TUNER.forget()
    yield autotune.TUNER
    autotune.TUNER.forget()


def kind_of(b=16, s=0.9, dtype=torch.float32, shape=(64, 128), tokens=64):
    return autotune.LayerKind.of(random_pattern(*shape, b, s), dtype, tokens, 1)


def test_token_buckets():
    assert [autotune.token_bucket(t) for t in (1, 16, 17, 22, 23, 100, 4096, 5000, 6200)] == \
        [16, 16, 16, 16, 32, 128, 4096, 4096, 8192]


@pytest.mark.parametrize("b, dtype", [(16, torch.float32), (16, torch.bfloat16), (4, torch.float32), (1, torch.bfloat16)])
def test_measuring_times_dense_and_every_kernel_path_and_keeps_the_fastest(tuner, b, dtype):
    kind = kind_of(b, dtype=dtype)
    state = torch.get_rng_state()
    decision = tuner.decide(kind)
    assert torch.equal(torch.get_rng_state(), state)  # measuring never draws from the run's RNG
    expected = {"reference"} | {f"cpu/{p}" for p in cpu.paths("cpu", dtype, b)}
    assert set(decision.ms) == expected and all(v > 0 for v in decision.ms.values())
    assert decision.choice == min(decision.ms, key=decision.ms.get) and decision.source == "measured"
    assert decision.speedup == pytest.approx(decision.ms["reference"] / decision.ms[decision.choice])
    assert tuner.measured == [decision]
    assert tuner.decide(kind) is decision and tuner.measured == [decision]  # once per kind


def test_the_decision_is_what_auto_runs_and_it_computes_the_reference(tuner, monkeypatch):
    pattern = random_pattern(64, 128, 16, 0.9)
    x = torch.randn(64, 128, requires_grad=True)
    values = torch.randn(pattern.nnz, 16, 16, requires_grad=True)
    kind = autotune.LayerKind.of(pattern, torch.float32, 64, torch.get_num_threads())
    here = cpu.paths("cpu", torch.float32, 16)  # the tiles need AVX-512: not on every CPU kind
    for choice in ("reference", "cpu/tiles", "cpu/panels"):
        tuner.adopt([autotune.Decision(kind, choice, {"reference": 1.0, choice: 0.5}, "run").to_dict()])
        assert ops.choose(x, pattern) == choice  # s = 0.9: the constant rule would say "cpu"
        called = []
        for name, op in (("reference", reference.linear), ("cpu", cpu.linear)):
            monkeypatch.setattr(ops._module(name), "linear", (lambda o, n: lambda *a, **k: called.append(n) or o(*a, **k))(op, name))
        y = ops.auto_linear(x, values, pattern)
        monkeypatch.undo()
        monkeypatch.setenv(autotune.ENV, "1")
        backend, _, kernels = choice.partition("/")
        # a decision naming kernels this CPU lacks (one measured on another machine, a resumed run's
        # kernels.json) runs the reference op inside the cpu backend: slow, never wrong
        assert called == ([backend] if backend == "reference" or kernels in here else ["cpu", "reference"])
        torch.testing.assert_close(y, reference.linear(x, values, pattern), rtol=1e-4, atol=1e-4)


def test_off_means_the_constant_limits_and_no_measuring(tuner, monkeypatch):
    monkeypatch.setenv(autotune.ENV, "0")
    monkeypatch.setattr(autotune, "measure", lambda kind: pytest.fail("measured with IPU_APP_AUTOTUNE=0"))
    x = torch.randn(8, 64)
    assert ops.choose(x, random_pattern(64, 64, 16, 0.9)) == "cpu"
    assert ops.choose(x, random_pattern(64, 64, 16, 0.2)) == "reference"
    # a frozen inactive subset is never measured: no kernel covers it
    monkeypatch.setenv(autotune.ENV, "1")
    assert ops.choose(x, random_pattern(64, 64, 16, 0.9), frozen=torch.zeros(64, 64)) == "reference"


def test_the_cache_remembers_per_cpu_and_kernel_source(tuner, monkeypatch):
    kind = kind_of()
    first = tuner.decide(kind)
    data = json.loads(autotune.cache_path().read_text())
    assert data["cpu"] == autotune.identity()["cpu"] and kind.key in data["decisions"]
    tuner.forget()
    monkeypatch.setattr(autotune, "measure", lambda kind: pytest.fail("measured a cached kind"))
    again = tuner.decide(kind)
    assert again.source == "cached" and again.choice == first.choice and again.ms == pytest.approx(first.ms, rel=1e-3)
    # IPU_APP_AUTOTUNE=fresh measures past the cache, and replaces its entry
    tuner.forget()
    monkeypatch.setenv(autotune.ENV, "fresh")
    monkeypatch.setattr(autotune, "measure", lambda kind: autotune.Decision(kind, "reference", {"reference": 1.0}))
    assert tuner.decide(kind).source == "measured" and autotune.enabled()
    assert json.loads(autotune.cache_path().read_text())["decisions"][kind.key]["choice"] == "reference"
    monkeypatch.setenv(autotune.ENV, "1")
    # another CPU (or changed kernels) is another cache: measured anew
    tuner.forget()
    monkeypatch.setattr(autotune, "identity", lambda: {"cpu": "another CPU", "kernels": "x", "torch": "y"})
    assert tuner.get(kind) is None


def test_a_damaged_cache_is_measured_again_and_rewritten(tuner):
    path = autotune.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    kind = kind_of()
    assert tuner.decide(kind).source == "measured"
    assert kind.key in json.loads(path.read_text())["decisions"]


def test_an_unwritable_cache_warns_and_still_decides(tuner, monkeypatch, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv(autotune.CACHE_ENV, str(blocked / "cache"))  # below a file: cannot be made
    decision = tuner.decide(kind_of())
    assert decision.choice in decision.ms
    err = capsys.readouterr().err
    assert "cannot cache kernel decisions" in err and autotune.CACHE_ENV in err


def test_median_times_stops_at_the_time_budget():
    calls = {"a": 0, "b": 0}

    def slow(name, seconds):
        def run():
            calls[name] += 1
            import time
            time.sleep(seconds)
        return run

    t = autotune.median_times({"a": slow("a", 0.02), "b": slow("b", 0.001)}, repeats=5, max_seconds=0.01)
    assert calls == {"a": 1, "b": 1} and t["a"] > t["b"]  # the warm-up alone took the budget
    calls.update(a=0, b=0)
    autotune.median_times({"a": slow("a", 0.001), "b": slow("b", 0.001)}, repeats=5, max_seconds=0.0035)
    assert 2 <= calls["a"] < 6  # warm-up, then rounds until the budget is spent


def test_tune_layers_pins_one_decision_per_kind(tuner):
    from ipu_app.model.sparse_linear import SparseLinear

    layers = [SparseLinear(128, 64, sparsity=0.9, block_size=16, backend="auto") for _ in range(3)]
    layers.append(SparseLinear(64, 128, sparsity=0.9, block_size=16, backend="auto"))
    layers.append(SparseLinear(64, 128, sparsity=0.9, block_size=16, backend="reference"))  # forced: left alone
    decisions = ops.tune_layers(layers, torch.device("cpu"), torch.float32, 100, 1)
    assert [d.kind.key for d in decisions] == [
        "64x128 b16 nnz3 float32 T128 t1", "128x64 b16 nnz3 float32 T128 t1"]
    assert [layer.kernels for layer in layers] == [decisions[0].choice] * 3 + [decisions[1].choice, None]
    line = ops.decisions_line(decisions, torch.float32)
    assert line.startswith("sparse layers (backend auto, block size 16, float32, 128 tokens, 1 threads; measured now): 64x128: ")
    for d in decisions:
        if d.choice == "reference":
            assert "dense GEMMs (reference op) (the best kernels:" in line
        else:
            assert f"{d.speedup:.2f}x dense" in line
    known = ops.known_decisions(layers, torch.device("cpu"), torch.float32, 100, 1)
    assert [k for k, _ in known] == [d.kind for d in decisions]
    tuner.forget()
    assert "to be measured" in ops.decisions_line([(kind_of(), None)], torch.float32)


def test_a_run_records_its_choices_and_a_resume_keeps_them(tuner, data_dir, tmp_path, capsys, monkeypatch):
    from tests.train.test_trainer import new_trainer, small_config, train_losses

    config = small_config(data_dir, "bert_tiny_sparse_b16", "training.steps=8", "training.validate_every=8")
    run = tmp_path / "run"
    trainer = new_trainer(config, run)
    assert trainer.train(stop_at=5) is None
    err = capsys.readouterr().err
    assert "sparse layers (backend auto, block size 16, float32, 512 tokens" in err and "measured now" in err
    record = json.loads((run / "kernels.json").read_text())
    assert record["identity"]["cpu"] == autotune.identity()["cpu"]
    *layers, attention = record["decisions"]
    assert sorted(d["key"] for d in layers) == sorted(f"{o}x{i} b16 nnz{n} float32 T512 t{trainer.threads}"
                                                   for o, i, n in ((128, 128, 6), (512, 128, 26), (128, 512, 26)))
    assert {layer.kernels for _, layer in trainer.state.sparse_layers} == {d["choice"] for d in layers}
    # the attention: the faster of the two at the run's micro-batch (4 x 128 tokens, 2 heads of 64)
    assert attention["key"] == f"attention B4 H2 S128 D64 float32 t{trainer.threads}"
    assert set(attention["ms"]) == {"sdpa", "eager"} and attention["choice"] == min(attention["ms"], key=attention["ms"].get)
    assert trainer.model.bert.config._attn_implementation == attention["choice"]
    assert f"attention: {attention['choice']} (auto: " in err
    # a resume on this CPU runs what the run recorded, even where this process would choose otherwise
    flip = {"reference": "cpu/panels", "sdpa": "eager", "eager": "sdpa"}
    flipped = [{**d, "choice": flip.get(d["choice"], "reference")} for d in record["decisions"]]
    (run / "kernels.json").write_text(json.dumps({**record, "decisions": flipped}))
    tuner.forget()
    monkeypatch.setattr(autotune, "measure", lambda kind: pytest.fail("a resume measured again"))
    monkeypatch.setattr("ipu_app.model.attention.measure", lambda kind: pytest.fail("a resume measured again"))
    resumed = new_trainer(config, run, resume=True)
    assert {layer.kernels for _, layer in resumed.state.sparse_layers} == {d["choice"] for d in flipped[:-1]}
    assert resumed.model.bert.config._attn_implementation == flipped[-1]["choice"]
    summary = resumed.train()
    assert "as the run recorded" in capsys.readouterr().err
    assert sorted(c["choice"] for c in summary["kernel_choices"]) == sorted(d["choice"] for d in flipped)
    assert json.loads((run / "summary.json").read_text())["kernel_choices"] == summary["kernel_choices"]
    assert len(train_losses(run)) == 8
    # evaluate runs what the run recorded, so it gives the run's own final validation to the bit
    from ipu_app.rundir import RunDir
    from ipu_app.train.evaluate import evaluate_run

    RunDir(run).write_config(config)  # what the command line writes before training
    evaluated = evaluate_run(run)
    assert evaluated["mlm_loss"] == summary["final_val_mlm_loss"]
    assert evaluated["nsp_loss"] == summary["final_val_nsp_loss"]
    # recorded on another CPU: measured again here, with a note
    other = json.loads((run / "kernels.json").read_text())
    other["identity"]["cpu"] = "another CPU"
    (run / "kernels.json").write_text(json.dumps(other))
    monkeypatch.undo()
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "cache"))
    tuner.forget()
    new_trainer(config, run, resume=True)
    assert "were chosen on another CPU; measuring again" in capsys.readouterr().err


def test_describe_names_cached_choices_or_to_be_measured(tuner, monkeypatch):
    from ipu_app.config import load_config
    from ipu_app.model.bert import SparseBertForPreTraining
    from ipu_app.sparse.layer import sparse_weights
    from ipu_app.commands.describe import _local_kernel_line

    config = load_config("bert_tiny_sparse_b16", ["training.precision=fp32", "training.threads=1"])
    model = SparseBertForPreTraining(model_config(config, 1000), initialize=False)
    line = _local_kernel_line(config, model)
    assert line.count("to be measured") == 4 and "128x128: to be measured" in line  # 3 shapes + the source note
    monkeypatch.setattr(autotune, "measure", lambda kind: autotune.Decision(kind, "cpu/panels",
                                                                           {"reference": 3.0, "cpu/panels": 1.5}))
    layers = [layer for _, layer in sparse_weights(model)]
    tokens = config.micro_batch_size * config.data.seq_len
    assert len(ops.tune_layers(layers, torch.device("cpu"), torch.float32, tokens, 1)) == 3
    tuner.forget()
    line = _local_kernel_line(config, model)
    assert "measured before (cache)" in line and "to be measured" not in line
    assert line.count("CPU kernels, fp32 token panels, 2.00x dense") == 3
