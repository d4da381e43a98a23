"""Layer math of the expert bank, gates, mixture and embedding."""
import keras
import numpy as np
import pytest
from keras import ops

from mmoe.layers import (MLP, ExpertBank, ExpertMixture, FeatureCross, FeatureEmbedding, Gate,
                         PiecewiseLinearEncoding, TaskHead, importance_cv_squared)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_expert_bank_matches_independent_per_expert_mlps():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7)).astype("float32")
    bank = ExpertBank(3, [4, 6], activation="relu")
    out = _np(bank(x))
    assert out.shape == (5, 3, 6)
    k0, k1 = _np(bank.kernels[0]), _np(bank.kernels[1])
    b0, b1 = _np(bank.biases[0]), _np(bank.biases[1])
    for e in range(3):
        h = np.maximum(x @ k0[:, e, :] + b0[e], 0)
        h = np.maximum(h @ k1[e] + b1[e], 0)
        np.testing.assert_allclose(out[:, e, :], h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [None, 2])
def test_expert_bank_with_crosses_is_a_dcn_v2_network_per_expert(rank):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(5, 6)).astype("float32")
    bank = ExpertBank(3, [4, 2], cross_layers=2, cross_rank=rank)
    bank.build(x0.shape)
    for w in bank.weights:  # non-zero biases too, so the test sees where they enter
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.5)
    out = _np(bank(x0))
    assert out.shape == (5, 3, 2)
    for e in range(3):
        x = x0
        for i in range(2):
            kernel = _np(bank.cross_down[i])[e]
            if rank is not None:
                kernel = kernel @ _np(bank.cross_up[i])[e]
            x = x0 * (x @ kernel + _np(bank.cross_biases[i])[e]) + x
        h = np.maximum(x @ _np(bank.kernels[0])[:, e, :] + _np(bank.biases[0])[e], 0)
        h = np.maximum(h @ _np(bank.kernels[1])[e] + _np(bank.biases[1])[e], 0)
        np.testing.assert_allclose(out[:, e, :], h, rtol=1e-4, atol=1e-4)
    # Each expert holds its own crosses: E x (d x d, or two d x r factors, plus a bias) per layer.
    cross = 3 * 2 * ((6 * 6 if rank is None else 2 * 6 * rank) + 6)
    plain = ExpertBank(3, [4, 2])
    plain.build(x0.shape)
    assert bank.count_params() == plain.count_params() + cross
    # Experts start with different crosses, or they would stay symmetric.
    fresh = ExpertBank(2, [4], cross_layers=1)
    fresh.build(x0.shape)
    assert not np.allclose(_np(fresh.cross_down[0])[0], _np(fresh.cross_down[0])[1])


def test_expert_bank_rejects_bad_cross_arguments():
    with pytest.raises(ValueError, match="cross_layers"):
        ExpertBank(2, [4], cross_layers=-1)
    with pytest.raises(ValueError, match="cross_rank"):
        ExpertBank(2, [4], cross_layers=1, cross_rank=0)


def test_expert_bank_initialises_experts_differently_with_per_expert_scale():
    bank = ExpertBank(8, [32])
    bank.build((None, 100))
    w = _np(bank.kernels[0])  # [d, E, u]
    assert not np.allclose(w[:, 0, :], w[:, 1, :])
    # Glorot uniform for one expert's [100, 32] kernel: limit sqrt(6 / 132).
    assert np.abs(w).max() <= np.sqrt(6 / 132) + 1e-6
    assert np.abs(w).max() > 0.8 * np.sqrt(6 / 132)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_softmax_gate_rows_sum_to_one(temperature):
    x = np.random.default_rng(1).normal(size=(64, 10)).astype("float32")
    gate = Gate(6, temperature=temperature)
    g = _np(gate(x))
    assert g.shape == (64, 6)
    np.testing.assert_allclose(g.sum(axis=1), 1.0, rtol=1e-5)
    assert (g > 0).all()


def test_lower_temperature_sharpens_routing():
    x = np.random.default_rng(2).normal(size=(64, 10)).astype("float32")
    gate = Gate(6, temperature=1.0)
    gate.build(x.shape)
    sharp = Gate(6, temperature=0.25)
    sharp.build(x.shape)
    sharp.set_weights(gate.get_weights())
    assert _np(sharp(x)).max(axis=1).mean() > _np(gate(x)).max(axis=1).mean()


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("training", [False, True])
def test_noisy_top_k_keeps_exactly_k_renormalised(k, training):
    x = np.random.default_rng(3).normal(size=(128, 10)).astype("float32")
    gate = Gate(6, gate_type="noisy_top_k", top_k=k, seed=0)
    g = _np(gate(x, training=training))
    assert ((g > 0).sum(axis=1) == k).all()
    np.testing.assert_allclose(g.sum(axis=1), 1.0, rtol=1e-5)
    if not training:
        # Without noise the kept experts are the k largest logits.
        logits = _np(gate.logits(x))
        top = np.argsort(-logits, axis=1)[:, :k]
        kept = np.argsort(-g, axis=1)[:, :k]
        assert (np.sort(top, axis=1) == np.sort(kept, axis=1)).all()


def test_noisy_gate_adds_noise_only_in_training():
    x = np.random.default_rng(4).normal(size=(32, 10)).astype("float32")
    gate = Gate(6, gate_type="noisy_top_k", top_k=6, seed=1)
    np.testing.assert_allclose(_np(gate(x)), _np(gate(x)))
    assert not np.allclose(_np(gate(x, training=True)), _np(gate(x, training=True)))


def test_balance_loss_is_minimal_for_uniform_routing():
    uniform = np.full((16, 4), 0.25, "float32")
    assert float(_np(importance_cv_squared(uniform))) == pytest.approx(0.0, abs=1e-7)
    rng = np.random.default_rng(5)
    for _ in range(20):
        g = rng.dirichlet(np.ones(4), size=16).astype("float32")
        assert float(_np(importance_cv_squared(g))) > 0
    collapsed = np.zeros((16, 4), "float32")
    collapsed[:, 0] = 1
    assert float(_np(importance_cv_squared(collapsed))) == pytest.approx(3.0, rel=1e-5)  # var/mean^2 of [16,0,0,0]


def test_gate_adds_weighted_balance_loss():
    x = np.random.default_rng(6).normal(size=(32, 10)).astype("float32")
    gate = Gate(4, balance_loss_weight=0.5)
    g = gate(x)
    assert len(gate.losses) == 1
    np.testing.assert_allclose(_np(gate.losses[0]), 0.5 * _np(importance_cv_squared(g)), rtol=1e-5)
    unweighted = Gate(4)
    unweighted(x)
    assert not unweighted.losses  # no balancing loss unless a weight is given


def test_gate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        Gate(4, gate_type="noisy_top_k", top_k=5)
    with pytest.raises(ValueError, match="temperature"):
        Gate(4, temperature=0)
    with pytest.raises(ValueError, match="gate_type"):
        Gate(4, gate_type="hard")


def test_mixture_is_gate_weighted_sum():
    rng = np.random.default_rng(7)
    g = rng.dirichlet(np.ones(3), size=4).astype("float32")
    e = rng.normal(size=(4, 3, 5)).astype("float32")
    out = _np(ExpertMixture()([g, e]))
    np.testing.assert_allclose(out, np.einsum("be,beu->bu", g, e), rtol=1e-5)


def test_feature_embedding_layout_and_out_of_range_ids():
    layer = FeatureEmbedding([{"name": "n", "kind": "numeric"},
                              {"name": "c", "kind": "categorical", "vocab_size": 5, "embedding_dim": 3}])
    out = _np(layer({"n": np.array([1.5, -2.0], "float32"), "c": np.array([4, 99], "int32")}))
    assert out.shape == (2, 4)
    np.testing.assert_allclose(out[:, 0], [1.5, -2.0])
    rows = _np(layer.rows("c"))
    np.testing.assert_allclose(out[1, 1:], rows[4])  # 99 clipped to the last id
    with pytest.raises(KeyError, match="c"):
        layer({"n": np.array([1.0], "float32")})


def test_features_sharing_a_table_keep_their_own_rows():
    layer = FeatureEmbedding([{"name": "a", "kind": "categorical", "vocab_size": 3, "embedding_dim": 2},
                              {"name": "n", "kind": "numeric"},
                              {"name": "b", "kind": "categorical", "vocab_size": 4, "embedding_dim": 2},
                              {"name": "c", "kind": "categorical", "vocab_size": 5, "embedding_dim": 3}])
    out = _np(layer({"a": np.array([0, 2]), "n": np.array([7.0, 8.0], "float32"), "b": np.array([0, 3]),
                     "c": np.array([1, 4])}))
    assert len(layer.tables) == 2 and layer.output_dim == 1 + 2 + 2 + 3 == out.shape[1]
    a, b, c = _np(layer.rows("a")), _np(layer.rows("b")), _np(layer.rows("c"))
    assert a.shape == (3, 2) and b.shape == (4, 2) and c.shape == (5, 3)
    np.testing.assert_allclose(out[:, 0], [7.0, 8.0])
    np.testing.assert_allclose(out[:, 1:3], a[[0, 2]])
    np.testing.assert_allclose(out[:, 3:5], b[[0, 3]])  # id 0 of b is not id 0 of a
    np.testing.assert_allclose(out[:, 5:8], c[[1, 4]])
    assert not np.allclose(a[0], b[0])


def test_task_head_outputs():
    x = np.random.default_rng(8).normal(size=(6, 3)).astype("float32")
    p = _np(TaskHead("binary")(x))
    assert p.shape == (6,) and ((p > 0) & (p < 1)).all()
    r = TaskHead("regression")
    assert _np(r(x * 100)).shape == (6,)


@pytest.mark.parametrize("layer", [
    ExpertBank(3, [4, 2], activation="tanh", dropout=0.1),
    Gate(5, gate_type="noisy_top_k", temperature=0.7, top_k=2, balance_loss_weight=0.01, seed=3),
    MLP([8, 4], dropout=0.2),
    TaskHead("regression"),
    FeatureEmbedding([{"name": "c", "kind": "categorical", "vocab_size": 9, "embedding_dim": None}]),
    FeatureCross(3, projection_dim=4),
    PiecewiseLinearEncoding(5),
    FeatureEmbedding([{"name": "n", "kind": "numeric"}], numeric_bins=7),
    ExpertBank(3, [4, 2], dropout=0.1, cross_layers=2, cross_rank=3),
])
def test_layer_config_round_trip(layer):
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize("rank", [None, 2])
def test_feature_cross_is_the_dcn_v2_recurrence(rank):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(5, 6)).astype("float32")
    layer = FeatureCross(2, projection_dim=rank)
    layer.build(x0.shape)
    for w in layer.weights:  # non-zero biases too, so the test sees where they enter
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.5)
    x = x0
    for i in range(2):
        kernel = _np(layer.down[i]) if rank is None else _np(layer.down[i]) @ _np(layer.up[i])
        x = x0 * (x @ kernel + _np(layer.bias[i])) + x
    np.testing.assert_allclose(_np(layer(x0)), x, rtol=1e-5, atol=1e-5)
    # Full rank holds a d x d matrix per layer; rank r two d x r factors.
    assert layer.count_params() == 2 * ((6 * 6) if rank is None else (2 * 6 * rank)) + 2 * 6


def test_feature_cross_fits_a_product_a_linear_model_cannot():
    # y = x1 * x2 is degree 2: one cross layer holds it exactly, a linear model not at all.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4096, 2)).astype("float32")
    y = x[:, 0] * x[:, 1]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(FeatureCross(1)(inputs)))
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(x, y, epochs=30, batch_size=256, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.01 * np.var(y)


def test_feature_cross_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        FeatureCross(0)
    with pytest.raises(ValueError, match="projection_dim"):
        FeatureCross(1, projection_dim=0)


def test_model_saves_as_tensorflow_saved_model(tmp_path):
    # The serving export tracks the model in a tf.Module; layer attributes must be trackable.
    import tensorflow as tf

    from mmoe import InputFeature, ModelConfig, TaskSpec, build_model

    model = build_model(ModelConfig(num_experts=2, expert_units=(4,)),
                        [InputFeature("n"), InputFeature("c", "categorical", vocab_size=7),
                         InputFeature("d", "categorical", vocab_size=900)], [TaskSpec("t")])
    module = tf.Module()
    module.model = model
    tf.saved_model.save(module, str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "saved_model.pb").exists()


def _embedding_features():
    return [{"name": "a", "kind": "categorical", "vocab_size": 3, "embedding_dim": 2},
            {"name": "n", "kind": "numeric"},
            {"name": "b", "kind": "categorical", "vocab_size": 4, "embedding_dim": 2},
            {"name": "c", "kind": "categorical", "vocab_size": 5, "embedding_dim": 3}]


def test_matmul_and_gather_lookups_agree_in_values_and_gradients():
    import keras

    rng = np.random.default_rng(11)
    inputs = {"a": rng.integers(-1, 4, 64), "n": rng.normal(size=64).astype("float32"),
              "b": rng.integers(0, 6, 64), "c": rng.integers(0, 5, 64)}
    layers = {lookup: FeatureEmbedding(_embedding_features(), lookup=lookup) for lookup in ("gather", "matmul")}
    layers["gather"].build(None)
    layers["matmul"].build(None)
    layers["matmul"].set_weights(layers["gather"].get_weights())
    assert layers["matmul"].group_lookups == ("matmul", "matmul")
    assert layers["gather"].group_lookups == ("gather", "gather")
    outs = {k: _np(layer(inputs, training=True)) for k, layer in layers.items()}
    np.testing.assert_array_equal(outs["matmul"], outs["gather"])  # a row times 1.0 plus zeros is exact
    np.testing.assert_array_equal(_np(layers["matmul"](inputs)), outs["gather"])  # inference gathers

    # The table gradients agree too: rows seen k times get k times the upstream gradient.
    import tensorflow as tf

    upstream = rng.normal(size=outs["gather"].shape).astype("float32")
    grads = {}
    for k, layer in layers.items():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(inputs, training=True) * upstream)
        raw = tape.gradient(loss, [t.embeddings.value for t in layer.tables])
        # The gather's gradient is sparse (a scatter-add); the matmul's is dense, which shows it ran.
        assert all(isinstance(g, tf.IndexedSlices) == (k == "gather") for g in raw)
        grads[k] = [np.asarray(tf.convert_to_tensor(g)) for g in raw]
    for g, m in zip(grads["gather"], grads["matmul"]):
        np.testing.assert_allclose(m, g, rtol=1e-5, atol=1e-6)
    assert any(np.abs(g).sum() > 0 for g in grads["gather"])


def test_auto_lookup_uses_matmul_only_for_small_tables():
    from mmoe.layers.embedding import MATMUL_MAX_ROWS_X_FEATURES

    small = FeatureEmbedding(_embedding_features())
    assert small.lookup == "auto" and small.group_lookups == ("matmul", "matmul")
    hashed = FeatureEmbedding([{"name": "h", "kind": "categorical", "vocab_size": MATMUL_MAX_ROWS_X_FEATURES + 1,
                                "embedding_dim": 4}, {"name": "s", "kind": "categorical", "vocab_size": 3,
                                                      "embedding_dim": 2}])
    assert hashed.group_lookups == ("gather", "matmul")
    assert FeatureEmbedding.from_config(hashed.get_config()).group_lookups == ("gather", "matmul")
    with pytest.raises(ValueError, match="lookup must be one of"):
        FeatureEmbedding(_embedding_features(), lookup="onehot")


def _piecewise_reference(x, edges):
    """Piecewise-linear encoding written out bin by bin: merged repeated edges, open first and last bins."""
    out = []
    for value, feature_edges in zip(x, edges):
        distinct = np.unique(feature_edges)
        bins = len(distinct) - 1
        row = np.zeros(len(feature_edges) - 1)
        for t in range(bins):
            low, high = distinct[t], distinct[t + 1]
            z = (value - low) / (high - low)
            row[t] = z if (t == 0 and z < 0) or (t == bins - 1 and z > 1) else min(max(z, 0.0), 1.0)
        out.append(row)
    return np.concatenate(out)


def test_piecewise_encoding_adapts_to_quantiles_and_matches_its_definition():
    rng = np.random.default_rng(3)
    smooth = rng.normal(size=2000)
    money = np.where(rng.random(2000) < 0.8, 0.0, rng.exponential(100.0, 2000))  # a mass point at zero
    train = np.stack([smooth, money], axis=1)
    layer = PiecewiseLinearEncoding(8)
    layer.adapt(train)
    edges = _np(layer.edges)
    np.testing.assert_allclose(edges[0], np.quantile(smooth, np.linspace(0, 1, 9)), rtol=1e-6)
    # The money column's repeated zero quantiles are merged: two edges above zero are left, the rest pad the top.
    distinct = np.unique(np.quantile(money, np.linspace(0, 1, 9)))
    assert len(distinct) == 3
    np.testing.assert_allclose(edges[1, :3], distinct, rtol=1e-6)
    assert (edges[1, 3:] == edges[1, 2]).all()
    # Values inside, on the edges of, and beyond the training range (both open ends extrapolate).
    x = np.stack([np.concatenate([smooth[:5], edges[0], [-9.0, 9.0]]),
                  np.concatenate([money[:5], edges[1], [-50.0, 5000.0]])], axis=1).astype("float32")
    got = _np(layer(x))
    assert got.shape == (len(x), 16)
    want = np.stack([_piecewise_reference(row, edges) for row in x])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got[:, 8 + 2:] == 0).all()  # the money column's unused bins


def test_piecewise_encoding_lets_a_linear_layer_fit_a_bend():
    # |x| has a bend at 0: linear in x it cannot be fitted at all, linear in the encoding almost exactly.
    rng = np.random.default_rng(4)
    x = rng.uniform(-3, 3, size=(4096, 1)).astype("float32")
    y = np.abs(x[:, 0])
    encoding = PiecewiseLinearEncoding(8)
    encoding.adapt(x)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1)(encoding(inputs)))
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(x, y, epochs=40, batch_size=256, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.01 * np.var(y)


def test_piecewise_encoding_defaults_and_bad_input():
    layer = PiecewiseLinearEncoding(4)
    out = _np(layer(np.array([[-3.0], [0.0], [1.5], [3.0]], "float32")))
    # Before adapt: edges -2, -1, 0, 1, 2 (z-scored inputs).
    np.testing.assert_allclose(out, [[-1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0.5], [1, 1, 1, 2]])
    assert not layer.is_adapted
    layer.adapt(np.arange(10.0).reshape(-1, 1))
    assert layer.is_adapted
    # Quantiles that differ only below float32 precision are one edge, so no zero-width bin sits mid-way.
    close = PiecewiseLinearEncoding(3)
    close.adapt(np.array([[0.0], [1.0], [1.0 + 1e-9], [2.0]]))  # quantiles 0, 1, 1 + 1e-9, 2
    np.testing.assert_array_equal(_np(close.edges)[0], [0.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(_np(close(np.array([[5.0]], "float32")))[0], [1.0, 4.0, 0.0])
    with pytest.raises(ValueError, match="num_bins"):
        PiecewiseLinearEncoding(0)
    with pytest.raises(ValueError, match="2 features"):
        layer.adapt(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        layer.adapt(np.array([[1.0], [np.nan]]))
    with pytest.raises(ValueError, match="non-empty"):
        layer.adapt(np.zeros((0, 1)))


def test_feature_embedding_appends_piecewise_encodings_of_numeric_inputs():
    features = [{"name": "n", "kind": "numeric"}, {"name": "m", "kind": "numeric"},
                {"name": "c", "kind": "categorical", "vocab_size": 5, "embedding_dim": 3}]
    layer = FeatureEmbedding(features, numeric_bins=4)
    inputs = {"n": np.array([0.5, 3.0], "float32"), "m": np.array([-1.0, 2.0], "float32"),
              "c": np.array([1, 2], "int32")}
    out = _np(layer(inputs))
    assert out.shape == (2, layer.output_dim) == (2, 2 + 2 * 4 + 3)
    np.testing.assert_allclose(out[:, :2], [[0.5, -1.0], [3.0, 2.0]])  # the raw values stay
    np.testing.assert_allclose(out[:, 2:10], _np(layer.piecewise(np.stack([inputs["n"], inputs["m"]], axis=1))))
    np.testing.assert_allclose(out[:, 10:], _np(layer.rows("c"))[[1, 2]])
    assert layer.needs_adapt
    layer.adapt({"n": np.arange(100.0), "m": np.arange(100.0) * 2, "c": np.zeros(100)})
    assert not layer.needs_adapt
    np.testing.assert_allclose(_np(layer.piecewise.edges)[1], np.linspace(0, 198, 5), rtol=1e-6)
    with pytest.raises(KeyError, match="m"):
        layer.adapt({"n": np.arange(10.0)})
    # Adapting builds a layer that has not been called yet.
    fresh = FeatureEmbedding(features, numeric_bins=4)
    fresh.adapt({"n": np.arange(100.0), "m": np.arange(100.0) * 2})
    assert fresh.adaptable and not fresh.needs_adapt and fresh.bin_edges()["m"] == list(np.linspace(0, 198, 5))
    assert _np(fresh(inputs)).shape == out.shape
    # Without numeric inputs, or without bins, there is nothing to adapt.
    assert not FeatureEmbedding(features[2:], numeric_bins=4).adaptable
    assert not FeatureEmbedding(features).adaptable and FeatureEmbedding(features).bin_edges() == {}
    with pytest.raises(ValueError, match="numeric_bins"):
        FeatureEmbedding(features, numeric_bins=-1)
