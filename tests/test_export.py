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
    assert set(sigs) == {SERVING_DEFAULT, PREDICT_RAW, TRANSFORM_FEATURES}
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


def test_export_without_gates(exports, tmp_path):
    out = export_serving_model(exports.model, exports.transform_dir, exports.spec, str(tmp_path / "m" / "7"),
                               xla=False, with_gates=False)
    assert out == str(tmp_path / "m" / "7")
    outputs = tf.saved_model.load(out).signatures[SERVING_DEFAULT].structured_outputs
    assert set(outputs) == {"income", "marital"}
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
    elif change == "other_spec":
        kwargs["spec"] = census_spec(2)  # task group 2: different tasks and inputs
    with pytest.raises(error, match=message):
        export_serving_model(**kwargs)
