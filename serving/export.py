"""Export a trained model as a TF Serving SavedModel.

`export_serving_model(model, transform_output_dir, spec, export_dir)` writes
one SavedModel that holds the whole inference path: tf.Example parsing, the
tf.Transform graph (the same `preprocessing_fn` that produced the training
data, so training and serving cannot drift apart) and the Keras 3 model.

Signatures:

* `serving_default`: `examples` (tf.string `[None]`, serialized tf.Example
  with the raw serving features) -> one float32 `[batch]` output per task,
  named by the task, plus `<task>_gates` `[batch, E]` (gate weights) when
  asked for and the architecture has gates.
* `predict_raw`: one `[None]` tensor per raw serving feature (float32 or
  string, as in `features.transform.serving_feature_spec`) -> the same
  outputs, for clients that do not build tf.Example protos.
* `transform_features`: `examples` (serialized tf.Example that include the
  label columns) -> every transformed feature, the labels
  (`spec.label_key(task)`) and the weight.  TFMA's Evaluator reads numeric
  labels from raw examples through it (`preprocessing_function_names`).
* `classify_<task>` (binary heads) and `regress_<task>` (every head): TF
  Serving's Classify / Regress signatures (method names
  `tensorflow/serving/classify` / `tensorflow/serving/regress`, set after
  saving, see `_set_method_names`): `inputs` (serialized tf.Example) ->
  `classes` ["0", "1"] and `scores` [1 - p, p], or `outputs` (the score).

serving_default and predict_raw transform the raw features with
`serving.fast_transform.FusedTransform`, a few ops on stacked features built
from the fitted tf.Transform output and checked against its graph at export
(`fused_transform=False`, or a failed check, keeps the tf.Transform graph);
transform_features always runs the tf.Transform graph.

The expert dispatch (the Keras model call: embeddings, experts, gates,
mixtures, towers) runs inside a `tf.function(jit_compile=True)` when
`xla=True`, so the SavedModel holds an XLA-compiled function (its FunctionDef
carries `_XlaMustCompile`).  TF Serving's GPU builds cannot run such
functions (tensorflow/serving#2214), hence `xla=False`, which writes the
same computation without the XLA attribute.

XLA compiles one executable per input shape.  A serving batch can have any
size, so the XLA path pads every batch up to the next power of two (repeating
the last row) and slices the outputs back: at most ~log2(max batch) compiles
instead of one per distinct batch size.  Rows are independent at inference
(no batch statistics, dropout off), so padding does not change any output.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Dict

import keras
import tensorflow as tf

from mmoe.models import GATES_SUFFIX, with_gate_outputs

log = logging.getLogger("mmoe.serving")

# Signature names (TF Serving's default key, then ours).
SERVING_DEFAULT = "serving_default"
PREDICT_RAW = "predict_raw"
TRANSFORM_FEATURES = "transform_features"
EXAMPLES_INPUT = "examples"
# TF Serving's Classify and Regress APIs: per head, `classify_<task>` (binary heads) and `regress_<task>` (every
# head), taking serialized tf.Examples under `inputs`.
CLASSIFY_PREFIX = "classify_"
REGRESS_PREFIX = "regress_"
CLASSIFY_INPUTS = "inputs"
CLASSIFY_CLASSES = "classes"
CLASSIFY_SCORES = "scores"
REGRESS_OUTPUTS = "outputs"
CLASSIFY_METHOD_NAME = "tensorflow/serving/classify"
REGRESS_METHOD_NAME = "tensorflow/serving/regress"
# Class labels of a binary head, in the order of their scores (1 - p, p); our server's Classify uses the same.
BINARY_CLASSES = ("0", "1")

# Written next to saved_model.pb so tools can tell how the export was made
# without loading it (assets.extra is TF Serving's place for such files).
EXPORT_INFO_FILE = "mmoe_export.json"


_BUCKETS = [2 ** i for i in range(31)]


def _next_power_of_two(n: tf.Tensor) -> tf.Tensor:
    """Smallest power of two >= n (1 for n = 0), as int32."""
    index = tf.searchsorted(tf.constant(_BUCKETS, tf.int32), tf.reshape(tf.cast(n, tf.int32), [1]), side="left")
    return tf.gather(tf.constant(_BUCKETS, tf.int32), index[0])


class ServingModule(tf.Module):
    """Holds the Keras model and the tf.Transform layer; its tf.functions are the signatures.

    Built by `export_serving_model`; kept public so tests and the benchmark can
    call the same functions in process without a save/load round trip.
    """

    def __init__(self, model: keras.Model, tft_output, spec, *, xla: bool, with_gates: bool,
                 fused_transform: bool = True):
        super().__init__(name="mmoe_serving")
        from features.transform import raw_feature_spec, serving_feature_spec
        from serving.fast_transform import FusedTransform, FusedTransformError

        model = with_gate_outputs(model) if with_gates else model
        # The Keras model is held in a closure, not as a tracked attribute, and only its variables are
        # tracked.  tf.saved_model.save walks every tracked attribute of every layer, and a layer attribute
        # it cannot serialize (e.g. a dict with integer keys holding lists) would make the export fail
        # although the computation is fine; the variables are all the SavedModel needs.
        self._call_model = lambda inputs: model(inputs, training=False)
        self.model_variables = [getattr(v, "value", v) for v in model.variables]
        # Tracked attribute: tf.saved_model.save follows it and saves the
        # transform graph and its assets inside this SavedModel.
        self.tft_layer = tft_output.transform_features_layer()
        self._xla = bool(xla)
        self._serving_spec = serving_feature_spec(spec)
        self._raw_spec = raw_feature_spec(spec)
        self._model_inputs = {name: tensor.dtype for name, tensor in model.input.items()}
        self._output_names = list(model.output.keys())
        self._task_names = [t.name for t in spec.tasks]
        # Compiled by XLA (jit_compile=True) or a plain graph function: the only difference between the two exports.
        self.dispatch = tf.function(self._dispatch_packed, jit_compile=self._xla, autograph=False)
        # Model inputs grouped by their transformed dtype (float32 numbers, int64 ids), in model order: the
        # dispatch takes one [batch, n] tensor per group.
        transformed_spec = tft_output.transformed_feature_spec()
        groups: Dict[str, list] = {}
        for name in self._model_inputs:
            groups.setdefault(transformed_spec[name].dtype.name, []).append(name)
        self._groups = tuple((dtype, tuple(names)) for dtype, names in groups.items())
        # serving_default and predict_raw transform with the fused graph (serving/fast_transform.py), a few ops
        # instead of tf.Transform's ~1,500; it checks itself against the tf.Transform layer on probe rows and,
        # should they differ, the export keeps the tf.Transform graph (slower, never wrong).
        self.fused = None
        self.transform_kind = "tf.Transform"
        self.fused_transform_error = ""
        if fused_transform:
            try:
                self.fused = FusedTransform(spec, tft_output, self.tft_layer)
                self.transform_kind = "fused"
            except FusedTransformError as err:
                self.fused_transform_error = str(err)
                log.warning("serving export keeps the tf.Transform graph: the fused transform does not "
                            "reproduce it (%s)", err)

        example_spec = tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)
        raw_specs = {name: tf.TensorSpec([None], f.dtype, name=name) for name, f in self._serving_spec.items()}
        self.serve_examples = tf.function(self._serve_examples, input_signature=[example_spec], autograph=False)
        self.serve_raw = tf.function(self._serve_raw, input_signature=[raw_specs], autograph=False)
        self.transform_examples = tf.function(self._transform_examples, input_signature=[example_spec],
                                              autograph=False)
        inputs_spec = tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUTS)
        kinds = {t.name: t.kind for t in spec.tasks}
        self._classify = {name: tf.function(self._classify_fn(name), input_signature=[inputs_spec], autograph=False)
                          for name in self._task_names if kinds[name] == "binary"}
        self._regress = {name: tf.function(self._regress_fn(name), input_signature=[inputs_spec], autograph=False)
                         for name in self._task_names}

    # -- the graph pieces ------------------------------------------------------------------

    def _dispatch(self, inputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        outputs = self._call_model(inputs)
        return {k: tf.cast(v, tf.float32) for k, v in outputs.items()}

    def _dispatch_packed(self, packed: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """One [batch, n] tensor per transformed dtype, unpacked and cast inside the (compiled) function."""
        inputs = {}
        for group, names in self._groups:
            for name, column in zip(names, tf.unstack(packed[group], num=len(names), axis=1)):
                inputs[name] = tf.cast(column, self._model_inputs[name])
        return self._dispatch(inputs)

    def _packed_inputs(self, raw: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """Raw serving features -> one [batch, n] model-input tensor per transformed dtype."""
        if self.fused is not None:
            return self.fused.packed(raw, self._groups)
        transformed = self.tft_layer(raw)
        # Pack the ~40 [batch] inputs into one [batch, n] tensor per dtype: a handful of ops outside the
        # dispatch (stack, pad) instead of a cast and a pad per input, and fewer arguments for the call.
        return {g: tf.stack([tf.cast(transformed[n], g) for n in names], axis=1) for g, names in self._groups}

    def _model_outputs(self, raw: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        packed = self._packed_inputs(raw)
        if not self._xla:
            return self.dispatch(packed)
        batch = tf.shape(next(iter(packed.values())))[0]
        padded_size = _next_power_of_two(batch)
        last = tf.maximum(batch - 1, 0)
        # Repeat the last row (always a valid input) up to the bucket size.
        index = tf.minimum(tf.range(padded_size), last)
        outputs = self.dispatch({g: tf.gather(v, index) for g, v in packed.items()})
        return {k: v[:batch] for k, v in outputs.items()}

    def _serve_examples(self, examples):
        raw = tf.io.parse_example(examples, self._serving_spec)
        return self._model_outputs(raw)

    def _serve_raw(self, features):
        return self._model_outputs(dict(features))

    def _transform_examples(self, examples):
        raw = tf.io.parse_example(examples, self._raw_spec)
        return dict(self.tft_layer(raw))

    def _classify_fn(self, task: str):
        """Classify signature body of one binary head: classes ["0", "1"] with scores [1 - p, p] per example."""
        def classify(inputs):
            p = self._serve_examples(inputs)[task]
            scores = tf.stack([1.0 - p, p], axis=1)
            classes = tf.tile(tf.constant([BINARY_CLASSES]), tf.stack([tf.shape(p)[0], 1]))
            return {CLASSIFY_CLASSES: classes, CLASSIFY_SCORES: scores}
        return classify

    def _regress_fn(self, task: str):
        """Regress signature body of one head: its score (the probability for a binary head) per example."""
        def regress(inputs):
            return {REGRESS_OUTPUTS: self._serve_examples(inputs)[task]}
        return regress

    def signatures(self) -> dict:
        sigs = {SERVING_DEFAULT: self.serve_examples.get_concrete_function(),
                PREDICT_RAW: self.serve_raw.get_concrete_function(),
                TRANSFORM_FEATURES: self.transform_examples.get_concrete_function()}
        sigs.update({CLASSIFY_PREFIX + task: fn.get_concrete_function() for task, fn in self._classify.items()})
        sigs.update({REGRESS_PREFIX + task: fn.get_concrete_function() for task, fn in self._regress.items()})
        return sigs


def _set_method_names(export_dir: str) -> None:
    """Mark the classify_* / regress_* signatures as TF Serving classification / regression signatures.

    Why after saving: TF2's tf.saved_model.save writes every signature with
    method_name "tensorflow/serving/predict" and has no way to ask for
    another, while tensorflow_model_server's Classify and Regress refuse a
    signature whose method_name is not "tensorflow/serving/classify" /
    "tensorflow/serving/regress".  The method name is only a label in the
    MetaGraphDef (tf.saved_model.load ignores it), so the saved_model.pb is
    rewritten with the right labels, and fingerprint.pb, which holds a hash
    of saved_model.pb, is written again to match.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(export_dir, "saved_model.pb")
    saved = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(path, "rb") as fh:
        saved.ParseFromString(fh.read())
    for key, sig in saved.meta_graphs[0].signature_def.items():
        if key.startswith(CLASSIFY_PREFIX):
            sig.method_name = CLASSIFY_METHOD_NAME
        elif key.startswith(REGRESS_PREFIX):
            sig.method_name = REGRESS_METHOD_NAME
    with tf.io.gfile.GFile(path, "wb") as fh:
        fh.write(saved.SerializeToString())
    fingerprint = os.path.join(export_dir, "fingerprint.pb")
    if tf.io.gfile.exists(fingerprint):
        # No public API writes a fingerprint for an existing directory; this is what tf.saved_model.save calls.
        from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

        with tf.io.gfile.GFile(fingerprint, "wb") as fh:
            fh.write(fingerprinting.CreateFingerprintDef(export_dir))


# Batch sizes replayed at load time: each is one XLA bucket compiled before the version takes traffic.
WARMUP_BATCH_SIZES = (1, 8, 32)


def _write_warmup_requests(path: str, serving_spec) -> None:
    """TF Serving's warmup file (assets.extra/tf_serving_warmup_requests): PredictionLogs replayed at load.

    The examples are synthetic (0.0 for numbers, "" for strings, which the
    transform maps to its out-of-vocabulary bucket): warmup only needs valid
    inputs, so that the first real requests do not pay for XLA compilation.
    tensorflow_model_server replays the same file.
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    feature = {}
    for name, parse in serving_spec.items():
        if parse.dtype == tf.string:
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[b""]))
        else:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[0.0]))
    example = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
    with tf.io.TFRecordWriter(path) as writer:
        for size in WARMUP_BATCH_SIZES:
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=SERVING_DEFAULT))
            request.inputs[EXAMPLES_INPUT].CopyFrom(tf.make_tensor_proto([example] * size, dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def _write_extras(extra: str, module: ServingModule, spec, xla: bool) -> None:
    """assets.extra/: TF Serving's warmup requests and our export description."""
    import json

    tf.io.gfile.makedirs(extra)
    _write_warmup_requests(os.path.join(extra, "tf_serving_warmup_requests"), module._serving_spec)
    with tf.io.gfile.GFile(os.path.join(extra, EXPORT_INFO_FILE), "w") as fh:
        fh.write(json.dumps({"xla": xla, "transform": module.transform_kind, "tasks": module._task_names,
                             "task_kinds": {t.name: t.kind for t in spec.tasks}, "outputs": module._output_names,
                             "features": {k: v.dtype.name for k, v in module._serving_spec.items()},
                             "dataset": spec.name}, indent=1))


def _check_arguments(model, transform_output_dir, spec, export_dir):
    from features.spec import DatasetSpec

    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model (Keras 3), got {type(model).__name__}")
    if not isinstance(model.input, dict) or not isinstance(model.output, dict):
        raise ValueError("model must have dict inputs and dict outputs (build it with mmoe.build_model)")
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"spec must be a features.spec.DatasetSpec, got {type(spec).__name__}")
    if not isinstance(export_dir, (str, os.PathLike)) or not os.fspath(export_dir):
        raise ValueError(f"export_dir must be a non-empty path, got {export_dir!r}")
    export_dir = os.fspath(export_dir)
    if os.path.exists(os.path.join(export_dir, "saved_model.pb")):
        raise FileExistsError(f"{export_dir} already holds a SavedModel; pick a new version directory")
    if os.path.isfile(export_dir):
        raise FileExistsError(f"export_dir {export_dir} is a file")
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        raise FileExistsError(f"export_dir {export_dir} exists and is not empty")
    if not os.path.isdir(os.fspath(transform_output_dir)):
        raise FileNotFoundError(f"transform output {transform_output_dir}: no such directory")
    if not os.path.isdir(os.path.join(os.fspath(transform_output_dir), "transform_fn")):
        raise FileNotFoundError(f"{transform_output_dir} is not a tf.Transform output (no transform_fn/ inside)")

    # input_names, not feature_names: a numeric feature with also_bucketize feeds the model two inputs.
    missing = sorted(set(spec.input_names) - set(model.input))
    extra = sorted(set(model.input) - set(spec.input_names))
    if missing or extra:
        raise ValueError(f"model inputs do not match the dataset spec's features: model lacks {missing}, "
                         f"model has inputs the spec does not produce {extra}")
    tasks = set(spec.task_names)
    heads = {k for k in model.output if not k.endswith(GATES_SUFFIX)}
    if heads != tasks:
        raise ValueError(f"model heads {sorted(heads)} do not match the spec's tasks {sorted(tasks)}")
    return export_dir


def export_serving_model(model: keras.Model, transform_output_dir: str, spec, export_dir: str, *,
                         xla: bool = True, with_gates: bool = True, fused_transform: bool = True) -> str:
    """Writes a SavedModel at export_dir (the caller picks <base>/<name>/<version>) and returns export_dir.

    Args:
        model: the trained Keras 3 model (dict inputs named after the spec's
            features, one `[batch]` output per task), e.g. from mmoe.build_model.
        transform_output_dir: a tft.TFTransformOutput directory (transform_fn/,
            transformed_metadata/) fitted for `spec`.
        spec: the features.spec.DatasetSpec the model and transform were built from.
        export_dir: where to write; must not hold a SavedModel already.  The
            SavedModel is written next to it and renamed into place, so a
            server polling the parent directory never sees half a version.
        xla: run the expert dispatch in a jit_compile=True function (False
            for TF Serving GPU builds, tensorflow/serving#2214).
        with_gates: add `<task>_gates` outputs when the model has gates.
        fused_transform: serve with `serving.fast_transform.FusedTransform`
            (checked against the tf.Transform graph at export; that graph is
            kept if they differ, see `mmoe_export.json`'s "transform");
            False always uses the tf.Transform graph.

    Returns:
        export_dir.
    """
    import tensorflow_transform as tft

    if not all(isinstance(flag, bool) for flag in (xla, with_gates, fused_transform)):
        raise TypeError(f"xla, with_gates and fused_transform must be booleans, got xla={xla!r}, "
                        f"with_gates={with_gates!r}, fused_transform={fused_transform!r}")
    export_dir = _check_arguments(model, transform_output_dir, spec, export_dir)
    tft_output = tft.TFTransformOutput(os.fspath(transform_output_dir))
    module = ServingModule(model, tft_output, spec, xla=xla, with_gates=with_gates, fused_transform=fused_transform)

    if "://" in export_dir:
        # Remote file systems (gs://, s3://) have no atomic rename: write in place with tf.io.gfile.
        tf.saved_model.save(module, export_dir, signatures=module.signatures())
        _set_method_names(export_dir)
        _write_extras(os.path.join(export_dir, "assets.extra"), module, spec, xla)
        return export_dir

    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    # Dot-prefixed and non-numeric: TF Serving's and our poller ignore it while it is being written.
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(export_dir))}.tmp-", dir=parent)
    try:
        tf.saved_model.save(module, staging, signatures=module.signatures())
        _set_method_names(staging)
        _write_extras(os.path.join(staging, "assets.extra"), module, spec, xla)
        if os.path.isdir(export_dir):
            os.rmdir(export_dir)  # empty (checked above); rename needs it gone
        os.rename(staging, export_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return export_dir


RUN_FILES = ("model.keras", "transform", "run_config.json")  # what an `mmoe train` run directory holds to export


def load_run(run_dir: str):
    """(dataset spec, Keras model, transform directory) of an `mmoe train` run; the model loads with safe_mode on."""
    import json

    import mmoe  # noqa: F401  (registers the model's layers for loading)
    from features.spec import dataset_spec_from_dict

    missing = [n for n in RUN_FILES if not os.path.exists(os.path.join(run_dir, n))]
    if missing:
        raise FileNotFoundError(f"{run_dir}: not a finished `mmoe train` run (no {', '.join(missing)})")
    with open(os.path.join(run_dir, "run_config.json")) as fh:
        spec = dataset_spec_from_dict(json.load(fh)["dataset"], source=f"{run_dir}/run_config.json")
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    return spec, model, os.path.join(run_dir, "transform")
