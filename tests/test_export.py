"""serving.export: signatures, parity with Keras, XLA vs non-XLA, the saved graph, bad arguments."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from serving.export import (EXPORT_INFO_FILE, PREDICT_RAW, SERVING_DEFAULT, TRANSFORM_FEATURES,  # noqa: E402
                            export_serving_model)
from serving.testing import example_bytes, raw_columns, tiny_exports  # noqa: E402


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    return tiny_exports(str(tmp_path_factory.getbasetemp() / "serving-exports"))


@pytest.fixture(scope="module")
def loaded(exports):
    return {"xla": tf.saved_model.load(exports.xla_dir), "plain": tf.saved_model.load(exports.plain_dir)}


def _call_examples(loaded_model, examples):
    out = loaded_model.signatures[SERVING_DEFAULT](examples=tf.constant(examples))
    return {k: v.numpy() for k, v in out.items()}


def test_signatures_and_their_inputs_and_outputs(exports, loaded):
    sigs = loaded["xla"].signatures
    assert set(sigs) == {SERVING_DEFAULT, PREDICT_RAW, TRANSFORM_FEATURES, "classify_income", "classify_marital",
                         "regress_income", "regress_marital"}
    _, kwargs = sigs[SERVING_DEFAULT].structured_input_signature
    assert list(kwargs) == ["examples"] and kwargs["examples"].dtype == tf.string
    assert kwargs["examples"].shape.as_list() == [None]
    outputs = sigs[SERVING_DEFAULT].structured_outputs
    assert set(outputs) == {"income", "marital", "income_gates", "marital_gates"}
    assert outputs["income"].shape.as_list() == [None] and outputs["income"].dtype == tf.float32
    assert outputs["income_gates"].shape.as_list() == [None, 4]

    from features.transform import serving_feature_spec
    _, raw = sigs[PREDICT_RAW].structured_input_signature
    serving = serving_feature_spec(exports.spec)
    assert set(raw) == set(serving)
    for name, spec in raw.items():
        assert spec.dtype == serving[name].dtype and spec.shape.as_list() == [None]
    # Labels, weight and label sources are never serving inputs.
    assert "income_50k" not in raw and "instance_weight" not in raw
    assert set(sigs[PREDICT_RAW].structured_outputs) == set(outputs)

    info = json.loads(open(os.path.join(exports.xla_dir, "assets.extra", EXPORT_INFO_FILE)).read())
    assert info["xla"] is True and info["tasks"] == ["income", "marital"]
    # The fused serving transform passed its export-time check against the tf.Transform graph.
    assert info["transform"] == "fused"


def test_classify_and_regress_signatures_for_tf_serving(exports, loaded):
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(exports.plain_dir, "saved_model.pb"), "rb") as fh:
        saved.ParseFromString(fh.read())
    defs = saved.meta_graphs[0].signature_def
    assert defs[SERVING_DEFAULT].method_name == "tensorflow/serving/predict"
    for task in ("income", "marital"):
        classify, regress = defs[f"classify_{task}"], defs[f"regress_{task}"]
        assert classify.method_name == "tensorflow/serving/classify"
        assert regress.method_name == "tensorflow/serving/regress"
        for sig in (classify, regress):
            assert list(sig.inputs) == ["inputs"] and sig.inputs["inputs"].dtype == tf.string.as_datatype_enum
        assert set(classify.outputs) == {"classes", "scores"}
        assert classify.outputs["classes"].dtype == tf.string.as_datatype_enum
        assert classify.outputs["scores"].dtype == tf.float32.as_datatype_enum
        assert list(regress.outputs) == ["outputs"] and regress.outputs["outputs"].dtype == tf.float32.as_datatype_enum
    # The rewritten saved_model.pb still matches its fingerprint and loads; the scores are serving_default's.
    from tensorflow.core.protobuf import fingerprint_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    fresh = fingerprint_pb2.FingerprintDef.FromString(fingerprinting.CreateFingerprintDef(exports.plain_dir))
    assert tf.saved_model.experimental.read_fingerprint(exports.plain_dir).saved_model_checksum == \
        fresh.saved_model_checksum
    examples = example_bytes(exports.frame, exports.spec, rows=7)
    for name in ("xla", "plain"):
        want = _call_examples(loaded[name], examples)
        sigs = loaded[name].signatures
        for task in ("income", "marital"):
            got = sigs[f"classify_{task}"](inputs=tf.constant(examples))
            np.testing.assert_allclose(got["scores"].numpy()[:, 1], want[task], atol=1e-6)
            np.testing.assert_allclose(got["scores"].numpy()[:, 0], 1 - want[task], atol=1e-6)
            assert got["classes"].numpy().tolist() == [[b"0", b"1"]] * len(examples)
            regressed = sigs[f"regress_{task}"](inputs=tf.constant(examples))["outputs"].numpy()
            np.testing.assert_allclose(regressed, want[task], atol=1e-6)


def test_outputs_equal_the_keras_model(exports, loaded):
    expected = exports.model.predict(exports.model_inputs, verbose=0)
    examples = example_bytes(exports.frame, exports.spec)
    for name in ("xla", "plain"):
        got = _call_examples(loaded[name], examples)
        for task in ("income", "marital"):
            np.testing.assert_allclose(got[task], expected[task], atol=1e-5, err_msg=f"{name} {task}")
            assert np.all((got[task] >= 0) & (got[task] <= 1))
        np.testing.assert_allclose(got["income_gates"].sum(axis=1), 1.0, atol=1e-5)


def test_xla_and_plain_exports_agree_for_every_batch_size(exports, loaded):
    examples = example_bytes(exports.frame, exports.spec)
    # Odd sizes exercise the XLA path's padding to power-of-two buckets.
    for size in (1, 3, 17, len(examples)):
        xla = _call_examples(loaded["xla"], examples[:size])
        plain = _call_examples(loaded["plain"], examples[:size])
        assert xla["income"].shape == (size,)
        for key in plain:
            np.testing.assert_allclose(xla[key], plain[key], atol=1e-5, err_msg=f"{key} at batch {size}")


def test_predict_raw_equals_serving_default(exports, loaded):
    raw = raw_columns(exports.frame, exports.spec)
    got = loaded["xla"].signatures[PREDICT_RAW](**{k: tf.constant(v) for k, v in raw.items()})
    want = _call_examples(loaded["xla"], example_bytes(exports.frame, exports.spec))
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key], atol=1e-6)


def test_transform_features_returns_labels(exports, loaded):
    from features.io import read_dataset  # noqa: F401  (labels come from the raw label columns)
    from features.transform import raw_feature_spec

    frame = exports.frame.iloc[:50]
    spec = raw_feature_spec(exports.spec)
    examples = []
    for record in frame.to_dict("records"):
        feature = {}
        for name, parse in spec.items():
            if parse.dtype == tf.string:
                feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(record[name]).encode()]))
            else:
                feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(record[name])]))
        examples.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    out = loaded["plain"].signatures[TRANSFORM_FEATURES](examples=tf.constant(examples))
    income = out[exports.spec.label_key("income")].numpy()
    want = (frame["income_50k"].astype(str).str.strip() == "50000+").to_numpy(np.float32)
    np.testing.assert_array_equal(income, want)
    assert set(np.unique(out[exports.spec.label_key("marital")].numpy())) <= {0.0, 1.0}
    np.testing.assert_allclose(out["age"].numpy(), exports.model_inputs["age"][:50], atol=1e-6)


def _xla_flags(export_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as fh:
        saved.ParseFromString(fh.read())
    library = saved.meta_graphs[0].graph_def.library.function
    return [f.attr["_XlaMustCompile"].b for f in library if "_XlaMustCompile" in f.attr]


def test_saved_graph_holds_an_xla_compiled_function_only_when_asked(exports):
    assert any(_xla_flags(exports.xla_dir)), "no function with _XlaMustCompile=True in the XLA export"
    assert not any(_xla_flags(exports.plain_dir)), "the non-XLA export still has an XLA-compiled function"


def test_saved_model_cli_reads_the_export(exports):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run([cli, "show", "--dir", exports.xla_dir, "--all"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("signature_def['serving_default']", "signature_def['predict_raw']",
                 "signature_def['transform_features']", "outputs['income_gates']", "inputs['examples']"):
        assert text in result.stdout


def test_export_without_gates_and_with_the_tf_transform_graph(exports, loaded, tmp_path):
    out = export_serving_model(exports.model, exports.transform_dir, exports.spec, str(tmp_path / "m" / "7"),
                               xla=False, with_gates=False, fused_transform=False)
    assert out == str(tmp_path / "m" / "7")
    reloaded = tf.saved_model.load(out)
    outputs = reloaded.signatures[SERVING_DEFAULT].structured_outputs
    assert set(outputs) == {"income", "marital"}
    info = json.loads(open(os.path.join(out, "assets.extra", EXPORT_INFO_FILE)).read())
    assert info["transform"] == "tf.Transform"
    # The tf.Transform graph and the fused transform give the same scores.
    examples = example_bytes(exports.frame, exports.spec)
    got, want = _call_examples(reloaded, examples), _call_examples(loaded["plain"], examples)
    for task in ("income", "marital"):
        np.testing.assert_allclose(got[task], want[task], atol=1e-6)
    # Staging directories are renamed into place, never left behind.
    assert os.listdir(tmp_path / "m") == ["7"]


@pytest.mark.parametrize("change, error, message", [
    ("model", TypeError, "must be a keras.Model"),
    ("spec", TypeError, "DatasetSpec"),
    ("transform_missing", FileNotFoundError, "no such directory"),
    ("transform_not_tft", FileNotFoundError, "not a tf.Transform output"),
    ("existing", FileExistsError, "already holds a SavedModel"),
    ("export_dir", ValueError, "non-empty path"),
    ("nonempty", FileExistsError, "exists and is not empty"),
    ("xla", TypeError, "booleans"),
    ("fused", TypeError, "booleans"),
    ("other_spec", ValueError, "do not match the spec.s tasks"),
])
def test_bad_arguments_raise_clear_errors(exports, tmp_path, change, error, message):
    from features.census import census_spec

    kwargs = dict(model=exports.model, transform_output_dir=exports.transform_dir, spec=exports.spec,
                  export_dir=str(tmp_path / "out" / "1"))
    if change == "model":
        kwargs["model"] = "model.keras"
    elif change == "spec":
        kwargs["spec"] = {"name": "census"}
    elif change == "transform_missing":
        kwargs["transform_output_dir"] = str(tmp_path / "nope")
    elif change == "transform_not_tft":
        kwargs["transform_output_dir"] = str(tmp_path)
    elif change == "existing":
        kwargs["export_dir"] = exports.plain_dir
    elif change == "nonempty":
        (tmp_path / "out" / "1").mkdir(parents=True)
        (tmp_path / "out" / "1" / "notes.txt").write_text("x")
    elif change == "export_dir":
        kwargs["export_dir"] = ""
    elif change == "xla":
        kwargs["xla"] = "yes"
    elif change == "fused":
        kwargs["fused_transform"] = 1
    elif change == "other_spec":
        kwargs["spec"] = census_spec(2)  # task group 2: different tasks and inputs
    with pytest.raises(error, match=message):
        export_serving_model(**kwargs)


@pytest.mark.parametrize("xla", [True, False])
def test_spec_with_also_bucketize_and_crosses_exports_and_matches_keras(tmp_path, xla):
    # A numeric feature with also_bucketize feeds the model its value and its bucket id; the export must accept
    # that model and serve what Keras computes on the tf.Transform output.
    import textwrap

    import tensorflow_transform as tft

    from features.io import read_dataset
    from features.spec import load_dataset_spec
    from features.transform import transform_in_process, transformed_feature_info
    from mmoe import InputFeature, ModelConfig, TaskSpec, build_model
    from mmoe.training import adapt_model
    from test_dataset_config import CONFIG, make_csv

    config = tmp_path / "clicks.yaml"
    config.write_text(textwrap.dedent(CONFIG).replace("{name: age, type: numeric}",
                                                      "{name: age, type: numeric, also_bucketize: 4}"))
    spec = load_dataset_spec(config)
    make_csv(tmp_path / "clicks.csv")
    frame = read_dataset(tmp_path / "clicks.csv", spec)
    transform_in_process(spec, frame, {}, str(tmp_path / "tft"), progress=None)
    tft_output = tft.TFTransformOutput(str(tmp_path / "tft"))
    inputs = [InputFeature.from_dict(i) for i in transformed_feature_info(spec, tft_output)]
    assert "age_bucket" in {i.name for i in inputs}
    tasks = [TaskSpec(t.name, t.kind) for t in spec.tasks]
    # With shared and per-expert cross layers and piecewise-linear numeric encodings (edges adapted on the
    # transformed rows), so both exports (XLA or not) are checked on them too.
    model = build_model(ModelConfig(num_experts=2, expert_units=(4,), tower_units=(4,), cross_layers=1,
                                    expert_cross_layers=1, expert_cross_rank=2, numeric_bins=3), inputs, tasks)
    transform = tft_output.transform_features_layer()
    transformed = transform({k: tf.constant(v) for k, v in raw_columns(frame, spec).items()})
    assert adapt_model(model, {i.name: transformed[i.name].numpy() for i in inputs}) == 1
    export_dir = str(tmp_path / "export" / "1")
    export_serving_model(model, str(tmp_path / "tft"), spec, export_dir, xla=xla)

    rows = frame.iloc[:37]
    transformed = transform({k: tf.constant(v) for k, v in raw_columns(rows, spec).items()})
    want = model.predict({i.name: transformed[i.name] for i in inputs}, verbose=0)
    got = _call_examples(tf.saved_model.load(export_dir), example_bytes(rows, spec))
    for task in spec.task_names:
        np.testing.assert_allclose(got[task], want[task], atol=1e-5, err_msg=task)


def test_mmoe_export_turns_a_train_run_into_numbered_versions(tmp_path, capsys):
    import keras
    import tensorflow_transform as tft

    from features.census import CENSUS_SAMPLE_PATH, census_spec
    from features.io import read_dataset
    from pipelines.cli import main

    run, base = tmp_path / "run", tmp_path / "models" / "census"
    assert main(["train", "--data", str(CENSUS_SAMPLE_PATH), "--out", str(run), "--epochs", "1",
                 "--num-experts", "2", "--expert-units", "8", "--tower-units", "4"]) == 0
    assert main(["export", str(run), "--base-path", str(base)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {base / '1'}" in out and f"--model-base-path {base} --model-name census" in out
    assert main(["export", str(run), "--base-path", str(base), "--no-xla"]) == 0  # the next version
    assert sorted(os.listdir(base)) == ["1", "2"]
    assert json.loads((base / "2" / "assets.extra" / EXPORT_INFO_FILE).read_text())["xla"] is False
    # Version 1 serves what the run's model computes on the run's own transform.
    spec = census_spec(1)
    rows = read_dataset(CENSUS_SAMPLE_PATH, spec).iloc[:25]
    transform = tft.TFTransformOutput(str(run / "transform")).transform_features_layer()
    transformed = transform({k: tf.constant(v) for k, v in raw_columns(rows, spec).items()})
    model = keras.saving.load_model(run / "model.keras")
    want = model.predict({name: transformed[name] for name in model.input}, verbose=0)
    got = _call_examples(tf.saved_model.load(str(base / "1")), example_bytes(rows, spec))
    for task in spec.task_names:
        np.testing.assert_allclose(got[task], want[task], atol=1e-5, err_msg=task)
    # A version is never overwritten, and a directory that is not a finished run is named.
    assert main(["export", str(run), "--base-path", str(base), "--version", "1"]) == 2
    assert "versions are immutable" in capsys.readouterr().err
    assert main(["export", str(run), "--base-path", str(base / "1")]) == 2  # a version as the base path
    assert "is itself a version (it holds saved_model.pb)" in capsys.readouterr().err
    assert sorted(os.listdir(base / "1")) == sorted(os.listdir(base / "2"))  # nothing nested in it
    assert main(["export", str(tmp_path / "models"), "--base-path", str(base)]) == 2
    assert "not a finished `mmoe train` run (no model.keras, transform, run_config.json)" in capsys.readouterr().err
    # The serving benchmark's requests are the run's own rows (run_config.json's "data"), here a file of the
    # sample's last 30 rows standing in for it.
    import gzip

    import benchmarks.serving as serving_benchmark

    config = json.loads((run / "run_config.json").read_text())
    assert config["data"] == [os.path.abspath(CENSUS_SAMPLE_PATH)]
    with gzip.open(CENSUS_SAMPLE_PATH, "rt") as fh:
        tail = fh.read().splitlines()[-30:]
    other = tmp_path / "other.csv.gz"
    with gzip.open(other, "wt") as fh:
        fh.write("\n".join(tail) + "\n")
    config["data"] = [str(other)]
    (run / "run_config.json").write_text(json.dumps(config))
    _, frame, dirs = serving_benchmark.exports_from_run(str(run), str(tmp_path / "bench"))
    assert frame.equals(read_dataset(other, spec)) and len(frame) == 30
    assert sorted(dirs) == ["plain", "xla"]
