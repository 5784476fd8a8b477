import csv
import json
import math

import numpy as np
import pytest

from ipu_app.__main__ import main as app_main
from ipu_app.experiments.report import FIGURES, build_report
from ipu_app.experiments.runs import (
    DenseCurve,
    ReportError,
    dof_curve,
    fit_lr_curve,
    fit_power_law,
    load_runs,
)

from .conftest import make_run

PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


# ------------------------------------------------------------------------------- the numbers
def test_matched_dense_and_reduction_factor_reproduce_the_paper():
    # Table 1 and Table A.8: dense Mini/Small/Medium, losses and FLOPs from the paper.
    curve = DenseCurve.from_points([(2.617e9, 2.606, "mini"), (1.0066e10, 2.310, "small"), (2.013e10, 2.115, "medium")])
    assert curve.matched_loss(8.33e9) == pytest.approx(2.351, abs=1.5e-3)  # "Matched (dense) 2.350"
    assert curve.reduction_factor(8.33e9, 2.160) == pytest.approx(0.486, abs=2e-3)  # B = 1
    assert curve.reduction_factor(8.33e9, 2.272) == pytest.approx(0.723, abs=2e-3)  # B = 4
    assert curve.reduction_factor(8.33e9, 2.295) == pytest.approx(0.785, abs=2e-3)  # B = 8
    assert curve.reduction_factor(8.33e9, 2.311) == pytest.approx(0.832, abs=2e-3)  # B = 16
    medium = DenseCurve.from_points([(2.617e9, 2.614, "mini"), (1.0066e10, 2.310, "small")])
    assert medium.matched_loss(2.738e9) == pytest.approx(2.603, abs=1e-3)
    # Exactly at a family member, and outside the family's range.
    assert curve.matched_loss(1.0066e10) == pytest.approx(2.310)
    assert curve.matched_loss(1e9) is None and curve.matched_loss(1e11) is None
    assert curve.reduction_factor(8.33e9, 2.0) is None  # better than the largest dense model: no crossing
    assert curve.reduction_bound(8.33e9, 2.0) == f"< {8.33e9 / 2.013e10:.3g}"  # ... but the factor is below this
    assert curve.reduction_bound(8.33e9, 2.7) == f"> {8.33e9 / 2.617e9:.3g}"
    assert curve.reduction_bound(8.33e9, 2.2) is None
    assert DenseCurve.from_points([(1e9, 3.0, "tiny")]) is None


def test_interpolation_is_linear_in_log_flops():
    curve = DenseCurve.from_points([(1e9, 3.0, "a"), (1e11, 2.0, "b")])
    assert curve.matched_loss(1e10) == pytest.approx(2.5)  # the geometric midpoint
    assert curve.matched_flops(2.5) == pytest.approx(1e10)
    assert curve.reduction_factor(1e9, 2.5) == pytest.approx(0.1)


def test_cubic_fit_finds_the_minimum():
    lrs = 1e-3 * 2.0 ** np.arange(-3, 3)
    losses = 2.0 + 0.1 * (np.log(lrs) - math.log(7e-4)) ** 2
    fit = fit_lr_curve(lrs, losses)
    assert len(fit.coefficients) == 4 and not fit.at_edge
    assert fit.optimum_lr == pytest.approx(7e-4, rel=1e-6) and fit.optimum_loss == pytest.approx(2.0)
    # An asymmetric (genuinely cubic) curve: the fitted minimum is the curve's, not the best sample.
    x = np.log(lrs)
    x0 = math.log(1.3e-3)
    cubic = 2.0 + 0.2 * (x - x0) ** 2 + 0.05 * (x - x0) ** 3
    fit = fit_lr_curve(lrs, cubic)
    assert fit.optimum_lr == pytest.approx(1.3e-3, rel=1e-6)
    # Loss still falling at the largest learning rate: the optimum is flagged as at the edge.
    fit = fit_lr_curve(lrs, 3.0 - 0.1 * np.log(lrs / lrs[0]))
    assert fit.at_edge and fit.optimum_lr == pytest.approx(lrs[-1])
    # Three learning rates: a quadratic; two: nothing to fit.
    fit = fit_lr_curve(lrs[:3], 2.0 + (np.log(lrs[:3]) - np.log(lrs[1])) ** 2)
    assert len(fit.coefficients) == 3 and fit.optimum_lr == pytest.approx(lrs[1])
    assert fit_lr_curve(lrs[:2], [2.0, 2.1]) is None


def test_power_law_fit():
    ns = np.array([4e5, 3e6, 1.2e7, 2.5e7])
    slope, intercept = fit_power_law(ns, np.exp(-0.44 * np.log(ns) - 0.47))
    assert slope == pytest.approx(-0.44) and intercept == pytest.approx(-0.47)
    assert fit_power_law([1e6, 1e6], [1e-3, 2e-3]) is None


# ------------------------------------------------------------------------------------ pareto
def pareto_runs(root):
    make_run(root, "bert_tiny_dense", "bert_tiny_dense", 3.0)
    make_run(root, "bert_mini_dense", "bert_mini_dense", 2.6)
    make_run(root, "bert_small_dense", "bert_small_dense", 2.3)
    make_run(root, "bert_mini_static", "bert_mini_static", 2.97)
    for seed, loss in ((0, 2.75), (1, 2.77)):
        make_run(root, f"bert_mini_sparse,seed={seed}", "bert_mini_sparse", loss, seed=seed)
    make_run(root, "bert_mini_sparse_b16", "bert_mini_sparse_b16", 2.9)
    make_run(root, "bert_tiny_sparse", "bert_tiny_sparse", 3.4)  # below the dense family's FLOPs


def test_pareto_report(runs_root, tmp_path):
    pareto_runs(runs_root)
    out = tmp_path / "report"
    written = build_report(runs_root.parent, "pareto", out)
    assert {p.name for p in written} == {"pareto.png", "pareto.csv", "pareto.md", "pareto_block_size.csv",
                                          "pareto_block_size.md"}
    assert_png(out / "pareto.png")
    rows = {(r["setting"], r["model"], r["block_size"]): r for r in read_csv(out / "pareto.csv")}
    assert len(rows) == 7
    tiny = 6 * 12 * 2 * 128**2 * 128 + 12 * 2 * 128**2 * 128
    mini = 6 * 12 * 4 * 256**2 * 128 + 12 * 4 * 128**2 * 256
    mini_sparse_flops = float(rows["DynSparse", "mini", "1"]["flops_per_sequence"])
    assert mini_sparse_flops == pytest.approx(6 * 0.1 * 12 * 4 * 256**2 * 128 + 12 * 4 * 128**2 * 256)
    t = math.log(mini_sparse_flops / tiny) / math.log(mini / tiny)
    matched = 3.0 + t * (2.6 - 3.0)
    r = rows["DynSparse", "mini", "1"]
    assert float(r["val_mlm_loss"]) == pytest.approx(2.76)  # the mean of two seeds
    assert float(r["std"]) == pytest.approx(np.std([2.75, 2.77], ddof=1), rel=1e-4) and r["seeds"] == "2"
    assert float(r["matched_dense_loss"]) == pytest.approx(matched, rel=1e-5)
    dense_flops = math.exp(math.log(tiny) + (3.0 - 2.76) / 0.4 * math.log(mini / tiny))
    assert float(r["flops_reduction_factor"]) == pytest.approx(mini_sparse_flops / dense_flops, rel=1e-4)
    assert r["pareto_better"] == "True"
    assert rows["static", "mini", "1"]["pareto_better"] == "False"
    assert float(rows["static", "mini", "1"]["flops_reduction_factor"]) > 1
    # Outside the dense range: no matched value, no factor.
    assert rows["DynSparse", "tiny", "1"]["matched_dense_loss"] == "" and \
        rows["DynSparse", "tiny", "1"]["flops_reduction_factor"] == ""
    # Dense rows carry no comparison with themselves.
    assert rows["dense", "small", ""]["matched_dense_loss"] == ""
    blocks = read_csv(out / "pareto_block_size.csv")
    assert [(b["model"], b["block_size"]) for b in blocks] == [("mini", "1"), ("mini", "16"), ("tiny", "1")]
    md = (out / "pareto.md").read_text()
    assert "| DynSparse | mini | 1 |" in md and "linear in log FLOPs" in md


def test_pareto_takes_the_best_learning_rate(runs_root, tmp_path):
    make_run(runs_root, "tiny_a", "bert_tiny_dense", 3.2, lr=1e-3)
    make_run(runs_root, "tiny_b", "bert_tiny_dense", 3.0, lr=2e-3)
    make_run(runs_root, "mini", "bert_mini_dense", 2.6)
    build_report(runs_root, "pareto", tmp_path / "r")
    rows = read_csv(tmp_path / "r" / "pareto.csv")
    tiny = [r for r in rows if r["model"] == "tiny"]
    assert len(tiny) == 1 and float(tiny[0]["val_mlm_loss"]) == 3.0 and float(tiny[0]["learning_rate"]) == 2e-3


def test_sparsity_report(runs_root, tmp_path):
    make_run(runs_root, "tiny", "bert_tiny_dense", 3.0)
    make_run(runs_root, "mini", "bert_mini_dense", 2.6)
    for s, loss in ((0.5, 2.62), (0.75, 2.68), (0.9, 2.75)):
        make_run(runs_root, f"mini_s{s}", "bert_mini_sparse", loss, overrides=(f"sparsity.ratio={s}",))
    build_report(runs_root, "sparsity", tmp_path / "r")
    assert_png(tmp_path / "r" / "sparsity.png")
    rows = [r for r in read_csv(tmp_path / "r" / "sparsity.csv") if r["setting"] == "DynSparse"]
    assert [float(r["sparsity"]) for r in rows] == [0.5, 0.75, 0.9]
    assert all(r["flops_reduction_factor"] for r in rows)
    assert float(rows[0]["flops_per_sequence"]) > float(rows[2]["flops_per_sequence"])


# ----------------------------------------------------------------- pr × n and exploration
def update_records(steps, dofs, recent):
    return [{"kind": "update", "step": s, "mean_explored_dof": d, "pruned_blocks": 10,
             "layers": [{"name": "x", "pruned_recently_grown": r}, {"name": "y", "pruned_recently_grown": float("nan")}]}
            for s, d, r in zip(steps, dofs, recent)]


def test_prune_ratio_updates_report(runs_root, tmp_path):
    for pr, n, loss, dof in ((0.25, 160, 2.44, 0.5), (0.5, 160, 2.41, 0.8), (0.5, 80, 2.43, 0.6),
                             (0.5, 40, 2.47, 0.4)):
        make_run(runs_root, f"pr{pr}_n{n}", "bert_medium_sparse", loss,
                 overrides=(f"sparsity.pruning_ratio={pr}", f"sparsity.segments={n}"),
                 summary={"mean_explored_dof": dof}, metrics=update_records([10, 20], [0.2, dof], [0.0, 0.1]))
    build_report(runs_root, "prune_ratio_updates", tmp_path / "r")
    assert_png(tmp_path / "r" / "prune_ratio_updates.png")
    rows = read_csv(tmp_path / "r" / "prune_ratio_updates.csv")
    got = {(float(r["pruning_ratio"]), int(r["segments"])): r for r in rows}
    assert float(got[0.5, 160]["pr_x_n"]) == 80 and float(got[0.25, 160]["pr_x_n"]) == 40
    assert float(got[0.5, 160]["explored_dof"]) == 0.8
    assert float(got[0.5, 160]["pruned_recently_grown"]) == pytest.approx(0.05)  # NaN layers are left out
    assert [int(r["segments"]) for r in rows] == [40, 80, 160, 160]


def test_exploration_report(runs_root, tmp_path):
    rng = np.random.default_rng(0)
    layer = "bert.encoder.layer.1.intermediate.dense"
    maps = {}
    for method, final in (("static", 0.1), ("random", 0.6), ("rigl", 0.25)):
        m = rng.random((64, 16)) < final
        maps[method] = {layer: m, "bert.encoder.layer.0.intermediate.dense": m}
    make_run(runs_root, "static", "bert_mini_static", 3.0, summary={"mean_explored_dof": 0.1, "steps": 100},
             explored=maps["static"])
    make_run(runs_root, "random", "bert_mini_sparse", 2.8, explored=maps["random"],
             summary={"mean_explored_dof": 0.6, "steps": 100, "pattern_updates": 2},
             metrics=update_records([30, 60], [0.3, 0.6], [0.0, 0.1]))
    make_run(runs_root, "rigl", "bert_mini_sparse_rigl", 2.9, explored=maps["rigl"],
             summary={"mean_explored_dof": 0.25, "steps": 100, "pattern_updates": 2},
             metrics=update_records([30, 60], [0.2, 0.25], [0.0, 0.0]))
    written = build_report(runs_root, "exploration", tmp_path / "r")
    assert_png(tmp_path / "r" / "exploration.png")
    assert_png(tmp_path / "r" / "exploration_pattern.png")
    assert tmp_path / "r" / "exploration_pattern.png" in written
    runs = {r.name: r for r in load_runs(runs_root)[0]}
    assert dof_curve(runs["random"]) == [(0, pytest.approx(0.1)), (30, 0.3), (60, 0.6), (100, 0.6)]
    assert dof_curve(runs["static"]) == [(0, pytest.approx(0.1)), (100, 0.1)]  # flat at 1 - s
    rows = {r["run"]: r for r in read_csv(tmp_path / "r" / "exploration.csv")}
    assert float(rows["random"]["initial_dof"]) == pytest.approx(0.1)
    assert float(rows["random"]["final_explored_dof"]) == 0.6
    assert float(rows["static"]["final_explored_dof"]) == 0.1 and rows["static"]["method"] == "static"
    assert rows["rigl"]["method"] == "DynSparse (RigL)"
    assert float(rows["random"]["layer_explored_dof"]) == pytest.approx(maps["random"][layer].mean())
    # A damaged or empty explored.safetensors: that run is skipped with a warning, the rest reported.
    for content in (b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc"):
        (runs_root / "rigl" / "explored.safetensors").write_bytes(content)
        warnings = []
        build_report(runs_root, "exploration", tmp_path / "damaged", warn=warnings.append)
        assert sorted(r["run"] for r in read_csv(tmp_path / "damaged" / "exploration.csv")) == ["random", "static"]
        assert any(w.startswith("skipping run rigl: cannot read") and "explored.safetensors" in w for w in warnings)
    # Another weight by suffix; an ambiguous suffix is an error.
    build_report(runs_root, "exploration", tmp_path / "r2", layer="layer.0.intermediate.dense")
    with pytest.raises(ReportError, match="matches 2 sparse weights"):
        build_report(runs_root, "exploration", tmp_path / "r3", layer="intermediate.dense")


# ---------------------------------------------------------------- categorical and LR figures
def test_block_metric_report(runs_root, tmp_path):
    losses = {"l1": (2.603, 2.610, 2.615), "l2": (2.62, 2.63, 2.625), "linf": (2.65, 2.66, 2.64)}
    for metric, values in losses.items():
        for seed, loss in enumerate(values):
            make_run(runs_root, f"{metric}_{seed}", "bert_medium_sparse_b16", loss, seed=seed,
                     overrides=(f"sparsity.block_metric={metric}",))
    build_report(runs_root, "block_metric", tmp_path / "r")
    assert_png(tmp_path / "r" / "block_metric.png")
    rows = read_csv(tmp_path / "r" / "block_metric.csv")
    assert [r["block_metric"] for r in rows] == ["l1", "l2", "linf"]  # sorted by loss
    assert float(rows[0]["val_mlm_loss"]) == pytest.approx(np.mean(losses["l1"]))
    assert float(rows[2]["std"]) == pytest.approx(np.std(losses["linf"], ddof=1), rel=1e-4)
    assert rows[0]["seeds"] == "3" and rows[0]["block_size"] == "16"


def test_group_lasso_report(runs_root, tmp_path):
    # The coefficient of a weight-decay run is that of the sparse values (sparse_weight_decay, else weight_decay).
    for c, loss in ((0.01, 2.52), (0.03, 2.51)):
        make_run(runs_root, f"wd{c}", "bert_medium_sparse_b16", loss, overrides=(f"optimizer.weight_decay={c}",))
    make_run(runs_root, "wd0.1", "bert_medium_sparse_b16", 2.515, overrides=("optimizer.sparse_weight_decay=0.1",))
    for c, loss in ((0.01, 2.60), (0.03, 2.59), (0.1, 2.62)):
        make_run(runs_root, f"gl{c}", "bert_medium_sparse_b16", loss,
                 overrides=(f"sparsity.group_lasso={c}", "optimizer.sparse_weight_decay=0"))
    build_report(runs_root, "group_lasso", tmp_path / "r")
    assert_png(tmp_path / "r" / "group_lasso.png")
    rows = read_csv(tmp_path / "r" / "group_lasso.csv")
    assert [(r["regulariser"], float(r["coefficient"])) for r in rows] == [
        ("group lasso", 0.01), ("group lasso", 0.03), ("group lasso", 0.1),
        ("weight decay", 0.01), ("weight decay", 0.03), ("weight decay", 0.1)]
    best = [(r["regulariser"], float(r["coefficient"])) for r in rows if r["best"] == "True"]
    assert best == [("group lasso", 0.03), ("weight decay", 0.03)]


def test_init_and_zero_vs_frozen_reports(runs_root, tmp_path):
    for init, base in (("trunc_normal", 2.65), ("glorot", 2.70)):
        for lr, bump in ((8e-4, 0.03), (1.6e-3, 0.0), (3.2e-3, 0.02)):
            make_run(runs_root, f"{init}_{lr}", "bert_medium_static", base + bump, lr=lr,
                     overrides=(f"sparsity.init={init}",))
    build_report(runs_root, "init", tmp_path / "r")
    assert_png(tmp_path / "r" / "init.png")
    rows = read_csv(tmp_path / "r" / "init.csv")
    assert len(rows) == 6
    assert [(r["init"], float(r["learning_rate"])) for r in rows if r["best"] == "True"] == [
        ("glorot", 1.6e-3), ("trunc_normal", 1.6e-3)]

    root = tmp_path / "zf"
    root.mkdir()
    for inactive in ("zero", "frozen"):
        for s, loss in ((0.5, 2.49), (0.9, 2.83)):
            for lr, bump in ((1e-3, 0.0), (2e-3, 0.05 if inactive == "zero" else -0.01)):
                make_run(root, f"{inactive}_{s}_{lr}", "bert_small_static", loss + bump, lr=lr,
                         overrides=(f"sparsity.ratio={s}", f"sparsity.inactive={inactive}", "backend=reference"))
    build_report(root, "zero_vs_frozen", tmp_path / "r")
    rows = read_csv(tmp_path / "r" / "zero_vs_frozen.csv")
    got = {(r["inactive"], float(r["sparsity"])): r for r in rows}
    assert len(got) == 4
    assert float(got["zero", 0.9]["learning_rate"]) == 1e-3 and float(got["frozen", 0.9]["learning_rate"]) == 2e-3
    assert float(got["frozen", 0.5]["val_mlm_loss"]) == pytest.approx(2.48)
    assert float(got["zero", 0.5]["trainable_fraction"]) == pytest.approx(0.5)


def test_learning_rate_report_recovers_the_law(runs_root, tmp_path):
    # Each size's loss is a parabola in ln(lr) around exp(-0.5 ln N + 1): the report's fitted optima
    # and law must give back slope -0.5 and intercept 1.
    for size in ("mini", "small", "medium"):
        from ipu_app.choices import MODEL_SIZES
        layers, hidden = MODEL_SIZES[size]
        n = 12 * layers * hidden**2
        best = math.exp(-0.5 * math.log(n) + 1.0)
        for k in range(-2, 3):
            lr = best * 2.0 ** (k + 0.3)
            make_run(runs_root, f"{size}_{k}", f"bert_{size}_dense", 2.5 + 0.05 * math.log(lr / best) ** 2, lr=lr)
    make_run(runs_root, "tiny_only_two_a", "bert_tiny_dense", 3.0, lr=1e-3)
    make_run(runs_root, "tiny_only_two_b", "bert_tiny_dense", 3.1, lr=2e-3)
    build_report(runs_root, "learning_rate", tmp_path / "r")
    assert_png(tmp_path / "r" / "learning_rate.png")
    rows = {r["model"]: r for r in read_csv(tmp_path / "r" / "learning_rate.csv")}
    n_small = 12 * 4 * 512**2
    assert float(rows["small"]["fitted_optimum_lr"]) == pytest.approx(math.exp(-0.5 * math.log(n_small) + 1), rel=1e-4)
    assert rows["small"]["fit"] == "cubic" and rows["tiny"]["fit"] == "too few learning rates"
    assert float(rows["small"]["eq3_lr"]) == pytest.approx(math.exp(-0.44 * math.log(n_small) - 0.47))
    law = read_csv(tmp_path / "r" / "learning_rate_law.csv")
    assert len(law) == 1 and law[0]["setting"] == "dense" and law[0]["sizes"] == "mini small medium"
    assert float(law[0]["slope"]) == pytest.approx(-0.5, abs=1e-4)
    assert float(law[0]["intercept"]) == pytest.approx(1.0, abs=2e-3)


# ------------------------------------------------------------------------------------ errors
def test_report_errors(runs_root, tmp_path, capsys):
    with pytest.raises(ReportError, match="no finished runs"):
        build_report(runs_root, "pareto")
    with pytest.raises(ReportError, match="not a directory"):
        build_report(tmp_path / "missing", "pareto")
    make_run(runs_root, "mini_sparse", "bert_mini_sparse", 2.8)
    with pytest.raises(ReportError, match="unknown figure 'paretto'"):
        build_report(runs_root, "paretto")
    with pytest.raises(ReportError, match="give --figure"):
        build_report(runs_root)
    with pytest.raises(ReportError, match="needs dense runs"):
        build_report(runs_root, "pareto")
    # An unfinished run is skipped with a warning; a damaged summary is one line.
    unfinished = runs_root / "half"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((runs_root / "mini_sparse" / "config.yaml").read_text())
    (unfinished / "metrics.jsonl").write_text("")
    warnings = []
    runs, skipped = load_runs(runs_root, warnings.append)
    assert [r.name for r in runs] == ["mini_sparse"] and skipped == ["half"] and "half" in warnings[0]
    (runs_root / "mini_sparse" / "metrics.jsonl").write_text('{"kind": "update", "step": 1}\n{broken\n')
    with pytest.raises(ReportError, match=r"metrics.jsonl line 2 is not JSON; the run's metrics are damaged"):
        build_report(runs_root, "exploration", tmp_path / "m")
    (runs_root / "mini_sparse" / "metrics.jsonl").write_text("")
    capsys.readouterr()  # that attempt warned about the unfinished run
    (runs_root / "mini_sparse" / "summary.json").write_text(json.dumps({"final_val_mlm_loss": 2.0}))
    with pytest.raises(ReportError, match="lacks 'non_embedding_flops_per_sequence'"):
        build_report(runs_root, "exploration")
    # A damaged summary leaves that run out with a warning naming the file; here no run is left.
    (runs_root / "mini_sparse" / "summary.json").write_text("{not json")
    code = app_main(["report", str(runs_root), "--figure", "exploration", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and err[-1].startswith("error: ") and "no finished runs" in err[-1]
    assert any(line.startswith("warning: skipping run mini_sparse: cannot read") and "summary.json" in line
               for line in err)


def test_cli_report_uses_the_sweep_figure(runs_root, tmp_path, capsys):
    pareto_runs(runs_root)
    (runs_root.parent / "sweep.yaml").write_text("figure: pareto\ngrid: []\n")
    code = app_main(["report", str(runs_root.parent)])
    out = capsys.readouterr().out
    assert code == 0 and (runs_root.parent / "report" / "pareto.png").is_file()
    assert str(runs_root.parent / "report" / "pareto.csv") in out


def test_every_figure_is_registered():
    assert set(FIGURES) == {"pareto", "sparsity", "prune_ratio_updates", "block_metric", "group_lasso", "init",
                            "zero_vs_frozen", "freeze_unfreeze", "exploration", "learning_rate", "paired", "capacity",
                            "horizon", "horizon_pilot"}


def test_freeze_unfreeze_report(runs_root, tmp_path):
    def curve(final):
        return [{"kind": "train", "step": s, "loss": final + 3.0 * (1 - s / 100)} for s in range(10, 101, 10)]

    for freeze, lr, final in (("none", 1e-3, 2.3), ("early", 1e-3, 2.5), ("early", 2e-3, 2.44), ("late", 1e-3, 2.41),
                              ("late", 2e-3, 2.6)):
        make_run(runs_root, f"{freeze}_{lr}", "bert_small_dense", final - 0.7, lr=lr,
                 overrides=(f"sparsity.freeze={freeze}", "training.steps=100", "training.warmup_steps=5"),
                 summary={"final_train_loss": final}, metrics=curve(final))
    build_report(runs_root, "freeze_unfreeze", tmp_path / "r")
    assert_png(tmp_path / "r" / "freeze_unfreeze.png")
    rows = read_csv(tmp_path / "r" / "freeze_unfreeze.csv")
    best = {r["freeze"]: (float(r["learning_rate"]), float(r["final_train_loss"])) for r in rows if r["best"] == "True"}
    assert best == {"dense": (1e-3, 2.3), "early untrained (unfreeze)": (2e-3, 2.44),
                    "late untrained (freeze)": (1e-3, 2.41)}
    assert len(rows) == 5


def test_paired_report_per_seed_differences_against_static(runs_root, tmp_path):
    from ipu_app.experiments.figures.paired import paired_difference

    static = {0: 6.20, 1: 6.25, 2: 6.18}
    dyn = {0: 6.15, 1: 6.21, 2: 6.12}  # better by 0.05, 0.04, 0.06: consistent across seeds
    noisy = {0: 6.10, 1: 6.30, 2: 6.17}  # -0.10, +0.05, -0.01
    update = {"kind": "update", "step": 500, "layers": [{"pruned_recently_grown": 0.4, "grown_pruned_again": 0.2},
                                                     {"pruned_recently_grown": 0.6, "grown_pruned_again": 0.3}]}
    for seed in static:
        make_run(runs_root, f"bert_tiny_static,seed={seed}", "bert_tiny_static", static[seed], seed=seed)
        make_run(runs_root, f"bert_tiny_sparse,seed={seed},update_every=500", "bert_tiny_sparse", dyn[seed], seed=seed,
                 summary={"mean_explored_dof": 0.3}, metrics=[update])
        make_run(runs_root, f"bert_tiny_sparse_noisy,seed={seed}", "bert_tiny_sparse", noisy[seed], seed=seed)
    make_run(runs_root, "bert_tiny_dense,seed=0", "bert_tiny_dense", 6.4)
    build_report(runs_root, "paired", tmp_path / "r")
    assert_png(tmp_path / "r" / "paired.png")
    rows = {r["setting"]: r for r in read_csv(tmp_path / "r" / "paired.csv")}
    good, bad = rows["bert_tiny_sparse,update_every=500"], rows["bert_tiny_sparse_noisy"]
    diffs = np.array([dyn[s] - static[s] for s in static])
    assert good["baseline"] == bad["baseline"] == "bert_tiny_static" and good["seeds"] == "3"
    assert float(good["diff_mean"]) == pytest.approx(diffs.mean(), abs=1e-9)
    assert float(good["diff_std"]) == pytest.approx(diffs.std(ddof=1), rel=1e-6)
    assert float(good["t"]) == pytest.approx(diffs.mean() / (diffs.std(ddof=1) / np.sqrt(3)), rel=1e-6)
    assert good["beyond_noise"] == "True" and bad["beyond_noise"] == "False"
    assert float(good["pruned_recently_grown"]) == pytest.approx(0.5) and float(good["explored_dof"]) == 0.3
    assert float(good["grown_pruned_again"]) == pytest.approx(0.25) and bad["grown_pruned_again"] == ""
    assert rows["bert_tiny_dense"]["baseline"] == "" and rows["bert_tiny_static"]["diff_mean"] == ""
    per_seed = [r for r in read_csv(tmp_path / "r" / "paired_per_seed.csv") if r["setting"] == "bert_tiny_sparse_noisy"]
    assert [round(float(r["diff_vs_baseline"]), 6) for r in per_seed] == [-0.1, 0.05, -0.01]
    # t, p and the interval as scipy's paired t-test gives them; the sign count.
    from scipy import stats

    test = stats.ttest_rel([dyn[s] for s in static], [static[s] for s in static])
    assert float(good["p"]) == pytest.approx(test.pvalue, rel=1e-6) and float(good["t"]) == pytest.approx(test.statistic)
    ci = test.confidence_interval(0.95)
    assert float(good["diff_ci_low"]) == pytest.approx(ci.low) and float(good["diff_ci_high"]) == pytest.approx(ci.high)
    assert good["below_baseline"] == "3/3" and bad["below_baseline"] == "2/3"
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    one = paired_difference({0: 1.0}, {0: 0.5})
    assert one["n"] == 1 and one["mean"] == 0.5 and one["beyond_noise"] is None


def test_seeds_for_power_match_the_textbook_paired_t_test():
    """80% power at 5% (two-sided), paired: d = 1 needs 10 pairs, d = 0.8 15, d = 0.5 34 (the
    standard tables, e.g. G*Power's matched-pairs t-test)."""
    from ipu_app.experiments.figures.paired import seeds_for_power

    assert seeds_for_power(0.01, 0.01) == 10
    assert seeds_for_power(-0.008, 0.01) == 15
    assert seeds_for_power(0.005, 0.01) == 34
    assert seeds_for_power(0.0, 0.01) is None and seeds_for_power(0.01, 0.0) is None


def test_paired_report_pairs_within_one_machine_and_precision(runs_root, tmp_path):
    """Losses differ between CPUs: a DynSparse seed pairs only with the static run of its own machine
    kind and precision; a run resumed on another machine is left out, with a note."""
    a = {"machine": "AMD EPYC (family 25 model 1; avx2)", "precision": "fp32"}
    b = {"machine": "Intel Xeon (family 6 model 143; amx_bf16 avx512_bf16 avx512f avx2)", "precision": "bf16"}
    for seed in (0, 1, 2):
        make_run(runs_root, f"bert_tiny_static,seed={seed}", "bert_tiny_static", 6.2 + 0.01 * seed, seed=seed, summary=a)
        make_run(runs_root, f"bert_tiny_sparse,seed={seed}", "bert_tiny_sparse", 6.19 + 0.01 * seed, seed=seed,
                 summary=a)
    make_run(runs_root, "bert_tiny_sparse,seed=3", "bert_tiny_sparse", 5.0, seed=3, summary=b)  # no static on b
    make_run(runs_root, "bert_tiny_static,seed=3", "bert_tiny_static", 7.0, seed=3, summary=a)
    make_run(runs_root, "bert_tiny_sparse,seed=4", "bert_tiny_sparse", 1.0, seed=4,
             summary={"machine": "several", "precision": "fp32"})
    build_report(runs_root, "paired", tmp_path / "r")
    rows = {(r["setting"], r["machine"]): r for r in read_csv(tmp_path / "r" / "paired.csv")}
    on_a = rows["bert_tiny_sparse", f"{a['machine']}, fp32"]
    assert on_a["seeds"] == "3" and float(on_a["diff_mean"]) == pytest.approx(-0.01)  # seeds 0-2 only
    on_b = rows["bert_tiny_sparse", f"{b['machine']}, bf16"]
    assert on_b["seeds"] == "1" and on_b["baseline"] == "" and on_b["diff_mean"] == ""
    md = (tmp_path / "r" / "paired.md").read_text()
    assert "paired only within their own" in md and "left out: 1 run(s) trained on several machine kinds" in md


def test_runs_before_metrics_version_2_leave_out_their_suspect_validation(runs_root, tmp_path):
    """A summary without ``metrics_version`` 2 may hold NSP loss and MLM accuracy swapped: the report
    leaves those two out (MLM loss stays), says so once, and names the command that recomputes them."""
    from ipu_app.experiments.runs import load_runs

    for inactive, version in (("zero", 1), ("frozen", 2)):
        make_run(runs_root, f"{inactive}_run", "bert_small_static", 2.5, overrides=(
            "sparsity.ratio=0.5", f"sparsity.inactive={inactive}", "backend=reference"),
            summary={"metrics_version": version, "final_val_nsp_loss": 14.25, "final_val_mlm_accuracy": 0.0003})
    warnings = []
    runs, _ = load_runs(runs_root, warnings.append)
    by_name = {r.name: r for r in runs}
    old, new = by_name["zero_run"], by_name["frozen_run"]
    assert "final_val_nsp_loss" not in old.summary and old.summary["unverified"]["final_val_nsp_loss"] == 14.25
    assert old.loss == 2.5 and new.summary["final_val_nsp_loss"] == 14.25
    assert len(warnings) == 1 and "1 run(s) were written before metrics_version 2 (zero_run)" in warnings[0]
    assert "python -m ipu_app revalidate" in warnings[0]
    build_report(runs_root, "zero_vs_frozen", tmp_path / "r")
    rows = {r["inactive"]: r for r in read_csv(tmp_path / "r" / "zero_vs_frozen.csv")}
    assert rows["zero"]["val_nsp_loss"] == "" and float(rows["frozen"]["val_nsp_loss"]) == 14.25


def test_pareto_draws_a_single_dense_size(runs_root):
    """With one dense size there is no curve, but the dense run is in the table, so it is drawn too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ipu_app.experiments.figures.common import METHOD_LABELS
    from ipu_app.experiments.figures.pareto import draw_pareto
    from ipu_app.experiments.runs import dense_curve, load_runs

    make_run(runs_root, "bert_mini_dense", "bert_mini_dense", 2.6)
    make_run(runs_root, "bert_mini_sparse", "bert_mini_sparse", 2.75)
    runs, _ = load_runs(runs_root)
    assert dense_curve(runs) is None
    fig, ax = plt.subplots()
    draw_pareto(ax, runs, None, lambda r: METHOD_LABELS[r.method])
    dense = next(r for r in runs if r.mode == "dense")
    drawn = {(float(x), float(y)) for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())}
    assert (dense.flops, 2.6) in drawn
    assert "dense" in [t.get_text() for t in ax.legend().get_texts()]
    plt.close(fig)


def test_capacity_report_applies_the_pilots_choice_rule(runs_root, tmp_path):
    """gap = static s minus static s = 0.5 at the same horizon; score = gap / sqrt(time); a run whose
    validation loss rises at the end, or that is too slow, is not eligible; the best score is chosen."""
    def val(*losses):
        return [{"kind": "val", "step": 250 * (i + 1), "mlm_loss": v} for i, v in enumerate(losses)]

    cases = {  # (steps, ratio): (final loss, train seconds, validation curve)
        (1000, 0.5): (6.00, 300, val(6.5, 6.0)), (1000, 0.9): (6.20, 320, val(6.6, 6.2)),
        (1000, 0.95): (6.35, 330, val(6.7, 6.35)),
        (2000, 0.5): (5.80, 600, val(6.0, 5.8)), (2000, 0.9): (6.10, 640, val(6.0, 6.1)),  # rises 0.1: out
        (2000, 0.95): (6.30, 1000, val(6.5, 6.3)),  # too slow: out
    }
    for (steps, ratio), (loss, seconds, curve) in cases.items():
        make_run(runs_root, f"proxy_tiny_static,steps={steps},ratio={ratio}", "proxy_tiny_static", loss, seed=1000,
                 overrides=(f"training.steps={steps}", f"sparsity.ratio={ratio}"),
                 summary={"steps": steps, "train_time_s": seconds, "vocab_size": 4096}, metrics=curve)
    build_report(runs_root, "capacity", tmp_path / "r")
    assert_png(tmp_path / "r" / "capacity.png")
    rows = {(int(r["steps"]), float(r["sparsity"])): r for r in read_csv(tmp_path / "r" / "capacity.csv")}
    assert rows[1000, 0.9]["capacity_gap"] and float(rows[1000, 0.9]["capacity_gap"]) == pytest.approx(0.20)
    assert float(rows[1000, 0.95]["score"]) == pytest.approx(0.35 / math.sqrt(330))
    assert rows[2000, 0.9]["eligible"] == "False" and float(rows[2000, 0.9]["val_rise"]) == pytest.approx(0.1)
    assert rows[2000, 0.95]["eligible"] == "False" and rows[1000, 0.5]["eligible"] == "False"
    assert [k for k, r in rows.items() if r["chosen"] == "True"] == [(1000, 0.95)]


def test_every_figure_is_a_module_with_a_table_and_a_plot_function():
    from pathlib import Path

    from ipu_app.experiments import figures

    folder = Path(figures.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "common"}
    assert modules == set(figures.NAMES)  # a figure module not in the registry is caught
    for name in figures.NAMES:
        module = figures.figure_module(name)
        assert callable(module.tables) and callable(module.plot), name
    with pytest.raises(KeyError):
        figures.figure_module("common")
