"""The serving speed paths: the fused transform equals tf.Transform's, allowed_batch_sizes pads batches."""
import os
import textwrap
import threading

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from serving.batching import Batcher  # noqa: E402
from serving.config import BatchingParameters, parse_batching_parameters  # noqa: E402
from serving.testing import raw_columns, tiny_exports  # noqa: E402


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    return tiny_exports(str(tmp_path_factory.getbasetemp() / "serving-exports"))


def _raw_with_edge_cases(frame, spec, vocabulary_of):
    """Raw serving columns of `frame` with unseen, empty and padded strings and NaN numbers mixed in."""
    raw = raw_columns(frame, spec)
    rng = np.random.default_rng(0)
    for name, values in raw.items():
        values = values.copy()
        rows = rng.choice(len(values), size=max(3, len(values) // 4), replace=False)
        if values.dtype == object:
            known = vocabulary_of(name) or [b"x"]
            edits = [b"", b"never seen in training", b"  " + known[0] + b"  ", b" "]
            for i, row in enumerate(rows):
                values[row] = edits[i % len(edits)]
        else:
            values[rows[::2]] = np.nan
            values[rows[1::2]] = -values[rows[1::2]] * 1000
        raw[name] = values
    return raw


def _assert_fused_equals_tf_transform(spec, transform_dir, frame):
    import tensorflow_transform as tft

    from serving.fast_transform import FusedTransform

    tft_output = tft.TFTransformOutput(transform_dir)
    layer = tft_output.transform_features_layer()
    fused = FusedTransform(spec, tft_output, layer)
    vocabulary = dict(fused._vocabulary_values)
    raw = _raw_with_edge_cases(frame, spec, lambda name: list(vocabulary.get(name, ())))
    tensors = {k: tf.constant(v) for k, v in raw.items()}
    want = layer(tensors)
    got = fused.transform(tensors)
    assert set(got) == set(spec.input_names)
    for name, value in got.items():
        expected = want[name].numpy()
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(value.numpy(), expected, err_msg=name)
    return fused, raw, got


def test_fused_transform_equals_tf_transform_on_census(exports):
    fused, raw, got = _assert_fused_equals_tf_transform(exports.spec, exports.transform_dir, exports.frame)
    unseen = raw["class_worker"] == b"never seen in training"
    assert unseen.any()
    from features.spec import CategoricalFeature

    categorical = [f.name for f in exports.spec.features if isinstance(f, CategoricalFeature)]
    sizes = dict(zip(categorical, fused._vocab_sizes.numpy()))
    assert (got["class_worker"].numpy()[unseen] >= sizes["class_worker"]).all()


@pytest.mark.slow
def test_fused_transform_equals_tf_transform_on_a_non_census_spec(tmp_path):
    """Hashed, top_k-cut, log and bucketized features (the spec of tests/test_dataset_config.py)."""
    from features.io import read_dataset
    from features.spec import load_dataset_spec
    from features.transform import transform_in_process
    from test_dataset_config import CONFIG, make_csv

    config = tmp_path / "clicks.yaml"
    config.write_text(textwrap.dedent(CONFIG))
    spec = load_dataset_spec(config)
    make_csv(tmp_path / "clicks.csv")
    frame = read_dataset(tmp_path / "clicks.csv", spec)
    transform_in_process(spec, frame.iloc[:300], {}, str(tmp_path / "tft"), progress=None)
    _, raw, got = _assert_fused_equals_tf_transform(spec, str(tmp_path / "tft"), frame.iloc[300:])
    # "de" is cut by top_k=2: the OOV id 2, as tf.Transform gives.
    de = raw["country"] == b"de"
    assert de.any() and (got["country"].numpy()[de] == 2).all()


def test_fused_transform_check_catches_a_difference(exports):
    import tensorflow_transform as tft

    from serving.fast_transform import FusedTransform, FusedTransformError

    tft_output = tft.TFTransformOutput(exports.transform_dir)
    layer = tft_output.transform_features_layer()
    fused = FusedTransform(exports.spec, tft_output, layer)
    fused._mean = tf.constant(fused._mean.numpy() + 0.01)
    with pytest.raises(FusedTransformError, match="feature 'age'"):
        fused.check(layer)


def test_fused_transform_vocabulary_keys_are_per_feature_and_collisions_refused(exports):
    import tensorflow_transform as tft

    from serving.fast_transform import FusedTransform, FusedTransformError

    tft_output = tft.TFTransformOutput(exports.transform_dir)
    fused = FusedTransform(exports.spec, tft_output, tft_output.transform_features_layer())
    # The same value in two features gets two keys, each in its own feature's range.
    keys = fused._int_keys([0, 1, 1], [b"same", b"same", b"other"])
    assert len(set(keys.tolist())) == 3
    assert (keys >> fused._key_bits).tolist() == [0, 1, 1]
    # With 1-bit fingerprints, three values of one feature cannot all have distinct keys.
    fused._key_bits = 1
    with pytest.raises(FusedTransformError, match="shares its 1-bit fingerprint"):
        fused._int_keys([0, 0, 0], [b"a", b"b", b"c"])


# -- allowed_batch_sizes ------------------------------------------------------------------------------------


def test_allowed_batch_sizes_are_parsed_and_validated():
    params = parse_batching_parameters("max_batch_size { value: 32 }\nallowed_batch_sizes: 4\n"
                                       "allowed_batch_sizes: 16\nallowed_batch_sizes: 32\n")
    assert params.allowed_batch_sizes == (4, 16, 32)
    with pytest.raises(ValueError, match="strictly increasing"):
        BatchingParameters(max_batch_size=32, allowed_batch_sizes=(16, 8, 32))
    with pytest.raises(ValueError, match="end with max_batch_size"):
        parse_batching_parameters("max_batch_size { value: 32 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 16\n")


def test_batches_are_padded_to_the_next_allowed_size():
    seen = []

    def run(inputs):
        seen.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2.0}

    params = BatchingParameters(max_batch_size=8, batch_timeout_micros=200_000, allowed_batch_sizes=(2, 4, 8))
    batcher = Batcher(run, params)
    try:
        # One request of 3 rows: padded to 4, the padding row's output dropped.
        out = batcher.run({"x": np.array([1.0, 2.0, 3.0], np.float32)}, 3)
        np.testing.assert_array_equal(out["y"], [2.0, 4.0, 6.0])
        # Three concurrent 1-row requests merge into 3 rows, padded to 4; each gets its own row back.
        results = {}
        barrier = threading.Barrier(3)

        def client(i):
            barrier.wait()
            results[i] = batcher.run({"x": np.array([float(i)], np.float32)}, 1)["y"]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert {i: float(v[0]) for i, v in results.items()} == {0: 0.0, 1: 2.0, 2: 4.0}
        assert set(seen) <= {2, 4, 8} and 4 in seen
    finally:
        batcher.stop()
    plain = Batcher(run, BatchingParameters(max_batch_size=8))
    assert plain.padded_size(3) == 3  # no allowed sizes: no padding
    plain.stop()


# -- also_bucketize: the number and its quantile-bucket id (features/spec.py) --------------------------------


@pytest.mark.slow
def test_fused_transform_equals_tf_transform_with_also_bucketize(tmp_path):
    """A numeric feature that also emits a bucket id, beside a bucketize one and a log one: same values as
    tf.Transform."""
    import tensorflow_transform as tft

    from features.io import read_dataset
    from features.spec import load_dataset_spec
    from features.transform import transform_in_process, transformed_feature_info
    from test_dataset_config import CONFIG, make_csv

    config = tmp_path / "clicks.yaml"
    # age: number + 5 quantile buckets; clicks: log1p number + 3 buckets of the logged value; score stays
    # bucketize-only, between them in the analyzer order, so a boundary list read out of order would show.
    text = textwrap.dedent(CONFIG).replace("{name: age, type: numeric}",
                                           "{name: age, type: numeric, also_bucketize: 5}")
    text = text.replace("{name: clicks, type: numeric, log: true}",
                        "{name: clicks, type: numeric, log: true, also_bucketize: 3}")
    config.write_text(text)
    spec = load_dataset_spec(config)
    assert spec.input_names == ["user_id", "country", "age", "age_bucket", "clicks", "clicks_bucket", "score"]
    make_csv(tmp_path / "clicks.csv")
    frame = read_dataset(tmp_path / "clicks.csv", spec)
    transform_in_process(spec, frame.iloc[:300], {}, str(tmp_path / "tft"), progress=None)
    tft_output = tft.TFTransformOutput(str(tmp_path / "tft"))
    info = {i["name"]: i for i in transformed_feature_info(spec, tft_output)}
    assert info["age"]["kind"] == "numeric" and info["age_bucket"] == {"name": "age_bucket", "kind": "categorical",
                                                                        "vocab_size": 5}
    assert info["clicks_bucket"]["vocab_size"] == 3

    # FusedTransform runs its own probe check too; this compares it with tf.Transform on held-out rows.
    _, raw, got = _assert_fused_equals_tf_transform(spec, str(tmp_path / "tft"), frame.iloc[300:])
    tensors = {k: tf.constant(v) for k, v in raw.items()}
    # The bucket ids are a real function of the value: ordered with it, and spread over the buckets.
    age, age_bucket = got["age"].numpy(), got["age_bucket"].numpy()
    order = np.argsort(age, kind="stable")
    assert (np.diff(age_bucket[order]) >= 0).all()
    assert len(np.unique(age_bucket)) == 5
    # The number itself is unchanged by also_bucketize: still the z-score.
    plain = _spec_without_buckets(text, tmp_path)
    transform_in_process(plain, read_dataset(tmp_path / "clicks.csv", plain).iloc[:300], {}, str(tmp_path / "plain"),
                         progress=None)
    plain_layer = tft.TFTransformOutput(str(tmp_path / "plain")).transform_features_layer()
    np.testing.assert_allclose(plain_layer(tensors)["age"].numpy(), got["age"].numpy(), rtol=1e-6)


@pytest.mark.slow
def test_zero_bucket_gives_zero_its_own_id_in_tf_transform_and_the_fused_transform(tmp_path):
    """clicks (Poisson, ~5 % zeros): 0 -> id 0, the non-zero values' own 3 quantiles -> ids 1..3, both transforms."""
    import tensorflow_transform as tft

    from features.io import read_dataset
    from features.spec import load_dataset_spec
    from features.transform import transform_in_process, transformed_feature_info
    from test_dataset_config import CONFIG, make_csv

    config = tmp_path / "clicks.yaml"
    text = textwrap.dedent(CONFIG).replace("{name: clicks, type: numeric, log: true}",
                                           "{name: clicks, type: numeric, log: true, also_bucketize: 3, "
                                           "zero_bucket: true}")
    config.write_text(text)
    spec = load_dataset_spec(config)
    raw_frame = make_csv(tmp_path / "clicks.csv")
    frame = read_dataset(tmp_path / "clicks.csv", spec)
    transform_in_process(spec, frame.iloc[:300], {}, str(tmp_path / "tft"), progress=None)
    tft_output = tft.TFTransformOutput(str(tmp_path / "tft"))
    info = {i["name"]: i for i in transformed_feature_info(spec, tft_output)}
    assert info["clicks_bucket"]["vocab_size"] == 4

    _, raw, got = _assert_fused_equals_tf_transform(spec, str(tmp_path / "tft"), frame.iloc[300:])
    # The probe rows include NaN (-> the training mean, not zero) and negative values (log1p(max(x, 0)) = 0).
    clicks, ids = np.asarray(raw["clicks"], np.float64), got["clicks_bucket"].numpy()
    zero = clicks <= 0
    assert (raw_frame["clicks"].astype(float)[300:] == 0).any() and zero.any()
    assert (ids[zero] == 0).all()
    assert (ids[~zero] >= 1).all() and set(ids[clicks > 0].tolist()) == {1, 2, 3}


def _spec_without_buckets(text, tmp_path):
    from features.spec import load_dataset_spec

    path = tmp_path / "plain.yaml"
    path.write_text(text.replace(", also_bucketize: 5", "").replace(", also_bucketize: 3", ""))
    return load_dataset_spec(path)


# -- the flat signature call ----------------------------------------------------------------------------------


@pytest.mark.parametrize("export", ["xla", "plain"])
def test_flat_signature_call_equals_the_public_wrapper(exports, export):
    """Signature.call (pre-bound flat call) gives every signature's outputs exactly as the public wrapper does."""
    from serving.models import Servable
    from serving.testing import example_bytes

    servable = Servable("m", 1, exports.xla_dir if export == "xla" else exports.plain_dir, None, 8192)
    examples = np.array(example_bytes(exports.frame, exports.spec, rows=5), dtype=object)
    raw = raw_columns(exports.frame.iloc[:5], exports.spec)
    for key, sig in servable.signatures.items():
        assert sig.fast_call, key
        if key == "transform_features":
            continue  # needs the label columns in its examples; the other signatures cover the flat call
        inputs = raw if key == "predict_raw" else {name: examples for name in sig.inputs}
        got = sig.call(inputs)
        want = sig.fn(**{k: tf.constant(v, dtype=sig.inputs[k].dtype) for k, v in inputs.items()})
        assert sorted(got) == sorted(want), key
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value.numpy(), err_msg=f"{key}/{name}")


def test_signature_call_falls_back_to_the_public_wrapper(exports, monkeypatch):
    from serving.models import Servable, Signature
    from serving.testing import example_bytes

    monkeypatch.setattr(Signature, "_bind_flat_call", lambda self, fn: None)
    servable = Servable("m", 1, exports.plain_dir, None, 8192)
    sig = servable.signature("serving_default")
    assert not sig.fast_call
    examples = np.array(example_bytes(exports.frame, exports.spec, rows=3), dtype=object)
    _, out = servable.run("serving_default", {"examples": examples})
    want = sig.fn(examples=tf.constant(examples, tf.string))
    for name, value in want.items():
        np.testing.assert_array_equal(out[name], value.numpy())


# -- the batcher's threads --------------------------------------------------------------------------------------


def test_batch_threads_survive_collecting_at_the_same_time():
    """Two batch threads waiting on the same requests: the one left with nothing goes on serving, not exit."""
    params = BatchingParameters(max_batch_size=64, batch_timeout_micros=20_000, num_batch_threads=2)
    batcher = Batcher(lambda inputs: {"y": inputs["x"] * 2.0}, params)
    try:
        for _ in range(10):
            results = []
            threads = [threading.Thread(target=lambda i=i: results.append(
                float(batcher.run({"x": np.array([float(i)], np.float32)}, 1)["y"][0]))) for i in range(5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert sorted(results) == [0.0, 2.0, 4.0, 6.0, 8.0]
        assert all(t.is_alive() for t in batcher._threads)
    finally:
        batcher.stop()
    assert not any(t.is_alive() for t in batcher._threads)


def test_a_full_batch_runs_on_the_calling_thread():
    ran_on = []

    def run(inputs):
        ran_on.append(threading.current_thread())
        return {"y": inputs["x"] + 1.0}

    batcher = Batcher(run, BatchingParameters(max_batch_size=4, batch_timeout_micros=1_000_000))
    try:
        out = batcher.run({"x": np.arange(4, dtype=np.float32)}, 4)
        np.testing.assert_array_equal(out["y"], [1.0, 2.0, 3.0, 4.0])
        assert ran_on == [threading.current_thread()]
        out = batcher.run({"x": np.arange(2, dtype=np.float32)}, 2)  # smaller: queued, run by a batch thread
        np.testing.assert_array_equal(out["y"], [1.0, 2.0])
        assert ran_on[1] in batcher._threads
    finally:
        batcher.stop()


def test_a_cancelled_request_leaves_the_queue_and_submit_refuses_a_full_batch():
    seen = []

    def run(inputs):
        seen.append(inputs["x"].tolist())
        return {"y": inputs["x"] * 10.0}

    batcher = Batcher(run, BatchingParameters(max_batch_size=8, batch_timeout_micros=300_000))
    try:
        futures = [batcher.submit({"x": np.array([float(i)], np.float32)}, 1) for i in range(3)]
        assert futures[1].cancel()  # still queued: cancelling works
        assert futures[0].result(30)["y"].tolist() == [0.0]
        assert futures[2].result(30)["y"].tolist() == [20.0]
        assert seen == [[0.0, 2.0]]
        assert batcher._queued_examples == 0
        with pytest.raises(ValueError, match="full batch"):
            batcher.submit({"x": np.zeros(8, np.float32)}, 8)
    finally:
        batcher.stop()


# -- output encoding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("array", [np.array([0.25, 0.5], np.float32), np.arange(6, dtype=np.int64).reshape(2, 3),
                                   np.array([[1.5]], np.float64), np.array([b"a", b"bc"], dtype=object),
                                   np.array(3.0, np.float32), np.array([1, 2], np.int16)])
def test_to_proto_into_a_response_field_equals_a_fresh_proto(array):
    from tensorflow_serving.apis import predict_pb2

    from serving.tensors import to_numpy, to_proto

    fresh = to_proto(array)
    response = predict_pb2.PredictResponse()
    assert to_proto(array, response.outputs["y"]) is response.outputs["y"]
    assert response.outputs["y"] == fresh
    assert [d.size for d in fresh.tensor_shape.dim] == list(array.shape)
    want = array.astype(np.float32) if array.dtype == np.int16 else array  # no int16 on the wire: float32
    np.testing.assert_array_equal(to_numpy(fresh, "y", 1 << 20), want)
    np.testing.assert_array_equal(tf.make_ndarray(fresh), want)
