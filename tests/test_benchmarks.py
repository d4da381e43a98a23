"""The benchmark scripts' own arithmetic and a smoke run, so the report card cannot rot."""
import json
from pathlib import Path

import numpy as np
import pytest

from mmoe import InputFeature, ModelConfig, TaskSpec, build_model


def test_forward_flops_counts_experts_gates_mixtures_towers_and_heads():
    from benchmarks.train_speed import forward_flops

    features = [InputFeature("a"), InputFeature("b"), InputFeature("c", "categorical", vocab_size=10,
                                                                      embedding_dim=4)]
    tasks = [TaskSpec("t1"), TaskSpec("t2", "regression")]
    model = build_model(ModelConfig(arch="mmoe", num_experts=3, expert_units=(5, 7), tower_units=(2,)),
                        features, tasks)
    d = 2 + 4
    experts = 2 * (d * 5 + 5 * 7) * 3
    per_task = 2 * d * 3 + 2 * 3 * 7 + 2 * 7 * 2 + 2 * 2  # gate, mixture, tower, head
    assert forward_flops(model) == experts + 2 * per_task


def test_loop_expert_bank_computes_the_same_shape_as_the_fused_bank():
    from benchmarks.train_speed import loop_expert_bank_class

    bank = loop_expert_bank_class()(4, [6, 3])
    out = bank(np.zeros((5, 8), "float32"))
    assert tuple(out.shape) == (5, 4, 3)


def test_synthetic_benchmark_runs_and_plots(tmp_path, capsys):
    from benchmarks.synthetic import main

    assert main(["--rhos", "0.5", "1.0", "--seeds", "1", "--n", "512", "--dim", "8", "--epochs", "2",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "synthetic_loss.png").stat().st_size > 5000
    curves = json.loads((tmp_path / "synthetic.json").read_text())["curves"]
    assert set(curves) == {f"{rho}/{m}" for rho in (0.5, 1.0) for m in ("shared_bottom", "omoe", "mmoe")}
    assert all(len(c) == 2 and np.isfinite(c).all() for c in curves.values())
    assert "| 0.5 |" in capsys.readouterr().out


def test_coordinate_search_keeps_a_change_only_when_it_scores_higher():
    from benchmarks.census_quality import coordinate_search

    scores = {(1, "a"): 0.5, (2, "a"): 0.7, (3, "a"): 0.6, (2, "b"): 0.65}
    tried = []

    def score(s):
        tried.append((s["x"], s["y"]))
        return scores[(s["x"], s["y"])]

    best, table = coordinate_search([("x", [{"x": 1}, {"x": 2}, {"x": 3}]), ("y", [{"y": "a"}, {"y": "b"}])],
                                    {"x": 1, "y": "a"}, score)
    assert best == {"x": 2, "y": "a"}  # y=b scored lower than the point it started from
    assert tried == [(1, "a"), (2, "a"), (3, "a"), (2, "b")]  # the current point is never scored twice
    assert [row[0] for row in table] == ["start", "x", "x", "y"]


def test_run_cache_computes_once_and_survives_a_restart(tmp_path):
    from benchmarks.run_cache import RunCache

    calls = []
    cache = RunCache(tmp_path / "runs.json")
    assert cache.get({"seed": 0, "arch": "mmoe"}, lambda: calls.append(1) or {"auc": 0.9}) == {"auc": 0.9}
    again = RunCache(tmp_path / "runs.json")
    assert again.get({"arch": "mmoe", "seed": 0}, lambda: calls.append(1) or {"auc": 0.1}) == {"auc": 0.9}
    assert calls == [1]
    fresh = RunCache(tmp_path / "runs.json", fresh=True)
    assert fresh.get({"arch": "mmoe", "seed": 0}, lambda: 0.1) == 0.1
    again.get({"arch": "mmoe", "seed": 1}, lambda: 0.5)
    # The fresh cache read the file back when it saved, old runs included; it still recomputes them.
    assert fresh.get({"arch": "mmoe", "seed": 1}, lambda: 0.6) == 0.6
    assert fresh.get({"arch": "mmoe", "seed": 1}, lambda: 0.7) == 0.6


def _add_runs(path, worker, count):
    from benchmarks.run_cache import RunCache

    cache = RunCache(path)
    for i in range(count):
        cache.get({"worker": worker, "i": i}, lambda: {"pad": "x" * 1000})


def test_run_cache_commands_saving_at_once_lose_no_run(tmp_path):
    # Two processes saving to one file: each save is read-merge-write under a lock, so none overwrites the other's
    # runs (without the lock some are lost: the file is large enough that the writes overlap).
    import multiprocessing

    path = tmp_path / "runs.json"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_runs, args=(path, w, 60)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert len(json.loads(path.read_text())) == 180


def test_gradient_boosting_anchor_stops_at_its_best_validation_iteration():
    from benchmarks import census_quality
    from mmoe import InputFeature
    from mmoe.training import TaskData

    rng = np.random.default_rng(0)

    def split(n):
        a, c = rng.normal(size=n), rng.integers(0, 5, size=n)
        y = ((a + (c == 2) + 0.8 * rng.normal(size=n)) > 0.5).astype("float32")
        return TaskData({"a": a.astype("float32"), "c": c.astype("int32")}, {"t": y})

    features = [InputFeature("a"), InputFeature("c", "categorical", vocab_size=5)]
    splits = {"train": split(600), "valid": split(300), "test": split(300)}
    r = census_quality.hgb_fit(features, splits, "t", {"learning_rate": 0.3, "max_leaf_nodes": 31})
    assert 0.7 < r["valid"] <= 1 and 0.7 < r["test"] <= 1
    # Noisy labels and a high learning rate: the best iteration comes early, and the fit stopped
    # HGB_PATIENCE iterations after it instead of growing all HGB_MAX_ITER trees.
    assert r["iterations"] < census_quality.HGB_MAX_ITER - census_quality.HGB_PATIENCE


def test_zero_buckets_give_zero_its_own_id_and_quantiles_over_the_rest():
    from benchmarks.census_quality import _quantile_buckets, zero_buckets

    # A money column: 90% zeros (here the z-scored zero, -0.3), then a long tail.
    train = np.concatenate([np.full(900, -0.3), np.linspace(1.0, 100.0, 100)]).astype("float32")
    plain, plain_size = _quantile_buckets(train, train, 8)
    assert plain_size <= 3  # the zeros swallow almost every quantile boundary
    ids, size = zero_buckets(train, np.array([-0.3, -5.0, 1.0, 50.0, 100.0, 1e6], "float32"), 8)
    assert size == 9  # zero + 8 quantile buckets of the non-zero values
    assert ids.tolist()[:2] == [0, 0]  # zero, and anything below the training minimum
    assert ids.tolist()[2:] == [1, 4, 8, 8]  # boundaries 13.4, 25.8, 38.1, 50.5, ...; 1e6 in the last
    all_ids, _ = zero_buckets(train, train, 8)
    counts = np.bincount(all_ids)
    assert counts[0] == 900 and len(counts) == 9 and set(counts[1:]) == {12, 13}  # even over the non-zeros


def test_money_log_is_scale_free_and_compresses_the_tail():
    from benchmarks.census_quality import money_log

    amounts = np.concatenate([np.zeros(90), np.array([10.0, 20.0, 50.0, 100.0, 100.0, 200.0, 500.0, 1e3, 1e4, 1e5])])
    z = ((amounts - amounts.mean()) / amounts.std()).astype("float32")
    out = money_log(z, z)
    # The same as z-scoring log1p(amount / median non-zero amount): the arrays' own scaling does not matter.
    expected = np.log1p(amounts / 150.0)
    np.testing.assert_allclose(out, (expected - expected.mean()) / expected.std(), atol=1e-4)
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4
    # The tail is compressed: 1e3 -> 1e4 -> 1e5 are two equal steps, not a 10x larger second one.
    assert (z[-1] - z[-2]) / (z[-2] - z[-3]) > 9
    assert 0.9 < (out[-1] - out[-2]) / (out[-2] - out[-3]) < 1.1
    assert np.all(np.diff(out[90:]) >= 0)  # monotone, so quantile bucket ids are unchanged


def test_numeric_inputs_money_modes_touch_only_the_money_columns():
    from benchmarks.census_quality import numeric_inputs
    from mmoe.training import TaskData

    rng = np.random.default_rng(0)

    def split(n):
        gains = np.where(rng.random(n) < 0.9, 0.0, rng.lognormal(8, 1, n)).astype("float32")
        return TaskData({"age": rng.normal(size=n).astype("float32"), "capital_gains": gains},
                        {"t": rng.integers(0, 2, n).astype("float32")})

    features = [InputFeature("age"), InputFeature("capital_gains")]
    splits = {"train": split(2000), "valid": split(500)}
    plain_f, plain = numeric_inputs(features, splits, "both", 16)
    f, out = numeric_inputs(features, splits, "both", 16, money="log_zero")
    sizes = {x.name: x.vocab_size for x in f}
    assert sizes["capital_gains_bucket"] == 17 > {x.name: x.vocab_size for x in plain_f}["capital_gains_bucket"]
    assert sizes["age_bucket"] == 16
    for k in splits:
        np.testing.assert_array_equal(out[k].inputs["age"], splits[k].inputs["age"])
        np.testing.assert_array_equal(out[k].inputs["age_bucket"], plain[k].inputs["age_bucket"])
        assert not np.allclose(out[k].inputs["capital_gains"], splits[k].inputs["capital_gains"])
        zero = splits[k].inputs["capital_gains"] == 0
        assert np.all(out[k].inputs["capital_gains_bucket"][zero] == 0)
        assert np.all(out[k].inputs["capital_gains_bucket"][~zero] > 0)
    # "log" alone leaves the bucket ids as they were; the z-scored input alone ("zscore") is still log-scaled.
    _, log_only = numeric_inputs(features, splits, "both", 16, money="log")
    np.testing.assert_array_equal(log_only["train"].inputs["capital_gains_bucket"],
                                  plain["train"].inputs["capital_gains_bucket"])
    zf, zs = numeric_inputs(features, splits, "zscore", 16, money="log")
    assert [x.name for x in zf] == ["age", "capital_gains"]
    np.testing.assert_array_equal(zs["valid"].inputs["capital_gains"], out["valid"].inputs["capital_gains"])


def test_anchor_money_buckets_are_cached_apart_and_reported_with_the_best_anchor(tmp_path):
    from benchmarks.census_quality import RunCache, best_anchor, gradient_boosting_anchor
    from mmoe.training import TaskData

    rng = np.random.default_rng(0)

    def split(n):
        gains = np.where(rng.random(n) < 0.8, 0.0, rng.lognormal(3, 1, n)).astype("float32")
        y = ((gains > 20) | (rng.random(n) < 0.1)).astype("float32")
        return TaskData({"capital_gains": gains}, {"t": y}, np.ones(n, "float32"))

    features, tasks = [InputFeature("capital_gains")], [TaskSpec("t")]
    splits = {"train": split(400), "valid": split(200), "test": split(200)}
    cache = RunCache(tmp_path / "runs.json")
    reports = [gradient_boosting_anchor(features, tasks, splits, cache, {"group": 0}, False, 1, print,
                                        numeric="both", numeric_buckets=8, money=money) for money in ("plain", "zero")]
    keys = [json.loads(k) for k in cache.runs]
    assert [k.get("money") for k in keys] == [None, "zero"]  # two runs, not one cached answer for both
    best = best_anchor(reports, tasks)
    chosen = max(reports, key=lambda r: r["valid"]["t"]["mean"])
    assert best["settings"]["t"].get("money", "plain") == chosen["money"]
    assert best["test"]["t"] == chosen["test"]["t"]


def test_synthetic_runs_come_from_the_cache_and_more_seeds_train_only_the_new_ones(tmp_path, capsys, monkeypatch):
    from benchmarks import synthetic

    trained = []

    def fake_run(model_name, rho, seed, args, learning_rate):
        trained.append((model_name, rho, seed))
        return np.linspace(1.0, 0.1 + 0.01 * seed, args.epochs), 7

    monkeypatch.setattr(synthetic, "run", fake_run)
    argv = ["--rhos", "0.5", "1.0", "--models", "omoe", "mmoe", "--epochs", "3", "--out", str(tmp_path)]
    assert synthetic.main(argv + ["--seeds", "2"]) == 0
    assert len(trained) == 2 * 2 * 2
    assert synthetic.main(argv + ["--seeds", "3"]) == 0
    assert sorted(trained[8:]) == sorted((m, rho, 2) for m in ("omoe", "mmoe") for rho in (0.5, 1.0))
    out = capsys.readouterr().out
    assert "4 of 12 runs trained by this command" in out
    runs = json.loads((tmp_path / "synthetic.json").read_text())["runs"]
    assert [c[-1] for c in runs["0.5/mmoe"]] == pytest.approx([0.1, 0.11, 0.12])  # cached seeds kept their curves
    # Another setting (here the learning rate) is another run, and --fresh retrains.
    assert synthetic.main(argv + ["--seeds", "1", "--learning-rate", "0.003"]) == 0
    assert synthetic.main(argv + ["--seeds", "1", "--fresh"]) == 0
    assert len(trained) == 12 + 4 + 4


# Any existing file passes census_quality's --arrays check: the tests that give it replace prepare_arrays.
FAKE_ARRAYS = __file__


def _one_file_census_arrays(monkeypatch, census_quality, data):
    """Makes census_quality.prepare_arrays return group 1 (income, marital) with `data` as every split."""
    protocol = {"name": "single-file split", "split": "60/20/20", "seed": 0,
                "rows": {"train": 8, "valid": 8, "test": 8}}
    monkeypatch.setattr(census_quality, "prepare_arrays", lambda path: (
        1, [InputFeature("a")], [TaskSpec("income"), TaskSpec("marital")],
        {"train": data, "valid": data, "test": data}, protocol))


def test_refine_tunes_the_other_architectures_from_the_chosen_settings(tmp_path, monkeypatch):
    from benchmarks import census_quality
    from mmoe.training import TaskData

    for arch in ("single_task", "shared_bottom", "omoe", "ple"):
        for _, changes in census_quality.refine_axes(arch):
            for change in changes:
                ModelConfig(**{**{k: v for k, v in census_quality.BASE.items() if k not in census_quality.TRAIN_KEYS},
                               "arch": arch, **change})  # every candidate is a valid model setting

    rng = np.random.default_rng(0)
    data = TaskData({"a": rng.normal(size=8).astype("float32")}, {"income": np.zeros(8), "marital": np.ones(8)})
    _one_file_census_arrays(monkeypatch, census_quality, data)

    def fake_train(arch, settings, *args, **kwargs):
        # Validation prefers a larger learning rate for OMoE only; test AUC tells the seeds apart.
        auc = 0.9 + (0.01 * settings["learning_rate"] if arch == "omoe" else 0)
        seed = args[3]
        scores = {"income": {"auc": auc + seed * 1e-4}, "marital": {"auc": 0.99}}
        return {"valid": scores, "test": scores, "epochs": 3, "seconds": 0.1, "params": 10}

    monkeypatch.setattr(census_quality, "train_once", fake_train)
    out = tmp_path / "report.json"
    assert census_quality.main(["--arrays", FAKE_ARRAYS, "--archs", "mmoe", "omoe", "--seeds", "2", "--no-anchor",
                                "--refine", "--cache", str(tmp_path / "runs.json"), "--out", str(out)]) == 0
    archs = json.loads(out.read_text())["groups"]["1"]["archs"]
    chosen = census_quality.key_settings({**census_quality.TRAIN_DEFAULTS, **census_quality.SEARCHED[(1, "mmoe")]})
    # Both start from MMoE's chosen settings; only OMoE's validation score prefers another learning rate.
    assert archs["mmoe"]["settings"] == chosen and archs["mmoe"]["refined"]
    # (3e-3, the largest refine candidate, then 5e-3 from the edge pass past it.)
    assert archs["omoe"]["refined"] and archs["omoe"]["settings"] == {**chosen, "learning_rate": 5e-3}
    for arch in ("mmoe", "omoe"):
        rows = archs[arch]["search"]
        assert rows[0]["axis"] == "refine: start" and rows[0]["learning_rate"] == 2e-3
        assert {"refine: learning_rate", "refine: expert_units", "refine: num_experts"} <= {r["axis"] for r in rows}
    assert archs["omoe"]["test"]["income"]["runs"] == 2


def test_refine_edge_pass_tries_one_step_past_a_choice_at_the_end_of_its_range(tmp_path, monkeypatch):
    from benchmarks import census_quality
    from mmoe.training import TaskData

    model_keys = {k: v for k, v in census_quality.BASE.items() if k not in census_quality.TRAIN_KEYS}
    for arch in ("mmoe", "single_task", "shared_bottom", "omoe", "ple"):
        for axis, _ in census_quality.refine_axes(arch):
            for past in filter(None, census_quality.REFINE_BEYOND[axis]):
                ModelConfig(**{**model_keys, "arch": arch, **past})  # a valid model

    data = TaskData({"a": np.zeros(8, "float32")}, {"income": np.zeros(8), "marital": np.ones(8)})
    _one_file_census_arrays(monkeypatch, census_quality, data)

    def fake_train(arch, settings, *args, **kwargs):
        # Validation rises with the learning rate without limit; nothing else changes it.
        scores = {"income": {"auc": 0.9 + 10 * settings["learning_rate"]}, "marital": {"auc": 0.99}}
        return {"valid": scores, "test": scores, "epochs": 3, "seconds": 0.1, "params": 10}

    monkeypatch.setattr(census_quality, "train_once", fake_train)
    out = tmp_path / "report.json"
    assert census_quality.main(["--arrays", FAKE_ARRAYS, "--archs", "mmoe", "--seeds", "1", "--no-anchor", "--refine",
                                "--cache", str(tmp_path / "runs.json"), "--out", str(out)]) == 0
    mmoe = json.loads(out.read_text())["groups"]["1"]["archs"]["mmoe"]
    # 3e-3, the last of the refine's learning rates, won; the edge pass tried 5e-3 past it and kept it.
    assert mmoe["settings"]["learning_rate"] == 5e-3
    edge_rows = [r for r in mmoe["search"] if r["axis"].endswith(" edge")]
    assert [(r["axis"], r["learning_rate"]) for r in edge_rows][0] == ("refine: learning_rate edge", 5e-3)
    # The tower stayed at (32,), the first of its candidates, so (16,) was tried and, scoring no higher, not kept;
    # axes chosen inside their range (8 experts of 4/8/16, 64 units) or left at the start (no bins) got no edge.
    assert {r["axis"] for r in edge_rows} == {"refine: learning_rate edge", "refine: tower_units edge"}
    assert next(r for r in edge_rows if r["axis"] == "refine: tower_units edge")["tower_units"] == [16]
    assert mmoe["settings"]["tower_units"] == [32] and mmoe["settings"]["num_experts"] == 8
    assert sum(r["axis"] == "refine: start" for r in mmoe["search"]) == 1


def test_select_seeds_scores_each_refine_point_on_the_mean_of_its_seeds(tmp_path, monkeypatch, capsys):
    from benchmarks import census_quality
    from mmoe.training import TaskData

    data = TaskData({"a": np.zeros(8, "float32")}, {"income": np.zeros(8), "marital": np.ones(8)})
    _one_file_census_arrays(monkeypatch, census_quality, data)
    trained = []

    def fake_train(arch, settings, *args, **kwargs):
        # Learning rate 1e-3 wins on seed 0 by chance and loses on seed 1 by more: only one seed picks it.
        seed = args[3]
        trained.append((json.dumps(settings, sort_keys=True), seed))
        auc = 0.9 + ({0: 0.01, 1: -0.03}.get(seed, 0.0) if settings["learning_rate"] == 1e-3 else 0.0)
        scores = {"income": {"auc": auc}, "marital": {"auc": 0.99}}
        return {"valid": scores, "test": scores, "epochs": 3, "seconds": 0.1, "params": 10}

    monkeypatch.setattr(census_quality, "train_once", fake_train)
    chosen = {}
    for select in (1, 2):
        out = tmp_path / f"select{select}.json"
        assert census_quality.main(["--arrays", FAKE_ARRAYS, "--archs", "mmoe", "--seeds", "1", "--no-anchor", "--refine",
                                    "--select-seeds", str(select), "--cache", str(tmp_path / "runs.json"),
                                    "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        chosen[select] = report["groups"]["1"]["archs"]["mmoe"]
        assert report["select_seeds"] == select
    assert chosen[1]["settings"]["learning_rate"] == 1e-3
    assert chosen[2]["settings"]["learning_rate"] == 2e-3  # the searched point, kept
    row = next(r for r in chosen[2]["search"] if r["axis"] == "refine: learning_rate" and r["learning_rate"] == 1e-3)
    assert row["valid_auc"] == pytest.approx(0.9 - 0.01)
    # No run was trained twice: the second command took every seed-0 run it shared with the first from the cache.
    assert len(set(trained)) == len(trained) and any(seed == 1 for _, seed in trained)
    assert "refine: mean of seeds 0-1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        census_quality.main(["--arrays", FAKE_ARRAYS, "--select-seeds", "0", "--out", str(tmp_path / "x.json")])


def _learnable_census_splits(monkeypatch, census_quality, rng, test_rows):
    """Makes census_quality.prepare_arrays return group 1 with 600 / 300 / `test_rows` rows whose income and marital
    labels follow the one input `a` (so the real anchor learns them); returns the splits."""
    from mmoe.training import TaskData

    def split(n):
        a = rng.normal(size=n).astype("float32")
        labels = {"income": (a + rng.normal(scale=1.0, size=n) > 0.5).astype("float32"),
                  "marital": (a + rng.normal(scale=1.0, size=n) > 0).astype("float32")}
        return TaskData({"a": a}, labels, np.ones(n, dtype="float32"))

    splits = {"train": split(600), "valid": split(300), "test": split(test_rows)}
    protocol = {"name": "single-file split", "split": "60/20/20", "seed": 0,
                "rows": {"train": 600, "valid": 300, "test": test_rows}}
    monkeypatch.setattr(census_quality, "prepare_arrays", lambda path: (
        1, [InputFeature("a")], [TaskSpec("income"), TaskSpec("marital")], splits, protocol))
    return splits


def test_significance_tests_the_seeds_mean_auc_against_the_refitted_anchor(tmp_path, monkeypatch, capsys):
    from benchmarks import census_quality
    from mmoe.training import roc_auc

    rng = np.random.default_rng(0)
    splits = _learnable_census_splits(monkeypatch, census_quality, rng, 1500)
    test_labels = splits["test"].labels
    calls = []

    def fake_train(arch, settings, features, tasks, data, seed, *args, test_scores=False, **kwargs):
        # Income: the labels themselves, noised (far above the trees); marital: noise (far below).
        scores = {"income": test_labels["income"] + rng.normal(scale=0.3, size=1500),
                  "marital": rng.random(1500)}
        aucs = {t: {"auc": 0.5} for t in scores}  # the cached and retrained AUCs agree: no warning
        calls.append((seed, test_scores))
        out = {"valid": aucs, "test": aucs, "epochs": 1, "seconds": 0.1, "params": 1}
        return {**out, "test_scores": scores} if test_scores else out

    monkeypatch.setattr(census_quality, "train_once", fake_train)
    out = tmp_path / "report.json"
    assert census_quality.main(["--arrays", FAKE_ARRAYS, "--archs", "mmoe", "--seeds", "3", "--significance",
                                "--cache", str(tmp_path / "runs.json"), "--out", str(out)]) == 0
    assert calls == [(0, False), (1, False), (2, False), (0, True), (1, True), (2, True)]
    vs = json.loads(out.read_text())["groups"]["1"]["archs"]["mmoe"]["vs_anchor"]
    assert vs["income"]["diff"] > 0 and vs["income"]["p_value"] < 1e-6 and vs["income"]["ci"][0] > 0
    assert vs["marital"]["diff"] < 0 and vs["marital"]["ci"][1] < 0
    assert vs["marital"]["detectable"] == pytest.approx(census_quality.detectable_difference(vs["marital"]["se"]))
    printed = capsys.readouterr().out
    assert "Against the anchor" in printed and f"| {vs['marital']['detectable']:.5f} |" in printed
    with pytest.raises(SystemExit):
        census_quality.main(["--arrays", FAKE_ARRAYS, "--significance", "--no-anchor", "--out", str(out)])
    assert "drop --no-anchor" in capsys.readouterr().err
    # The difference is the seeds' mean AUC minus the anchor's, on the same rows.
    anchor = {"income": rng.random(1500), "marital": rng.random(1500)}
    seeds = [{t: rng.random(1500) for t in anchor} for _ in range(2)]
    direct = census_quality.versus_anchor(test_labels, anchor, seeds)
    for t in anchor:
        want = np.mean([roc_auc(test_labels[t], s[t]) for s in seeds]) - roc_auc(test_labels[t], anchor[t])
        assert direct[t]["diff"] == pytest.approx(want, abs=1e-12)


def test_detectable_difference_is_found_significant_four_times_in_five():
    from benchmarks.census_quality import detectable_difference

    # A true difference of exactly the detectable size, measured with that SE: a two-sided 5 % test finds it
    # in 80 % of repetitions (power); half of it, in about 29 %.
    se, rng = 0.00007, np.random.default_rng(0)
    for true, power in ((detectable_difference(se), 0.80), (detectable_difference(se) / 2, 0.29)):
        measured = rng.normal(true, se, size=200_000)
        assert np.mean(np.abs(measured / se) > 1.959964) == pytest.approx(power, abs=0.01)


def test_refit_retrains_every_run_on_train_and_valid_for_the_epochs_early_stopping_chose(tmp_path, monkeypatch,
                                                                                        capsys):
    from benchmarks import census_quality
    from mmoe.training import TaskData

    rng = np.random.default_rng(0)
    splits = _learnable_census_splits(monkeypatch, census_quality, rng, 500)

    def fake_train(arch, settings, features, tasks, data, seed, *args, **kwargs):
        aucs = {"income": {"auc": 0.9}, "marital": {"auc": 0.99}}
        return {"valid": aucs, "test": aucs, "epochs": seed + 7, "best_epoch": seed + 3, "seconds": 0.1, "params": 1}

    refits = []

    def fake_refit(arch, settings, features, tasks, data, seed, epochs, test_scores=False):
        refits.append((seed, epochs))
        out = {"test": {"income": {"auc": 0.95 + seed * 1e-3}, "marital": {"auc": 0.995}}, "epochs": epochs,
               "rows": 900, "seconds": 0.1}
        # For --significance: income scores are the labels themselves (far above the trees), marital noise.
        scores = {"income": data["test"].labels["income"] + rng.normal(scale=0.1, size=500),
                  "marital": rng.random(500)}
        return {**out, "test_scores": scores} if test_scores else out

    monkeypatch.setattr(census_quality, "train_once", fake_train)
    monkeypatch.setattr(census_quality, "refit_once", fake_refit)
    out, cache = tmp_path / "report.json", str(tmp_path / "runs.json")
    argv = ["--arrays", FAKE_ARRAYS, "--archs", "mmoe", "--seeds", "3", "--refit", "--cache", cache, "--out", str(out)]
    assert census_quality.main(argv) == 0
    # Each seed refitted for the epoch its own early stopping kept, not the epochs it ran.
    assert refits == [(0, 3), (1, 4), (2, 5)]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure beside the report
    group = json.loads(out.read_text())["groups"]["1"]
    refit = group["archs"]["mmoe"]["refit"]
    assert refit["epochs"] == [3, 4, 5] and refit["test"]["income"]["mean"] == pytest.approx(0.951)
    # The anchor refitted for the iterations it chose, on the 900 training and validation rows.
    anchor = group["hist_gradient_boosting"]
    for i, t in enumerate(("income", "marital")):
        assert anchor["refit"]["iterations"][t] == anchor["runs"][i][t][0]["iterations"]
    shown = capsys.readouterr().out
    assert "retrained on the training and validation rows together (900)" in shown
    assert "| mmoe (3 seeds) | 0.9510 ± 0.0010 | 0.9520 | 0.99500 ± 0.00000 | 0.99500 | 3-5 |" in shown
    # A second command takes the refits from the run cache; --significance refits again for the predictions and
    # tests them against the refitted anchor's.
    assert census_quality.main(argv) == 0 and len(refits) == 3
    monkeypatch.setattr(census_quality, "train_once", lambda *a, test_scores=False, **k: {
        **fake_train(*a, **k), **({"test_scores": {"income": rng.random(500), "marital": rng.random(500)}}
                                  if test_scores else {})})
    assert census_quality.main(argv + ["--significance"]) == 0 and refits[3:] == [(0, 3), (1, 4), (2, 5)]
    vs = json.loads(out.read_text())["groups"]["1"]["archs"]["mmoe"]["refit"]["vs_anchor"]
    assert vs["income"]["diff"] > 0 and vs["income"]["ci"][0] > 0 and vs["marital"]["ci"][1] < 0
    assert "| mmoe (refit, against the refitted anchor) | +" in capsys.readouterr().out
    # The anchor's refit is hgb_fit's model at the same iterations, trained on more rows.
    params = {"learning_rate": 0.1, "max_leaf_nodes": 31}
    merged = {"train": TaskData.concat([splits["train"], splits["valid"]]), "test": splits["test"]}
    alone = census_quality.hgb_refit([InputFeature("a")], {"train": splits["train"], "test": splits["test"]},
                                     "income", params, 40)
    together = census_quality.hgb_refit([InputFeature("a")], merged, "income", params, 40)
    assert (alone["rows"], together["rows"]) == (600, 900) and alone["test"] != together["test"]


def _census_report(group, tasks, mmoe_test, mmoe_refit, anchor_test, anchor_refit):
    """A census_quality report of one group: MMoE's runs (test AUC per seed, per task) and the anchor's."""
    def runs(aucs):
        return [{"test": {t: {"auc": aucs[t][i]} for t in tasks}} for i in range(len(aucs[tasks[0]]))]

    def mean(values):
        return {t: {"mean": v} for t, v in values.items()}

    return {"protocol": {"name": "single-file split", "split": "60/20/20", "seed": 0},
            "groups": {str(group): {
                "tasks": tasks,
                "archs": {"mmoe": {"runs": runs(mmoe_test), "refit": {"runs": runs(mmoe_refit)}}},
                "hist_gradient_boosting": {"runs": [{t: [{"test": anchor_test[t]}]} for t in tasks],
                                           "test": mean(anchor_test), "refit": {"test": mean(anchor_refit)}}}}}


def test_census_plot_draws_every_seed_the_anchor_and_the_targets(tmp_path):
    from benchmarks import census_quality

    g1 = _census_report(1, ["income", "marital"],
                        mmoe_test={"income": [0.9490, 0.9495, 0.9486], "marital": [0.99483, 0.99480, 0.99490]},
                        mmoe_refit={"income": [0.9502, 0.9509, 0.9497], "marital": [0.99485, 0.99479, 0.99492]},
                        anchor_test={"income": 0.9469, "marital": 0.99481},
                        anchor_refit={"income": 0.9483, "marital": 0.99482})
    g2 = _census_report(2, ["education", "marital"],
                        mmoe_test={"education": [0.8928, 0.8925], "marital": [0.99479, 0.99484]},
                        mmoe_refit={"education": [0.8935, 0.8937], "marital": [0.99478, 0.99487]},
                        anchor_test={"education": 0.8921, "marital": 0.99481},
                        anchor_refit={"education": 0.8922, "marital": 0.99481})
    fig = census_quality.plot(census_quality.merge_reports([g2, g1]), tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    income, marital, education = fig.axes[0], fig.axes[1], fig.axes[2]  # groups in order, whatever the order given
    assert (income.get_title(), education.get_title()) == ("group 1: income", "group 2: education")

    from matplotlib.collections import PathCollection

    def dots(ax):
        return sorted(float(y) for c in ax.collections if isinstance(c, PathCollection) for _, y in c.get_offsets())

    def lines(ax):
        return {round(float(line.get_ydata()[0]), 6) for line in ax.get_lines()}

    # Every seed of both protocols and the anchor's two runs are dots; the anchor's AUCs also run across.
    report_income = [0.9490, 0.9495, 0.9486, 0.9502, 0.9509, 0.9497, 0.9469, 0.9483]
    assert dots(income) == pytest.approx(sorted(report_income))
    assert {0.9469, 0.9483} <= lines(income)
    # The income target (0.950) lies among the runs: a line. Marital's (0.994) would flatten the seeds: a note.
    assert 0.95 in lines(income) and 0.994 not in lines(marital)
    assert any("target 0.994: below" in text.get_text() for text in marital.texts)
    assert dots(education) == pytest.approx(sorted([0.8928, 0.8925, 0.8935, 0.8937, 0.8921, 0.8922]))


def test_census_plot_command_merges_finished_reports_and_refuses_mismatches(tmp_path, capsys):
    from benchmarks import census_quality

    report = _census_report(1, ["income", "marital"], {"income": [0.95], "marital": [0.99]},
                            {"income": [0.95], "marital": [0.99]}, {"income": 0.94, "marital": 0.99},
                            {"income": 0.94, "marital": 0.99})
    (tmp_path / "g1.json").write_text(json.dumps(report))
    out = tmp_path / "both.json"
    assert census_quality.main(["--plot", str(tmp_path / "g1.json"), "--out", str(out)]) == 0
    assert (tmp_path / "both.png").exists() and not out.exists()  # the figure only; nothing trained or rewritten
    other = {**report, "protocol": {"name": "paper (two files)"}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    for reports, message in [(["g1.json", "other.json"], "protocols differ"),
                             (["g1.json", "g1.json"], "task group 1 is in more than one report"),
                             (["missing.json"], "No such file")]:
        with pytest.raises(SystemExit) as exit_info:
            census_quality.main(["--plot", *(str(tmp_path / r) for r in reports), "--out", str(out)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_refit_once_trains_on_both_splits_and_best_epoch_matches_what_early_stopping_kept():
    from benchmarks import census_quality
    from mmoe.training import TaskData

    rng = np.random.default_rng(1)

    def split(n, noise):
        a = rng.normal(size=n).astype("float32")
        y = (a + noise * rng.normal(size=n) > 0).astype("float32")
        return TaskData({"a": a}, {"t": y, "u": y}, np.ones(n, dtype="float32"))

    # Validation labels are nearly noise, so early stopping ends the run before its 12 epochs.
    splits = {"train": split(512, 0.3), "valid": split(256, 30.0), "test": split(256, 0.3)}
    features, tasks = [InputFeature("a")], [TaskSpec("t"), TaskSpec("u")]
    settings = {**census_quality.TRAIN_DEFAULTS, **census_quality.BASE, "batch_size": 64, "num_experts": 2,
                "expert_units": (4,), "tower_units": (4,), "learning_rate": 0.05}
    run = census_quality.train_once("mmoe", settings, features, tasks, splits, 0, 12, patience=2)
    assert run["epochs"] < 12 and 1 <= run["best_epoch"] <= run["epochs"]
    # What the refit of a cached run without `best_epoch` derives is what the run recorded.
    legacy = {k: v for k, v in run.items() if k != "best_epoch"}
    assert census_quality.best_epoch(legacy, 12, 2) == run["best_epoch"] == census_quality.best_epoch(run, 12, 2)
    assert census_quality.best_epoch({"epochs": 12}, 12, 2) is None  # used every epoch: unknown
    refit = census_quality.refit_once("mmoe", settings, features, tasks, splits, 0, run["best_epoch"])
    assert refit["rows"] == 768 and refit["epochs"] == run["best_epoch"]
    assert 0.8 < refit["test"]["t"]["auc"] <= 1


def test_serving_table_reports_the_batching_gain_and_the_best_batch_256_cell(capsys):
    from benchmarks.serving import GRPC_CELLS, print_table

    assert sorted(GRPC_CELLS) == sorted((b, c) for b in (1, 32, 256) for c in (1, 8, 32))  # the matrix

    def cell(throughput):
        return {"p50": 1.0, "p99": 2.0, "throughput": throughput, "server_cpu_ms": 0.5, "client_cpu_ms": 0.2}

    rows = [("grpc", 1, 32, "xla", cell(1000.0)), ("grpc batching", 1, 32, "xla", cell(2500.0)),
            ("grpc", 256, 1, "xla", cell(90_000.0)), ("grpc", 256, 8, "xla", cell(120_000.0)),
            ("grpc batching", 256, 32, "xla", cell(110_000.0)), ("in-process", 256, 1, "xla", cell(500_000.0))]
    print_table(rows, cores=2)
    out = capsys.readouterr().out
    # Cores busy: requests/s x (server + client CPU per request), 2,500 x 0.7 ms and 1,000 x 0.7 ms.
    assert "xla: 32 batch-1 clients, batching on/off throughput = 2.50x (server + clients keep 1.8 / 0.7 of 2 cores " \
        "busy)" in out
    assert "xla: batch 256 over gRPC, best 120,000 examples/s (grpc, 8 clients)" in out  # not the in-process row
    assert "plain:" not in out
    assert "grpc canned" not in out
    print_table(rows + [("grpc canned", 1, 32, "xla", {**cell(4000.0), "server_cpu_ms": 0.2, "client_cpu_ms": 0.1})],
                cores=2)
    # The canned reply's rate over the no-batching rate bounds what batching could gain.
    assert "32 batch-1 clients 4,000 requests/s (1.2 of 2 cores busy); the most batching could gain over no " \
        "batching here: xla 4.00x" in capsys.readouterr().out


def test_chosen_settings_are_the_ones_the_committed_census_tables_report():
    # Without --search/--refine the script trains CHOSEN; the tables in BENCHMARKS.md come from these files.
    from benchmarks import census_quality

    for group in (1, 2):
        report = json.loads((census_quality.RESULTS / f"census_quality_g{group}.json").read_text())
        archs = report["groups"][str(group)]["archs"]
        assert set(archs) == {"single_task", "shared_bottom", "omoe", "mmoe", "ple"}
        for arch, result in archs.items():
            chosen = {**census_quality.TRAIN_DEFAULTS, **census_quality.CHOSEN[(group, arch)]}
            assert census_quality.key_settings(chosen) == result["settings"], (group, arch)


def _export_format_arrays(path, rows=2048, seed=0):
    """A small `mmoe data export`-format file (`save_arrays`, which `load_arrays` reads) whose labels are
    learnable from the inputs, written without tf.Transform."""
    from pipelines.train_local import save_arrays

    rng = np.random.default_rng(seed)
    inputs = [InputFeature("age"), InputFeature("hours"), InputFeature("occupation", "categorical", vocab_size=12)]
    arrays = {}
    for split in ("train", "valid", "test"):
        age, hours = rng.normal(size=(2, rows)).astype("float32")
        occupation = rng.integers(0, 12, size=rows).astype("int64")
        arrays[split] = {"age": age, "hours": hours, "occupation": occupation,
                         "income_label": (age + hours + (occupation % 3 == 0) > 1).astype("int64"),
                         "marital_label": (age < 0).astype("int64")}
    return save_arrays(path, [f.to_dict() for f in inputs], [TaskSpec("income"), TaskSpec("marital")],
                       {"income": "income_label", "marital": "marital_label"},
                       {"name": "synthetic", "rows": {split: rows for split in arrays}}, arrays)


# Runs a script the way the lent GPU host would: JAX only, TensorFlow not importable there.
_WITHOUT_TENSORFLOW = """
import runpy, sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf_keras"):
            raise ModuleNotFoundError(f"No module named {name!r} (test: a host without TensorFlow)")
sys.meta_path.insert(0, NoTensorFlow())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_gpu_train_runs_on_cpu_with_the_same_flags_and_its_step_trains(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    arrays = _export_format_arrays(tmp_path / "census.npz")
    out = tmp_path / "gpu_train.json"
    flags = ["--arrays", str(arrays), "--models", "paper_8x16", "--batch-sizes", "256", "1024",
             "--precisions", "float32", "bf16", "--steps", "100", "--out", str(out)]
    script = str(root / "benchmarks" / "gpu_train.py")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW, script, *flags], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(r["mixed_precision"], r["batch_size"]) for r in results] == [
        (False, 256), (False, 1024), (True, 256), (True, 1024)]
    for r in results:
        assert r["examples_per_s"] > 0 and r["train_flops_per_example"] > 0 and r["peak_tflops"] > 0
        assert "measured float32 matmul" in r["peak_source"]  # no known GPU here: the CPU's own peak
        # 103 jitted steps (3 warmup) of forward, backward and the Adam update lower the first step's loss
        # (about 0.73x here; a step that dropped its update would stay near 1x).
        assert np.isfinite(r["final_loss"]) and r["final_loss"] < 0.85 * r["first_loss"], r
    table = [line for line in proc.stdout.splitlines() if line.startswith("| paper_8x16 |")]
    assert len(table) == 4 and all("%" in line for line in table)
    # The TensorFlow backend is refused with a message saying what to set.
    proc = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"}, cwd=tmp_path)
    assert proc.returncode != 0 and "KERAS_BACKEND=jax" in proc.stderr


@pytest.mark.parametrize("script, argv, message", [
    ("census_quality", ["--arrays", "ARRAYS", "--seeds", "0"], "--seeds: must be >= 1"),
    ("census_quality", ["--arrays", "ARRAYS", "--archs", "nope"], "--archs: unknown ['nope']"),
    ("census_quality", ["--arrays", "ARRAYS", "--patience", "-1"], "--patience: must be >= 0"),
    ("census_quality", ["--arrays", "MISSING"], "no such file"),
    ("census_quality", ["--arrays", "ARRAYS", "--cache", "BADCACHE"], "not a run cache"),
    ("train_speed", ["--arrays", "ARRAYS", "--batch-sizes", "0"], "--batch-sizes: must be >= 1"),
    ("train_speed", ["--arrays", "MISSING"], "no such file"),
    ("synthetic", ["--noise", "-1"], "--noise: must be >= 0"),
    ("synthetic", ["--lr-grid", "0"], "--lr-grid: must be > 0"),
    ("serving", ["--seconds", "-1"], "--seconds: must be > 0"),
    ("memory", ["--no-serving"], "nothing to measure"),
    ("memory", ["--no-serving", "--train-data", "x", "--run", "r"], "it means nothing with --no-serving"),
    ("synthetic", ["--num-sin", "0"], "--num-sin: must be >= 1"),
    ("synthetic", ["--c", "0"], "--c: must be > 0"),
    ("pipeline", ["--train-steps", "0"], "--train-steps must be >= 1"),
    ("ab_eval", ["--rows", "0"], "--rows: must be >= 1"),
])
def test_benchmark_scripts_refuse_bad_arguments_before_any_work(script, argv, message, tmp_path, capsys):
    import importlib

    (tmp_path / "arrays.npz").write_bytes(b"")
    (tmp_path / "bad.json").write_text("{not json")
    paths = {"ARRAYS": tmp_path / "arrays.npz", "MISSING": tmp_path / "missing.npz", "BADCACHE": tmp_path / "bad.json"}
    argv = [str(paths.get(a, a)) for a in argv] + (["--out", str(tmp_path / "out.json")] if script == "census_quality"
                                                   else [])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"benchmarks.{script}").main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
