"""report --figure horizon and horizon_pilot on made-up runs, every statistic recomputed with scipy
(the distribution-free checks by enumerating every sign assignment)."""

import itertools

import numpy as np
import pytest
from scipy import stats

from ipu_app.experiments.report import build_report
from ipu_app.experiments.runs import ReportError

from .conftest import make_run
from .test_report import assert_png, read_csv

STEPS = (500, 1000, 1500, 2000)
ZEN4 = {"machine": "AMD EPYC (family 25 model 17; avx512_bf16 avx512f avx2)", "precision": "fp32"}
ZEN3 = {"machine": "AMD EPYC (family 25 model 1; avx2)", "precision": "fp32"}


def val_records(losses, nsp):
    return [{"kind": "val", "step": step, "mlm_loss": loss, "nsp_loss": n} for step, loss, n in zip(STEPS, losses, nsp)]


def pair(root, seed, static, dyn, *, static_nsp=(0.69,) * 4, dyn_nsp=(0.69,) * 4, machine=ZEN4,
         setting="proxy_tiny_sparse", update=None, static_name="proxy_tiny_static", extra=()):
    common = ("training.steps=2000", "training.warmup_steps=100") + tuple(extra)
    make_run(root, f"{static_name},seed={seed}", "proxy_tiny_static",
             static[-1], seed=seed, overrides=common, summary={**machine, "steps": 2000, "train_time_s": 100.0},
             metrics=val_records(static, static_nsp))
    make_run(root, f"{setting},seed={seed}", "proxy_tiny_sparse", dyn[-1],
             seed=seed, overrides=common + ("sparsity.update_every=500",),
             summary={**machine, "steps": 2000, "mean_explored_dof": 0.2, "train_time_s": 110.0},
             metrics=val_records(dyn, dyn_nsp) + ([update] if update else []))


def test_horizon_difference_at_every_step_and_the_end_match_scipy(runs_root, tmp_path):
    rng = np.random.default_rng(0)
    static = {seed: 6.5 - 0.1 * np.arange(4) + rng.normal(0, 0.01, 4) for seed in range(5)}
    dyn = {seed: static[seed] + np.array([0.01, 0.0, -0.02, -0.04]) + rng.normal(0, 0.005, 4) for seed in range(5)}
    # DynSparse learns NSP at 1000 in every seed; static at 2000 in seeds 0-1, never in 2-4.
    update = {"kind": "update", "step": 500, "layers": [{"pruned_recently_grown": 0.5, "grown_pruned_again": 0.25}]}
    for seed in range(5):
        pair(runs_root, seed, list(static[seed]), list(dyn[seed]),
             static_nsp=(0.69, 0.69, 0.69, 0.4 if seed < 2 else 0.69), dyn_nsp=(0.69, 0.45, 0.3, 0.2), update=update)
    written = build_report(runs_root, "horizon", tmp_path / "r")
    assert_png(tmp_path / "r" / "horizon.png")
    assert_png(tmp_path / "r" / "horizon_seeds.png")
    assert {p.name for p in written} >= {"horizon.csv", "horizon_end.csv", "horizon_per_seed.csv", "horizon.md"}
    rows = read_csv(tmp_path / "r" / "horizon.csv")
    assert [int(r["step"]) for r in rows] == list(STEPS)
    for i, row in enumerate(rows):
        a = [dyn[s][i] for s in range(5)]
        b = [static[s][i] for s in range(5)]
        test = stats.ttest_rel(a, b)
        ci = test.confidence_interval(0.95)
        assert float(row["diff_mean"]) == pytest.approx(np.mean(np.subtract(a, b)), rel=1e-8)
        assert float(row["t"]) == pytest.approx(test.statistic) and float(row["p"]) == pytest.approx(test.pvalue)
        assert float(row["ci_low"]) == pytest.approx(ci.low) and float(row["ci_high"]) == pytest.approx(ci.high)
        assert row["n"] == "5" and row["per_seed"].count(":") == 5
    assert rows[-1]["beyond_noise"] == "True" and float(rows[-1]["diff_mean"]) < 0
    end = read_csv(tmp_path / "r" / "horizon_end.csv")[0]
    assert float(end["diff_mean"]) == pytest.approx(float(rows[-1]["diff_mean"])) and end["steps"] == "2000"
    assert end["baseline"] == "proxy_tiny_static" and end["method"] == "DynSparse"
    # NSP: DynSparse earlier in all 5 seeds; sign test over the 5 that differ; both crossed in seeds 0-1 only.
    assert end["nsp_earlier"] == "5/5" and end["nsp_later"] == "0/5" and end["both_crossed"] == "2"
    assert float(end["nsp_sign_p"]) == pytest.approx(stats.binomtest(5, 5).pvalue)
    after = [dyn[s][-1] - static[s][-1] for s in (0, 1)]
    assert float(end["diff_after_both_crossed"]) == pytest.approx(np.mean(after))
    assert float(end["p_after_both_crossed"]) == pytest.approx(stats.ttest_1samp(after, 0).pvalue)
    # 5 of 5 earlier is p = 0.0625 for a sign test: not an earlier transition beyond noise on its own.
    after_beyond = stats.ttest_1samp(after, 0).pvalue < 0.05
    assert end["verdict"] == ("lower loss after both crossed" if after_beyond
                              else "DynSparse ahead; neither source beyond noise alone")
    assert float(end["pruned_recently_grown"]) == 0.5 and float(end["explored_dof"]) == 0.2
    per_seed = read_csv(tmp_path / "r" / "horizon_per_seed.csv")
    assert [r["static_nsp_step"] for r in per_seed] == ["2000", "2000", "never", "never", "never"]
    assert {r["dynsparse_nsp_step"] for r in per_seed} == {"1000"}


def enumerated_sign_flip_p(diffs):
    """P(|mean of the sign-flipped diffs| >= |observed mean|) over all 2^n sign assignments."""
    diffs = np.asarray(diffs)
    means = [abs(np.mean(diffs * signs)) for signs in itertools.product((1, -1), repeat=len(diffs))]
    return np.mean(np.array(means) >= abs(diffs.mean()) - 1e-12)


def enumerated_wilcoxon_p(diffs):
    """P(|W+ - E W+| >= |observed W+ - E W+|), W+ the rank sum of the positive diffs, over all 2^n signs."""
    diffs = np.asarray(diffs)
    ranks = stats.rankdata(np.abs(diffs))
    centre = ranks.sum() / 2
    observed = abs(ranks[diffs > 0].sum() - centre)
    sums = [abs(ranks[np.array(signs) > 0].sum() - centre) for signs in itertools.product((1, -1), repeat=len(diffs))]
    return np.mean(np.array(sums) >= observed - 1e-12)


def test_distribution_free_checks_match_enumeration(runs_root, tmp_path):
    """A bimodal set of differences (as the proxy's NSP transition makes them): the t-test, the exact
    sign-flip test and the signed-rank test all reported, each recomputed independently."""
    diffs = [-0.074, -0.010, 0.086, 0.0004, 0.086, 0.072, -0.051, -0.0017, 0.016, -0.0005]
    for seed, d in enumerate(diffs):
        pair(runs_root, seed, [6.0, 5.99, 5.98, 5.97], [6.0, 5.99, 5.98, 5.97 + d])
    build_report(runs_root, "horizon", tmp_path / "r")
    end = read_csv(tmp_path / "r" / "horizon_end.csv")[0]
    assert float(end["p"]) == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    assert float(end["sign_flip_p"]) == pytest.approx(enumerated_sign_flip_p(diffs))
    assert float(end["wilcoxon_p"]) == pytest.approx(enumerated_wilcoxon_p(diffs))
    assert 0.3 < float(end["sign_flip_p"]) < 1.0 and 0.3 < float(end["wilcoxon_p"]) < 1.0
    # before the last step the two arms are equal in every seed: no test of a difference that is zero
    first = read_csv(tmp_path / "r" / "horizon.csv")[0]
    assert first["sign_flip_p"] == "" and first["wilcoxon_p"] == ""


def test_holm_adjusts_over_an_arms_steps(runs_root, tmp_path):
    rng = np.random.default_rng(3)
    for seed in range(6):
        static = 6.0 - 0.01 * np.arange(4) + rng.normal(0, 0.01, 4)
        dyn = static + np.array([-0.001, -0.01, -0.02, -0.03]) + rng.normal(0, 0.01, 4)
        pair(runs_root, seed, list(static), list(dyn))
    build_report(runs_root, "horizon", tmp_path / "r")
    rows = read_csv(tmp_path / "r" / "horizon.csv")
    for column, adjusted in (("p", "holm_p"), ("sign_flip_p", "sign_flip_holm_p")):
        raw = np.array([float(r[column]) for r in rows])
        order = np.argsort(raw)
        # Holm by hand: the k-th smallest times (m - k), then the running maximum, capped at 1
        expected = np.empty(4)
        expected[order] = np.minimum(1, np.maximum.accumulate(raw[order] * (4 - np.arange(4))))
        assert [float(r[adjusted]) for r in rows] == pytest.approx(list(expected))
    assert all(float(r["holm_p"]) >= float(r["p"]) for r in rows)
    from ipu_app.experiments.figures.horizon import holm

    assert holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])


def test_distribution_free_checks_see_a_consistent_shift():
    from ipu_app.experiments.figures.horizon import distribution_free

    diffs = [-0.03, -0.02, -0.025, -0.01, -0.04, -0.015, -0.02, -0.035]  # all 8 below zero
    checks = distribution_free(diffs)
    assert checks["sign_flip_p"] == pytest.approx(2 / 2 ** 8) and checks["wilcoxon_p"] == pytest.approx(2 / 2 ** 8)
    assert distribution_free([0.01]) == {"sign_flip_p": None, "wilcoxon_p": None}


def test_seed_curves_carry_each_pairs_difference_and_transitions(runs_root, tmp_path):
    from ipu_app.experiments.figures.horizon import arms, seed_curves
    from ipu_app.experiments.runs import load_runs

    pair(runs_root, 7, [6.2, 6.1, 6.0, 5.95], [6.2, 6.05, 6.02, 5.9], static_nsp=(0.69, 0.69, 0.45, 0.3),
         dyn_nsp=(0.69, 0.4, 0.3, 0.2))
    (curve,) = next(iter(seed_curves(arms(load_runs(runs_root)[0])[0]).values()))
    assert curve.seed == 7 and curve.steps == list(STEPS)
    assert curve.diffs == pytest.approx([0.0, -0.05, 0.02, -0.05])
    assert (curve.dynsparse_nsp, curve.static_nsp) == (1000, 1500)


def test_verdicts():
    from ipu_app.experiments.figures.horizon import verdict

    noise = {"beyond_noise": False, "mean": -0.01}
    ahead = {"beyond_noise": True, "mean": -0.01}
    earlier = {"n": 10, "earlier": 9, "later": 0, "sign_p": 0.004, "diff_after": 0.0, "p_after": 0.9}
    lower = {"n": 10, "earlier": 1, "later": 1, "sign_p": 1.0, "diff_after": -0.02, "p_after": 0.01}
    assert verdict(noise, earlier) == "no difference beyond noise"
    assert verdict({"beyond_noise": True, "mean": 0.01}, earlier) == "static ahead"
    assert verdict(ahead, earlier) == "earlier NSP transition"
    assert verdict(ahead, lower) == "lower loss after both crossed"
    both = {**earlier, "diff_after": -0.02, "p_after": 0.01}
    assert verdict(ahead, both).startswith("both")


def test_horizon_pairs_within_a_machine_kind_and_pools_stratified(runs_root, tmp_path):
    """Seeds 0-2 on Zen 4, 3-5 on Zen 3 (a constant loss offset between kinds): each kind is tested
    alone, and the pooled row is a one-sample t-test over all six within-kind differences."""
    diffs = {0: -0.03, 1: -0.01, 2: -0.02, 3: -0.04, 4: 0.0, 5: -0.02}
    for seed, d in diffs.items():
        machine = ZEN4 if seed < 3 else ZEN3
        base = 6.0 + (0.3 if machine is ZEN3 else 0.0) + 0.01 * seed
        # two sweeps (one per session and machine kind) with the same run names under one root
        pair(runs_root / ("zen4" if seed < 3 else "zen3") / "runs", seed, [base] * 4, [base + d] * 4, machine=machine)
    build_report(runs_root, "horizon", tmp_path / "r")
    end = {r["machine"]: r for r in read_csv(tmp_path / "r" / "horizon_end.csv")}
    assert len(end) == 3
    zen4 = end[f"{ZEN4['machine']}, fp32"]
    assert float(zen4["diff_mean"]) == pytest.approx(-0.02) and zen4["n"] == "3"
    pooled = end["pooled over 2 kinds"]
    test = stats.ttest_1samp(list(diffs.values()), 0)
    assert pooled["n"] == "6" and float(pooled["p"]) == pytest.approx(test.pvalue)
    assert "one mean on every kind" in (tmp_path / "r" / "horizon_end.md").read_text()
    steps = [r for r in read_csv(tmp_path / "r" / "horizon.csv") if r["machine"] == "pooled over 2 kinds"]
    assert [int(r["step"]) for r in steps] == list(STEPS)


def test_mlm_only_runs_pair_only_with_mlm_only_static_runs(runs_root, tmp_path):
    """One directory holding both objectives under the same run names (two sweeps): each DynSparse
    run pairs with the static run of its own objective, never across."""
    for seed, (with_nsp, mlm_only) in enumerate(((-0.02, 0.01), (-0.03, 0.02), (-0.01, 0.03))):
        pair(runs_root / "nsp", seed, [6.0] * 4, [6.0 + with_nsp] * 4)
        pair(runs_root / "mlm", seed, [5.5] * 4, [5.5 + mlm_only] * 4, extra=("model.nsp=false",))
    build_report(runs_root, "horizon", tmp_path / "r")
    end = read_csv(tmp_path / "r" / "horizon_end.csv")
    assert sorted(float(r["diff_mean"]) for r in end) == pytest.approx([-0.02, 0.02])
    assert all(r["n"] == "3" for r in end)
    mlm = next(r for r in end if float(r["diff_mean"]) > 0)
    assert mlm["setting"] == "proxy_tiny_sparse (MLM only)" and mlm["baseline"] == "proxy_tiny_static (MLM only)"
    build_report(runs_root, "paired", tmp_path / "p")
    paired = {r["setting"]: r for r in read_csv(tmp_path / "p" / "paired.csv")}
    assert float(paired["proxy_tiny_sparse (MLM only)"]["diff_mean"]) == pytest.approx(0.02)
    assert paired["proxy_tiny_sparse (MLM only)"]["baseline"] == "proxy_tiny_static (MLM only)"
    assert float(paired["proxy_tiny_sparse"]["diff_mean"]) == pytest.approx(-0.02)


def test_horizon_needs_pairs(runs_root, tmp_path):
    make_run(runs_root, "proxy_tiny_sparse,seed=0", "proxy_tiny_sparse", 6.0, summary=ZEN4)
    make_run(runs_root, "proxy_tiny_static,seed=1", "proxy_tiny_static", 6.0, seed=1, summary=ZEN4)
    with pytest.raises(ReportError, match="none pair"):
        build_report(runs_root, "horizon", tmp_path / "r")


def pilot_run(root, name, config, loss, seed, overrides=(), curve=None):
    curve = curve or [loss + 0.3, loss + 0.1, loss + 0.02, loss]
    make_run(root, f"{name},seed={seed}", config, loss, seed=seed,
             overrides=("training.steps=4000", "training.warmup_steps=320") + tuple(overrides),
             summary={**ZEN4, "steps": 4000}, metrics=val_records(curve, (0.69, 0.6, 0.45, 0.3)))


def test_horizon_pilot_applies_the_rule(runs_root, tmp_path):
    losses = {  # (update_every, pruning_ratio): per-seed final loss
        (250, 0.25): (5.95, 5.97), (250, 0.5): (5.93, 5.95),  # mean 5.94: lowest, but seed 1001 overfits below
        (500, 0.25): (5.945, 5.9555), (500, 0.5): (5.96, 5.97),  # 5.95025: the best eligible
        (1000, 0.25): (5.9505, 5.9505), (1000, 0.5): (5.99, 5.99),  # 5.9505: within 0.001 of it: tie -> longer
    }
    for (every, pr), per_seed in losses.items():
        for seed, loss in zip((1000, 1001), per_seed):
            curve = [loss - 0.02, loss - 0.015, loss - 0.012, loss] if (every, pr, seed) == (250, 0.5, 1001) else None
            pilot_run(runs_root, f"perslot,update_every={every},pruning_ratio={pr}", "proxy_tiny_sparse", loss, seed,
                      (f"sparsity.update_every={every}", f"sparsity.pruning_ratio={pr}"), curve)
    pilot_run(runs_root, "rigl", "proxy_tiny_sparse", 5.5, 1000,
              ("sparsity.update_every=500", "sparsity.regrowth=gradient"))
    for seed, (s9, s5) in zip((1000, 1001), ((6.0, 5.9), (6.01, 5.92))):
        pilot_run(runs_root, "static,ratio=0.9", "proxy_tiny_static", s9, seed)
        pilot_run(runs_root, "static,ratio=0.5", "proxy_tiny_static", s5, seed, ("sparsity.ratio=0.5",))
    build_report(runs_root, "horizon_pilot", tmp_path / "r")
    assert_png(tmp_path / "r" / "horizon_pilot.png")
    rows = {(r["regrowth"], int(r["update_every"]), float(r["pruning_ratio"])): r
            for r in read_csv(tmp_path / "r" / "horizon_pilot.csv")}
    assert rows["random", 250, 0.5]["eligible"] == "False"  # rose 0.02 from its minimum in seed 1001
    assert float(rows["random", 250, 0.5]["max_val_rise"]) == pytest.approx(0.02)
    assert [k for k, r in rows.items() if r["chosen"] == "True"] == [("random", 1000, 0.25)]
    assert rows["gradient", 500, 0.5]["chosen"] == "False"  # RigL is shown, never chosen
    assert float(rows["random", 500, 0.25]["val_mlm_loss"]) == pytest.approx(5.95025)
    assert float(rows["random", 500, 0.25]["diff_vs_static"]) == pytest.approx(np.mean([5.945 - 6.0, 5.9555 - 6.01]))
    assert rows["random", 500, 0.25]["nsp_steps"] == "1000:1500 1001:1500"
    checks = read_csv(tmp_path / "r" / "horizon_pilot_checks.csv")
    gaps = [float(r["capacity_gap"]) for r in checks if r["capacity_gap"]]
    assert gaps == pytest.approx([0.1, 0.09])
