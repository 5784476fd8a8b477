import math

import pytest
import torch

from ipu_app.config import (
    CONFIG_DIR,
    ConfigError,
    RunConfig,
    config_names,
    load_config,
    parse_override,
)
from ipu_app.sparse.flops import auto_learning_rate
from ipu_app.train.build import model_config, schedule_warning, segment_steps, update_schedule
from ipu_app.train.optim import peak_learning_rate

SIZES = ("tiny", "mini", "small", "medium", "base")
VARIANTS = ("dense", "static", "sparse", "sparse_b16", "sparse_rigl")


def test_every_size_and_variant_is_shipped_and_valid():
    names = set(config_names())
    for size in SIZES:
        for variant in VARIANTS:
            assert f"bert_{size}_{variant}" in names
            config = load_config(f"bert_{size}_{variant}")
            assert config.model.size == size
            assert config.name == f"bert_{size}_{variant}"


@pytest.mark.parametrize("size", SIZES)
def test_shipped_configs_follow_the_paper_recipe(size):
    for variant in VARIANTS:
        c = load_config(f"bert_{size}_{variant}")
        assert (c.optimizer.beta1, c.optimizer.beta2, c.optimizer.eps) == (0.9, 0.999, 1e-6)
        assert c.optimizer.weight_decay == 0.01 and c.optimizer.max_grad_norm > 0
        assert (c.training.steps, c.training.warmup_steps) == (757_000, 10_000)
        assert c.data.seq_len == 128 and c.model.nsp
        assert c.training.learning_rate == "auto"
    dense, static, sparse = (load_config(f"bert_{size}_{v}") for v in ("dense", "static", "sparse"))
    assert dense.sparsity.mode == "dense" and dense.effective_sparsity == 0.0
    assert static.sparsity.mode == "static" and static.sparsity.ratio == 0.9
    s = sparse.sparsity
    assert (s.mode, s.ratio, s.pruning_ratio, s.segments, s.regrowth, s.block_size, s.pruning_schedule) == (
        "dynamic", 0.9, 0.5, 160, "random", 1, "cosine")
    b16 = load_config(f"bert_{size}_sparse_b16").sparsity
    assert (b16.block_size, b16.segments, b16.block_metric) == (16, 80, "l1")
    assert load_config(f"bert_{size}_sparse_rigl").sparsity.regrowth == "gradient"


def test_auto_learning_rate_is_the_paper_law():
    # paper-spec §2.3: the dense law predicts Mini 8.6e-4, Small 4.7e-4, Medium 3.5e-4, Base 2.0e-4;
    # with Eq. 3 at s = 0.9 (x 6.400): Medium 2.2e-3, Base 1.30e-3.
    for size, expected in (("mini", 8.6e-4), ("small", 4.7e-4), ("medium", 3.5e-4), ("base", 2.0e-4)):
        assert auto_learning_rate(size, 0.0) == pytest.approx(expected, rel=0.02)
    assert auto_learning_rate("medium", 0.9) / auto_learning_rate("medium", 0.0) == pytest.approx(6.400, rel=1e-3)
    assert peak_learning_rate(load_config("bert_base_sparse")) == pytest.approx(1.30e-3, rel=0.01)
    assert peak_learning_rate(load_config("bert_medium_dense")) == pytest.approx(3.46e-4, rel=0.01)
    assert peak_learning_rate(load_config("bert_mini_sparse", ["training.learning_rate=0.001"])) == 0.001


def test_base_inheritance_merges_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("training:\n  steps: 100\n  warmup_steps: 10\n  batch_size: 16\nsparsity:\n  ratio: 0.5\n")
    (tmp_path / "b.yaml").write_text("training:\n  steps: 200\n")
    (tmp_path / "c.yaml").write_text(
        "base: [bert_tiny_sparse, a, b]\ntraining:\n  micro_batch_size: 8\nsparsity:\n  segments: 4\n")
    c = load_config(tmp_path / "c.yaml")
    assert c.model.size == "tiny"  # from the shipped config
    assert (c.training.steps, c.training.batch_size, c.training.micro_batch_size) == (200, 16, 8)
    assert (c.sparsity.ratio, c.sparsity.segments, c.sparsity.mode) == (0.5, 4, "dynamic")
    assert c.name == "c"
    assert c.accumulation_steps() == 2


def test_inheritance_loop_and_missing_base_fail(tmp_path):
    (tmp_path / "x.yaml").write_text("base: y\n")
    (tmp_path / "y.yaml").write_text("base: x\n")
    with pytest.raises(ConfigError, match="inheritance loop: x -> y -> x"):
        load_config(tmp_path / "x.yaml")
    (tmp_path / "z.yaml").write_text("base: bert_tiny_sparce\n")
    with pytest.raises(ConfigError, match="did you mean 'bert_tiny_sparse'"):
        load_config(tmp_path / "z.yaml")


def test_overrides_are_typed():
    c = load_config("bert_tiny_sparse", ["sparsity.ratio=0.8", "sparsity.block_size=4", "model.nsp=false",
                                         "training.steps=1e5", "data.dir=null", "sparsity.modules=[ffn_up, ffn_down]"])
    assert c.sparsity.ratio == 0.8 and isinstance(c.sparsity.ratio, float)
    assert c.sparsity.block_size == 4 and c.training.steps == 100_000 and c.model.nsp is False
    assert c.sparsity.modules == ["ffn_up", "ffn_down"]
    assert parse_override("data.dir=/tmp/a=b") == ("data.dir", "/tmp/a=b")


@pytest.mark.parametrize("override, message", [
    ("sparsity.ratoi=0.5", "unknown config key 'sparsity.ratoi'; did you mean 'sparsity.ratio'"),
    ("learning_rate=0.1", "did you mean 'training.learning_rate'"),
    ("sparsity.ratio=abc", "sparsity.ratio must be a number, got 'abc'"),
    ("training.steps=1.5", "training.steps must be an integer"),
    ("model.nsp=3", "model.nsp must be true/false"),
    ("sparsity.ratio=1.0", r"sparsity.ratio must be in \[0, 1\), got 1.0"),
    ("sparsity.block_size=3", "sparsity.block_size=3 is not supported"),
    ("sparsity.segments=1000000", "more than training.steps"),
    ("training.micro_batch_size=24", "training.batch_size=512 is not a multiple of training.micro_batch_size=24"),
    ("model.size=huge", "model.size='huge' is not valid"),
    ("sparsity.regrowth=magnitude", "sparsity.regrowth='magnitude' is not valid"),
    ("training.learning_rate=fast", "must be a number or 'auto'"),
    ("training.learning_rate=inf", "must be a number or 'auto'"),
    ("training.learning_rate=-1", "must be > 0"),
    ("sparsity.modules=[ffn]", "sparsity.modules entry='ffn' is not valid"),
    ("sparsity", "expected section.key=value"),
    ("training=3", "unknown config key 'training'"),
])
def test_bad_overrides_fail_with_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config("bert_tiny_sparse", [override])
    assert "\n" not in str(info.value)


def test_block_size_must_divide_hidden(monkeypatch):
    from ipu_app.choices import MODEL_SIZES

    monkeypatch.setitem(MODEL_SIZES, "odd", (2, 136))
    with pytest.raises(ConfigError, match="block_size=16 does not divide the hidden size 136"):
        load_config("bert_tiny_sparse_b16", ["model.size=odd"])


def test_steps_shortcut_keeps_the_warmup_fraction():
    c = load_config("bert_tiny_sparse", steps=7570)
    assert (c.training.steps, c.training.warmup_steps) == (7570, 100)
    c = load_config("bert_tiny_sparse", ["training.warmup_steps=5"], steps=7570)
    assert c.training.warmup_steps == 5
    # a short run's warmup never rounds to 0 (a fresh Adam at the peak rate): a tenth of the run, 2 to 10
    assert [load_config("bert_tiny_sparse", steps=n).training.warmup_steps
            for n in (1, 2, 3, 4, 20, 60, 200, 757, 2000)] == [0, 0, 2, 2, 2, 6, 10, 10, 26]
    assert load_config("bert_tiny_sparse", ["training.warmup_steps=0"], steps=20).training.warmup_steps == 0


def test_steps_shortcut_caps_the_intervals_to_the_run_and_explicit_values_win():
    t = load_config("bert_medium_sparse", steps=2000).training  # paper config: 100 / 10,000 / 10,000
    assert (t.log_every, t.validate_every, t.checkpoint_every) == (100, 500, 500)
    t = load_config("bert_medium_sparse", steps=40).training
    assert (t.log_every, t.validate_every, t.checkpoint_every) == (2, 10, 10)
    t = load_config("bert_medium_sparse", steps=3).training  # never below 1
    assert (t.log_every, t.validate_every, t.checkpoint_every) == (1, 1, 1)
    t = load_config("bert_medium_sparse", steps=5_000_000).training  # longer runs keep the config's intervals
    assert (t.log_every, t.validate_every, t.checkpoint_every) == (100, 10_000, 10_000)
    c = load_config("bert_medium_sparse", ["training.validate_every=1500", "training.log_every=7"], steps=2000)
    assert (c.training.log_every, c.training.validate_every, c.training.checkpoint_every) == (7, 1500, 500)
    assert c.adjusted == {"training.warmup_steps": (10000, 26), "training.checkpoint_every": (10000, 500),
                          "sparsity.segments": (160, 2)}
    assert load_config("bert_medium_sparse").adjusted == {}
    # Without pattern updates the number of segments is no change a run is subject to.
    assert "sparsity.segments" not in load_config("bert_medium_static", steps=2000).adjusted
    assert "sparsity.segments" not in load_config("bert_medium_dense", steps=2000).adjusted


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("5e-4", 5e-4), ("0.002", 0.002), ("auto", "auto")])
def test_learning_rates_as_people_type_them(tmp_path, text, value):
    assert load_config("bert_tiny_sparse", [f"training.learning_rate={text}"]).training.learning_rate == value
    path = tmp_path / "lr.yaml"
    path.write_text(f"base: bert_tiny_sparse\ntraining:\n  learning_rate: {text}\n")  # YAML 1.1: 1e-3 is a string
    assert load_config(path).training.learning_rate == value


def test_config_yaml_holds_the_ipu_section_only_for_ipu_runs():
    import yaml

    assert "ipu" not in yaml.safe_load(load_config("bert_tiny_sparse").to_yaml())
    assert yaml.safe_load(load_config("bert_base_sparse_pod16").to_yaml())["ipu"]["replication_factor"] >= 1


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)
    section = tmp_path / "section.yaml"
    section.write_text("training: 3\n")
    with pytest.raises(ConfigError, match="training must be a mapping"):
        load_config(section)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_round_trip():
    import yaml

    from ipu_app.config import from_dict

    c = load_config("bert_small_sparse_b16", ["training.learning_rate=0.002"])
    raw = yaml.safe_load(c.to_yaml())
    raw.pop("name")
    again = from_dict(raw)
    again.name = c.name
    assert again == c
    assert isinstance(RunConfig().validate(), RunConfig)
    assert CONFIG_DIR.is_dir()
    assert math.isfinite(peak_learning_rate(c))


def test_steps_keeps_segments_long_enough_and_explicit_settings_win():
    from ipu_app.config import load_config

    paper = load_config("bert_tiny_sparse")
    assert paper.sparsity.segments == 160 and schedule_warning(paper) is None
    assert segment_steps(paper) == pytest.approx(757000 / 160, rel=1e-3)
    short = load_config("bert_tiny_sparse", steps=5000)  # segments of >= min_segment_steps = 1000
    assert short.sparsity.segments == 5 and update_schedule(short).steps == (1000, 2000, 3000, 4000)
    assert schedule_warning(short) is None
    tiny = load_config("bert_tiny_sparse", steps=300)  # too short for one sound segment: one update, a warning
    assert tiny.sparsity.segments == 2 and update_schedule(tiny).steps == (150,)
    assert "updates every 150 steps, below sparsity.min_segment_steps=1000" in schedule_warning(tiny)
    kept = load_config("bert_tiny_sparse", ["sparsity.segments=30"], steps=3000)
    assert kept.sparsity.segments == 30 and "every 100 steps" in schedule_warning(kept)
    every = load_config("bert_tiny_sparse", ["sparsity.update_every=700", "sparsity.min_segment_steps=500"], steps=3000)
    assert update_schedule(every).steps == (700, 1400, 2100, 2800) and schedule_warning(every) is None
    assert update_schedule(load_config("bert_tiny_static", steps=300)).steps == ()


def test_schedule_and_optimizer_option_errors():
    from ipu_app.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"sparsity.update_every=0 must be in \[1, training.steps=100\)"):
        load_config("bert_tiny_sparse", ["sparsity.update_every=0"], steps=100)
    with pytest.raises(ConfigError, match="sparsity.min_segment_steps must be >= 1"):
        load_config("bert_tiny_sparse", ["sparsity.min_segment_steps=0"])
    with pytest.raises(ConfigError, match="optimizer.sparse_weight_decay must be >= 0"):
        load_config("bert_tiny_sparse", ["optimizer.sparse_weight_decay=-1"])
    with pytest.raises(ConfigError, match=r"per_slot runs on the host optimizer only; with backend: ipu set "
                                          r"optimizer.bias_correction=global \(the paper's\) or auto"):
        load_config("bert_mini_sparse_ipu", ["optimizer.bias_correction=per_slot"])
    assert load_config("bert_mini_sparse", ["backend=ipu", "optimizer.bias_correction=global"]).backend == "ipu"


@pytest.mark.parametrize("backend, expected", [("reference", "per_slot"), ("cpu", "per_slot"), ("auto", "per_slot"),
                                               ("ipu", "global")])
def test_bias_correction_auto_is_per_slot_on_the_host_and_global_on_an_ipu(backend, expected, capsys):
    """The mission's command on an IPU (bert_medium_sparse, backend=ipu) is valid with the defaults."""
    import json

    from ipu_app.config import load_config
    from ipu_app.commands.train import main

    config = load_config("bert_medium_sparse", [f"backend={backend}"])
    assert config.optimizer.bias_correction == "auto" and config.bias_correction == expected
    assert main(["--config", "bert_medium_sparse", "--set", f"backend={backend}", "--describe", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bias_correction"] == expected and info["bias_correction_line"].endswith("(auto)")
    assert main(["--config", "bert_medium_sparse", "--set", f"backend={backend}", "--describe"]) == 0
    assert ("per slot" if expected == "per_slot" else "global (one step count") in capsys.readouterr().out
    static = load_config("bert_mini_static", [f"backend={backend}"])
    assert static.bias_correction_line() is None  # no regrowth: nothing to name


def test_the_optimizer_follows_the_resolved_bias_correction():
    from ipu_app.config import load_config
    from ipu_app.model.bert import SparseBertForPreTraining
    from ipu_app.train.optim import SlotAdamW, build_optimizer

    for setting, cls in (("auto", SlotAdamW), ("per_slot", SlotAdamW), ("global", torch.optim.AdamW)):
        config = load_config("bert_tiny_sparse", [f"optimizer.bias_correction={setting}"])
        model = SparseBertForPreTraining(model_config(config, 512))
        assert type(build_optimizer(model, config)) is cls, setting


def test_the_old_name_num_updates_is_read_as_segments_everywhere(tmp_path):
    from ipu_app.config import from_dict
    from ipu_app.experiments.runs import load_runs
    from ipu_app.experiments.sweep_spec import load_sweep
    from ipu_app.rundir import RunDir
    from ipu_app.sparse.schedule import ScheduleError, UpdateSchedule

    old = tmp_path / "old.yaml"
    old.write_text("base: bert_tiny_sparse\nsparsity: {num_updates: 40}\n")
    assert load_config(old).sparsity.segments == 40
    # --set with the old name overrides the file's new name and counts as explicit for --steps
    c = load_config("bert_tiny_sparse", ["sparsity.num_updates=30"], steps=3000)
    assert c.sparsity.segments == 30 and "sparsity.segments" not in c.adjusted
    both = tmp_path / "both.yaml"
    both.write_text("base: bert_tiny_sparse\nsparsity: {num_updates: 40, segments: 20}\n")
    with pytest.raises(ConfigError, match=r"both.yaml: sparsity.num_updates is the old name of sparsity.segments; "
                                          r"give only sparsity.segments"):
        load_config(both)
    # a run directory and a checkpoint's config saved before the rename
    saved = load_config("bert_tiny_sparse", steps=200).to_saved_dict()
    saved["sparsity"]["num_updates"] = saved["sparsity"].pop("segments")
    assert from_dict(saved) == load_config("bert_tiny_sparse", steps=200)
    import yaml

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "name": "bert_tiny_sparse"}))
    assert RunDir(run).load_config().sparsity.segments == 2
    (run / "summary.json").write_text('{"final_val_mlm_loss": 6.0, "metrics_version": 2, '
                                      '"non_embedding_flops_per_sequence": 1.0, "learning_rate": 0.001}')
    runs, _ = load_runs(tmp_path / "runs")
    assert [r.get("sparsity.segments") for r in runs] == [2]
    # a sweep spec keeps its run names (so its run directories are found again) and sets segments
    spec = tmp_path / "s.yaml"
    spec.write_text("grid:\n  - config: bert_tiny_sparse\n    sparsity.num_updates: [2, 4]\n    training.steps: 100\n")
    sweep = load_sweep(spec)
    assert [r.name for r in sweep.runs] == ["bert_tiny_sparse,num_updates=2,steps=100",
                                            "bert_tiny_sparse,num_updates=4,steps=100"]
    assert [r.resolve().sparsity.segments for r in sweep.runs] == [2, 4]
    # the Python API
    assert UpdateSchedule.evenly_spaced(100, num_updates=4) == UpdateSchedule.evenly_spaced(100, 4)
    with pytest.raises(ScheduleError, match="exactly once"):
        UpdateSchedule.evenly_spaced(100, 4, num_updates=4)


def test_a_batch_below_the_micro_batch_shrinks_the_micro_batch():
    c = load_config("bert_tiny_sparse", ["training.batch_size=16"])  # the recipe's micro-batch is 32
    assert (c.training.micro_batch_size, c.accumulation_steps()) == (16, 1)
    assert c.adjusted == {"training.micro_batch_size": (32, 16)}
    assert load_config("bert_tiny_sparse", ["training.batch_size=48"]).training.micro_batch_size == 24
    assert load_config("bert_tiny_sparse", ["training.batch_size=7"]).training.micro_batch_size == 7
    # per process under data parallel: 48 over 4 processes is 12 each
    assert load_config("bert_tiny_sparse", ["training.batch_size=48"], world_size=4).training.micro_batch_size == 12
    # a batch the micro-batch divides, or a micro-batch given too, is left as it is
    assert load_config("bert_tiny_sparse", ["training.batch_size=64"]).adjusted == {}
    assert load_config("bert_tiny_sparse", ["training.batch_size=16",
                                            "training.micro_batch_size=8"]).training.micro_batch_size == 8
    with pytest.raises(ConfigError, match="training.batch_size=16 is not a multiple of training.micro_batch_size=32"):
        load_config("bert_tiny_sparse", ["training.batch_size=16", "training.micro_batch_size=32"]).accumulation_steps()
