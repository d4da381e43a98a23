"""serving.ab.stats: bootstrap metrics, DeLong, Holm, SRM and verdicts on fabricated predictions (no TensorFlow)."""
import numpy as np
import pytest
from sklearn.metrics import log_loss, mean_absolute_error, roc_auc_score

from serving.ab import stats
from serving.ab.stats import HeadScores, Settings


def _binary(n, seed, signal=1.0, rounding=None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    p = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(size=n))))
    return y, (np.round(p, rounding) if rounding else p), rng


def _heads(y, pa, pb, kind="binary"):
    return {"kind": kind, "labels_a": y, "scores_a": pa, "labels_b": y, "scores_b": pb}


def test_resampled_metrics_equal_weighted_sklearn_metrics_with_ties():
    y, p, rng = _binary(3000, 0, rounding=2)  # rounding makes many ties
    head = HeadScores("binary", y, p)
    counts = stats.resample_counts(rng, len(y), 6)
    assert counts.shape == (3000, 6) and np.all(counts.sum(axis=0) == 3000)
    got = head.metrics(counts)
    for j in range(6):
        w = counts[:, j]
        assert got["auc"][j] == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)
        assert got["log_loss"][j] == pytest.approx(log_loss(y, p, sample_weight=w), rel=1e-5)
    point = head.metrics()
    assert point["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    # ECE from its definition: per bin |mean score - positive rate| weighted by the bin's share of rows.
    bins = np.minimum((p * 10).astype(int), 9)
    ece = sum(abs(p[bins == k].mean() - y[bins == k].mean()) * (bins == k).mean() for k in np.unique(bins))
    assert point["ece"] == pytest.approx(ece, abs=1e-12)
    reg = HeadScores("regression", rng.normal(size=500), rng.normal(size=500))
    assert reg.metrics()["mae"] == pytest.approx(mean_absolute_error(reg.y, reg.p))


def test_delong_auc_is_sklearns_and_variance_agrees_with_the_bootstrap():
    y, pa, rng = _binary(4000, 1)
    pb = np.clip(pa + rng.normal(scale=0.15, size=len(y)), 0, 1)
    auc, variance = stats.delong_auc_variance(y, pa)
    assert auc == pytest.approx(roc_auc_score(y, pa), abs=1e-12)
    boot = HeadScores("binary", y, pa).metrics(stats.resample_counts(rng, len(y), 2000))["auc"]
    assert boot.var() == pytest.approx(variance, rel=0.12)
    # Paired: the SE of AUC(B) - AUC(A) agrees with the paired bootstrap SE of the difference.
    test = stats.delong_paired(y, pa, pb)
    assert test["auc_b"] == pytest.approx(roc_auc_score(y, pb), abs=1e-12)
    diffs = stats.paired_bootstrap({"h": (HeadScores("binary", y, pa), HeadScores("binary", y, pb))}, 2000, 3)
    assert diffs["h"]["auc"].std() == pytest.approx(test["se"], rel=0.12)


def test_delong_paired_tests_the_mean_auc_of_several_models():
    y, pa, rng = _binary(3000, 4)
    seeds = np.vstack([np.clip(pa + rng.normal(scale=s, size=len(y)), 0, 1) for s in (0.1, 0.2, 0.3)])
    test = stats.delong_paired(y, pa, seeds)
    assert test["auc_b"] == pytest.approx(np.mean([roc_auc_score(y, p) for p in seeds]), abs=1e-12)
    # Copies of one model are that model: same AUC, same SE.
    one = stats.delong_paired(y, pa, seeds[1])
    same = stats.delong_paired(y, pa, np.vstack([seeds[1], seeds[1]]))
    assert same["diff"] == pytest.approx(one["diff"], abs=1e-12) and same["se"] == pytest.approx(one["se"], rel=1e-9)
    # The SE of the mean's difference agrees with the paired bootstrap of the mean AUC.
    counts = stats.resample_counts(rng, len(y), 1500)
    base = HeadScores("binary", y, pa).metrics(counts)["auc"]
    mean = np.mean([HeadScores("binary", y, p).metrics(counts)["auc"] for p in seeds], axis=0)
    assert (mean - base).std() == pytest.approx(test["se"], rel=0.12)


def test_holm_matches_a_hand_computed_case():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> max so far 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = stats.holm([0.02, float("nan"), 0.01])  # NaN is not a test: m = 2
    assert np.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.02)


def test_degraded_head_is_b_worse_and_unchanged_head_no_difference():
    y, p_income, rng = _binary(5000, 2)
    y2, p_marital, _ = _binary(5000, 3)
    noised = np.clip(p_income + rng.normal(scale=0.3, size=len(y)), 0, 1)
    level = rng.normal(size=5000)
    pred = level + rng.normal(scale=0.5, size=5000)
    heads = {"income": _heads(y, p_income, noised), "marital": _heads(y2, p_marital, p_marital),
             "level": _heads(level, pred, pred + rng.normal(scale=0.5, size=5000), kind="regression")}
    results = stats.compare(heads, Settings(resamples=300), paired=True)
    stats.judge([results], Settings())
    assert results["income"]["verdict"] == stats.B_WORSE
    assert results["income"]["metrics"]["auc"]["ci"][1] < 0
    assert results["level"]["verdict"] == stats.B_WORSE  # RMSE went up
    assert results["level"]["metrics"]["rmse"]["diff"] > 0
    marital = results["marital"]
    assert marital["verdict"] == stats.NO_DIFFERENCE
    for m in marital["metrics"].values():
        assert m["diff"] == 0 and m["ci"][0] <= 0 <= m["ci"][1]
    assert marital["test"]["p_holm"] == 1.0
    # The MDE is 2.80 x the bootstrap SE of the primary metric for one test; judged as a family of three heads,
    # z(1 - 0.05 / 6) + z(0.8) = 3.2356 (Holm's first step, its strictest level), where its test has 80 % power.
    income = results["income"]["test"]
    assert income["mde_per_test"] == pytest.approx(2.8016 * income["se_bootstrap"], rel=1e-3)
    assert income["tests_in_family"] == 3
    assert income["mde"] == pytest.approx(3.2356 * income["se_bootstrap"], rel=1e-3)
    # B better when the roles swap.
    swapped = stats.compare({"income": _heads(y, noised, p_income)}, Settings(resamples=100), paired=True)
    stats.judge([swapped], Settings())
    assert swapped["income"]["verdict"] == stats.B_BETTER


def test_bootstrap_is_reproducible_with_a_seed():
    y, pa, rng = _binary(2000, 4)
    pb = np.clip(pa + rng.normal(scale=0.1, size=len(y)), 0, 1)
    prepared = {"h": (HeadScores("binary", y, pa), HeadScores("binary", y, pb))}
    first = stats.paired_bootstrap(prepared, 50, seed=7)["h"]["auc"]
    again = stats.paired_bootstrap(prepared, 50, seed=7)["h"]["auc"]
    other = stats.paired_bootstrap(prepared, 50, seed=8)["h"]["auc"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_unpaired_comparison_finds_the_worse_arm():
    ya, pa, rng = _binary(4000, 5)
    yb, pb, _ = _binary(3000, 6, signal=0.3)  # the other arm's model separates the classes less
    results = stats.compare({"income": {"kind": "binary", "labels_a": ya, "scores_a": pa, "labels_b": yb,
                                        "scores_b": pb}}, Settings(resamples=200), paired=False)
    stats.judge([results], Settings())
    r = results["income"]
    assert r["rows_a"] == 4000 and r["rows_b"] == 3000
    assert r["test"]["method"] == "DeLong (unpaired)" and r["verdict"] == stats.B_WORSE


def test_sample_ratio_mismatch_flags_a_skewed_split_only():
    fractions = {"A": 0.9, "B": 0.1}
    ok = stats.sample_ratio_mismatch({"A": 9010, "B": 990}, fractions)
    assert not ok["flagged"] and ok["p_value"] > 0.05
    skewed = stats.sample_ratio_mismatch({"A": 8800, "B": 1200}, fractions)
    assert skewed["flagged"] and skewed["message"].startswith("SRM: do not trust this test")
    with pytest.raises(ValueError, match="arm\\(s\\) \\['C'\\]"):
        stats.sample_ratio_mismatch({"A": 1, "C": 2}, fractions)


def test_small_slices_are_marked_not_judged():
    y, p, _ = _binary(150, 7)
    results = stats.compare({"income": _heads(y, p, p)}, Settings(resamples=50, min_rows=200), paired=True)
    stats.judge([results], Settings())
    assert "metrics" not in results["income"]
    assert results["income"]["verdict"].startswith("too small: 150 rows")


def test_bad_input_is_rejected_with_a_clear_message():
    y, p, _ = _binary(100, 8)
    with pytest.raises(ValueError, match="99 predictions for 100 labelled rows"):
        stats.compare({"income": _heads(y, p, p[:99])}, Settings(resamples=20), paired=True)
    with pytest.raises(ValueError, match="labels other than 0 and 1"):
        stats.compare({"income": _heads(y + 0.5, p, p)}, Settings(resamples=20), paired=True)
    with pytest.raises(ValueError, match="NaN"):
        stats.compare({"income": _heads(np.r_[y[:-1], np.nan], p, p)}, Settings(resamples=20), paired=True)
    with pytest.raises(ValueError, match="resamples"):
        Settings(resamples=0)
