"""Architectures: each learns, saves and loads, mixed precision, loss weights."""

import keras
import numpy as np
import pytest

from mmoe import (ARCHITECTURES, GATES_SUFFIX, InputFeature, ModelConfig, TaskSpec, build_model, compile_model,
                  with_gate_outputs)
from mmoe.layers import ExpertBank
from mmoe.training import evaluate, fit, predict

SMALL = dict(num_experts=4, task_experts=2, expert_units=(16,), bottom_units=(32,), tower_units=(8,),
             learning_rate=0.01)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_learns_both_tasks(arch, toy):
    features, tasks, train, test = toy
    config = ModelConfig(arch=arch, **SMALL)
    model = compile_model(build_model(config, features, tasks), config, tasks)
    fit(model, tasks, train, epochs=12, batch_size=128, verbose=0)
    metrics = evaluate(model, tasks, test)
    # XOR of signs needs the non-linear experts; chance is 0.5.
    assert metrics["xor"]["auc"] > 0.93, metrics
    # Predicting the mean would give RMSE ~ std(level) ~ 1.3.
    assert metrics["level"]["rmse"] < 0.5 * np.std(test.labels["level"]), metrics


def test_noisy_top_k_mmoe_with_balance_loss_learns(toy):
    features, tasks, train, test = toy
    config = ModelConfig(arch="mmoe", gate="noisy_top_k", top_k=2, balance_loss_weight=0.01, **SMALL)
    model = compile_model(build_model(config, features, tasks), config, tasks)
    fit(model, tasks, train, epochs=12, batch_size=128, verbose=0)
    assert evaluate(model, tasks, test)["xor"]["auc"] > 0.9
    gates = predict(with_gate_outputs(model), test.inputs)["xor" + GATES_SUFFIX]
    assert ((gates > 0).sum(axis=1) == 2).all()


def _assert_trained_model_round_trips(model, config, tasks, train, test, path):
    """Compile, train one epoch on 512 rows, save as .keras and load it back (safe_mode stays on: no lambdas,
    registered layers only); the loaded model must predict exactly what the trained one does. Returns it."""
    model = compile_model(model, config, tasks)
    fit(model, tasks, train.take(np.arange(512)), epochs=1, batch_size=128, verbose=0)
    model.save(path)
    loaded = keras.saving.load_model(path)
    before, after = predict(model, test.inputs), predict(loaded, test.inputs)
    assert set(before) == set(after) == {t.name for t in tasks}
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    return loaded


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_keras_save_load_round_trip_gives_identical_predictions(arch, toy, tmp_path):
    features, tasks, train, test = toy
    config = ModelConfig(arch=arch, gate="noisy_top_k", balance_loss_weight=0.01, **SMALL)
    loaded = _assert_trained_model_round_trips(build_model(config, features, tasks), config, tasks, train, test,
                                               tmp_path / f"{arch}.keras")
    # The loaded model keeps training (optimizer state and compile config restored).
    fit(loaded, tasks, train.take(np.arange(256)), epochs=1, batch_size=128, verbose=0)


def test_gate_outputs_share_weights_and_sum_to_one(toy):
    features, tasks, _, test = toy
    for arch, n in [("mmoe", 4), ("omoe", 4), ("cgc", 6), ("ple", 6)]:
        model = build_model(ModelConfig(arch=arch, **SMALL), features, tasks)
        analysis = with_gate_outputs(model)
        out = predict(analysis, test.inputs)
        for t in tasks:
            assert out[t.name + GATES_SUFFIX].shape == (len(test), n)
            np.testing.assert_allclose(out[t.name + GATES_SUFFIX].sum(axis=1), 1, rtol=1e-5)
            np.testing.assert_allclose(out[t.name], predict(model, test.inputs)[t.name], rtol=1e-6)
        if arch == "omoe":
            np.testing.assert_array_equal(out["xor" + GATES_SUFFIX], out["level" + GATES_SUFFIX])
        else:
            assert not np.allclose(out["xor" + GATES_SUFFIX], out["level" + GATES_SUFFIX])
    shared_bottom = build_model(ModelConfig(arch="shared_bottom", **SMALL), features, tasks)
    assert with_gate_outputs(shared_bottom) is shared_bottom


def test_omoe_runs_its_one_gate_once_for_all_tasks(toy):
    # Noisy top-k in training draws fresh noise per call: the tasks see one draw, and one balance loss is added.
    features, tasks, _, test = toy
    config = ModelConfig(arch="omoe", gate="noisy_top_k", top_k=2, balance_loss_weight=0.01, **SMALL)
    analysis = with_gate_outputs(build_model(config, features, tasks))
    batch = {k: v[:64] for k, v in test.inputs.items()}
    out = analysis(batch, training=True)
    np.testing.assert_array_equal(np.asarray(out["xor" + GATES_SUFFIX]), np.asarray(out["level" + GATES_SUFFIX]))
    assert len(analysis.losses) == 1


def test_mixed_precision_computes_experts_and_towers_in_bfloat16(toy):
    features, tasks, train, test = toy
    config = ModelConfig(arch="mmoe", mixed_precision=True, **SMALL)
    model = compile_model(build_model(config, features, tasks), config, tasks)
    assert model.get_layer("experts").compute_dtype == "bfloat16"
    assert model.get_layer("experts").variable_dtype == "float32"
    assert model.get_layer("tower_xor").compute_dtype == "bfloat16"
    assert model.get_layer("gate_xor").compute_dtype == "float32"
    assert model.get_layer("head_xor").compute_dtype == "float32"
    out = predict(model, test.inputs)
    assert out["xor"].dtype == np.float32
    fit(model, tasks, train, epochs=8, batch_size=128, verbose=0)
    assert evaluate(model, tasks, test)["xor"]["auc"] > 0.9


def test_loss_weight_zero_leaves_a_head_untrained(toy):
    features, tasks, train, test = toy
    tasks = [TaskSpec("xor", "binary", loss_weight=0.0), TaskSpec("level", "regression")]
    config = ModelConfig(arch="mmoe", **SMALL)
    model = compile_model(build_model(config, features, tasks), config, tasks)
    head_before = [w.copy() for w in model.get_layer("head_xor").get_weights()]
    fit(model, tasks, train, epochs=2, batch_size=128, verbose=0)
    for before, after in zip(head_before, model.get_layer("head_xor").get_weights()):
        np.testing.assert_array_equal(before, after)
    assert model.get_layer("head_level").get_weights()[0].tolist() != head_before[0].tolist()


def test_sample_weights_change_training(toy):
    features, tasks, train, _ = toy
    config = ModelConfig(arch="mmoe", **SMALL)
    results = []
    for weights in (None, np.where(train.inputs["a"] > 0, 10.0, 0.0).astype("float32")):
        model = compile_model(build_model(config, features, tasks), config, tasks)
        data = train.take(np.arange(len(train)))
        data.weights = weights
        fit(model, tasks, data, epochs=1, batch_size=128, verbose=0, seed=0)
        results.append(model.get_layer("head_xor").get_weights()[0])
    assert not np.allclose(results[0], results[1])


def test_tensorflow_backend_trains_with_xla(toy):
    assert keras.backend.backend() == "tensorflow"
    features, tasks, train, _ = toy
    config = ModelConfig(arch="mmoe", **SMALL)
    model = compile_model(build_model(config, features, tasks), config, tasks)
    assert model.jit_compile is True


def test_config_validation_and_round_trip():
    config = ModelConfig(arch="ple", expert_units=[32, 16], ple_levels=3)
    assert config.expert_units == (32, 16)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="moe")
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({"experts": 3})
    with pytest.raises(ValueError, match="gate_temperature"):
        ModelConfig(gate_temperature=-1)
    with pytest.raises(ValueError, match="cross_layers and cross_rank"):
        ModelConfig(cross_layers=-1)
    with pytest.raises(ValueError, match="expert_cross_layers and expert_cross_rank"):
        ModelConfig(expert_cross_rank=-2)
    with pytest.raises(ValueError, match="numeric_bins"):
        ModelConfig(numeric_bins=-1)
    with pytest.raises(ValueError, match="embedding_lookup must be one of"):
        ModelConfig(embedding_lookup="dense")
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("x", "multiclass")


def test_builder_rejects_bad_tasks(toy):
    features, _, _, _ = toy
    with pytest.raises(ValueError, match="unique"):
        build_model(ModelConfig(), features, [TaskSpec("t"), TaskSpec("t")])
    with pytest.raises(ValueError, match="clash"):
        build_model(ModelConfig(), features, [TaskSpec("a")])
    with pytest.raises(ValueError, match="at least one task"):
        build_model(ModelConfig(), features, [])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cross_layers_sit_between_embedding_and_experts(arch, toy, tmp_path):
    features, tasks, train, test = toy
    config = ModelConfig(arch=arch, cross_layers=2, cross_rank=3, **SMALL)
    model = build_model(config, features, tasks)
    crosses = [layer for layer in model.layers if layer.__class__.__name__ == "FeatureCross"]
    # One cross network shared by every task; Single-Task's networks share nothing, crosses included.
    assert len(crosses) == (len(tasks) if arch == "single_task" else 1)
    for cross in crosses:
        assert cross.num_layers == 2 and cross.projection_dim == 3
        assert cross.input.shape[-1] == model.get_layer(cross.name.replace("cross", "embedding")).output.shape[-1]
    assert not any(layer.__class__.__name__ == "FeatureCross"
                   for layer in build_model(ModelConfig(arch=arch, **SMALL), features, tasks).layers)
    # Under mixed precision the crosses stay float32, like the embedding and the gates that read them.
    mixed = build_model(config.replace(mixed_precision=True), features, tasks)
    assert {layer.compute_dtype for layer in mixed.layers if layer.__class__.__name__ == "FeatureCross"} == {"float32"}
    _assert_trained_model_round_trips(model, config, tasks, train, test, tmp_path / "cross.keras")


@pytest.mark.parametrize("arch", ["mmoe", "ple"])
def test_expert_crosses_reach_every_expert_bank(arch, toy, tmp_path):
    features, tasks, train, test = toy
    config = ModelConfig(arch=arch, expert_cross_layers=2, expert_cross_rank=3, **SMALL)
    model = build_model(config, features, tasks)
    banks = [layer for layer in model.layers if isinstance(layer, ExpertBank)]
    assert banks and all(b.cross_layers == 2 and b.cross_rank == 3 for b in banks)
    plain = build_model(ModelConfig(arch=arch, **SMALL), features, tasks)
    assert all(b.cross_layers == 0 for b in plain.layers if isinstance(b, ExpertBank))
    # Shared-Bottom and Single-Task have no experts: the setting changes nothing there.
    assert (build_model(ModelConfig(arch="shared_bottom", expert_cross_layers=2, **SMALL), features, tasks)
            .count_params() == build_model(ModelConfig(arch="shared_bottom", **SMALL), features, tasks).count_params())
    _assert_trained_model_round_trips(model, config, tasks, train, test, tmp_path / "expert_cross.keras")


@pytest.mark.parametrize("arch", ["mmoe", "single_task"])
def test_numeric_bins_are_adapted_by_fit_and_saved_with_the_model(arch, toy, tmp_path):
    from mmoe.training import adapt_model, needs_adapt

    features, tasks, train, test = toy
    config = ModelConfig(arch=arch, numeric_bins=6, **SMALL)
    model = build_model(config, features, tasks)
    embeddings = [layer for layer in model.layers if layer.__class__.__name__ == "FeatureEmbedding"]
    assert len(embeddings) == (len(tasks) if arch == "single_task" else 1)
    # Both numeric inputs gain 6 components each; the categorical embedding is unchanged.
    plain = build_model(ModelConfig(arch=arch, **SMALL), features, tasks).get_layer(embeddings[0].name)
    assert embeddings[0].output_dim == plain.output_dim + 2 * 6
    assert needs_adapt(model)
    loaded = _assert_trained_model_round_trips(model, config, tasks, train, test, tmp_path / "bins.keras")
    # fit adapted every embedding on the rows it trained on (the helper trains on the first 512).
    numeric = np.stack([train.inputs["a"][:512], train.inputs["b"][:512]], axis=1)
    want = np.quantile(numeric, np.linspace(0, 1, 7), axis=0).T
    for layer in embeddings + [loaded.get_layer(e.name) for e in embeddings]:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.piecewise.edges), want, rtol=1e-5, atol=1e-6)
    # A loaded (already adapted) model keeps its edges when it trains on other rows; `force` re-adapts.
    assert not needs_adapt(loaded)
    fit(loaded, tasks, train.take(np.arange(2048, 2560)), epochs=1, batch_size=128, verbose=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded.get_layer(embeddings[0].name).piecewise.edges),
                               want, rtol=1e-5, atol=1e-6)
    assert adapt_model(loaded, train.take(np.arange(2048, 2560)).inputs, force=True) == len(embeddings)
    assert not np.allclose(keras.ops.convert_to_numpy(loaded.get_layer(embeddings[0].name).piecewise.edges), want)
    assert adapt_model(build_model(ModelConfig(arch=arch, **SMALL), features, tasks), train.inputs) == 0


def test_embedding_lookup_setting_reaches_the_embedding_layer(toy):
    features, tasks, train, _ = toy
    models = {lookup: build_model(ModelConfig(arch="mmoe", embedding_lookup=lookup, **SMALL), features, tasks)
              for lookup in ("gather", "matmul")}
    assert set(models["gather"].get_layer("embedding").group_lookups) == {"gather"}
    assert set(models["matmul"].get_layer("embedding").group_lookups) == {"matmul"}
    models["matmul"].set_weights(models["gather"].get_weights())
    outs = {k: predict(m, train.inputs) for k, m in models.items()}
    for task in outs["gather"]:
        np.testing.assert_allclose(outs["matmul"][task], outs["gather"][task], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("num_tasks", [1, 2])
def test_early_stopping_watches_a_metric_keras_logs(toy, num_tasks):
    """A one-task model logs `val_auc` (Keras adds the output name only with several outputs); early stopping
    must watch the key that exists, or it silently never stops nor restores the best epoch."""
    from mmoe.training import TaskData, monitor_for

    features, tasks, train, test = toy
    tasks = tasks[:num_tasks]
    keep = [t.name for t in tasks]
    train = TaskData(train.inputs, {k: train.labels[k] for k in keep})
    valid = TaskData(test.inputs, {k: test.labels[k] for k in keep})
    config = ModelConfig(arch="mmoe", **SMALL)
    model = compile_model(build_model(config, features, tasks), config, tasks)
    history = fit(model, tasks, train, valid, epochs=2, batch_size=256, patience=1, verbose=0)
    monitor, mode = monitor_for(tasks[0], len(tasks))
    assert monitor in history.history, sorted(history.history)
    assert mode == "max"
    assert monitor_for(tasks[1 % len(tasks)], len(tasks))[1] == ("max" if num_tasks == 1 else "min")
    with pytest.raises(ValueError, match="num_tasks"):
        monitor_for(tasks[0], 0)


def test_ema_ends_training_with_the_averaged_weights():
    import keras

    from mmoe.training import OptimizerSettings, TaskData, fit, optimizer_and_callbacks

    rng = np.random.default_rng(0)

    def split(n, noise):
        a = rng.normal(size=n).astype("float32")
        y = (a + noise * rng.normal(size=n) > 0).astype("float32")
        return TaskData({"a": a}, {"t": y, "u": y})

    # Two tasks: with one output Keras names the metric val_auc, not the val_t_auc early stopping watches.
    features, tasks = [InputFeature("a")], [TaskSpec("t"), TaskSpec("u")]
    # Validation labels are (nearly) noise, so its AUC wanders and early stopping ends training before 12 epochs.
    train, valid = split(512, 0.3), split(256, 30.0)

    def trained(ema):
        keras.utils.set_random_seed(0)
        config = ModelConfig(num_experts=2, expert_units=(4,), tower_units=(4,), learning_rate=0.05)
        optimizer, callbacks = optimizer_and_callbacks(OptimizerSettings(ema=ema), config.learning_rate, 8, tasks[0],
                                                       len(tasks))
        model = compile_model(build_model(config, features, tasks), config, tasks, optimizer=optimizer)
        initial = model.get_weights()
        history = fit(model, tasks, train, valid, epochs=12, batch_size=64, patience=2, verbose=0,
                      callbacks=callbacks)
        moved = max(float(np.abs(w - w0).max()) for w, w0 in zip(model.get_weights(), initial))
        return moved, len(history.history["loss"])

    raw_moved, _ = trained(0.0)
    # An average that barely moves after Keras starts it at the weights after the first step (one Adam step:
    # at most about the learning rate per weight): the raw weights move far, yet after the early stop (where
    # Keras's final overwrite would put the raw weights back) the model must end with the averaged ones.
    ema_moved, epochs = trained(0.99999)
    assert epochs < 12
    assert raw_moved > 0.2 and ema_moved < 0.06


def test_optimizer_settings_give_the_schedule_adamw_and_averaging_they_name():
    import keras

    from mmoe.training import OptimizerSettings, optimizer_and_callbacks

    task = TaskSpec("t")
    adam, none = optimizer_and_callbacks(OptimizerSettings(), 0.01, 10, task, 2)
    assert type(adam) is keras.optimizers.Adam and not adam.use_ema and none == []
    assert float(adam.learning_rate) == pytest.approx(0.01)
    # Cosine: decays over cosine_epochs x steps_per_epoch optimizer steps to 1% of the rate, then stays.
    cosine, _ = optimizer_and_callbacks(OptimizerSettings(schedule="cosine", cosine_epochs=4), 0.01, 10, task, 2)
    schedule = cosine._learning_rate
    assert float(schedule(0)) == pytest.approx(0.01) and float(schedule(40)) == pytest.approx(1e-4)
    assert float(schedule(20)) == pytest.approx(0.01 * (0.01 + 0.99 * 0.5))
    assert float(schedule(400)) == pytest.approx(1e-4)
    plateau, callbacks = optimizer_and_callbacks(OptimizerSettings(schedule="plateau"), 0.01, 10, task, 2)
    assert [type(c).__name__ for c in callbacks] == ["ReduceLROnPlateau"] and callbacks[0].monitor == "val_t_auc"
    # Without validation data (a refit) there is nothing for the plateau to watch: no callback.
    assert optimizer_and_callbacks(OptimizerSettings(schedule="plateau"), 0.01, 10, task, 2, validated=False)[1] == []
    adamw, callbacks = optimizer_and_callbacks(OptimizerSettings(weight_decay=1e-2, ema=0.9), 0.01, 10, task, 2)
    assert type(adamw) is keras.optimizers.AdamW and adamw.weight_decay == pytest.approx(1e-2)
    assert adamw.use_ema and adamw.ema_momentum == pytest.approx(0.9)
    assert [type(c).__name__ for c in callbacks] == ["SwapEMAWeights"]
    # From a wider settings mapping: other keys ignored, missing ones at their defaults, values cast (YAML reads
    # 1e-2 as a string).
    assert OptimizerSettings.from_settings({"schedule": "cosine", "weight_decay": "1e-2", "ema": 0, "batch_size": 64}) \
        == OptimizerSettings(schedule="cosine", weight_decay=0.01)
    with pytest.raises(ValueError, match="cosine_epochs"):
        OptimizerSettings.from_settings({"schedule": "cosine", "cosine_epochs": 0})
    assert OptimizerSettings(cosine_epochs=0).schedule == "constant"  # the length of a schedule not in use
    for bad, match in (({"schedule": "step"}, "schedule"), ({"ema": 1.0}, "ema"), ({"weight_decay": -1}, "weight"),
                       ({"weight_decay": float("inf")}, "weight"), ({"schedule": "cosine", "cosine_epochs": 0},
                                                                     "cosine_epochs")):
        with pytest.raises(ValueError, match=match):
            OptimizerSettings(**bad)


def test_main_task_spec_is_the_named_task_or_the_first():
    from mmoe.training import main_task_spec

    tasks = [TaskSpec("a"), TaskSpec("b", "regression")]
    assert main_task_spec(tasks) is tasks[0] and main_task_spec(tasks, "b") is tasks[1]
    with pytest.raises(ValueError, match=r"main task 'c' is not one of \['a', 'b'\]"):
        main_task_spec(tasks, "c")


def test_early_stopped_epoch_is_the_main_tasks_best_validation_epoch():
    from mmoe.config import TaskSpec
    from mmoe.training import early_stopped_epoch

    history = {"val_a_auc": [0.70, 0.74, 0.73, 0.72], "val_b_rmse": [3.0, 2.0, 1.0, 1.5], "loss": [1, 1, 1, 1]}
    assert early_stopped_epoch(history, TaskSpec("a"), 2) == 2  # AUC: the highest
    assert early_stopped_epoch(history, TaskSpec("b", "regression"), 2) == 3  # RMSE: the lowest
    # A one-task model's keys carry no task name (monitor_for); a history without validation is an error.
    assert early_stopped_epoch({"val_auc": [0.5, 0.6]}, TaskSpec("a"), 1) == 2
    with pytest.raises(ValueError, match="val_a_auc"):
        early_stopped_epoch({"loss": [1.0]}, TaskSpec("a"), 2)


def test_task_data_concat_keeps_row_order_and_drops_weights_only_when_a_part_lacks_them():
    from mmoe.training import TaskData

    a = TaskData({"x": np.arange(3.0)}, {"t": np.zeros(3)}, np.full(3, 2.0))
    b = TaskData({"x": np.arange(3.0, 5.0)}, {"t": np.ones(2)}, np.full(2, 5.0))
    both = TaskData.concat([a, b])
    assert len(both) == 5 and both.inputs["x"].tolist() == [0, 1, 2, 3, 4]
    assert both.labels["t"].tolist() == [0, 0, 0, 1, 1] and both.weights.tolist() == [2, 2, 2, 5, 5]
    assert TaskData.concat([a, TaskData(b.inputs, b.labels)]).weights is None
    with pytest.raises(ValueError, match="differ in inputs or labels"):
        TaskData.concat([a, TaskData({"y": np.arange(2.0)}, b.labels)])
    with pytest.raises(ValueError, match="at least one"):
        TaskData.concat([])


def test_a_diverging_fit_fails_instead_of_returning_a_nan_model():
    from mmoe.training import TaskData, TrainingDiverged, check_converged

    features, tasks = [InputFeature("x")], [TaskSpec("t")]
    config = ModelConfig(num_experts=2, expert_units=(4,), learning_rate=1e36)  # Adam steps of 1e36: overflow
    model = compile_model(build_model(config, features, tasks), config, tasks, jit_compile=False)
    x = np.random.default_rng(0).normal(size=256).astype("float32")
    data = TaskData({"x": x}, {"t": (x > 0).astype("float32")})
    with pytest.raises(TrainingDiverged, match="nan in epoch 1"):
        fit(model, tasks, data, epochs=3, batch_size=64, verbose=0)
    check_converged({"loss": [0.5, 0.4]})  # finite: nothing to say
    with pytest.raises(TrainingDiverged, match="inf in epoch 2"):
        check_converged({"loss": [0.5, float("inf")]})
    # The loss can stay finite while weights overflow (the cross-entropy clips probabilities): the weights say so.
    model = build_model(config, features, tasks)
    check_converged({"loss": [0.5]}, model)
    weight = model.get_layer("tower_t").weights[0]
    weight.assign(np.full(weight.shape, np.inf, dtype="float32"))
    with pytest.raises(TrainingDiverged, match=r"1 of the model's \d+ weight tensors hold NaN or infinite .*tower_t"):
        check_converged({"loss": [0.5]}, model)


@pytest.mark.parametrize("data, expected", [
    ({"expert_units": "64"}, "expert_units must be a list"),
    ({"mixed_precision": "false"}, "mixed_precision must be true or false"),
    ({"num_experts": 4.5}, "num_experts must be an integer"),
    ({"num_experts": True}, "num_experts must be an integer"),
    ({"learning_rate": "fast"}, "learning_rate must be a number"),
    ({"arch": 3}, "arch must be a string"),
    ({"gate_temperature": float("inf")}, "gate_temperature must be > 0 and finite"),
    ({"balance_loss_weight": float("inf")}, "balance_loss_weight must be >= 0 and finite"),
    ({"gate": "noisy_top_k", "top_k": 9, "num_experts": 8}, r"top_k \(9\) is more than the 8 experts"),
    ({"arch": "ple", "gate": "noisy_top_k", "top_k": 11, "num_experts": 8, "task_experts": 2}, "the 10 experts"),
])
def test_model_config_from_a_file_holds_each_value_to_its_type(data, expected):
    with pytest.raises(ValueError, match=expected):
        ModelConfig.from_dict(data)


def test_model_config_from_a_file_takes_what_yaml_and_json_give():
    # PyYAML reads 1e-3 as a string, JSON writes 8.0 for 8, numpy ints come from arrays; one width is a list of one.
    config = ModelConfig.from_dict({"learning_rate": "1e-3", "num_experts": 8.0, "tower_units": np.int64(16),
                                    "expert_units": [64, np.int64(32)]})
    assert (config.learning_rate, config.num_experts, config.tower_units, config.expert_units) == \
        (1e-3, 8, (16,), (64, 32))
    assert type(config.num_experts) is int and all(type(w) is int for w in config.expert_units)
