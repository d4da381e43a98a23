"""The gRPC model server over loopback, driven by TF Serving's official stubs.

One training run and two exports are shared by the session (serving.testing);
servers bind port 0 (picked by the OS) on 127.0.0.1.
"""
import os
import random
import shutil
import threading
import time

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from tensorflow.core.framework import tensor_pb2  # noqa: E402
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,  # noqa: E402
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
                                     regression_pb2)

from serving.config import BatchingParameters, ModelEntry, VersionPolicy, parse_model_config  # noqa: E402
from serving.models import AVAILABLE, END, ModelManager  # noqa: E402
from serving.server import Server  # noqa: E402
from serving.testing import example_bytes, raw_columns, tiny_exports  # noqa: E402

MAX_REQUEST_BATCH = 64


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    return tiny_exports(str(tmp_path_factory.getbasetemp() / "serving-exports"))


@pytest.fixture(scope="module")
def examples(exports):
    return example_bytes(exports.frame, exports.spec)


@pytest.fixture(scope="module")
def model_root(exports, tmp_path_factory):
    """census: versions 1 and 2 (copies of the XLA export) and a broken version 3; plain: the non-XLA export."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(exports.xla_dir, root / "census" / "1")
    shutil.copytree(exports.xla_dir, root / "census" / "2")
    (root / "census" / "3").mkdir()
    (root / "census" / "3" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    shutil.copytree(exports.plain_dir, root / "plain" / "1")
    return root


CONFIG = """
model_config_list {{
  config {{
    name: "census"
    base_path: "{root}/census"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 1 versions: 2 versions: 3 }} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
    version_labels {{ key: "broken" value: 3 }}
  }}
  config {{ name: "plain" base_path: "{root}/plain" }}
}}
"""


@pytest.fixture(scope="module")
def server(model_root):
    path = model_root / "models.config"
    path.write_text(CONFIG.format(root=model_root))
    from serving.config import load_model_config
    manager = ModelManager(load_model_config(str(path)), max_batch=MAX_REQUEST_BATCH, poll_seconds=3600,
                           config_path=str(path))
    srv = Server(manager, port=0).start()
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def predict_request(model, inputs, version=None, label=None, signature="", output_filter=()):
    request = predict_pb2.PredictRequest(output_filter=list(output_filter))
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    if signature:
        request.model_spec.signature_name = signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(value if isinstance(value, tensor_pb2.TensorProto)
                                      else tf.make_tensor_proto(value))
    return request


def examples_input(examples):
    return {"examples": tf.make_tensor_proto(list(examples), dtype=tf.string)}


def outputs_of(response):
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


# -- parity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, export", [("census", "xla_dir"), ("plain", "plain_dir")])
def test_predict_matches_the_in_process_signature(stub, exports, examples, model, export):
    loaded = tf.saved_model.load(getattr(exports, export))
    batch = examples[:40]
    want = {k: v.numpy() for k, v in loaded.signatures["serving_default"](examples=tf.constant(batch)).items()}
    response = stub.Predict(predict_request(model, examples_input(batch)))
    got = outputs_of(response)
    assert set(got) == set(want) == {"income", "marital", "income_gates", "marital_gates"}
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=key)
    assert response.model_spec.name == model and response.model_spec.signature_name == "serving_default"
    # Also equal to the Keras model on the same rows.
    keras_out = exports.model.predict({k: v[:40] for k, v in exports.model_inputs.items()}, verbose=0)
    np.testing.assert_allclose(got["income"], keras_out["income"], atol=1e-5)


def test_predict_raw_and_output_filter(stub, exports, examples):
    raw = {k: v[:10] for k, v in raw_columns(exports.frame, exports.spec).items()}
    inputs = {k: tf.make_tensor_proto(v, dtype=tf.string if v.dtype == object else tf.float32) for k, v in raw.items()}
    response = stub.Predict(predict_request("plain", inputs, signature="predict_raw", output_filter=["marital"]))
    got = outputs_of(response)
    assert list(got) == ["marital"]
    want = outputs_of(stub.Predict(predict_request("plain", examples_input(examples[:10]))))
    np.testing.assert_allclose(got["marital"], want["marital"], atol=1e-6)


def test_classify_and_regress_pick_a_head(stub, examples):
    parsed = [tf.train.Example.FromString(e) for e in examples[:3]]
    want = outputs_of(stub.Predict(predict_request("plain", examples_input(examples[:3]))))
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "plain"
    request.model_spec.signature_name = "marital"
    request.input.example_list.examples.extend(parsed)
    result = stub.Classify(request)
    assert result.model_spec.signature_name == "marital"
    for row, p in zip(result.result.classifications, want["marital"]):
        assert [c.label for c in row.classes] == ["0", "1"]
        assert row.classes[1].score == pytest.approx(p, abs=1e-6)
        assert row.classes[0].score == pytest.approx(1 - p, abs=1e-6)
    # The export's own signature names reach the same head, and the reply echoes the name asked for (TF Serving).
    request.model_spec.signature_name = "classify_marital"
    result = stub.Classify(request)
    assert result.model_spec.signature_name == "classify_marital"
    assert [row.classes[1].score for row in result.result.classifications] == pytest.approx(want["marital"], abs=1e-6)
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "plain"  # no signature name: the first head (income)
    request.input.example_list.examples.extend(parsed)
    response = stub.Regress(request)
    assert response.model_spec.signature_name == "serving_default"
    np.testing.assert_allclose([r.value for r in response.result.regressions], want["income"], atol=1e-6)


def test_model_metadata_lists_the_signatures(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "census"
    response = stub.GetModelMetadata(request)
    assert response.model_spec.version.value == 2  # the latest available
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sig_map)
    assert {"serving_default", "predict_raw", "transform_features"} <= set(sig_map.signature_def)
    assert "examples" in sig_map.signature_def["serving_default"].inputs


# -- versions, labels, status --------------------------------------------------------------------------


def test_version_pinning_and_labels(stub, examples):
    batch = examples_input(examples[:2])
    assert stub.Predict(predict_request("census", batch)).model_spec.version.value == 2
    assert stub.Predict(predict_request("census", batch, version=1)).model_spec.version.value == 1
    assert stub.Predict(predict_request("census", batch, label="stable")).model_spec.version.value == 1
    assert stub.Predict(predict_request("census", batch, label="canary")).model_spec.version.value == 2


def test_model_status_reports_the_failed_version(channel):
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "census"
    statuses = {s.version: s for s in stub.GetModelStatus(request).model_version_status}
    assert statuses[1].state == AVAILABLE and statuses[2].state == AVAILABLE
    assert statuses[3].state == END and statuses[3].status.error_code != 0
    assert "holds 0 MetaGraphs" in statuses[3].status.error_message
    request.model_spec.version_label = "stable"
    only = stub.GetModelStatus(request).model_version_status
    assert [s.version for s in only] == [1]


def test_health_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tensorflow.serving.PredictionService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# -- bad requests ------------------------------------------------------------------------------------------


def _example_without(examples, feature):
    e = tf.train.Example.FromString(examples[0])
    del e.features.feature[feature]
    return e.SerializeToString()


def _example_with_wrong_type(examples, feature):
    e = tf.train.Example.FromString(examples[0])
    e.features.feature[feature].Clear()
    e.features.feature[feature].bytes_list.value.append(b"forty")
    return e.SerializeToString()


def _raw(exports, rows=2, **changes):
    raw = {k: v[:rows] for k, v in raw_columns(exports.frame, exports.spec).items()}
    inputs = {k: tf.make_tensor_proto(v, dtype=tf.string if v.dtype == object else tf.float32) for k, v in raw.items()}
    for k, v in changes.items():
        if v is None:
            del inputs[k]
        else:
            inputs[k] = v
    return inputs


BAD_REQUESTS = {
    "unknown model": (lambda ex, exp: predict_request("nope", examples_input(ex[:1])),
                      grpc.StatusCode.NOT_FOUND, "model 'nope' is not served"),
    "unknown version": (lambda ex, exp: predict_request("census", examples_input(ex[:1]), version=9),
                        grpc.StatusCode.NOT_FOUND, "has no version 9"),
    "unknown label": (lambda ex, exp: predict_request("census", examples_input(ex[:1]), label="beta"),
                      grpc.StatusCode.NOT_FOUND, "no version label 'beta'"),
    "version that failed to load": (lambda ex, exp: predict_request("census", examples_input(ex[:1]), version=3),
                                    grpc.StatusCode.FAILED_PRECONDITION, "version 3 of model 'census' failed to load"),
    "label of a failed version": (lambda ex, exp: predict_request("census", examples_input(ex[:1]), label="broken"),
                                  grpc.StatusCode.FAILED_PRECONDITION, "points to version 3"),
    "unknown signature": (lambda ex, exp: predict_request("plain", examples_input(ex[:1]), signature="predict"),
                          grpc.StatusCode.INVALID_ARGUMENT, "has no signature 'predict'"),
    "unknown output": (lambda ex, exp: predict_request("plain", examples_input(ex[:1]), output_filter=["cats"]),
                       grpc.StatusCode.INVALID_ARGUMENT, "unknown output(s) ['cats']"),
    "repeated output": (lambda ex, exp: predict_request("plain", examples_input(ex[:1]),
                                                       output_filter=["income", "income"]),
                        grpc.StatusCode.INVALID_ARGUMENT, "output_filter repeats ['income']"),
    "missing feature in tf.Example": (lambda ex, exp: predict_request("plain", examples_input(
        [_example_without(ex, "age")])), grpc.StatusCode.INVALID_ARGUMENT, "Feature: age"),
    "wrong feature type in tf.Example": (lambda ex, exp: predict_request("plain", examples_input(
        [_example_with_wrong_type(ex, "age")])), grpc.StatusCode.INVALID_ARGUMENT, "age"),
    "malformed tf.Example": (lambda ex, exp: predict_request("plain", examples_input([b"\xff\x00garbage"])),
                             grpc.StatusCode.INVALID_ARGUMENT, "Could not parse example input"),
    "infinite raw input": (lambda ex, exp: predict_request("plain", _raw(exp, age=tf.make_tensor_proto(
        np.array([40.0, np.inf], np.float32))), signature="predict_raw"),
                           grpc.StatusCode.INVALID_ARGUMENT, "input 'age' holds an infinite value (row 1)"),
    "missing raw input": (lambda ex, exp: predict_request("plain", _raw(exp, age=None), signature="predict_raw"),
                          grpc.StatusCode.INVALID_ARGUMENT, "missing input(s) ['age']"),
    "unknown raw input": (lambda ex, exp: predict_request("plain", _raw(exp, colour=tf.make_tensor_proto([b"r", b"g"])),
                                                          signature="predict_raw"),
                          grpc.StatusCode.INVALID_ARGUMENT, "unknown input(s) ['colour']"),
    "wrong dtype": (lambda ex, exp: predict_request("plain", _raw(exp, sex=tf.make_tensor_proto([1.0, 2.0])),
                                                    signature="predict_raw"),
                    grpc.StatusCode.INVALID_ARGUMENT, "input 'sex' must be DT_STRING, got DT_FLOAT"),
    "wrong shape": (lambda ex, exp: predict_request("plain", _raw(exp, age=tf.make_tensor_proto(
        np.zeros((2, 3), np.float32))), signature="predict_raw"),
                    grpc.StatusCode.INVALID_ARGUMENT, "input 'age' has shape [2, 3]"),
    "different batch sizes": (lambda ex, exp: predict_request("plain", _raw(exp, age=tf.make_tensor_proto(
        np.zeros(3, np.float32))), signature="predict_raw"), grpc.StatusCode.INVALID_ARGUMENT, "different batch sizes"),
    "empty batch": (lambda ex, exp: predict_request("plain", {"examples": tf.make_tensor_proto(
        np.array([], dtype=object), dtype=tf.string, shape=[0])}), grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    "over-limit batch": (lambda ex, exp: predict_request("plain", examples_input(ex[:MAX_REQUEST_BATCH + 1])),
                         grpc.StatusCode.RESOURCE_EXHAUSTED, f"exceeds the server's limit of {MAX_REQUEST_BATCH}"),
    "huge declared shape": (lambda ex, exp: predict_request("plain", {"examples": _huge_tensor()}),
                            grpc.StatusCode.RESOURCE_EXHAUSTED, "holds more than"),
    "truncated tensor_content": (lambda ex, exp: predict_request("plain", _raw(exp, age=_truncated_floats()),
                                                                 signature="predict_raw"),
                                 grpc.StatusCode.INVALID_ARGUMENT, "tensor_content has 5 bytes"),
    "no model name": (lambda ex, exp: predict_request("", examples_input(ex[:1])),
                      grpc.StatusCode.INVALID_ARGUMENT, "model_spec.name is empty"),
    "no inputs": (lambda ex, exp: predict_request("plain", {}), grpc.StatusCode.INVALID_ARGUMENT, "no inputs"),
}


def _huge_tensor():
    proto = tf.make_tensor_proto([b"x"], dtype=tf.string)
    proto.tensor_shape.dim[0].size = 10 ** 12
    return proto


def _truncated_floats():
    proto = tf.make_tensor_proto(np.zeros(2, np.float32))
    proto.tensor_content = b"\x00" * 5
    return proto


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_the_right_status(stub, examples, exports, case):
    build, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(build(examples, exports), timeout=30)
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()


def test_classify_bad_requests(stub, examples):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "plain"
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "example_list" in err.value.details()
    request.model_spec.signature_name = "salary"
    request.input.example_list.examples.add().ParseFromString(examples[0])
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "names no task head" in err.value.details()
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["weights"])
    metadata.model_spec.name = "plain"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelMetadata(metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "signature_def" in err.value.details()


def _random_bad_request(rng: random.Random, examples, exports):
    """One request that is wrong in a random way (never a valid one)."""
    kind = rng.randrange(8)
    if kind == 0:  # random bytes as tf.Examples
        blobs = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64))) for _ in range(rng.randrange(1, 4))]
        return predict_request("plain", examples_input(blobs))
    if kind == 1:  # a valid Example with bytes flipped
        blob = bytearray(examples[rng.randrange(len(examples))])
        for _ in range(rng.randrange(1, 8)):
            blob[rng.randrange(len(blob))] = rng.getrandbits(8)
        return predict_request("plain", examples_input([bytes(blob), b"\x0a\xff"]))
    if kind == 2:  # wrong dtype for a raw feature
        name = rng.choice(sorted(raw_columns(exports.frame.iloc[:1], exports.spec)))
        return predict_request("plain", _raw(exports, **{name: tf.make_tensor_proto(
            rng.choice([np.zeros(2, np.int64), np.zeros(2, np.float64), np.array([True, False])]))}),
                               signature="predict_raw")
    if kind == 3:  # random shape
        dims = [rng.randrange(0, 4) for _ in range(rng.randrange(0, 4))]
        proto = tf.make_tensor_proto(np.zeros(dims, np.float32))
        return predict_request("plain", {"examples": proto})
    if kind == 4:  # nonsense model spec
        return predict_request(rng.choice(["", "x", "census\x00", "plain "]), examples_input(examples[:1]),
                               version=rng.choice([None, -1, 0, 10 ** 12]))
    if kind == 5:  # inconsistent tensor proto
        proto = tf.make_tensor_proto(np.zeros(3, np.float32))
        proto.tensor_content = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 11)))
        proto.tensor_shape.dim[0].size = rng.choice([0, 1, 2, 4, 2 ** 40])
        return predict_request("plain", _raw(exports, age=proto), signature="predict_raw")
    if kind == 6:  # dropped raw inputs
        inputs = _raw(exports)
        for name in rng.sample(sorted(inputs), rng.randrange(1, 5)):
            del inputs[name]
        return predict_request("plain", inputs, signature="predict_raw")
    return predict_request("plain", examples_input(examples[:1]), signature=rng.choice(["x", "predict", "trans"]))


def test_1000_malformed_requests_then_a_good_one(stub, examples, exports):
    rng = random.Random(1234)
    codes = {}
    started = time.time()
    for _ in range(1000):
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(_random_bad_request(rng, examples, exports), timeout=30)
        code = err.value.code()
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION), err.value.details()
        assert err.value.details()
        codes[code] = codes.get(code, 0) + 1
        assert time.time() - started < 240, "the server got too slow"
    assert len(codes) >= 3
    response = stub.Predict(predict_request("plain", examples_input(examples[:4])), timeout=30)
    assert outputs_of(response)["income"].shape == (4,)


# -- batching ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_server(model_root):
    entries = [ModelEntry("plain", str(model_root / "plain"))]
    params = BatchingParameters(max_batch_size=16, batch_timeout_micros=20_000, max_enqueued_batches=100,
                                num_batch_threads=1)
    srv = Server(ModelManager(entries, batching=params, max_batch=MAX_REQUEST_BATCH, poll_seconds=3600),
                 port=0).start()
    yield srv
    srv.stop(1)


def test_batching_on_and_off_give_identical_results(stub, batching_server, examples):
    with grpc.insecure_channel(f"127.0.0.1:{batching_server.port}") as ch:
        batched = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        # Requests of 1-3 examples from 12 threads at once, so batches really merge several requests.
        jobs = [examples[i:i + 1 + i % 3] for i in range(0, 60, 2)]
        results = [None] * len(jobs)

        def send(i):
            results[i] = outputs_of(batched.Predict(predict_request("plain", examples_input(jobs[i])), timeout=60))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # One malformed request among good ones fails alone (its batch-mates are rerun separately).
        with pytest.raises(grpc.RpcError) as err:
            batched.Predict(predict_request("plain", examples_input([b"junk"])), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for job, got in zip(jobs, results):
        assert got is not None
        want = outputs_of(stub.Predict(predict_request("plain", examples_input(job))))
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-6)


def _concurrently(fn, count):
    """fn(i) for i in range(count), each on its own thread; returns the results (or raised errors) in order."""
    results = [None] * count

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as err:  # noqa: BLE001 - the caller asserts on it
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _server_recording_batches(model_root, batch_timeout_micros, **server_options):
    """A batching server for "plain" (one batch thread) and the list its merged batches' sizes go to."""
    params = BatchingParameters(max_batch_size=64, batch_timeout_micros=batch_timeout_micros,
                                max_enqueued_batches=10, num_batch_threads=1)
    srv = Server(ModelManager([ModelEntry("plain", str(model_root / "plain"))], batching=params,
                              max_batch=MAX_REQUEST_BATCH, poll_seconds=3600), port=0, **server_options).start()
    with srv.manager.use("plain") as servable:
        batcher = servable._batchers["serving_default"]
    batch_sizes = []
    run = batcher._run
    batcher._run = lambda inputs: batch_sizes.append(len(inputs["examples"])) or run(inputs)
    return srv, batch_sizes


def test_warmup_compiles_every_padded_batch_size_of_the_xla_export(exports):
    # max_batch_size 100: merged batches of 65-100 rows are padded to 128, which warmup must compile too.
    from serving.models import Servable

    servable = Servable("census", 1, exports.xla_dir, BatchingParameters(max_batch_size=100), 8192)
    sizes, call = [], servable._call
    servable._call = lambda sig, inputs: (sizes.append(len(next(iter(inputs.values())))), call(sig, inputs))[1]
    try:
        servable.warmup()
    finally:
        servable.retire()
    assert {1, 2, 4, 8, 16, 32, 64, 128} <= set(sizes) and max(sizes) == 128


def test_waiting_requests_hold_no_thread(model_root, examples, stub):
    """32 requests wait in the batch queue at once on a server with ONE model thread: they merge into a batch.

    A server that held a thread per waiting request (the synchronous gRPC server) would run them one at a
    time through that thread, one batch timeout each."""
    srv, batch_sizes = _server_recording_batches(model_root, batch_timeout_micros=300_000, max_workers=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            batched = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            started = time.monotonic()
            got = _concurrently(lambda i: outputs_of(batched.Predict(
                predict_request("plain", examples_input(examples[i:i + 1])), timeout=60)), 32)
            elapsed = time.monotonic() - started
    finally:
        srv.stop(1)
    for i, out in enumerate(got):
        assert isinstance(out, dict), out
        want = outputs_of(stub.Predict(predict_request("plain", examples_input(examples[i:i + 1]))))
        np.testing.assert_allclose(out["income"], want["income"], atol=1e-6)
    assert sum(batch_sizes) == 32 and len(batch_sizes) <= 4, batch_sizes
    assert elapsed < 32 * 0.3 / 2, elapsed


def test_a_request_that_gives_up_leaves_its_batch(model_root, examples, stub):
    """A client whose deadline passes while its request waits in the batch queue gets DEADLINE_EXCEEDED; its
    batch-mates are answered, without its row, and the server goes on serving."""
    threads_before = set(threading.enumerate())
    srv, batch_sizes = _server_recording_batches(model_root, batch_timeout_micros=1_500_000)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            batched = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            # Request 0 gives up after 0.2 s; requests 1-4 (two examples each) wait for the 1.5 s timeout.
            got = _concurrently(lambda i: outputs_of(batched.Predict(
                predict_request("plain", examples_input(examples[2 * i:2 * i + 2])),
                timeout=0.2 if i == 0 else 60)), 5)
            assert isinstance(got[0], grpc.RpcError) and got[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED
            after = outputs_of(batched.Predict(predict_request("plain", examples_input(examples[:3])), timeout=60))
    finally:
        srv.stop(1)
    # stop() leaves none of its threads behind (batch threads, model pool, event loop, grpc.aio's poller): a
    # daemon thread still running while the `mmoe serve` process finalizes Python can abort it.
    assert [t.name for t in threading.enumerate() if t not in threads_before and t.is_alive()] == []
    for i in range(1, 5):
        want = outputs_of(stub.Predict(predict_request("plain", examples_input(examples[2 * i:2 * i + 2]))))
        np.testing.assert_allclose(got[i]["income"], want["income"], atol=1e-6)
    assert after["income"].shape == (3,)
    assert batch_sizes[0] == 8, batch_sizes  # 4 requests x 2 examples: the cancelled one's rows are not run


@pytest.mark.parametrize("options", [{"max_workers": 0}, {"max_concurrent_rpcs": 0}])
def test_server_refuses_non_positive_thread_and_rpc_limits(options):
    # Checked before anything is bound or started, so no model manager is needed.
    with pytest.raises(ValueError, match="max_workers and max_concurrent_rpcs must be >= 1"):
        Server(None, port=0, **options)


def test_declare_message_declares_once_and_round_trips():
    from serving.protos import Field, declare_message

    fields = [("count", 1, Field.LABEL_OPTIONAL, Field.TYPE_INT64, None),
              ("names", 2, Field.LABEL_REPEATED, Field.TYPE_STRING, None)]
    cls = declare_message("mmoe/serving/test_declared.proto", "TestDeclared", fields)
    assert declare_message("mmoe/serving/test_declared.proto", "TestDeclared", fields) is cls
    message = cls(count=7, names=["a", "b"])
    again = cls.FromString(message.SerializeToString())
    assert again.count == 7 and list(again.names) == ["a", "b"]
    assert cls.DESCRIPTOR.full_name == "mmoe.serving.TestDeclared"


def test_batching_parameters_text_format():
    from serving.config import parse_batching_parameters

    params = parse_batching_parameters("max_batch_size { value: 128 }\nbatch_timeout_micros { value: 500 }\n"
                                       "max_enqueued_batches { value: 4 }\nnum_batch_threads { value: 2 }\n"
                                       "allowed_batch_sizes: 32\nallowed_batch_sizes: 128\n")
    assert params == BatchingParameters(128, 500, 4, 2, allowed_batch_sizes=(32, 128))  # honoured, not dropped
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        parse_batching_parameters("max_batch_size { value: 0 }")
    with pytest.raises(ValueError, match="not BatchingParameters"):
        parse_batching_parameters("max_batch_size: 12")


def test_model_config_text_format_errors(tmp_path):
    entries = parse_model_config('model_config_list { config { name: "a" base_path: "/m/a" '
                                 'model_version_policy { latest { num_versions: 2 } } } '
                                 'config { name: "b" base_path: "/m/b" model_version_policy { all {} } } }')
    assert entries[0].policy == VersionPolicy("latest", 2) and entries[1].policy.kind == "all"
    assert VersionPolicy("latest", 2).select([3, 1, 7]) == [3, 7]
    for text, message in [("model_config_list { config { name: \"a\" } }", "has no base_path"),
                          ("model_config_list { config { name: \"a\" base_path: \"/x\" } "
                           "config { name: \"a\" base_path: \"/y\" } }", "configured twice"),
                          ("model_config_list { }", "holds no model"),
                          ("model_config_list { config { name: \"a\" base_path: \"/x\" model_platform: \"onnx\" } }",
                           "not supported"),
                          ("models { }", "not a ModelServerConfig")]:
        with pytest.raises(ValueError, match=message):
            parse_model_config(text)


# -- hot swap under load -------------------------------------------------------------------------------------


def test_new_version_appears_and_old_one_is_removed_under_load(exports, examples, tmp_path):
    base = tmp_path / "swap"
    shutil.copytree(exports.plain_dir, base / "1")
    manager = ModelManager([ModelEntry("swap", str(base))], max_batch=MAX_REQUEST_BATCH, poll_seconds=0.2)
    srv = Server(manager, port=0).start()
    failures, versions_seen, count = [], set(), [0]
    stop = threading.Event()
    request = predict_request("swap", examples_input(examples[:2]))

    def client():
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            s = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            deadline = time.time() + 120
            while not stop.is_set() and time.time() < deadline and count[0] < 20_000:
                try:
                    versions_seen.add(s.Predict(request, timeout=30).model_spec.version.value)
                    count[0] += 1
                except grpc.RpcError as err:
                    failures.append(f"{err.code()}: {err.details()}")

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        # Written next to the base path and renamed in: the poller never sees half a version.
        staging = tmp_path / "staging"
        shutil.copytree(exports.plain_dir, staging)
        os.rename(staging, base / "2")
        deadline = time.time() + 90
        while 2 not in versions_seen and time.time() < deadline:
            time.sleep(0.1)
        assert 2 in versions_seen, "version 2 never served"
        shutil.rmtree(base / "1")
        time.sleep(1.0)
        seen_before = count[0]
        time.sleep(0.5)
        assert count[0] > seen_before, "requests stopped flowing"
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        statuses = dict(manager.statuses("swap"))
        srv.stop(1)
    assert not failures, failures[:5]
    assert versions_seen == {1, 2}
    assert statuses[2].state == AVAILABLE and statuses[1].state == END


def test_model_without_versions_is_not_serving(tmp_path, examples):
    (tmp_path / "empty").mkdir()
    manager = ModelManager([ModelEntry("empty", str(tmp_path / "empty"))], poll_seconds=3600)
    srv = Server(manager, port=0).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="")).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(
                    predict_request("empty", examples_input(examples[:1])), timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "model 'empty' has no available version (no version directory under" in err.value.details()
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = "other"
            with pytest.raises(grpc.RpcError) as err:
                model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'other' is not served" in err.value.details()
    finally:
        srv.stop(1)


def test_config_file_changes_are_picked_up(model_root, examples, tmp_path):
    path = tmp_path / "models.config"
    path.write_text(f'model_config_list {{ config {{ name: "plain" base_path: "{model_root}/plain" }} }}')
    from serving.config import load_model_config
    manager = ModelManager(load_model_config(str(path)), poll_seconds=3600, config_path=str(path))
    srv = Server(manager, port=0).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            s = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            request = predict_request("plain", examples_input(examples[:1]), label="stable")
            with pytest.raises(grpc.RpcError) as err:
                s.Predict(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            path.write_text(f'model_config_list {{ config {{ name: "plain" base_path: "{model_root}/plain" '
                            f'version_labels {{ key: "stable" value: 1 }} }} }}')
            os.utime(path, (time.time() + 5, time.time() + 5))
            manager.poll()
            assert s.Predict(request, timeout=30).model_spec.version.value == 1
            # A broken edit keeps the previous config.
            path.write_text("model_config_list { config { name: ")
            os.utime(path, (time.time() + 10, time.time() + 10))
            manager.poll()
            assert s.Predict(request, timeout=30).model_spec.version.value == 1
            path.write_text(f'model_config_list {{ config {{ name: "other" base_path: "{tmp_path}/none" }} }}')
            os.utime(path, (time.time() + 15, time.time() + 15))
            manager.poll()
            with pytest.raises(grpc.RpcError) as err:
                s.Predict(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'plain' is not served" in err.value.details()
    finally:
        srv.stop(1)
