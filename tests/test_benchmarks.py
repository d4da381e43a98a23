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
