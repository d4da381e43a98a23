"""The benchmark scripts' own arithmetic and a smoke run, so the report card cannot rot."""
import json

import numpy as np

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
    from benchmarks.census_quality import RunCache

    calls = []
    cache = RunCache(tmp_path / "runs.json")
    assert cache.get({"seed": 0, "arch": "mmoe"}, lambda: calls.append(1) or {"auc": 0.9}) == {"auc": 0.9}
    again = RunCache(tmp_path / "runs.json")
    assert again.get({"arch": "mmoe", "seed": 0}, lambda: calls.append(1) or {"auc": 0.1}) == {"auc": 0.9}
    assert calls == [1]
    assert RunCache(tmp_path / "runs.json", fresh=True).get({"arch": "mmoe", "seed": 0}, lambda: 0.1) == 0.1


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
