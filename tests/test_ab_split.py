"""The traffic split: deterministic per-unit assignment, config errors, and the split over loopback gRPC."""
import json
import math
import os
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest

from serving.ab.split import (ARM_METADATA, REQUEST_KEY_METADATA, Arm, TrafficSplit, check_split_against_models,
                              parse_split_config, unit_key)
from serving.config import ModelEntry, VersionPolicy
from serving.tensors import ServingError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_split(fractions, salt="s1", key="user_id", model="census"):
    arms = tuple(Arm(chr(ord("A") + i), i + 1, None, f) for i, f in enumerate(fractions))
    return TrafficSplit(model, key, salt, arms)


# -- assignment ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.1, 0.9), (0.2, 0.5, 0.3)])
def test_assignment_matches_the_configured_ratio(fractions):
    split = make_split(fractions)
    n = 100_000
    arms = [split.assign(f"user-{i}".encode()).name for i in range(n)]
    for arm in split.arms:
        count = arms.count(arm.name)
        sigma = math.sqrt(n * arm.fraction * (1 - arm.fraction))
        assert abs(count - n * arm.fraction) < 5 * sigma, (arm, count)


def test_assignment_is_stable_across_processes_and_hash_seeds():
    """Not Python's randomized hash(): another interpreter with another PYTHONHASHSEED assigns identically."""
    code = ("from serving.ab.split import Arm, TrafficSplit\n"
            "s = TrafficSplit('census', 'user_id', 's1', (Arm('A', 1, None, 0.5), Arm('B', 2, None, 0.5)))\n"
            "print(''.join(s.assign(f'user-{i}'.encode()).name for i in range(2000)))\n")
    outputs = set()
    for seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        outputs.add(result.stdout.strip())
    here = "".join(make_split((0.5, 0.5)).assign(f"user-{i}".encode()).name for i in range(2000))
    assert outputs == {here}
    assert 900 < here.count("A") < 1100


def test_a_new_salt_reshuffles_units():
    keys = [f"user-{i}".encode() for i in range(20_000)]
    first, second = make_split((0.5, 0.5), salt="exp-1"), make_split((0.5, 0.5), salt="exp-2")
    moved = sum(first.assign(k).name != second.assign(k).name for k in keys) / len(keys)
    assert 0.47 < moved < 0.53  # independent halves: about half the units change arm
    assert all(first.assign(k) == make_split((0.5, 0.5), salt="exp-1").assign(k) for k in keys[:1000])


def test_unit_key_is_the_same_for_a_number_sent_as_float_int_or_text():
    assert unit_key(np.float32(42.0)) == unit_key(np.int64(42)) == unit_key(b"42") == unit_key("42") == b"42"
    assert unit_key(0.5) == b"0.5"
    assert unit_key(float("nan")) is None and unit_key(b"") is None


# -- routing without a server ------------------------------------------------------------------------------


class _Spec:
    """The part of a ModelSpec the router reads."""

    def __init__(self, name="census", version=None, label=""):
        self.name, self.version_label = name, label
        self.version = type("V", (), {"value": version})()

    def HasField(self, field):
        return field == "version" and self.version.value is not None


def _example(**features):
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    for name, value in features.items():
        if isinstance(value, str):
            example.features.feature[name].bytes_list.value.append(value.encode())
        else:
            example.features.feature[name].float_list.value.append(value)
    return example.SerializeToString()


def test_route_pins_keys_and_errors():
    split = make_split((0.5, 0.5))
    ids = np.array([b"u7", b"u7"], dtype=object)
    want = split.assign(b"u7")
    assert split.route(_Spec(), {"user_id": ids}).arm == want.name
    assert split.route(_Spec(), {"user_id": ids}).version == want.version
    # The same unit through tf.Examples (serving_default, Classify, Regress).
    examples = np.array([_example(user_id="u7", age=30.0)] * 3, dtype=object)
    assert split.route(_Spec(), {"examples": examples}).arm == want.name
    # Pins win and are not part of the split; other models are not split.
    assert split.route(_Spec(version=2), {}) .arm == "" and split.route(_Spec(version=2), {}).version == 2
    assert split.route(_Spec(label="stable"), {}).label == "stable"
    assert split.route(_Spec(name="other"), {}).arm == ""
    with pytest.raises(ServingError, match="split by feature 'user_id', which the request lacks") as err:
        split.route(_Spec(), {"age": np.array([1.0], np.float32)})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ServingError, match="which row 1 of the request lacks"):
        split.route(_Spec(), {"examples": np.array([_example(user_id="u1"), _example(age=3.0)], dtype=object)})
    with pytest.raises(ServingError, match="this batch holds 2 .*send one request per 'user_id'") as err:
        split.route(_Spec(), {"user_id": np.array([b"u1", b"u2"], dtype=object)})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # key "" = the request's gRPC metadata.
    by_request = make_split((0.5, 0.5), key="")
    assert by_request.route(_Spec(), {}, [(REQUEST_KEY_METADATA, "u7")]).arm == want.name
    with pytest.raises(ServingError, match=REQUEST_KEY_METADATA):
        by_request.route(_Spec(), {}, [])


# -- config errors -----------------------------------------------------------------------------------------


def _config(**change):
    config = {"model": "census", "key": "user_id", "salt": "x",
              "arms": [{"name": "A", "label": "stable", "fraction": 0.5},
                       {"name": "B", "version": 2, "fraction": 0.5}]}
    config.update(change)
    return config


@pytest.mark.parametrize("config, message", [
    (_config(arms=[{"name": "A", "version": 1, "fraction": 0.5}, {"name": "B", "version": 2, "fraction": 0.4}]),
     "fractions must sum to 1, they sum to 0.9"),
    (_config(arms=[{"name": "A", "version": 1, "fraction": 1.5}, {"name": "B", "version": 2, "fraction": -0.5}]),
     "'fraction' must be in"),
    ({k: v for k, v in _config().items() if k != "key"}, "'key' is missing"),
    (_config(arms=[{"name": "A", "version": 1, "label": "stable", "fraction": 0.5},
                   {"name": "B", "version": 2, "fraction": 0.5}]), "exactly one of 'version' and 'label'"),
    (_config(arms=[{"name": "A", "version": 1, "fraction": 0.5}, {"name": "A", "version": 2, "fraction": 0.5}]),
     "used twice"),
    (_config(arms=[{"name": "A", "version": 1, "fraction": 1.0}]), "at least two arms"),
    (_config(fractions=[0.5]), "unknown field"),
    (_config(arms=[{"name": "A", "version": "1", "fraction": 0.5}, {"name": "B", "version": 2, "fraction": 0.5}]),
     "'version' must be a positive integer"),
])
def test_bad_split_configs_are_rejected(config, message):
    with pytest.raises(ValueError, match=message):
        parse_split_config(json.dumps(config), "split.json")


def _fake_versions(root, versions):
    for v in versions:
        (root / str(v)).mkdir(parents=True)
        (root / str(v) / "saved_model.pb").write_bytes(b"")


def test_split_is_checked_against_the_served_models(tmp_path):
    _fake_versions(tmp_path, [1, 2])
    entries = [ModelEntry("census", str(tmp_path), VersionPolicy("all"), {"stable": 1})]
    check_split_against_models(parse_split_config(json.dumps(_config())), entries)
    bad_label = _config(arms=[{"name": "A", "label": "gold", "fraction": 0.5},
                              {"name": "B", "version": 2, "fraction": 0.5}])
    with pytest.raises(ValueError, match=r"arm 'A': model 'census' has no version label 'gold'; labels: \['stable'\]"):
        check_split_against_models(parse_split_config(json.dumps(bad_label)), entries)
    bad_version = _config(arms=[{"name": "A", "version": 1, "fraction": 0.5},
                                {"name": "B", "version": 7, "fraction": 0.5}])
    with pytest.raises(ValueError, match=r"arm 'B': model 'census' serves no version 7.*\[1, 2\]"):
        check_split_against_models(parse_split_config(json.dumps(bad_version)), entries)
    # On disk but not wanted by the version policy (latest 1 serves only 2).
    latest = [ModelEntry("census", str(tmp_path), VersionPolicy("latest"), {"stable": 1})]
    with pytest.raises(ValueError, match="arm 'A'.*serves no version 1"):
        check_split_against_models(parse_split_config(json.dumps(_config(arms=bad_version["arms"][:1] + [
            {"name": "B", "version": 2, "fraction": 0.5}]))), latest)
    with pytest.raises(ValueError, match="model 'other' is not served"):
        check_split_against_models(parse_split_config(json.dumps(_config(model="other"))), entries)
    # A label arm whose version is not served fails the same way (half the units would get errors).
    ghost = [ModelEntry("census", str(tmp_path), VersionPolicy("all"), {"stable": 7})]
    with pytest.raises(ValueError, match=r"serves no version 7 \(label 'stable' points to it\)"):
        check_split_against_models(parse_split_config(json.dumps(_config())), ghost)


def test_mmoe_serve_refuses_a_bad_split_at_start_up(tmp_path, capsys):
    from pipelines.cli import main

    _fake_versions(tmp_path / "census", [1])
    path = tmp_path / "split.json"
    path.write_text(json.dumps(_config(arms=[{"name": "A", "version": 1, "fraction": 0.5},
                                             {"name": "B", "version": 3, "fraction": 0.5}])))
    argv = ["serve", "--model-base-path", str(tmp_path / "census"), "--model-name", "census", "--port", "0",
            "--split-config", str(path)]
    assert main(argv) == 2
    assert "arm 'B': model 'census' serves no version 3" in capsys.readouterr().err
    path.write_text("{not json")
    assert main(argv) == 2
    assert "not JSON" in capsys.readouterr().err
    assert main(argv[:-2] + ["--split-config", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err


# -- over loopback, with TF Serving's stub -------------------------------------------------------------------

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    from serving.testing import tiny_exports
    return tiny_exports(str(tmp_path_factory.getbasetemp() / "serving-exports"))


@pytest.fixture(scope="module")
def split_server(exports, tmp_path_factory):
    """census versions 1 and 2 (copies of the plain export); A = label stable (version 1), B = version 2; logged."""
    from serving.ab.prediction_log import PredictionLogger
    from serving.models import ModelManager
    from serving.server import Server

    root = tmp_path_factory.mktemp("split-models")
    for v in (1, 2):
        shutil.copytree(exports.plain_dir, root / "census" / str(v))
    entries = [ModelEntry("census", str(root / "census"), VersionPolicy("all"), {"stable": 1})]
    split = parse_split_config(json.dumps(_config(salt="loopback")))
    check_split_against_models(split, entries)
    logger = PredictionLogger(str(root / "logs"), split=split.to_dict())
    srv = Server(ModelManager(entries, poll_seconds=3600), port=0, split=split, prediction_logger=logger).start()
    yield srv, split, logger
    srv.stop(1)


def _raw_request(exports, rows, user, **spec):
    from tensorflow_serving.apis import predict_pb2

    from serving.testing import raw_columns

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "census"
    request.model_spec.signature_name = "predict_raw"
    for field, value in spec.items():
        if field == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, field, value)
    for name, column in raw_columns(exports.frame.iloc[rows], exports.spec).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(column, dtype=tf.string if column.dtype == object
                                                           else tf.float32))
    if user is not None:
        request.inputs["user_id"].CopyFrom(tf.make_tensor_proto([user] * len(rows), dtype=tf.string))
    return request


def _examples_with_user(exports, rows, user):
    from serving.testing import example_bytes

    out = []
    for serialized in example_bytes(exports.frame.iloc[rows], exports.spec):
        example = tf.train.Example.FromString(serialized)
        example.features.feature["user_id"].bytes_list.value.append(user.encode())
        out.append(example)
    return out


def test_responses_are_served_by_the_units_arm(split_server, exports):
    from tensorflow_serving.apis import classification_pb2, predict_pb2, prediction_service_pb2_grpc

    srv, split, _ = split_server
    version_of = {"A": 1, "B": 2}
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        seen = set()
        for i in range(24):
            user = f"user-{i}"
            arm = split.assign(user.encode()).name
            response, call = stub.Predict.with_call(_raw_request(exports, [i, i + 1], user), timeout=30)
            assert response.model_spec.version.value == version_of[arm], user
            assert dict(call.trailing_metadata())[ARM_METADATA] == arm
            assert tf.make_ndarray(response.outputs["income"]).shape == (2,)
            seen.add(arm)
            # The same unit through serving_default (tf.Examples carrying user_id) and Classify.
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "census"
            request.inputs["examples"].CopyFrom(tf.make_tensor_proto(
                [e.SerializeToString() for e in _examples_with_user(exports, [i], user)], dtype=tf.string))
            assert stub.Predict(request, timeout=30).model_spec.version.value == version_of[arm]
            classify = classification_pb2.ClassificationRequest()
            classify.model_spec.name = "census"
            classify.input.example_list.examples.extend(_examples_with_user(exports, [i, i + 2], user))
            assert stub.Classify(classify, timeout=30).model_spec.version.value == version_of[arm]
        assert seen == {"A", "B"}
        # A pin wins over the split and is not counted in it (no arm).
        response, call = stub.Predict.with_call(_raw_request(exports, [0], "user-0", version=2), timeout=30)
        assert response.model_spec.version.value == 2 and ARM_METADATA not in dict(call.trailing_metadata())
        pinned = _raw_request(exports, [0], None, version_label="stable")
        assert stub.Predict(pinned, timeout=30).model_spec.version.value == 1
        # Missing key, several units in one batch: INVALID_ARGUMENT naming the problem.
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(_raw_request(exports, [0], None), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in err.value.details()
        mixed = _raw_request(exports, [0, 1], None)
        mixed.inputs["user_id"].CopyFrom(tf.make_tensor_proto(["u1", "u2"], dtype=tf.string))
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(mixed, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "holds 2" in err.value.details()


def test_split_calls_are_logged_with_their_arm(split_server, exports):
    from serving.ab.prediction_log import read_prediction_logs, read_split_config

    srv, split, logger = split_server
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for i in range(6):
            stub.Predict(_raw_request(exports, [i, i + 1, i + 2], f"logged-{i}"), timeout=30)
    logger.flush()
    frame = read_prediction_logs(logger.log_dir)
    logged = frame[frame["in.user_id"].fillna("").str.startswith("logged-")]
    assert len(logged) == 18  # 6 requests x 3 rows
    for _, row in logged.iterrows():
        arm = split.assign(row["in.user_id"].encode()).name
        assert row["arm"] == arm and row["version"] == {"A": 1, "B": 2}[arm]
        assert row["signature"] == "predict_raw" and row["model"] == "census"
    assert {"out.income", "out.marital", "in.age"} <= set(frame.columns)
    assert not [c for c in frame.columns if c.endswith("_gates")]
    assert logged["in.age"].tolist() == [float(exports.frame["age"].iloc[i + j]) for i in range(6) for j in range(3)]
    assert read_split_config(logger.log_dir) == split.to_dict()


def test_classify_calls_are_logged_under_the_head_they_scored(split_server, exports):
    # The client gets the signature name it asked for echoed ("serving_default" for the default head, as TF
    # Serving); the log names the head, so online ab-eval finds its outcomes. classify_<task> is that task.
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc

    from serving.ab.prediction_log import read_prediction_logs

    srv, _, logger = split_server
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for i, signature in enumerate(["", "classify_marital", "income"]):
            request = classification_pb2.ClassificationRequest()
            request.model_spec.name = "census"
            request.model_spec.signature_name = signature
            request.input.example_list.examples.extend(_examples_with_user(exports, [i], f"classify-{i}"))
            response = stub.Classify(request, timeout=30)
            assert response.model_spec.signature_name == (signature or "serving_default")
    logger.flush()
    frame = read_prediction_logs(logger.log_dir)
    rows = frame[frame["in.user_id"].fillna("").str.startswith("classify-")].set_index("in.user_id")
    assert "out.serving_default" not in frame.columns and "out.classify_marital" not in frame.columns
    assert np.isfinite(rows.loc["classify-0", "out.income"]) and np.isnan(rows.loc["classify-0", "out.marital"])
    assert np.isfinite(rows.loc["classify-1", "out.marital"]) and np.isfinite(rows.loc["classify-2", "out.income"])


def _units_csv(exports, path, users):
    """The first len(users) rows of the tiny frame, with a user_id column holding `users` (row order)."""
    frame = exports.frame.iloc[:len(users)].copy()
    frame["user_id"] = users
    frame.to_csv(path, index=False)
    return path


def _predict_lines(capsys, argv):
    from pipelines.cli import main

    assert main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    lines = [line.split("\t") for line in captured.out.splitlines()]
    return lines[0], lines[1:], captured.err


def test_mmoe_predict_sends_one_request_per_unit_through_the_split(split_server, exports, tmp_path, capsys):
    srv, split, _ = split_server
    # Units interleaved, one with more rows than a request holds.
    users = ["u-3", "u-7", "u-3", "42", "u-9", "u-3", "42", "u-7", "u-3", "u-11", "u-3", "u-12"]
    csv_path = _units_csv(exports, tmp_path / "rows.csv", users)
    header, rows, err = _predict_lines(capsys, ["predict", "--server", f"127.0.0.1:{srv.port}", "--model", "census",
                                                "--csv", str(csv_path), "--unit-column", "user_id",
                                                "--batch-size", "2", "--concurrency", "3"])
    assert header == ["row", "income", "marital", "unit", "arm", "version"]
    assert [r[0] for r in rows] == [str(i) for i in range(len(users))]
    assert [r[3] for r in rows] == users
    arms = [split.assign(u.encode()).name for u in users]
    assert [r[4] for r in rows] == arms and {"A", "B"} <= set(arms)
    assert [int(r[5]) for r in rows] == [{"A": 1, "B": 2}[a] for a in arms]
    # Scores in CSV row order (both versions are copies of one model).
    want = exports.model.predict({k: v[:len(users)] for k, v in exports.model_inputs.items()}, verbose=0)
    np.testing.assert_allclose([float(r[1]) for r in rows], want["income"], atol=1e-5)
    assert "rows per arm: A " in err

    # A row without its unit is named before anything is sent.
    from pipelines.cli import main

    # Without --unit-column, the split's refusal comes with what to give mmoe predict.
    assert main(["predict", "--server", f"127.0.0.1:{srv.port}", "--model", "census", "--csv", str(csv_path)]) == 1
    assert "give --unit-column COLUMN" in capsys.readouterr().err
    bad = _units_csv(exports, tmp_path / "bad.csv", ["u-1", "", "u-2"])
    assert main(["predict", "--server", f"127.0.0.1:{srv.port}", "--model", "census", "--csv", str(bad),
                 "--unit-column", "user_id"]) == 2
    assert "bad.csv:3: column 'user_id' is empty" in capsys.readouterr().err
    # A missing-value marker is no unit either (it would otherwise be one unit holding every such row).
    marker = _units_csv(exports, tmp_path / "marker.csv", ["u-1", "u-2", "?"])
    assert main(["predict", "--server", f"127.0.0.1:{srv.port}", "--model", "census", "--csv", str(marker),
                 "--unit-column", "user_id"]) == 2
    assert "marker.csv:4: column 'user_id' is empty" in capsys.readouterr().err


def test_mmoe_predict_sends_the_unit_as_metadata_to_a_split_keyed_by_metadata(exports, tmp_path, capsys):
    from serving.models import ModelManager
    from serving.server import Server

    root = tmp_path / "models"
    for v in (1, 2):
        shutil.copytree(exports.plain_dir, root / "census" / str(v))
    entries = [ModelEntry("census", str(root / "census"), VersionPolicy("all"), {"stable": 1})]
    split = parse_split_config(json.dumps(_config(key="", salt="by-metadata")))
    check_split_against_models(split, entries)
    srv = Server(ModelManager(entries, poll_seconds=3600), port=0, split=split).start()
    try:
        users = [f"m-{i}" for i in range(8)]
        csv_path = _units_csv(exports, tmp_path / "rows.csv", users)
        argv = ["predict", "--server", f"127.0.0.1:{srv.port}", "--model", "census", "--csv", str(csv_path),
                "--unit-column", "user_id"]
        _, rows, _ = _predict_lines(capsys, argv + ["--unit-in", "metadata"])
        arms = [split.assign(u.encode()).name for u in users]
        assert [r[4] for r in rows] == arms and len(set(arms)) == 2
        # As a feature, the server (split by metadata) has no key, and passes user_id to the signature: refused.
        from pipelines.cli import main

        assert main(argv) == 1
        assert "INVALID_ARGUMENT" in capsys.readouterr().err
    finally:
        srv.stop(1)


def test_predict_by_unit_keeps_task_scores_when_the_arms_models_differ(tmp_path):
    # Arm A's model: 4 experts, head income; arm B's: 8 experts and a second head. Gate outputs (whose width
    # differs) are left out, and B's extra head is NaN in A's rows, not 0.
    from tensorflow_serving.apis import predict_pb2

    from serving.client import ModelClient
    from serving.tensors import to_numpy, to_proto

    split = make_split((0.5, 0.5), salt="shapes")

    class Call:
        def __init__(self, arm):
            self.arm = arm

        def trailing_metadata(self):
            return ((ARM_METADATA, self.arm),)

    class Stub:
        def with_call(self, request, timeout=None, metadata=None):
            unit = request.inputs["user_id"].string_val[0]
            arm = split.assign(unit).name
            age = to_numpy(request.inputs["age"], "age", 1 << 20)
            n = len(age)
            response = predict_pb2.PredictResponse()
            response.model_spec.version.value = 1 if arm == "A" else 2
            response.outputs["income"].CopyFrom(to_proto(age / 100))
            response.outputs["income_gates"].CopyFrom(to_proto(np.full((n, 4 if arm == "A" else 8), 0.1, "f4")))
            if arm == "B":
                response.outputs["wage"].CopyFrom(to_proto(age * 2))
            return response, Call(arm)

    users = [f"s-{i}" for i in range(12)]
    path = tmp_path / "rows.csv"
    path.write_text("age,user_id\n" + "".join(f"{20 + i},{u}\n" for i, u in enumerate(users)))
    client = ModelClient("127.0.0.1:1")
    try:
        client.raw_inputs = lambda model: {"age": "DT_FLOAT"}
        client.predictions = type("Predictions", (), {"Predict": Stub()})()
        scores, served = client.predict_csv_by_unit("m", str(path), "user_id", batch_size=5)
    finally:
        client.close()
    arms = [split.assign(u.encode()).name for u in users]
    assert served["arm"].tolist() == arms and {"A", "B"} == set(arms)
    assert sorted(scores) == ["income", "wage"]
    np.testing.assert_allclose(scores["income"], (20 + np.arange(12)) / 100, rtol=1e-6)
    in_a = np.array(arms) == "A"
    assert np.isnan(scores["wage"][in_a]).all() and np.isfinite(scores["wage"][~in_a]).all()
