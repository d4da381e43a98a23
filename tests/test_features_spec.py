"""DatasetSpec validation and (de)serialisation."""
import json

import pytest

from features.spec import (WEIGHT_KEY, CategoricalFeature, DatasetSpec, HashedFeature, NumericFeature, Task,
                           dataset_spec_from_dict, dataset_spec_to_dict, load_dataset_spec, save_dataset_spec,
                           transformed_name)

COLUMNS = ("user", "country", "age", "clicked", "watch_time", "w")


def make_spec(**overrides):
    kwargs = dict(
        name="toy", columns=COLUMNS,
        features=[HashedFeature("user", 100), CategoricalFeature("country"), NumericFeature("age", log=True)],
        tasks=[Task("clicked", "binary", "clicked", positive=["yes"], values=["yes", "no"]),
               Task("watch", "regression", "watch_time")],
        weight_column="w", header=True)
    kwargs.update(overrides)
    return DatasetSpec(**kwargs)


def test_valid_spec_helpers():
    spec = make_spec()
    assert spec.feature_names == ["user", "country", "age"]
    assert spec.label_key("clicked") == "clicked_label"
    assert spec.label_keys == ["clicked_label", "watch_label"]
    assert spec.label_columns == ["clicked", "watch_time"]
    assert transformed_name("age") == "age"
    assert spec.raw_dtype("age") == "float" and spec.raw_dtype("country") == "string"
    assert spec.raw_dtype("clicked") == "string" and spec.raw_dtype("watch_time") == "float"
    assert spec.raw_dtype("w") == "float"
    assert spec.used_columns == list(COLUMNS)
    assert isinstance(spec.tasks[0].positive, tuple)  # lists are frozen into tuples
    hash(spec)  # frozen and hashable


@pytest.mark.parametrize("overrides, message", [
    (dict(features=[NumericFeature("clicked")]), "label source of task 'clicked'"),
    (dict(features=[NumericFeature("w")]), "weight_column 'w' cannot also be a feature"),
    (dict(features=[NumericFeature("nope")]), "feature 'nope' is not one of the columns"),
    (dict(features=[NumericFeature("age"), CategoricalFeature("age")]), "feature 'age' is listed twice"),
    (dict(tasks=[Task("t", "binary", "missing_col", positive=["1"])]), "reads column 'missing_col'"),
    (dict(tasks=[Task("t", "binary", "clicked", positive=["y"]), Task("t", "regression", "watch_time")]),
     "task 't' is listed twice"),
    (dict(tasks=[Task("a", "binary", "clicked", positive=["y"]), Task("b", "regression", "clicked")]),
     "string label"),
    (dict(weight_column="clicked"), "cannot also be a label source"),
    (dict(weight_column="zzz"), "weight_column 'zzz' is not one of the columns"),
    (dict(columns=COLUMNS + ("age",)), "duplicate columns ['age']"),
    (dict(drop_columns=["age"]), "'age' is in drop_columns but is used"),
    (dict(features=[]), "at least one feature"),
    (dict(tasks=[]), "at least one task"),
    (dict(delimiter=";;"), "single character"),
])
def test_spec_errors(overrides, message):
    with pytest.raises(ValueError) as e:
        make_spec(**overrides)
    assert message in str(e.value)


def test_label_key_clash():
    columns = COLUMNS + ("clicked_label",)
    with pytest.raises(ValueError, match="clashes with the label key"):
        make_spec(columns=columns, features=[NumericFeature("clicked_label")])


@pytest.mark.parametrize("make, message", [
    (lambda: Task("t", "multiclass", "c"), "unknown kind 'multiclass'"),
    (lambda: Task("t", "binary", "c"), "exactly one of 'positive' or 'threshold'"),
    (lambda: Task("t", "binary", "c", positive=["a"], threshold=1.0), "exactly one of"),
    (lambda: Task("t", "binary", "c", positive="yes"), "must be a list of strings"),
    (lambda: Task("t", "binary", "c", positive=["a"], values=["b"]), "positive values ['a'] are not in 'values'"),
    (lambda: Task("t", "regression", "c", threshold=1.0), "regression task takes no"),
    (lambda: Task("t", "binary", "c", threshold=float("nan")), "finite number"),
    (lambda: NumericFeature("x", bucketize=1), "bucketize must be an integer >= 2"),
    (lambda: NumericFeature("x", bucketize=True), "bucketize must be an integer"),
    (lambda: CategoricalFeature("x", oov_buckets=0), "oov_buckets must be an integer >= 1"),
    (lambda: HashedFeature("x", hash_buckets=1), "hash_buckets must be an integer >= 2"),
    (lambda: NumericFeature(" x"), "whitespace"),
])
def test_component_errors(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert message in str(e.value)


def test_threshold_task_label_source_is_float():
    t = Task("big", "binary", "amount", threshold=10)
    assert t.threshold == 10.0 and t.source_dtype == "float"


@pytest.mark.parametrize("ext", ["yaml", "json"])
def test_round_trip(tmp_path, ext):
    spec = make_spec(features=[HashedFeature("user", 100), CategoricalFeature("country", top_k=5, min_frequency=2),
                               NumericFeature("age", bucketize=4)], drop_columns=[], na_values=["?", "NA"])
    path = tmp_path / f"spec.{ext}"
    save_dataset_spec(spec, path)
    assert load_dataset_spec(path) == spec
    assert dataset_spec_from_dict(dataset_spec_to_dict(spec)) == spec


def _write(tmp_path, data, name="spec.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["features"].append({"name": "w2", "type": "embedding"}),
     "features[3] ('w2'): unknown feature type 'embedding'"),
    (lambda d: d["features"].append({"name": "x"}), "features[3] ('x'): missing key 'type'"),
    (lambda d: d["features"][2].update(bukets=3), "features[2] ('age'): unknown key(s) ['bukets']"),
    (lambda d: d["tasks"][1].update(kind="ranking"), "tasks[1] ('watch'): task 'watch': unknown kind 'ranking'"),
    (lambda d: d["tasks"][0].pop("column"), "tasks[0] ('clicked'): missing key 'column'"),
    (lambda d: d.pop("columns"), "missing key(s) ['columns']"),
    (lambda d: d.update(colums=[]), "unknown top-level key(s) ['colums']"),
    (lambda d: d["features"][2].update(bucketize=0), "features[2] ('age'): feature 'age': bucketize"),
])
def test_load_errors_name_the_entry(tmp_path, mutate, message):
    data = dataset_spec_to_dict(make_spec())
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as e:
        load_dataset_spec(path)
    assert str(path) in str(e.value)
    assert message in str(e.value)


def test_load_bad_extension_and_syntax(tmp_path):
    bad = tmp_path / "spec.toml"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unknown spec file extension"):
        load_dataset_spec(bad)
    broken = tmp_path / "spec.yaml"
    broken.write_text("name: [unclosed")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_dataset_spec(broken)


def test_weight_key_is_reserved():
    assert WEIGHT_KEY == "__weight__"
    with pytest.raises(ValueError, match="reserved"):
        DatasetSpec("d", ["__weight__", "y"], [NumericFeature("__weight__")], [Task("t", "regression", "y")])


def test_also_bucketize_adds_a_bucket_input():
    from features.spec import bucket_name

    spec = make_spec(features=[HashedFeature("user", 100), NumericFeature("age", log=True, also_bucketize=8),
                               CategoricalFeature("country")])
    # The raw features are unchanged; the transformed inputs gain the bucket id right after its number.
    assert spec.feature_names == ["user", "age", "country"]
    assert spec.input_names == ["user", "age", "age_bucket", "country"]
    assert bucket_name("age") == "age_bucket" == spec.feature("age").bucket_input
    assert NumericFeature("age").bucket_input is None
    assert make_spec().input_names == make_spec().feature_names


@pytest.mark.parametrize("make, message", [
    (lambda: NumericFeature("x", also_bucketize=1), "also_bucketize must be an integer >= 2"),
    (lambda: NumericFeature("x", also_bucketize=True), "also_bucketize must be an integer"),
    (lambda: NumericFeature("x", bucketize=4, also_bucketize=4), "give one of them"),
    (lambda: NumericFeature("x", zero_bucket=True), "zero_bucket applies to quantile buckets"),
    (lambda: NumericFeature("x", also_bucketize=4, zero_bucket=1), "zero_bucket must be true or false"),
    # a feature already named like the bucket input
    (lambda: make_spec(columns=COLUMNS + ("age_bucket",),
                       features=[NumericFeature("age", also_bucketize=4), CategoricalFeature("age_bucket")]),
     "adds the input 'age_bucket'"),
])
def test_also_bucketize_errors(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert message in str(e.value)


@pytest.mark.parametrize("ext", ["yaml", "json"])
def test_also_bucketize_round_trip(tmp_path, ext):
    spec = make_spec(features=[NumericFeature("age", log=True, also_bucketize=16), CategoricalFeature("country")])
    path = tmp_path / f"spec.{ext}"
    save_dataset_spec(spec, path)
    loaded = load_dataset_spec(path)
    assert loaded == spec and loaded.feature("age").also_bucketize == 16
    assert dataset_spec_to_dict(spec)["features"][0] == {"name": "age", "type": "numeric", "log": True,
                                                         "also_bucketize": 16}
