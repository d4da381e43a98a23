"""`mmoe train` end to end on small data, and its errors on bad input."""
import gzip
import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest

from features.census import CENSUS_SAMPLE_PATH
from pipelines.cli import main


@pytest.fixture(scope="module")
def census_lines():
    with gzip.open(CENSUS_SAMPLE_PATH, "rt") as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def small_census(tmp_path_factory, census_lines):
    path = tmp_path_factory.mktemp("data") / "census-small.data"  # plain text, not gzip
    path.write_text("\n".join(census_lines[:2500]) + "\n")
    return path


@pytest.mark.slow
def test_train_writes_model_transform_and_metrics(small_census, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(small_census), "--task-group", "1", "--arch", "mmoe", "--out", str(out),
               "--epochs", "3", "--num-experts", "4", "--expert-units", "16", "--batch-size", "256", "--seed", "3",
               "--learning-rate", "0.01", "--numeric-bins", "4"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"income", "marital"}
    assert metrics["protocol"]["split"] == "60/20/20" and metrics["protocol"]["seed"] == 3
    assert metrics["protocol"]["rows"] == {"train": 1500, "valid": 500, "test": 500}
    for task in metrics["tasks"].values():
        for split in ("valid", "test"):
            assert 0.5 < task[split]["auc"] <= 1.0
    # Marital status is easy from age and household columns, after 3 epochs at a high learning rate.
    assert metrics["tasks"]["marital"]["test"]["auc"] > 0.9
    assert (out / "transform" / "transform_fn").is_dir()
    assert (out / "training_curves.png").stat().st_size > 1000
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["model"]["num_experts"] == 4 and run_config["model"]["expert_units"] == [16]
    assert run_config["data"] == [os.path.abspath(small_census)]
    # Label-source columns never reach the model.
    input_names = {i["name"] for i in run_config["inputs"]}
    assert not input_names & {"education", "marital_stat", "income_50k", "instance_weight"}
    model = keras.saving.load_model(out / "model.keras")
    assert set(model.output) == {"income", "marital"}
    # --numeric-bins reached the model, and the saved edges are the training split's (age is z-scored, so its
    # quartile edges straddle 0), not the unadapted default.
    assert run_config["model"]["numeric_bins"] == 4
    age_edges = model.get_layer("embedding").bin_edges()["age"]
    assert len(age_edges) == 5 and age_edges != [-2.0, -1.0, 0.0, 1.0, 2.0] and age_edges[0] < 0 < age_edges[-1]
    assert "income" in capsys.readouterr().out
    # A second run into the same directory is refused rather than overwritten.
    rc = main(["train", "--data", str(small_census), "--out", str(out), "--epochs", "1"])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    # A run that fails, here on a bad row, with --overwrite leaves the finished run as it was, and nothing beside.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    lines = small_census.read_text().splitlines()
    lines[2000] = lines[2000].replace(",", ",1e39,", 1).split(",", 1)[1]  # age 1e39, past float32
    bad = tmp_path / "bad.data"
    bad.write_text("\n".join(lines) + "\n")
    assert main(["train", "--data", str(bad), "--out", str(out), "--overwrite"]) == 2
    assert "float32" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.data", "run"]
    # A finished one replaces it whole: one epoch now, and the transform rewritten rather than refused.
    assert main(["train", "--data", str(small_census), "--out", str(out), "--epochs", "1", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs_trained"] == 1
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir would make it, not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.data", "run"]


@pytest.mark.slow
@pytest.mark.slow
def test_refit_saves_a_model_trained_on_train_and_valid_for_the_epochs_early_stopping_kept(small_census, tmp_path,
                                                                                          capsys):
    from mmoe.training import predict, roc_auc
    from pipelines.train_local import load_arrays

    out = tmp_path / "run"
    rc = main(["train", "--data", str(small_census), "--out", str(out), "--epochs", "4", "--patience", "1",
               "--num-experts", "2", "--expert-units", "8", "--batch-size", "256", "--seed", "3", "--refit",
               "--schedule", "cosine", "--cosine-epochs", "4", "--ema", "0.9"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())
    # The refit's epoch count is the early-stopped run's best income (main task) validation epoch.
    assert metrics["refit"]["epochs"] == int(np.argmax(history["val_income_auc"])) + 1
    assert metrics["refit"]["rows"] == 1500 + 500
    train_config = json.loads((out / "run_config.json").read_text())["train"]
    assert train_config["refit"] is True and (train_config["schedule"], train_config["ema"]) == ("cosine", 0.9)
    # The saved model is the refitted one: its test predictions give refit_test, not the early-stopped test AUC.
    arrays = tmp_path / "census.npz"
    assert main(["data", "export", "--data", str(small_census), "--out", str(arrays), "--seed", "3"]) == 0
    _, _, splits, _ = load_arrays(str(arrays))
    model = keras.saving.load_model(out / "model.keras")
    # The optimizer flags reached the optimizer that trained it.
    assert model.optimizer.use_ema and type(model.optimizer._learning_rate).__name__ == "CosineDecay"
    scores = predict(model, splits["test"].inputs)
    saved = {t: roc_auc(splits["test"].labels[t], scores[t]) for t in ("income", "marital")}
    assert saved == {t: pytest.approx(metrics["tasks"][t]["refit_test"]["auc"], abs=1e-6) for t in saved}
    assert saved != {t: pytest.approx(metrics["tasks"][t]["test"]["auc"], abs=1e-6) for t in saved}
    assert "refit test" in capsys.readouterr().out


def test_train_on_a_dataset_that_is_not_census(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 1200
    country = rng.choice(["fr", "de", "us", "jp"], size=n)
    age = rng.integers(18, 80, size=n)
    clicks = rng.poisson(3, size=n)
    clicked = np.where((age < 40) ^ (country == "jp"), "yes", "no")
    watch = 0.5 * clicks + (country == "us") + rng.normal(0, 0.1, size=n)
    rows = ["user_id,country,age,clicks,clicked,watch_time"] + [
        f"u{i % 300},{country[i]},{age[i]},{clicks[i]},{clicked[i]},{watch[i]:.3f}" for i in range(n)]
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "events.yaml").write_text("""
name: events
header: true
columns: [user_id, country, age, clicks, clicked, watch_time]
features:
  - {name: user_id, type: hashed, hash_buckets: 64}
  - {name: country, type: categorical}
  - {name: age, type: numeric}
  - {name: clicks, type: numeric, log: true}
tasks:
  - {name: clicked, kind: binary, column: clicked, positive: ["yes"], values: ["yes", "no"]}
  - {name: watch_time, kind: regression, column: watch_time}
""")
    out = tmp_path / "run"
    rc = main(["train", "--data", str(tmp_path / "events.csv"), "--config", str(tmp_path / "events.yaml"),
               "--out", str(out), "--epochs", "15", "--arch", "cgc", "--learning-rate", "0.01",
               "--batch-size", "64", "--expert-units", "16", "--split", "70/15/15"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"]["clicked"]["test"]["auc"] > 0.9
    assert metrics["tasks"]["watch_time"]["test"]["rmse"] < 0.5 * np.std(watch)


def _run_error(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and "Traceback" not in err
    return err


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    err = _run_error(["train", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")], capsys)
    assert "--data" in err and "nope.csv: no such file" in err
    err = _run_error(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert "a directory, not a file" in err
    err = _run_error(["train", "--data", str(tmp_path / "nope.csv"), "--config", str(tmp_path / "spec.yaml"),
                      "--out", str(tmp_path / "o")], capsys)
    assert "--config" in err and "spec.yaml: no such file" in err


def test_empty_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty.data").write_text("")
    err = _run_error(["train", "--data", str(tmp_path / "empty.data"), "--out", str(tmp_path / "o")], capsys)
    assert "empty" in err.lower()


def test_row_with_missing_columns_names_the_line(tmp_path, census_lines, capsys):
    lines = census_lines[:50]
    lines[17] = ",".join(lines[17].split(",")[:30])
    (tmp_path / "short.data").write_text("\n".join(lines) + "\n")
    err = _run_error(["train", "--data", str(tmp_path / "short.data"), "--out", str(tmp_path / "o")], capsys)
    assert "18" in err


def test_non_numeric_value_names_column_and_row(tmp_path, census_lines, capsys):
    lines = census_lines[:50]
    fields = lines[9].split(",")
    fields[0] = " forty"  # age
    lines[9] = ",".join(fields)
    (tmp_path / "bad.data").write_text("\n".join(lines) + "\n")
    err = _run_error(["train", "--data", str(tmp_path / "bad.data"), "--out", str(tmp_path / "o")], capsys)
    assert "age" in err and "10" in err and "forty" in err


def test_unexpected_label_value_names_column(tmp_path, census_lines, capsys):
    lines = census_lines[:50]
    lines[4] = lines[4].rsplit(",", 1)[0] + ", maybe."
    (tmp_path / "label.data").write_text("\n".join(lines) + "\n")
    err = _run_error(["train", "--data", str(tmp_path / "label.data"), "--out", str(tmp_path / "o")], capsys)
    assert "income_50k" in err and "maybe" in err


@pytest.mark.parametrize("flags, expected", [
    (["--split", "50/50"], "--split"),
    (["--loss-weights", "salary=2"], "salary"),
    (["--gate-temperature", "0"], "gate_temperature"),
    (["--expert-cross-layers", "-1"], "expert_cross_layers"),
    (["--numeric-bins", "-3"], "numeric_bins"),
    (["--main-task", "salary"], "salary"),
    (["--ema", "1.5"], "ema"),
    (["--schedule", "cosine", "--cosine-epochs", "0"], "cosine_epochs"),
    (["--learning-rate", "nan"], "learning_rate"),
    (["--weight-decay", "inf"], "weight_decay"),
    (["--embedding-dim", "0"], "embedding_dim"),
    (["--split", "nan/nan/nan"], "--split"),
    (["--seed", "-1"], "--seed"),
    (["--use-weights", "--config", "TASKS_ONLY"], "no weight column"),
])
def test_bad_settings_are_clear_errors(small_census, tmp_path, capsys, flags, expected):
    if "TASKS_ONLY" in flags:  # the census spec without its weight column
        from features.census import census_spec
        from features.spec import dataset_spec_to_dict

        spec = {**dataset_spec_to_dict(census_spec(1)), "weight_column": None}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        flags = [str(tmp_path / "spec.json") if f == "TASKS_ONLY" else f for f in flags]
    err = _run_error(["train", "--data", str(small_census), "--out", str(tmp_path / "o")] + flags, capsys)
    assert expected in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))  # nothing written


def test_model_config_file_missing_and_spec_booleans_as_strings_are_clear_errors(small_census, tmp_path, capsys):
    from features.census import census_spec
    from features.spec import dataset_spec_to_dict

    err = _run_error(["train", "--data", str(small_census), "--out", str(tmp_path / "o"), "--model-config",
                      str(tmp_path / "none.yaml")], capsys)
    assert "--model-config" in err and "none.yaml" in err
    spec = {**dataset_spec_to_dict(census_spec(1)), "strip_trailing_period": "false"}  # a quoted YAML false
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    err = _run_error(["train", "--data", str(small_census), "--out", str(tmp_path / "o"), "--config",
                      str(tmp_path / "spec.json")], capsys)
    assert "strip_trailing_period must be true or false, got 'false'" in err


@pytest.mark.slow
def test_all_zero_weights_are_refused(tmp_path, census_lines, capsys):
    lines = []
    for line in census_lines[:600]:
        fields = line.split(",")
        fields[24] = " 0"  # instance_weight
        lines.append(",".join(fields))
    (tmp_path / "zero.data").write_text("\n".join(lines) + "\n")
    err = _run_error(["train", "--data", str(tmp_path / "zero.data"), "--out", str(tmp_path / "o"),
                      "--use-weights", "--epochs", "1"], capsys)
    assert "every training row's weight ('instance_weight') is 0" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("config, expected", [
    ("expert_units: '64'\n", "expert_units must be a list, got '64'"),
    ("mixed_precision: 'false'\n", "mixed_precision must be true or false"),
    ("num_experts: 4.7\n", "num_experts must be an integer"),
    ("num_experts: [4\n", "cannot parse"),
])
def test_bad_model_config_files_are_clear_errors(small_census, tmp_path, capsys, config, expected):
    (tmp_path / "model.YAML").write_text(config)  # any case of the suffix is YAML
    err = _run_error(["train", "--data", str(small_census), "--out", str(tmp_path / "o"), "--model-config",
                      str(tmp_path / "model.YAML")], capsys)
    assert expected in err


def test_an_existing_out_is_refused_before_any_work(small_census, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    err = _run_error(["train", "--data", str(small_census), "--out", str(tmp_path / "o")], capsys)
    assert "no finished run" in err and "choose another --out" in err
    # --overwrite replaces a whole directory, so only one that holds a run: never e.g. `--out .` in a checkout.
    err = _run_error(["train", "--data", str(small_census), "--out", str(tmp_path / "o"), "--overwrite"], capsys)
    assert "--overwrite replaces only a finished run" in err
    (tmp_path / "f").write_text("a file")
    assert "is a file" in _run_error(["train", "--data", str(small_census), "--out", str(tmp_path / "f")], capsys)
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"
    # Said before Keras and TensorFlow are imported (seconds), in a fresh interpreter.
    import subprocess
    import sys

    code = ("import sys; from pipelines.cli import main; "
            f"rc = main(['train', '--data', {str(small_census)!r}, '--out', {str(tmp_path / 'o')!r}]); "
            "print(rc, 'keras' in sys.modules, 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.stdout.split() == ["2", "False", "False"], result.stderr


def test_too_few_rows_or_one_file_twice_fail_before_the_transform(tmp_path, census_lines, capsys):
    (tmp_path / "three.data").write_text("\n".join(census_lines[:3]) + "\n")
    err = _run_error(["train", "--data", str(tmp_path / "three.data"), "--out", str(tmp_path / "o")], capsys)
    assert "too few rows" in err and "valid" in err and "--split 60/20/20" in err
    err = _run_error(["data", "export", "--data", str(tmp_path / "three.data"), "--out", str(tmp_path / "x")],
                     capsys)
    assert "too few rows" in err and not list(tmp_path.glob("x*"))
    (tmp_path / "some.data").write_text("\n".join(census_lines[:100]) + "\n")
    err = _run_error(["train", "--data", str(tmp_path / "some.data"), str(tmp_path / "some.data"), "--out",
                      str(tmp_path / "o")], capsys)
    assert "same file twice" in err


def test_one_class_in_a_split_is_warned_about(tmp_path, census_lines):
    from features.census import census_spec
    from pipelines.train_local import load_splits

    # The sample's first 60 rows: income is rare, so some split of 12 rows has no positive.
    (tmp_path / "few.data").write_text("\n".join(census_lines[:60]) + "\n")
    said = []
    load_splits([tmp_path / "few.data"], census_spec(1), (0.6, 0.2, 0.2), seed=0, log=said.append)
    warned = [m for m in said if m.startswith("warning:")]
    assert warned and all("income" in m or "marital" in m for m in warned)
    assert any("valid split" in m and "early stopping" in m for m in warned) or \
        any("test split" in m for m in warned)


def test_training_curves_read_the_keys_keras_logs():
    # A one-task model's history says `auc`, a two-task model's `<task>_auc`: the panels must find both.
    from mmoe import TaskSpec
    from pipelines.train_local import history_panels

    one = [TaskSpec("income", "binary")]
    two = one + [TaskSpec("wage", "regression")]
    assert [key for key, _ in history_panels(one)] == ["loss", "auc"]
    assert [key for key, _ in history_panels(two)] == ["loss", "income_auc", "wage_rmse"]


def test_metrics_json_has_no_nan():
    from mmoe.config import json_safe

    safe = json_safe({"auc": float("nan"), "runs": [1.0, float("inf"), {"x": -float("inf")}], "n": 3, "s": "a"})
    assert safe == {"auc": None, "runs": [1.0, None, {"x": None}], "n": 3, "s": "a"}
    json.dumps(safe, allow_nan=False)


def test_two_files_follow_the_paper_protocol(tmp_path, census_lines):
    from features.census import census_spec
    from pipelines.train_local import load_splits

    (tmp_path / "train.data").write_text("\n".join(census_lines[:600]) + "\n")
    (tmp_path / "test.data").write_text("\n".join(census_lines[600:1000]) + "\n")
    train, valid, test, protocol = load_splits([tmp_path / "train.data", tmp_path / "test.data"], census_spec(1),
                                               (0.6, 0.2, 0.2), seed=1, log=lambda _: None)
    assert protocol["name"].startswith("paper")
    assert protocol["rows"] == {"train": 600, "valid": 200, "test": 200}
    assert len(train) == 600
    # Validation and test are disjoint halves of the test file.
    key = ["age", "det_ind_code", "det_occ_code", "wage_per_hour", "instance_weight"]
    both = valid[key].merge(test[key], how="inner")
    assert len(both) < 5  # identical rows can only be true duplicates in the data


def test_download_command_fetches_from_a_mirror_and_checks_sha256(tmp_path, capsys):
    import shutil

    real = "/work/shared/data/census-income/census-income.test.gz"
    if not Path(real).exists():
        real = str(Path(__file__).parents[2] / "shared/data/census-income/census-income.test.gz")
    if not Path(real).exists():
        pytest.skip("the full UCI test file is not on this machine")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(real, mirror / "census-income.test.gz")
    rc = main(["data", "download", "--cache-dir", str(tmp_path / "cache"), "--base-url", mirror.as_uri() + "/",
               "--file", "census-income.test.gz"])
    assert rc == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == tmp_path / "cache" / "census-income.test.gz"
    # A corrupted mirror copy is rejected and nothing is left in the cache.
    (mirror / "census-income.test.gz").write_bytes(b"not the census file")
    err = _run_error(["data", "download", "--cache-dir", str(tmp_path / "cache2"), "--base-url",
                      mirror.as_uri() + "/", "--file", "census-income.test.gz"], capsys)
    assert "census-income.test.gz" in err
    assert not list(tmp_path.glob("cache2/census-income.test.gz*"))


@pytest.mark.slow
def test_data_export_loads_without_tensorflow(small_census, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "census.npz"
    # numpy adds the suffix itself; the command says where the file really is.
    assert main(["data", "export", "--data", str(small_census), "--out", str(tmp_path / "census"), "--seed", "2"]) == 0
    assert out.exists() and not (tmp_path / "census").exists()
    assert main(["data", "export", "--data", str(small_census), "--out", str(out)]) == 2  # no silent overwrite
    script = (
        "import sys, json; from pipelines.train_local import load_arrays\n"
        f"inputs, tasks, splits, protocol = load_arrays({str(out)!r})\n"
        "assert 'tensorflow' not in sys.modules, 'load_arrays imported TensorFlow'\n"
        "print(json.dumps({'rows': {k: len(v) for k, v in splits.items()}, 'tasks': [t.name for t in tasks],"
        " 'n_inputs': len(inputs), 'pos': float(splits['train'].labels['income'].mean())}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "KERAS_BACKEND": "jax"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows"] == {"train": 1500, "valid": 500, "test": 500}
    assert summary["tasks"] == ["income", "marital"]
    # 42 columns less education, marital_stat, income_50k, instance_weight; plus a bucket id per numeric quantity
    assert summary["n_inputs"] == 38 + 7
    assert 0 < summary["pos"] < 0.2
