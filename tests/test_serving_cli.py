"""TLS, `mmoe serve` as a process (SIGTERM drains in-flight requests), `mmoe predict`, and CLI errors."""
import datetime
import ipaddress
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from pipelines.cli import main  # noqa: E402
from serving.client import ModelClient, read_csv_columns  # noqa: E402
from serving.config import ModelEntry  # noqa: E402
from serving.models import ModelManager  # noqa: E402
from serving.server import Server  # noqa: E402
from serving.testing import example_bytes, start_serve_process, tiny_exports  # noqa: E402


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    return tiny_exports(str(tmp_path_factory.getbasetemp() / "serving-exports"))


@pytest.fixture(scope="module")
def base_path(exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-models")
    shutil.copytree(exports.plain_dir, root / "census" / "1")
    return root / "census"


def _self_signed(tmp_path):
    """A certificate for localhost / 127.0.0.1 and its key, as PEM files (cryptography, else openssl)."""
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key_path),
                        "-out", str(cert_path), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls(exports, base_path, tmp_path):
    cert, key = _self_signed(tmp_path)
    manager = ModelManager([ModelEntry("census", str(base_path))], poll_seconds=3600)
    srv = Server(manager, port=0, certificate=cert.read_bytes(), private_key=key.read_bytes()).start()
    try:
        examples = example_bytes(exports.frame, exports.spec, rows=3)
        with ModelClient(f"127.0.0.1:{srv.port}", root_certificates=cert.read_bytes(), timeout=30) as client:
            scores = client.predict_examples("census", examples)
        assert scores["income"].shape == (3,)
        # A plaintext client cannot talk to a TLS port.
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "census"
            request.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples, dtype=tf.string))
            with pytest.raises(grpc.RpcError) as err:
                prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(1)


def _write_csv(frame, path):
    frame.to_csv(path, index=False)
    return path


def test_serving_benchmark_canned_server_replies_like_the_real_one(exports, base_path):
    # The benchmark's floor cell: a Python gRPC server replying with the real server's bytes, no model.
    from benchmarks.serving import bench_grpc, predict_request, start_canned_server

    manager = ModelManager([ModelEntry("census", str(base_path))], poll_seconds=3600)
    srv = Server(manager, port=0).start()
    canned = None
    try:
        address = f"127.0.0.1:{srv.port}"
        examples = example_bytes(exports.frame, exports.spec, rows=4)
        canned, canned_address = start_canned_server(address, "census", examples)
        replies = []
        for target in (address, canned_address):
            with grpc.insecure_channel(target) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                replies.append(stub.Predict(predict_request("census", examples, 1), timeout=30))
        assert replies[0] == replies[1] and {"income", "marital"} <= set(replies[1].outputs)
        result = bench_grpc(canned_address, "census", examples, 1, 4, 0.5, server_pid=canned.pid)
        assert result["errors"] == 0 and result["requests"] > 10 and result["server_cpu_ms"] > 0
    finally:
        if canned is not None:
            canned.terminate()
            canned.join(30)
        srv.stop(1)
    assert canned.exitcode is not None


def test_serve_process_predict_cli_and_sigterm_drain(exports, base_path, tmp_path, capsys):
    batching = tmp_path / "batching.config"
    # A long batch timeout keeps a lone request in flight for ~3 s: long enough to SIGTERM in the middle.
    batching.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 3000000 }\n"
                        "num_batch_threads { value: 1 }\n")
    process, address = start_serve_process(["--model-base-path", str(base_path), "--model-name", "census",
                                            "--port", "0", "--batching-parameters-file", str(batching),
                                            "--tensorflow-intra-op-parallelism", "1",
                                            "--tensorflow-inter-op-parallelism", "2"])
    try:
        assert address.startswith("127.0.0.1:")
        # The thread pools as TensorFlow reports them once the model is loaded.
        assert "TensorFlow threads: intra-op 1, inter-op 2" in process.startup_lines, process.startup_lines

        # mmoe predict --csv, through the CLI entry point.
        csv_path = _write_csv(exports.frame.iloc[:5], tmp_path / "rows.csv")
        assert main(["predict", "--server", address, "--model", "census", "--csv", str(csv_path)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split("\t") == ["row", "income", "marital"] and len(out) == 6
        want = exports.model.predict({k: v[:5] for k, v in exports.model_inputs.items()}, verbose=0)
        got = np.array([[float(x) for x in line.split("\t")[1:]] for line in out[1:]])
        np.testing.assert_allclose(got[:, 0], want["income"], atol=1e-5)
        # As a command in its own process: the same scores, and TensorFlow's import chatter kept off stderr.
        import os
        import sys

        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        command = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", "--server", address, "--model",
                                  "census", "--csv", str(csv_path)], capture_output=True, text=True, env=env,
                                 timeout=120, cwd=str(Path(__file__).resolve().parents[1]))
        assert command.returncode == 0 and command.stdout.splitlines() == out, command.stderr
        assert command.stderr.strip() == "", command.stderr
        # --unit-column against a model that is not split: the unit input is refused, so it goes as metadata,
        # and every row is served, with the note that nothing is split.
        units_csv = _write_csv(exports.frame.iloc[:5].assign(user_id=[f"u{i % 2}" for i in range(5)]),
                               tmp_path / "units.csv")
        assert main(["predict", "--server", address, "--model", "census", "--csv", str(units_csv),
                     "--unit-column", "user_id"]) == 0
        captured = capsys.readouterr()
        lines = [line.split("\t") for line in captured.out.splitlines()]
        assert lines[0][-3:] == ["unit", "arm", "version"] and [r[-2] for r in lines[1:]] == ["-"] * 5
        assert [r[1] for r in lines[1:]] == [r.split("\t")[1] for r in out[1:]]
        assert "is not split on this server" in captured.err
        # Sent two rows a request (so three requests), the same scores in the same order.
        assert main(["predict", "--server", address, "--model", "census", "--csv", str(csv_path),
                     "--batch-size", "2"]) == 0
        assert capsys.readouterr().out.splitlines() == out
        # A bad pin is a clean error, not a traceback.
        assert main(["predict", "--server", address, "--model", "census", "--version", "7",
                     "--csv", str(csv_path)]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err

        # SIGTERM while a request waits in the batch queue: it still succeeds, then the process exits 0.
        result = {}

        def slow_request():
            with ModelClient(address, timeout=60) as client:
                try:
                    result["scores"] = client.predict_examples("census", example_bytes(exports.frame, exports.spec,
                                                                                        rows=2))
                except grpc.RpcError as err:
                    result["error"] = f"{err.code()}: {err.details()}"

        sender = threading.Thread(target=slow_request)
        sender.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        sender.join(60)
        assert "error" not in result, result.get("error")
        assert result["scores"]["income"].shape == (2,)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.parametrize("argv, message", [
    (["serve", "--model-name", "m"], "--model-base-path and --model-name are required"),
    (["serve", "--model-base-path", "/no/such/dir", "--model-name", "m"], "no such directory"),
    (["serve", "--model-config-file", "/no/such.config"], "no such file"),
    (["serve", "--model-base-path", ".", "--model-name", "m", "--ssl-cert", "x.pem"], "needs both --ssl-cert"),
    (["serve", "--model-base-path", ".", "--model-name", "m", "--max-request-batch", "0"], "must be >= 1"),
    (["serve", "--model-base-path", ".", "--model-name", "m", "--grpc-threads", "0"], "--grpc-threads must be >= 1"),
    (["serve", "--model-base-path", ".", "--model-name", "m", "--max-concurrent-rpcs", "0"],
     "--max-concurrent-rpcs must be >= 1"),
    (["serve", "--model-base-path", ".", "--model-name", "m", "--tensorflow-intra-op-parallelism", "-1"],
     "--tensorflow-intra-op-parallelism must be >= 0"),
    (["serve", "--model-base-path", ".", "--model-name", "m", "--file-system-poll-wait-seconds", "-1"],
     "--file-system-poll-wait-seconds must be >= 0"),
    (["predict", "--server", "localhost:1", "--model", "m", "--csv", "x.csv", "--timeout", "-1"],
     "--timeout must be > 0"),
    (["predict", "--server", "localhost:1", "--model", "m", "--csv", "x.csv", "--server-name", "a"],
     "needs --ca-cert"),
    (["predict", "--server", "localhost:1", "--model", "m", "--csv", "x.csv", "--batch-size", "0"],
     "--batch-size must be >= 1"),
    (["export", "/no/such/run", "--base-path", "/tmp/x", "--version", "0"], "--version must be >= 1"),
    (["predict", "--server", "localhost:1", "--model", "m", "--csv", "x.csv", "--unit-column", "u",
      "--version", "2"], "bypass it"),
    (["predict", "--server", "localhost:1", "--model", "m", "--csv", "x.csv", "--unit-in", "metadata"],
     "go with --unit-column"),
    (["predict", "--server", "localhost:1", "--model", "m", "--csv", "/no/such/rows.csv"],
     "--csv /no/such/rows.csv: no such file"),
    (["predict", "--server", "localhost:1", "--model", "m", "--csv", "x.csv", "--unit-column", "u",
      "--concurrency", "0"], "--concurrency must be >= 1"),
])
def test_serve_argument_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_tensorflow_threads_set_too_late_is_a_clear_error():
    from serving.models import set_tensorflow_threads, tensorflow_threads

    _ = tf.constant(1.0) + 1  # TensorFlow is running in this process: its pools are fixed
    intra, _ = tensorflow_threads()
    with pytest.raises(RuntimeError, match="must be set before it runs anything"):
        set_tensorflow_threads(intra + 3, 0)


def test_serve_rejects_a_bad_config_file(tmp_path, capsys):
    path = tmp_path / "models.config"
    path.write_text('model_config_list { config { name: "m" } }')
    assert main(["serve", "--model-config-file", str(path)]) == 2
    assert "has no base_path" in capsys.readouterr().err


def test_csv_reader_errors(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("age,sex\n40,Female\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['weeks_worked'\]"):
        read_csv_columns(str(path), {"age": "DT_FLOAT", "weeks_worked": "DT_FLOAT"})
    path.write_text("age,sex\nforty,Female\n")
    with pytest.raises(ValueError, match="column 'age' must be numeric"):
        read_csv_columns(str(path), {"age": "DT_FLOAT"})
    path.write_text("age,sex\n?,Female\n")
    columns = read_csv_columns(str(path), {"age": "DT_FLOAT", "sex": "DT_STRING"})
    assert np.isnan(columns["age"][0]) and columns["sex"][0] == b"Female"
    # ASCII whitespace is stripped, a Unicode space kept: as the training reader and tf.strings.strip do.
    path.write_text("age,sex\n40, Female\t\n41,Male\u00a0\n", encoding="utf-8")
    assert read_csv_columns(str(path), {"sex": "DT_STRING"})["sex"].tolist() == [b"Female", "Male\u00a0".encode()]


def test_a_certificate_and_key_that_are_not_a_pem_pair_are_named(tmp_path, capsys):
    cert, key = _self_signed(tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate")
    for pair in [(tmp_path / "junk.pem", key), (cert, tmp_path / "junk.pem")]:
        assert main(["serve", "--model-base-path", ".", "--model-name", "m", "--ssl-cert", str(pair[0]),
                     "--ssl-key", str(pair[1])]) == 2
        assert "not a PEM certificate and its private key" in capsys.readouterr().err


def test_csv_reader_refuses_infinite_numbers_and_reads_a_byte_order_mark(tmp_path):
    path = tmp_path / "rows.csv"
    for value in ("inf", "-Infinity", "1e40"):
        path.write_text(f"age,sex\n40,Female\n{value},Male\n")
        with pytest.raises(ValueError, match=rf"rows.csv:3: column 'age' holds '{value}', not a finite float32"):
            read_csv_columns(str(path), {"age": "DT_FLOAT"})
    path.write_bytes(b"\xef\xbb\xbfage,sex\n40,Female\n")
    assert read_csv_columns(str(path), {"age": "DT_FLOAT"})["age"].tolist() == [40.0]


def test_poll_wait_zero_polls_once_and_an_empty_base_path_is_warned_about_once(tmp_path, caplog):
    import logging

    (tmp_path / "saved_model.pb").write_bytes(b"")  # a version directory given as the base path
    def pollers():  # other tests' servers may still be polling in this process
        return sum(t.name == "model-poller" for t in threading.enumerate())

    manager = ModelManager([ModelEntry("m", str(tmp_path))], poll_seconds=0)
    before = pollers()
    with caplog.at_level(logging.WARNING, logger="mmoe.serving"):
        manager.start()
        manager.poll()
    try:
        assert pollers() == before
        warnings = [r.getMessage() for r in caplog.records if "no numbered version directory" in r.getMessage()]
        assert len(warnings) == 1 and "pass its parent" in warnings[0]
    finally:
        manager.stop()


def test_a_base_path_one_level_too_high_names_the_model_directory(tmp_path, caplog):
    # The pipeline's --serving-dir holds <model_name>/<version>: given as the base path, the warning says which.
    import logging

    (tmp_path / "mmoe" / "1700000000").mkdir(parents=True)
    (tmp_path / "mmoe" / "1700000000" / "saved_model.pb").write_bytes(b"")
    manager = ModelManager([ModelEntry("m", str(tmp_path))], poll_seconds=3600)
    with caplog.at_level(logging.WARNING, logger="mmoe.serving"):
        manager.poll()
    warnings = [r.getMessage() for r in caplog.records if "no numbered version directory" in r.getMessage()]
    assert len(warnings) == 1 and f"its subdirectory mmoe holds versions: pass {tmp_path / 'mmoe'}" in warnings[0]


def test_the_bundled_predict_csv_is_the_samples_first_rows_with_a_header():
    # features/data/census-rows.csv is what `mmoe predict --csv` takes (a header naming the raw columns); it is
    # the bundled sample's first 20 rows, so the README's commands score rows the models were trained like.
    import csv

    from features.census import CENSUS_SAMPLE_PATH, census_spec
    from features.io import read_dataset

    path = str(Path(CENSUS_SAMPLE_PATH).parent / "census-rows.csv")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    spec = census_spec(1)
    assert rows[0] == list(spec.columns) and len(rows) == 21
    sample = read_dataset(CENSUS_SAMPLE_PATH, spec).iloc[:20]
    for column in ("age", "class_worker", "sex", "income_50k", "marital_stat"):
        i = rows[0].index(column)
        expected = [str(v) if not isinstance(v, float) else f"{v:g}" for v in sample[column]]
        assert [r[i] for r in rows[1:]] == expected, column
    assert read_csv_columns(path, {"age": "DT_FLOAT", "sex": "DT_STRING"})["sex"][0] in (b"Male", b"Female")
