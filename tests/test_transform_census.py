"""tf.Transform on the bundled Census sample: one Beam run shared by the tests (marked slow)."""
import numpy as np
import pandas as pd
import pytest

from features.census import CENSUS_SAMPLE_PATH, census_spec, read_census
from features.spec import WEIGHT_KEY

pytestmark = pytest.mark.slow

N_TRAIN = 3000


@pytest.fixture(scope="module")
def census_run(tmp_path_factory):
    from features.transform import transform_in_process

    spec = census_spec(1)
    df = read_census(CENSUS_SAMPLE_PATH)
    train, valid = df.iloc[:N_TRAIN].reset_index(drop=True), df.iloc[N_TRAIN:4000].reset_index(drop=True)
    odd = valid.iloc[:2].copy()
    odd["class_worker"] = "Astronaut"  # never seen in training
    odd["age"] = np.nan  # missing numeric value
    out_dir = str(tmp_path_factory.mktemp("census_transform"))
    tft_output, arrays = transform_in_process(spec, train, {"valid": valid, "odd": odd}, out_dir, progress=None)
    return spec, train, valid, tft_output, arrays, out_dir


def test_outputs_cover_features_labels_weight(census_run):
    spec, train, valid, _, arrays, _ = census_run
    assert set(arrays) == {"train", "valid", "odd"}
    expected = set(spec.input_names) | {"income_label", "marital_label", WEIGHT_KEY}
    assert set(arrays["train"]) == expected
    # age_bucket is age's training-quantile bucket: ordered with age, and spread over many of its 64 buckets.
    age, bucket = arrays["train"]["age"], arrays["train"]["age_bucket"]
    order = np.argsort(age, kind="stable")
    assert np.all(np.diff(bucket[order]) >= 0)
    assert len(np.unique(bucket)) > 30 and bucket.min() >= 0 and bucket.max() < 64
    assert all(len(v) == N_TRAIN for v in arrays["train"].values())
    assert all(len(v) == len(valid) for v in arrays["valid"].values())


def test_zscore_matches_training_statistics(census_run):
    _, train, valid, _, arrays, _ = census_run
    age = train["age"].to_numpy()
    np.testing.assert_allclose(arrays["train"]["age"], (age - age.mean()) / age.std(), atol=1e-4)
    assert abs(arrays["train"]["age"].mean()) < 1e-4 and abs(arrays["train"]["age"].std() - 1) < 1e-3
    # Eval data uses the *training* statistics.
    np.testing.assert_allclose(arrays["valid"]["age"], (valid["age"].to_numpy() - age.mean()) / age.std(), atol=1e-4)
    gains = np.log1p(train["capital_gains"].to_numpy())
    np.testing.assert_allclose(arrays["train"]["capital_gains"], (gains - gains.mean()) / gains.std(), atol=1e-4)


def test_missing_numeric_is_imputed_with_training_mean(census_run):
    assert np.allclose(census_run[4]["odd"]["age"], 0.0, atol=1e-5)  # mean -> z-score 0


def test_vocabulary_ids(census_run):
    spec, train, _, tft_output, arrays, _ = census_run
    from features.transform import transformed_feature_info

    info = {d["name"]: d for d in transformed_feature_info(spec, tft_output)}
    assert info["age"] == {"name": "age", "kind": "numeric", "vocab_size": None}
    for name in ("class_worker", "det_ind_code", "sex", "year"):
        size = info[name]["vocab_size"]
        assert info[name]["kind"] == "categorical"
        assert size == train[name].nunique() + 1  # vocabulary + one OOV bucket
        for split in ("train", "valid", "odd"):
            ids = arrays[split][name]
            assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < size
        # Most frequent value first; the same value always gets the same id.
        ids = arrays["train"][name]
        assert (ids[train[name] == train[name].value_counts().index[0]] == 0).all()
        assert pd.Series(ids).groupby(train[name].to_numpy()).nunique().max() == 1
    # An unseen value lands in the OOV bucket right after the vocabulary.
    assert (arrays["odd"]["class_worker"] == info["class_worker"]["vocab_size"] - 1).all()


def test_labels_of_known_rows(census_run):
    _, train, _, _, arrays, _ = census_run
    income, marital = arrays["train"]["income_label"], arrays["train"]["marital_label"]
    # Sample rows 1, 4 and 32 (see features/data): married/<50K, never married/<50K, married/50K+.
    assert (income[0], marital[0]) == (0.0, 0.0)
    assert (income[3], marital[3]) == (0.0, 1.0)
    assert (income[31], marital[31]) == (1.0, 0.0)
    np.testing.assert_array_equal(income, (train["income_50k"] == "50000+").to_numpy(np.float32))
    np.testing.assert_array_equal(marital, (train["marital_stat"] == "Never married").to_numpy(np.float32))


def test_weight_is_normalised_instance_weight(census_run):
    _, train, _, _, arrays, _ = census_run
    w = train["instance_weight"].to_numpy()
    np.testing.assert_allclose(arrays["train"][WEIGHT_KEY], w / w.mean(), rtol=1e-4)


def test_saved_transform_serves_raw_csv_values(census_run):
    """The written transform loads with TFTransformOutput and handles raw UCI strings (spaces, period)."""
    import tensorflow as tf
    import tensorflow_transform as tft
    from features.transform import raw_feature_spec, serving_feature_spec

    spec, train, _, _, arrays, out_dir = census_run
    loaded = tft.TFTransformOutput(out_dir)
    raw_spec = raw_feature_spec(spec)
    assert set(serving_feature_spec(spec)) == set(spec.feature_names)
    assert set(raw_spec) - set(serving_feature_spec(spec)) == {"income_50k", "marital_stat", "instance_weight"}
    assert raw_spec["age"].dtype == tf.float32 and raw_spec["income_50k"].dtype == tf.string
    row = train.iloc[[31]]
    raw = {}
    for c in raw_spec:
        v = row[c].to_numpy()
        raw[c] = tf.constant(v.astype(np.float32)) if raw_spec[c].dtype == tf.float32 else \
            tf.constant([" " + str(v[0]) + (" " if c != "income_50k" else ".")])
    out = loaded.transform_raw_features(raw, drop_unused_features=True)
    assert float(out["income_label"][0]) == 1.0
    for name in ("class_worker", "det_occ_code", "age"):
        assert np.allclose(out[name].numpy()[0], arrays["train"][name][31])
