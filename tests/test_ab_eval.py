"""`mmoe ab-eval`: offline through real tiny exports, online on prediction logs (fabricated and real records)."""
import gzip
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from pipelines.cli import main  # noqa: E402
from serving.ab import stats  # noqa: E402
from serving.ab.online import evaluate_online  # noqa: E402
from serving.ab.stats import Settings  # noqa: E402

SPLIT = {"model": "census", "key": "user_id", "salt": "s", "arms": [
    {"name": "A", "version": 1, "label": None, "fraction": 0.5},
    {"name": "B", "version": 2, "label": None, "fraction": 0.5}]}


# -- offline, real exports ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from serving.testing import tiny_exports
    return tiny_exports(str(tmp_path_factory.getbasetemp() / "serving-exports"))


@pytest.fixture(scope="module")
def degraded(exports, tmp_path_factory):
    from benchmarks.ab_eval import degraded_export
    return degraded_export(exports, str(tmp_path_factory.mktemp("ab") / "degraded" / "1"), head="income",
                           noise=10.0)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    """5,000 census sample rows the tiny model did not train on (it used the first 1,000)."""
    from features.census import CENSUS_SAMPLE_PATH
    with gzip.open(CENSUS_SAMPLE_PATH, "rt", encoding="latin-1") as fh:
        lines = fh.readlines()[2000:7000]
    path = tmp_path_factory.mktemp("ab-data") / "rows.csv"
    path.write_text("".join(lines), encoding="latin-1")
    return str(path)


def test_offline_finds_the_degraded_head_and_not_the_unchanged_one(exports, degraded, rows_file, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["ab-eval", "--a", exports.xla_dir, "--b", degraded, "--data", rows_file, "--out", str(out),
               "--resamples", "200", "--slice", "sex", "--min-slice-rows", "1500"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    income, marital = report["overall"]["income"], report["overall"]["marital"]
    assert income["verdict"] == stats.B_WORSE and income["metrics"]["auc"]["ci"][1] < 0
    assert income["test"]["method"] == "DeLong (paired)" and income["test"]["p_holm"] < 0.05
    # The marital head's weights were not touched: identical scores, zero difference.
    assert marital["verdict"] == stats.NO_DIFFERENCE
    assert all(m["diff"] == 0 and m["ci"][0] <= 0 <= m["ci"][1] for m in marital["metrics"].values())
    sexes = report["slices"]["sex"]
    assert set(sexes) == {"Female", "Male"}
    judged = [r for v in sexes.values() for r in v.values() if "test" in r]
    assert judged and all("verdict" in r for v in sexes.values() for r in v.values())
    assert set(report["gates"]["A"]) == {"income", "marital"} and len(report["gates"]["A"]["income"]) == 4
    for name in ("report.md", "income_curves.png", "marital_curves.png", "gates.png"):
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr()
    assert "B worse" in printed.out and "predicting" in printed.err and "bootstrap" in printed.err


def test_offline_identical_models_by_name_and_version(exports, rows_file, tmp_path):
    # base_dir holds xla/1 and plain/1: the same model exported with and without XLA.
    out = tmp_path / "same"
    rc = main(["ab-eval", "--serving-dir", exports.base_dir, "--a", "xla@1", "--b", "plain", "--data", rows_file,
               "--out", str(out), "--resamples", "100", "--no-plots", "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["arms"]["A"]["version"] == 1 and report["arms"]["B"]["name"] == "plain"
    for head in report["overall"].values():
        assert head["verdict"] == stats.NO_DIFFERENCE
        assert head["metrics"]["auc"]["ci"][0] <= 0 <= head["metrics"]["auc"]["ci"][1]


def test_a_model_name_is_not_taken_for_a_directory_of_that_name(exports, tmp_path, monkeypatch):
    # Run where ./plain is some directory (not an export): with --serving-dir, "plain" is the served model.
    from serving.ab.offline import resolve_model

    (tmp_path / "plain").mkdir()
    monkeypatch.chdir(tmp_path)
    ref = resolve_model("plain", serving_dir=exports.base_dir)
    assert ref.path == os.path.join(exports.base_dir, "plain", "1") and ref.name == "plain"
    with pytest.raises(FileNotFoundError, match="directory holds no saved_model.pb"):
        resolve_model("plain")  # no serving directory: a path, and not an export
    assert resolve_model(exports.plain_dir, serving_dir=exports.base_dir).path == exports.plain_dir


def test_offline_bad_input(exports, rows_file, tmp_path, capsys):
    base = ["ab-eval", "--a", exports.xla_dir, "--b", exports.plain_dir, "--data", rows_file, "--out",
            str(tmp_path / "r"), "--quiet"]
    assert main(base + ["--head", "nope"]) == 2
    assert "--head nope: not a head of both models; shared heads: ['income', 'marital']" in capsys.readouterr().err
    assert main(base + ["--slice", "nope"]) == 2
    assert "--slice nope: not a column" in capsys.readouterr().err
    assert main(["ab-eval", "--serving-dir", exports.base_dir, "--a", "xla:stable", "--b", "plain", "--data",
                 rows_file, "--out", str(tmp_path / "r")]) == 2
    assert "unknown version label 'stable'" in capsys.readouterr().err
    assert main(["ab-eval", "--a", str(tmp_path), "--b", "x", "--data", rows_file, "--out", "o"]) == 2
    assert "holds no saved_model.pb" in capsys.readouterr().err
    assert main(["ab-eval", "--a", "x", "--logs", "d"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["ab-eval", "--logs", "d", "--labels", "l.csv"]) == 2  # the report needs a place, as offline
    assert "online mode needs --out" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["ab-eval", "--a", "x", "--b", "y", "--data", rows_file, "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file; the report goes into a directory" in capsys.readouterr().err


# -- online ------------------------------------------------------------------------------------------------


def _fake_logs(n_a, n_b, seed=0, noise_b=0.0):
    """A read_prediction_logs-shaped frame: arms A/B, unit user_id, sex, and income/marital outputs.

    Returns (logs, labels): labels has user_id, income (0/1) and marital_label (0/1; spec label-key naming).
    """
    rng = np.random.default_rng(seed)
    n = n_a + n_b
    income = (rng.random(n) < 0.3).astype(float)
    marital = (rng.random(n) < 0.4).astype(float)
    score_income = 1 / (1 + np.exp(-(2 * income - 1 + rng.normal(size=n))))
    noise = np.r_[np.zeros(n_a), rng.normal(scale=noise_b, size=n_b)]
    logs = pd.DataFrame({
        "arm": ["A"] * n_a + ["B"] * n_b, "model": "census", "version": [1] * n_a + [2] * n_b,
        "signature": "predict_raw", "time_ms": np.arange(n), "in.sex": rng.choice(["Female", "Male"], n),
        "in.user_id": np.arange(n, dtype=float),
        "out.income": np.clip(score_income + noise, 0, 1),
        "out.marital": 1 / (1 + np.exp(-(2 * marital - 1 + rng.normal(size=n))))})
    labels = pd.DataFrame({"user_id": np.arange(n), "income": income.astype(int),
                           "marital_label": marital.astype(int)})
    return logs, labels


def test_online_unpaired_report_flags_a_skewed_split(tmp_path):
    logs, labels = _fake_logs(3000, 2000, noise_b=0.4)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "report"
    report = evaluate_online("logs", str(tmp_path / "labels.csv"), None, str(out), logs=logs, split=SPLIT,
                             slices=["sex"], settings=Settings(resamples=200))
    assert report["srm"]["flagged"] and report["srm"]["counts"] == {"A": 3000, "B": 2000}
    assert report["comparison"].startswith("unpaired")
    assert report["overall"]["income"]["verdict"] == stats.B_WORSE
    assert report["overall"]["income"]["test"]["method"] == "DeLong (unpaired)"
    assert report["overall"]["marital"]["verdict"] == stats.NO_DIFFERENCE
    assert set(report["slices"]["sex"]) == {"Female", "Male"}
    assert (out / "report.md").read_text().splitlines()[2].startswith("**SRM: do not trust this test")

    balanced = evaluate_online("logs", str(tmp_path / "labels.csv"), "user_id", None,
                               logs=_fake_logs(2510, 2490)[0], split=SPLIT, settings=Settings(resamples=50))
    assert not balanced["srm"]["flagged"]


def test_online_join_keeps_first_exposure_and_counts_missing_outcomes(tmp_path):
    logs, labels = _fake_logs(600, 600)
    repeat = logs.iloc[:100].assign(time_ms=logs["time_ms"].iloc[:100] + 10_000, **{"out.income": 0.5})
    logs = pd.concat([logs, repeat], ignore_index=True)
    labels.iloc[:1100].to_csv(tmp_path / "labels.csv", index=False)  # the last 100 units have no outcome yet
    report = evaluate_online("logs", str(tmp_path / "labels.csv"), None, None, logs=logs, split=SPLIT,
                             settings=Settings(resamples=20))
    assert report["join"]["predictions_compared"] == 1200
    assert report["join"]["predictions_without_outcome"] == 100
    assert report["overall"]["income"]["rows_a"] == 600 and report["overall"]["income"]["rows_b"] == 500


def test_online_heads_with_unknown_outcomes_keep_their_own_rows(tmp_path):
    # Outcomes not known yet for some units of one head only: that head compares fewer rows (each head is
    # resampled on its own rows), the other head all of them.
    logs, labels = _fake_logs(400, 400)
    labels["marital_label"] = labels["marital_label"].astype(str)
    labels.loc[::40, "marital_label"] = ""
    labels.to_csv(tmp_path / "labels.csv", index=False)
    report = evaluate_online("logs", str(tmp_path / "labels.csv"), None, None, logs=logs, split=SPLIT,
                             settings=Settings(resamples=30))
    assert (report["overall"]["income"]["rows_a"], report["overall"]["income"]["rows_b"]) == (400, 400)
    assert (report["overall"]["marital"]["rows_a"], report["overall"]["marital"]["rows_b"]) == (390, 390)
    assert report["join"]["per_head"]["marital"]["A"] == {"no_score": 0, "outcome_unknown": 10}
    assert np.isfinite(report["overall"]["marital"]["metrics"]["auc"]["se"])


def test_online_classify_calls_log_one_head_per_row_and_every_head_keeps_its_units(tmp_path):
    # A Classify / Regress call is logged as one row per head signature, holding only that head's output; the
    # first row of a unit then lacks the other head, which must still be compared on every unit.
    logs, labels = _fake_logs(300, 300)
    income_rows = logs.drop(columns=["out.marital"])
    marital_rows = logs.drop(columns=["out.income"]).assign(time_ms=logs["time_ms"] + 10_000)
    logs = pd.concat([income_rows, marital_rows], ignore_index=True)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    report = evaluate_online("logs", str(tmp_path / "labels.csv"), None, None, logs=logs, split=SPLIT,
                             settings=Settings(resamples=20))
    for head in ("income", "marital"):
        assert (report["overall"][head]["rows_a"], report["overall"][head]["rows_b"]) == (300, 300), head
    assert report["join"]["predictions_compared"] == 600


def test_online_sample_ratio_counts_units_not_requests(tmp_path):
    # A split keyed by request metadata ("key": ""), the unit given as --key: a sound 50/50 split of units whose
    # request counts are heavy-tailed. Counted per request, arm B's few heavy users would flag it.
    split = {**SPLIT, "key": ""}
    logs, labels = _fake_logs(500, 500)
    heavy = pd.concat([logs.iloc[[500 + i]] for i in range(10) for _ in range(200)], ignore_index=True)
    logs = pd.concat([logs, heavy.assign(time_ms=heavy["time_ms"] + 5000)], ignore_index=True)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    report = evaluate_online("logs", str(tmp_path / "labels.csv"), "user_id", None, logs=logs, split=split,
                             settings=Settings(resamples=20))
    assert report["srm"]["counts"] == {"A": 500, "B": 500} and not report["srm"]["flagged"]
    assert report["srm"]["units"] == "distinct values of 'user_id'"


def test_online_keys_are_exact_64_bit_integers_and_versions_per_arm_are_reported(tmp_path):
    # Two ids one apart above 2**53 are two units (a float would merge them), in the logs and in the labels.
    logs, labels = _fake_logs(300, 300)
    base = 1234567890123456789
    logs["in.user_id"] = pd.array([base + i for i in range(600)], dtype="Int64")
    labels["user_id"] = [str(base + i) for i in range(600)]
    logs.loc[logs.index[-5:], "version"] = 3  # arm B's label moved to version 3 for its last 5 requests
    labels.to_csv(tmp_path / "labels.csv", index=False)
    lines = []
    report = evaluate_online("logs", str(tmp_path / "labels.csv"), None, None, logs=logs, split=SPLIT,
                             settings=Settings(resamples=20), progress=lines.append)
    assert report["srm"]["counts"] == {"A": 300, "B": 300}
    assert report["join"]["predictions_without_outcome"] == 0 and report["overall"]["income"]["rows_b"] == 300
    assert report["join"]["versions_by_arm"] == {"A": {1: 300}, "B": {2: 295, 3: 5}}
    assert any("arm 'B' was served by versions [2, 3]" in line for line in lines)


def test_online_bad_input(tmp_path):
    logs, labels = _fake_logs(300, 300)
    labels.drop(columns=["marital_label"]).to_csv(tmp_path / "labels.csv", index=False)
    path = str(tmp_path / "labels.csv")
    with pytest.raises(ValueError, match=r"no label column for head\(s\) \['marital'\]"):
        evaluate_online("logs", path, None, None, logs=logs, split=SPLIT, heads=["marital"])
    with pytest.raises(ValueError, match=r"--head nope: not a logged output"):
        evaluate_online("logs", path, None, None, logs=logs, split=SPLIT, heads=["nope"])
    with pytest.raises(ValueError, match="no key column 'account'"):
        evaluate_online("logs", path, "account", None, logs=logs.assign(**{"in.account": 1.0}), split=SPLIT)
    wrong = labels.assign(income=np.where(np.arange(len(labels)) == 7, 2, labels["income"]))  # one typo'd outcome
    wrong.to_csv(tmp_path / "wrong.csv", index=False)
    with pytest.raises(ValueError, match=r"head 'income' looks binary .* 1 other outcome\(s\) \(e.g. \[2.0\]\)"):
        evaluate_online("logs", str(tmp_path / "wrong.csv"), None, None, logs=logs, split=SPLIT, heads=["income"])
    with pytest.raises(ValueError, match="no traffic split was active"):
        evaluate_online("logs", path, None, None, logs=logs, split=None)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no complete record"):
        evaluate_online(str(tmp_path / "empty"), path, "user_id")


def test_online_through_the_real_prediction_log_reader(tmp_path, capsys):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from serving.ab.prediction_log import PredictionLogger

    rng = np.random.default_rng(1)
    logger = PredictionLogger(str(tmp_path / "logs"), split=SPLIT)
    outcomes = []
    for unit in range(600):
        arm = "A" if unit % 2 else "B"
        y = float(rng.random() < 0.4)
        score = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal())))
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "census"
        request.model_spec.signature_name = "predict_raw"
        request.inputs["user_id"].CopyFrom(tf.make_tensor_proto(np.array([unit], np.float32)))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = "census"
        response.model_spec.version.value = 1 if arm == "A" else 2
        response.outputs["income"].CopyFrom(tf.make_tensor_proto(np.array([score], np.float32)))
        logger.log("predict", request, response, arm)
        outcomes.append((unit, int(y)))
    logger.close()
    pd.DataFrame(outcomes, columns=["user_id", "income"]).to_csv(tmp_path / "labels.csv", index=False)
    rc = main(["ab-eval", "--logs", str(tmp_path / "logs"), "--labels", str(tmp_path / "labels.csv"),
               "--out", str(tmp_path / "report"), "--resamples", "50", "--no-plots", "--quiet"])
    assert rc == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["srm"]["counts"] == {"A": 300, "B": 300} and not report["srm"]["flagged"]
    assert report["overall"]["income"]["rows_a"] == 300
    assert "income" in capsys.readouterr().out


def test_prediction_logs_keep_64_bit_integer_features_exact(tmp_path):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from serving.ab.prediction_log import PredictionLogger, read_prediction_logs

    logger = PredictionLogger(str(tmp_path / "logs"), split=SPLIT)
    ids = [1234567890123456789, 1234567890123456790]
    for unit in ids:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "census"
        request.inputs["user_id"].CopyFrom(tf.make_tensor_proto(np.array([unit], np.int64)))
        response = predict_pb2.PredictResponse()
        response.model_spec.version.value = 1
        response.outputs["income"].CopyFrom(tf.make_tensor_proto(np.array([0.5], np.float32)))
        logger.log("predict", request, response, "A")
    # A request without the id: the column has a missing value and must stay integral.
    logger.log("predict", predict_pb2.PredictRequest(), response, "A")
    logger.close()
    frame = read_prediction_logs(str(tmp_path / "logs"))
    assert frame["in.user_id"].tolist()[:2] == ids and pd.isna(frame["in.user_id"].iloc[2])
    assert frame["out.income"].dtype == np.float64
