"""Prediction logging: TF Serving PredictionLog TFRecords, sampling, rotation, a full queue, crash recovery,
and the reader `mmoe ab-eval --logs` uses.  Most tests log hand-made requests (no model); the last one kills a
real `mmoe serve` process while it logs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tensorflow_serving.apis import predict_pb2, prediction_log_pb2, regression_pb2  # noqa: E402

from serving.ab.prediction_log import (PredictionLogger, iter_records, log_files, read_prediction_logs,  # noqa: E402
                                       read_split_config, recover_partial_logs)


def _predict(i, rows=2, version=1):
    """A predict_raw request of `rows` rows and its response (per-row income, [rows, 3] gates)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "census"
    request.model_spec.signature_name = "predict_raw"
    request.inputs["age"].CopyFrom(tf.make_tensor_proto(np.arange(rows, dtype=np.float32) + i))
    request.inputs["sex"].CopyFrom(tf.make_tensor_proto([f"s{i}"] * rows, dtype=tf.string))
    response = predict_pb2.PredictResponse()
    response.model_spec.name = "census"
    response.model_spec.version.value = version
    response.model_spec.signature_name = "predict_raw"
    response.outputs["income"].CopyFrom(tf.make_tensor_proto(np.full(rows, i / 1000, np.float32)))
    response.outputs["income_gates"].CopyFrom(tf.make_tensor_proto(np.ones((rows, 3), np.float32)))
    return request, response


def _log(logger, n, start=0, arm="A", **kw):
    for i in range(start, start + n):
        request, response = _predict(i, **kw)
        assert logger.log("predict", request, response, arm, when=1_700_000_000 + i / 1000)


def test_records_are_prediction_logs_and_read_back_per_row(tmp_path):
    split = {"model": "census", "key": "user_id", "salt": "s", "arms": [
        {"name": "A", "version": 1, "label": None, "fraction": 0.5},
        {"name": "B", "version": 2, "label": None, "fraction": 0.5}]}
    logger = PredictionLogger(str(tmp_path), split=split)
    _log(logger, 3, arm="A")
    _log(logger, 2, start=3, arm="B", version=2)
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "census"
    example = regress.input.example_list.examples.add()
    example.features.feature["age"].float_list.value.append(61.0)
    example.features.feature["sex"].bytes_list.value.append(b"Female")
    regress_response = regression_pb2.RegressionResponse()
    regress_response.model_spec.name = "census"
    regress_response.model_spec.version.value = 2
    regress_response.model_spec.signature_name = "marital"
    regress_response.result.regressions.add(value=0.25)
    logger.log("regress", regress, regress_response, "", when=1_700_000_001.5)
    logger.close()
    assert read_split_config(str(tmp_path)) == split
    # Finished files only (renamed), each record a PredictionLog TF Serving's tools can parse.
    (path,) = log_files(str(tmp_path))
    assert path.endswith(".tfrecord") and logger.files == [path]
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    assert [r.WhichOneof("log_type") for r in records] == ["predict_log"] * 5 + ["regress_log"]
    meta = records[3].log_metadata
    assert meta.model_spec.version.value == 2 and meta.sampling_config.sampling_rate == 1.0
    assert list(meta.saved_model_tags) == ["serve"] and meta.timestamp_secs == 1_700_000_000

    frame = read_prediction_logs(str(tmp_path))
    assert list(frame.columns) == ["arm", "model", "version", "signature", "time_ms", "in.age", "in.sex",
                                   "out.income", "out.marital"]
    assert len(frame) == 5 * 2 + 1
    assert frame["arm"].tolist() == ["A"] * 6 + ["B"] * 4 + [""]
    assert frame["version"].tolist() == [1] * 6 + [2] * 5
    assert frame["time_ms"].tolist()[:4] == [1_700_000_000_000] * 2 + [1_700_000_000_001] * 2
    assert frame["in.age"].tolist()[:4] == [0.0, 1.0, 1.0, 2.0]
    assert frame["in.sex"].tolist()[-3:] == ["s4", "s4", "Female"]
    assert frame["out.income"].tolist()[8] == pytest.approx(0.004)
    last = frame.iloc[-1]
    assert last["out.marital"] == 0.25 and last["signature"] == "marital" and np.isnan(last["out.income"])


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_prediction_logs(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="holds no complete record"):
        read_prediction_logs(str(tmp_path))
    assert read_split_config(str(tmp_path)) is None
    PredictionLogger(str(tmp_path)).close()  # no split: split.json says null
    assert json.loads((tmp_path / "split.json").read_text()) is None and read_split_config(str(tmp_path)) is None


def test_a_log_directory_holds_one_split(tmp_path):
    split = {"model": "census", "key": "user_id", "salt": "s", "arms": [
        {"name": "A", "version": 1, "label": None, "fraction": 0.9},
        {"name": "B", "version": 2, "label": None, "fraction": 0.1}]}
    logger = PredictionLogger(str(tmp_path), split=split)
    _log(logger, 2)
    logger.close()
    PredictionLogger(str(tmp_path), split=split).close()  # a restart with the same split appends
    rows = len(read_prediction_logs(str(tmp_path)))
    ramped = {**split, "arms": [{**split["arms"][0], "fraction": 0.5}, {**split["arms"][1], "fraction": 0.5}]}
    for other in (ramped, {**split, "salt": "s2"}, None):
        with pytest.raises(ValueError, match="holds logs of another traffic split"):
            PredictionLogger(str(tmp_path), split=other)
    assert read_split_config(str(tmp_path)) == split and len(read_prediction_logs(str(tmp_path))) == rows > 0


def test_rotation_by_size_gives_several_files_that_all_read_back(tmp_path):
    logger = PredictionLogger(str(tmp_path), max_file_bytes=2000)
    for batch in range(6):  # flushes (and rotation checks) happen between the writer's batches
        _log(logger, 5, start=batch * 5)
        logger.flush()
    logger.close()
    files = log_files(str(tmp_path))
    assert len(files) >= 3 and not [f for f in files if f.endswith(".tmp")]
    assert all(os.path.getsize(f) < 2000 + 5 * 400 for f in files)
    frame = read_prediction_logs(str(tmp_path))
    assert len(frame) == 60 and frame["in.age"].tolist()[::2] == [float(i) for i in range(30)]


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_sampling_rate(tmp_path, rate):
    logger = PredictionLogger(str(tmp_path), sampling_rate=rate, queue_size=5000)
    request, response = _predict(0, rows=1)
    n = 2000
    queued = sum(logger.log("predict", request, response) for _ in range(n))
    logger.close()
    if rate == 0.0:
        assert queued == 0 and log_files(str(tmp_path)) == []
        with pytest.raises(ValueError, match="no complete record"):
            read_prediction_logs(str(tmp_path))
    else:
        sigma = (n * rate * (1 - rate)) ** 0.5
        assert abs(queued - n * rate) < 5 * sigma
        assert len(read_prediction_logs(str(tmp_path))) == queued


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path, monkeypatch):
    release = threading.Event()
    logger = PredictionLogger(str(tmp_path), queue_size=4)
    real_write = logger._write
    monkeypatch.setattr(logger, "_write", lambda data: (release.wait(30), real_write(data)))
    request, response = _predict(0)
    started = time.perf_counter()
    queued = sum(logger.log("predict", request, response) for _ in range(50))
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0  # the writer is stuck, the callers are not
    # At most 4 waiting plus the few the writer took off the queue before it got stuck.
    assert 4 <= queued <= 8 and logger.dropped == 50 - queued
    release.set()
    logger.close()
    assert len(read_prediction_logs(str(tmp_path))) == 2 * queued


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_writers_file_reads_to_its_last_complete_record_and_is_recovered(tmp_path):
    logger = PredictionLogger(str(tmp_path))
    _log(logger, 4)
    logger.close()
    (path,) = log_files(str(tmp_path))
    # What a killed process leaves: a .tmp file named with its (now gone) pid, cut in the middle of a record.
    pid = _dead_pid()
    parts = os.path.basename(path).split("-")
    parts[2] = str(pid)
    leftover = os.path.join(str(tmp_path), "-".join(parts) + ".tmp")
    os.rename(path, leftover)
    complete = os.path.getsize(leftover)
    with open(leftover, "ab") as fh:
        first_record = open(leftover, "rb").read(200)
        fh.write(first_record[:150])  # a header and part of a body: a truncated tail
    assert len(read_prediction_logs(str(tmp_path))) == 8  # the tail is dropped, not an error
    # A new logger in the directory recovers the file: cut after the last complete record, renamed.
    recovered = PredictionLogger(str(tmp_path))
    recovered.close()
    final = leftover[: -len(".tmp")]
    assert os.path.isfile(final) and not os.path.exists(leftover) and os.path.getsize(final) == complete
    assert len(list(iter_records(final))) == 4
    # A leftover holding no complete record is removed; a live process's file is left alone.
    empty = os.path.join(str(tmp_path), f"prediction_log-20000101T000000-{pid}-00001.tfrecord.tmp")
    open(empty, "wb").write(b"\x01\x02")
    live = os.path.join(str(tmp_path), f"prediction_log-20000101T000000-{os.getppid()}-00001.tfrecord.tmp")
    shutil.copy(final, live)
    assert recover_partial_logs(str(tmp_path)) == []
    assert not os.path.exists(empty) and os.path.exists(live)


# -- a real server, killed ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    from serving.testing import tiny_exports
    return tiny_exports(str(tmp_path_factory.getbasetemp() / "serving-exports"))


def test_logs_of_a_killed_server_process_are_readable(exports, tmp_path):
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    import grpc

    from serving.testing import example_bytes, start_serve_process

    base = tmp_path / "models" / "census"
    shutil.copytree(exports.plain_dir, base / "1")
    log_dir = tmp_path / "logs"
    process, address = start_serve_process(["--model-base-path", str(base), "--model-name", "census", "--port",
                                            "0", "--prediction-log-dir", str(log_dir)])
    try:
        examples = example_bytes(exports.frame, exports.spec, rows=20)
        with grpc.insecure_channel(address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for i in range(10):
                request = predict_pb2.PredictRequest()
                request.model_spec.name = "census"
                request.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples[2 * i: 2 * i + 2],
                                                                         dtype=tf.string))
                stub.Predict(request, timeout=30)
        # The writer flushes after each batch it takes from its queue; wait until all 10 calls are in the file.
        deadline = time.time() + 30
        while time.time() < deadline:
            files = log_files(str(log_dir))
            if files and sum(1 for f in files for _ in iter_records(f)) == 10:
                break
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    (leftover,) = log_files(str(log_dir))
    assert leftover.endswith(".tfrecord.tmp")  # killed: never renamed
    frame = read_prediction_logs(str(log_dir))
    assert len(frame) == 20 and set(frame["arm"]) == {""} and set(frame["version"]) == {1}
    assert frame["in.age"].tolist() == exports.frame["age"].iloc[:20].astype(float).tolist()
    assert frame["out.income"].between(0, 1).all()
    # A cut tail (a kill in the middle of a write) is dropped; the next logger recovers the file.
    with open(leftover, "r+b") as fh:
        fh.truncate(os.path.getsize(leftover) - 7)
    assert len(read_prediction_logs(str(log_dir))) == 18
    PredictionLogger(str(log_dir)).close()
    (final,) = log_files(str(log_dir))
    assert final == leftover[: -len(".tmp")] and len(read_prediction_logs(str(log_dir))) == 18
