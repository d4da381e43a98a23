"""The TFX pipeline: config, schema, ExampleGen reader, Kubeflow compile (fast), and end-to-end runs (slow).

The slow tests share one successful run (module-scoped fixture) on 600 census
rows: two binary heads and a regression head, the Tuner on (2 trials), 30
training steps.  It is started in a subprocess that is killed (SIGKILL) once
Transform has finished, then started again, which must complete from the
cache.  A second run on the same store checks caching through the command
line (and that the unchanged model is not pushed again), a third one trains a
much worse model that must not be blessed or pushed, and a run on broken data
must stop before training.
"""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from features.census import CENSUS_SAMPLE_PATH, census_spec
from features.spec import dataset_spec_to_dict

TASKS = ["income", "marital"]  # the binary heads; the shared run adds the regression head "weeks"


def _sample_lines(n):
    with gzip.open(CENSUS_SAMPLE_PATH, "rt") as fh:
        return [next(fh) for _ in range(n)]


MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
# Single process: each multi-process Beam stage spends about a minute starting workers on a busy 2-core machine.
IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def _config_data(beam_args=MULTI_PROCESS, **train):
    return {"dataset": {"task_group": 1},
            "model": {"num_experts": 4, "expert_units": [16], "tower_units": [8]},
            "train": {"train_steps": 30, "steps_per_epoch": 15, "batch_size": 64, **train},
            "evaluation": {"auc_floor": 0.5, "auc_floors": {"income": 0.4}, "max_auc_drop": 0.01},
            "beam_args": list(beam_args)}


# -- fast --------------------------------------------------------------------------------------


def test_config_defaults_and_errors(tmp_path):
    from pipelines.configs import load_config_file, make_config

    config = make_config()
    assert config.spec.name == "census_group1" and config.train.train_steps == 2000
    assert config.module_config()["dataset"] == dataset_spec_to_dict(census_spec(1))
    assert "--direct_running_mode=multi_processing" in config.beam_args
    with pytest.raises(ValueError, match="unknown config key"):
        make_config({"trian": {}})
    with pytest.raises(ValueError, match="loss_weights names unknown task"):
        make_config({"train": {"loss_weights": {"nope": 1.0}}})
    with pytest.raises(ValueError, match="slices"):
        make_config({"evaluation": {"slices": ["education"]}})  # not a column task group 1 uses
    with pytest.raises(ValueError, match="train.schedule must be one of"):
        make_config({"train": {"schedule": "step"}})
    assert make_config({"train": {"ema": 0.99}}).module_config()["train"]["ema"] == 0.99
    # Values are held to their types: a quoted "no" is not false, nor "64" a width; PyYAML's string 1e-3 is a number.
    with pytest.raises(ValueError, match="use_weights must be true or false"):
        make_config({"train": {"use_weights": "no"}})
    with pytest.raises(ValueError, match=r"'tuner' num_experts\[1\] must be an integer"):
        make_config({"tuner": {"num_experts": [4, "8"]}})
    assert make_config({"tuner": {"learning_rate": ["1e-4", "1e-3"]}}).tuner.learning_rate == [1e-4, 1e-3]
    # A bare dataset spec file is the dataset section.
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(dataset_spec_to_dict(census_spec(2))))
    assert make_config(load_config_file(str(path))).spec.name == "census_group2"


def test_trainer_epochs_share_the_asked_steps():
    # TFX's train_args.num_steps is the total: 250 steps with epochs of at most 200 are 2 x 125, not 2 x 200.
    from pipelines.trainer_module import epoch_plan

    assert epoch_plan(250, 200) == (125, 2)
    assert epoch_plan(400, 200) == (200, 2) and epoch_plan(50, 200) == (50, 1)
    per_epoch, epochs = epoch_plan(251, 200)
    assert epochs == 2 and 251 <= per_epoch * epochs < 251 + epochs


def test_spec_schema_types_shapes_and_domains():
    from pipelines.components.spec_schema import spec_schema

    spec = census_spec(1)
    schema = {f.name: f for f in spec_schema(spec).feature}
    assert set(schema) == set(spec.used_columns)
    assert schema["age"].type == 3 and schema["class_worker"].type == 1  # FLOAT, BYTES
    assert all(len(f.shape.dim) == 0 and f.presence.min_fraction == 1 for f in schema.values())
    assert schema["income_50k"].domain == "income_50k"  # label values are closed
    assert not schema["class_worker"].domain  # a new category value is not an anomaly


def test_example_gen_reader_types_and_leniency(tmp_path):
    import tensorflow as tf

    from pipelines.components.spec_example_gen import InputDataError, file_to_examples

    spec = census_spec(1)
    lines = _sample_lines(5)
    path = tmp_path / "part.csv"
    fields = [l.rstrip("\n").split(",") for l in lines]
    age = spec.columns.index("age")
    fields[1][age] = " forty"  # not a number: the whole column becomes bytes (TFDV reports the type)
    path.write_text("".join(",".join(f) + "\n" for f in fields))
    examples = [tf.train.Example.FromString(e) for e in file_to_examples(str(path), dataset_spec_to_dict(spec))]
    assert len(examples) == 5
    first = examples[0].features.feature
    assert set(first) == set(spec.used_columns)
    assert first["year"].bytes_list.value[0] in (b"94", b"95")  # an integer code stays a string
    assert first["weeks_worked"].float_list.value  # numeric
    assert first["income_50k"].bytes_list.value[0] in (b"- 50000", b"50000+")  # stripped, no trailing '.'
    assert first["age"].bytes_list.value and examples[1].features.feature["age"].bytes_list.value[0] == b"forty"
    # Canonical bytes: the hash split must put the same row in the same split in every process.
    encoded = list(file_to_examples(str(path), dataset_spec_to_dict(spec)))
    assert all(tf.train.Example.FromString(e).SerializeToString(deterministic=True) == e for e in encoded)

    path.write_text(lines[0] + "1,2,3\n")
    with pytest.raises(InputDataError, match=r"line 2: expected 42 fields"):
        list(file_to_examples(str(path), dataset_spec_to_dict(spec)))


def test_example_gen_reads_a_file_as_mmoe_train_does(tmp_path):
    # A byte-order mark before the header, and values padded with ASCII and with Unicode spaces: the pipeline's
    # reader and features.io.read_dataset agree, stripping only what tf.strings.strip strips in serving.
    import textwrap

    from features.io import read_dataset
    from features.spec import load_dataset_spec
    from pipelines.components.spec_example_gen import read_columns

    config = tmp_path / "clicks.yaml"
    config.write_text(textwrap.dedent("""
        name: clicks
        columns: [age, country, clicked]
        header: true
        features:
          - {name: age, type: numeric}
          - {name: country, type: categorical}
        tasks:
          - {name: clicked, kind: binary, column: clicked, positive: ["yes"]}
        """))
    spec = load_dataset_spec(config)
    path = tmp_path / "rows.csv"
    path.write_bytes("\ufeffage,country,clicked\n30, us\t,yes\n41,fr\u00a0,no\n".encode("utf-8"))
    pipeline = read_columns(str(path), spec)
    local = read_dataset(path, spec)
    assert sorted(pipeline) == ["age", "clicked", "country"]
    assert pipeline["country"].tolist() == local["country"].tolist() == ["us", "fr\u00a0"]
    assert pipeline["age"].tolist() == ["30", "41"] and local["age"].tolist() == [30.0, 41.0]


def _census_frame(n):
    """The first n sample rows as ExampleGen types them (float columns, str for bytes), as a DataFrame."""
    import pandas as pd

    from pipelines.components.spec_example_gen import read_columns, typed_columns

    spec = census_spec(1)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mmoe-census-{os.getpid()}.csv")
    with open(path, "w") as fh:
        fh.write("".join(_sample_lines(n)))
    try:
        columns = typed_columns(read_columns(path, spec), spec)
    finally:
        os.remove(path)
    return pd.DataFrame({k: [v.decode() if isinstance(v, bytes) else v for v in values]
                         for k, values in columns.items()})


def test_conform_schema_keeps_the_contract_and_accepts_new_categories():
    """SchemaGen's inference (tfdv.infer_schema, as its executor calls it), held to the spec by ConformSchema."""
    import tensorflow_data_validation as tfdv
    from tensorflow_metadata.proto.v0 import schema_pb2

    from pipelines.components.spec_schema import conform_schema

    spec = census_spec(1)
    good = _census_frame(300)
    inferred = tfdv.infer_schema(tfdv.generate_statistics_from_dataframe(good), infer_feature_shape=True)
    schema = conform_schema(inferred, spec)
    features = {f.name: f for f in schema.feature}
    assert set(features) == set(spec.used_columns)
    assert all(len(f.shape.dim) == 0 and f.presence.min_fraction == 1 for f in features.values())
    domains = {d.name: list(d.value) for d in schema.string_domain}
    assert "Private" in domains[features["class_worker"].domain]  # inferred values kept for curation ...
    assert features["class_worker"].distribution_constraints.min_domain_mass == 0  # ... but open
    assert set(domains[features["income_50k"].domain]) == {"- 50000", "50000+"}  # labels stay closed
    assert not features["income_50k"].HasField("distribution_constraints")

    bad = good.drop(columns=["weeks_worked"])  # a missing column
    bad["age"] = bad["age"].astype(str)  # text in a numeric column: a wrong type
    bad.loc[::5, "class_worker"] = "Space agency"  # a new category value
    stats = tfdv.generate_statistics_from_dataframe(bad)
    assert "class_worker" in tfdv.validate_statistics(stats, inferred).anomaly_info  # why the schema is relaxed
    assert set(tfdv.validate_statistics(stats, schema).anomaly_info) == {"age", "weeks_worked"}
    # A first run on bad data: what SchemaGen infers from it is held to the spec all the same.
    first = conform_schema(tfdv.infer_schema(stats, infer_feature_shape=True), spec)
    assert {f.name: f.type for f in first.feature}["age"] == schema_pb2.FLOAT
    assert set(tfdv.validate_statistics(stats, first).anomaly_info) == {"age", "weeks_worked"}


def test_schema_components_inferred_or_imported(tmp_path):
    from tfx.v1.components import ImportSchemaGen, SchemaGen

    from pipelines import pipeline as pl
    from pipelines.configs import make_config

    config = make_config(_config_data())
    paths = dict(data=CENSUS_SAMPLE_PATH, pipeline_root=str(tmp_path / "root"), serving_dir=str(tmp_path / "s"))
    nodes = {c.id: c for c in pl.create_pipeline(config, **paths).components}
    assert isinstance(nodes[pl.SCHEMA_GEN], SchemaGen) and pl.CONFORM_SCHEMA in nodes
    assert nodes[pl.EXAMPLE_VALIDATOR].inputs["schema"].producer_component_id == pl.CONFORM_SCHEMA
    curated = tmp_path / "curated.pbtxt"
    curated.write_text('feature { name: "age" type: FLOAT }\n')
    nodes = {c.id: c for c in pl.create_pipeline(config, schema_file=str(curated), **paths).components}
    assert isinstance(nodes[pl.SCHEMA_GEN], ImportSchemaGen) and pl.CONFORM_SCHEMA not in nodes
    assert nodes[pl.TRANSFORM].inputs["schema"].producer_component_id == pl.SCHEMA_GEN
    curated.write_text("feature { nme: 1 }\n")
    with pytest.raises(ValueError, match="not a text-format tensorflow_metadata Schema"):
        pl.create_pipeline(config, schema_file=str(curated), **paths)


def test_pusher_does_not_copy_the_newest_version_again(tmp_path):
    """Our Pusher executor: the newest served version's files == the model -> no copy; an older one -> a push."""
    from google.protobuf import json_format
    from tfx.proto import pusher_pb2
    from tfx.types import standard_artifacts

    from pipelines.components.pusher import Executor

    serving = tmp_path / "serving"

    def model(name, content, version=None):
        artifact = standard_artifacts.Model()
        artifact.uri = str(tmp_path / name)
        for directory in [tmp_path / name / "Format-Serving"] + ([serving / version] if version else []):
            (directory / "variables").mkdir(parents=True)
            (directory / "saved_model.pb").write_text(content)
            (directory / "variables" / "variables.index").write_text(content + " weights")
        return artifact

    old, new = model("old", "model A", version="1"), model("new", "model B", version="2")
    blessing = standard_artifacts.ModelBlessing()
    blessing.uri = str(tmp_path / "blessing")
    blessing.set_int_custom_property("blessed", 1)
    destination = pusher_pb2.PushDestination(
        filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=str(serving)))

    def push(m, name):
        pushed = standard_artifacts.PushedModel()
        pushed.uri = str(tmp_path / name)
        Executor().Do({"model": [m], "model_blessing": [blessing]}, {"pushed_model": [pushed]},
                      {"push_destination": json_format.MessageToJson(destination)})
        return pushed

    again = push(new, "push-1")  # version 2 is already this model
    assert sorted(os.listdir(serving)) == ["1", "2"]
    assert again.get_string_custom_property("pushed_version") == "2"
    assert again.get_int_custom_property("pushed") == 1 and again.get_int_custom_property("reused_version") == 1
    back = push(old, "push-2")  # version 1's model, but 2 is served: a real push makes it the newest
    assert len(os.listdir(serving)) == 3 and back.get_int_custom_property("reused_version") == 0
    newest = max(os.listdir(serving), key=int)
    assert back.get_string_custom_property("pushed_version") == newest
    assert (serving / newest / "saved_model.pb").read_text() == "model A"


def test_summary_slice_table_says_why_a_one_class_slice_has_no_auc():
    from pipelines.local_runner import RunSummary, format_summary

    head = {"example_count": 2115.0, "auc": 0.9254, "mean_label": 0.0558}
    summary = RunSummary("root", "metadata.sqlite", metrics={
        "overall": {"income": head, "marital": {**head, "auc": 0.9926, "mean_label": 0.435}},
        # TFMA's numbers for slices without a positive (or a negative) label: AUC 0.0, undefined in fact.
        "race=Other": {"income": {"example_count": 39.0, "auc": 0.0, "mean_label": 0.0},
                       "marital": {"example_count": 39.0, "auc": 0.9882, "mean_label": 0.667}},
        "sex=Female": {"income": {"example_count": 12.0, "auc": 0.0, "mean_label": 1.0},
                       "marital": {"example_count": 12.0, "auc": 0.25, "mean_label": 0.5}}})
    lines = {line.split()[0]: line for line in format_summary(summary).splitlines() if line.startswith("  ")}
    assert "income n/a (no positives), marital 0.988" in lines["race=Other"]
    assert "income n/a (no negatives), marital 0.250" in lines["sex=Female"]  # a real 0.25 is still shown


def test_run_quiets_beam_worker_noise_and_passes_a_warnings_filter_to_workers(monkeypatch, caplog):
    import logging

    from pipelines import local_runner

    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    beam = logging.getLogger(local_runner.BEAM_JOB_SERVICE_LOGGER)
    shown = []
    with local_runner._progress_logging(shown.append):
        # What a Beam worker process started now sees: its own interpreter reads PYTHONWARNINGS at startup.
        worker = subprocess.run([sys.executable, "-c", "import sys, warnings; warnings.warn('old', FutureWarning); "
                                 "warnings.warn('kept', UserWarning); print(sys.warnoptions)"],
                                capture_output=True, text=True, env=dict(os.environ), timeout=60)
        with caplog.at_level(logging.WARNING, logger=local_runner.BEAM_JOB_SERVICE_LOGGER):
            beam.warning('Worker: message: "No semi_persistent_directory found: User registered objects ..."')
            beam.warning("Worker: message: \"Discarding unparseable args: ['--direct_runner_use_stacked_bundle']\"")
            beam.warning("Worker: message: a worker ran out of memory")
    assert "FutureWarning" not in worker.stderr and "UserWarning: kept" in worker.stderr, worker.stderr
    assert "error::DeprecationWarning" in worker.stdout  # the user's own filter still reaches the workers
    assert [r.getMessage() for r in caplog.records] == ["Worker: message: a worker ran out of memory"]
    # Everything is as it was after the run.
    assert os.environ["PYTHONWARNINGS"] == "error::DeprecationWarning"
    assert not beam.filters
    assert local_runner._with_worker_warnings(None) == "ignore::FutureWarning"
    assert local_runner._with_worker_warnings("ignore::FutureWarning,a") == "ignore::FutureWarning,a"


def test_progress_lines_survive_a_savedmodel_export_inside_a_component():
    # TensorFlow's SavedModel save sets absl's verbosity to FATAL and back to what it read (the Trainer's export
    # does): the progress echo must still see every later "Component ..." line.
    from absl import logging as absl_logging

    from pipelines import local_runner

    before = absl_logging.get_verbosity()
    shown = []
    with local_runner._progress_logging(shown.append):
        absl_logging.info("Component Trainer is running.")
        verbosity = absl_logging.get_verbosity()  # tensorflow/python/trackable/autotrackable.py
        absl_logging.set_verbosity(absl_logging.FATAL)
        absl_logging.set_verbosity(verbosity)
        absl_logging.info("Component Trainer is finished.")
        absl_logging.info("Component Evaluator is running.")
    assert [line[9:] for line in shown] == ["Component Trainer is running.", "Component Trainer is finished.",
                                            "Component Evaluator is running."]
    assert absl_logging.get_verbosity() == before


def test_kubeflow_compile_lists_every_component(tmp_path):
    pytest.importorskip("kfp.pipeline_spec", reason="kfp-pipeline-spec is needed to compile for Kubeflow")
    from pipelines.cli import main

    out = tmp_path / "spec.json"
    code = main(["pipeline", "run", "--data", CENSUS_SAMPLE_PATH, "--pipeline-root", str(tmp_path / "root"),
                 "--serving-dir", str(tmp_path / "serving"), "--compile", "kubeflow", "--output", str(out),
                 "--image", "example.com/mmoe:test", "--tune"])
    assert code == 0
    spec = json.loads(out.read_text())
    spec = spec.get("pipelineSpec", spec)
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("ExampleGen", "StatisticsGen", "SchemaGen", "ConformSchema", "ExampleValidator", "AnomalyGate",
                 "Transform", "Tuner", "Trainer", "Evaluator", "Pusher"):
        assert name in tasks, name
    assert "AnomalyGate" in tasks["Transform"].get("dependentTasks", [])
    text = out.read_text()
    assert "example.com/mmoe:test" in text and "pipelines.trainer_module.run_fn" in text


def test_cli_errors_are_clear(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["pipeline", "run", "--data", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {train_steps: 0}\n")
    assert main(["pipeline", "run", "--data", CENSUS_SAMPLE_PATH, "--config", str(bad)]) == 2
    assert "train_steps must be >= 1" in capsys.readouterr().err
    bad.rename(tmp_path / "bad.YAML")  # read as YAML whatever the suffix's case
    assert main(["pipeline", "run", "--data", CENSUS_SAMPLE_PATH, "--config", str(tmp_path / "bad.YAML")]) == 2
    assert "train_steps must be >= 1" in capsys.readouterr().err
    assert main(["pipeline", "run", "--data", CENSUS_SAMPLE_PATH, "--config", CENSUS_SAMPLE_PATH]) == 2
    assert "not a text file (YAML or JSON)" in capsys.readouterr().err
    assert main(["pipeline", "run", "--data", CENSUS_SAMPLE_PATH, "--config", str(tmp_path)]) == 2
    assert "a directory, not a file" in capsys.readouterr().err
    # Paths a local run would find wrong only at the end, or after making a junk "gs:" folder in the working dir.
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty.data").write_text("")
    (tmp_path / "empty_dir").mkdir()
    for flags, message in [
            (["--pipeline-root", "gs://bucket/root"], "the local runner needs local paths"),
            (["--serving-dir", str(tmp_path / "a_file")], "--serving-dir"),
            (["--metadata", str(tmp_path)], "it names the SQLite file"),
            (["--data", str(tmp_path / "empty.data")], "an empty file"),
            (["--data", str(tmp_path / "empty_dir")], "holds no data file"),
            (["--schema", str(tmp_path / "empty.data")], "lists no feature"),
            (["--schema", CENSUS_SAMPLE_PATH], "not a text file")]:
        argv = ["pipeline", "run", "--data", CENSUS_SAMPLE_PATH, "--pipeline-root", str(tmp_path / "root"), *flags]
        assert main(argv) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")
    # Flags of the other mode are said to do nothing rather than dropped.
    assert main(["pipeline", "run", "--data", CENSUS_SAMPLE_PATH, "--image", "img"]) == 2
    assert "--image does nothing without --compile kubeflow" in capsys.readouterr().err
    assert main(["pipeline", "run", "--data", CENSUS_SAMPLE_PATH, "--compile", "kubeflow", "--no-cache"]) == 2
    assert "--no-cache does nothing with --compile kubeflow" in capsys.readouterr().err
    assert main(["pipeline", "run", "--data", CENSUS_SAMPLE_PATH, "--compile", "kubeflow", "--output",
                 str(tmp_path)]) == 2
    assert "names the spec file to write" in capsys.readouterr().err


def test_schema_command_never_writes_over_the_store_or_a_file_unasked(tmp_path, capsys):
    from pipelines.cli import main

    root = tmp_path / "root"
    root.mkdir()
    (root / "metadata.sqlite").write_bytes(b"SQLite format 3\x00")  # stands in for a store
    (tmp_path / "mine.pbtxt").write_text("kept")
    for out, message in [(root / "metadata.sqlite", "inside the pipeline root"),
                         (root / "schema.pbtxt", "inside the pipeline root")]:
        assert main(["pipeline", "schema", "--out", str(out), "--pipeline-root", str(root)]) == 2
        assert message in capsys.readouterr().err
    assert main(["pipeline", "schema", "--out", str(tmp_path / "mine.pbtxt"), "--pipeline-root", str(root)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (root / "metadata.sqlite").read_bytes() == b"SQLite format 3\x00"
    assert (tmp_path / "mine.pbtxt").read_text() == "kept"


def test_pipeline_config_values_are_checked_before_any_component_runs():
    from pipelines.configs import make_config

    for data, message in [
            ({"pipeline_name": 5}, "pipeline_name must be a string"),
            ({"beam_args": "--runner=Foo"}, "beam_args must be a list"),
            ({"dataset": {"task_group": 1.7}}, "dataset.task_group must be 1 or 2"),
            ({"dataset": {"spec": 5}}, "dataset.spec must be a string"),
            ({"train": {"seed": -1}}, "train.seed"),
            ({"train": {"patience": -3}}, "train.patience must be >= 0"),
            ({"tuner": {"max_trials": 0}}, "tuner.max_trials must be >= 1"),
            ({"tuner": {"num_experts": []}}, "tuner.num_experts must list"),
            ({"tuner": {"gate_temperature": [0.5]}}, r"tuner.gate_temperature must be a range"),
            ({"tuner": {"learning_rate": [3e-3, 3e-4]}}, r"tuner.learning_rate must be a range"),
            ({"tuner": {"steps_per_trial": -4}}, "tuner.steps_per_trial must be >= 1"),
            ({"split": {"partition_feature": "nosuchcol"}}, "split.partition_feature 'nosuchcol'"),
            ({"evaluation": {"auc_floors": {"income": 5}}}, r"evaluation.auc_floors.income must be in \[0, 1\]"),
            ({"evaluation": {"rmse_ceiling": -1}}, "evaluation.rmse_ceiling must be > 0")]:
        with pytest.raises(ValueError, match=message):
            make_config(data)


# -- slow: end to end ------------------------------------------------------------------------------


def _good_config_data():
    """The shared run: census group 1 plus a regression head (weeks worked, no longer an input), tuned."""
    data = _config_data(IN_MEMORY)
    spec = dataset_spec_to_dict(census_spec(1))
    spec["name"] = "census_group1_weeks"
    spec["features"] = [f for f in spec["features"] if f["name"] != "weeks_worked"]
    spec["tasks"].append({"name": "weeks", "kind": "regression", "column": "weeks_worked"})
    data["dataset"] = spec
    # Weeks are not scaled (MSE in the hundreds at first): a small weight keeps them from swamping the binary heads.
    data["train"]["loss_weights"] = {"weeks": 0.001}
    # Income has 5-10 positives among ~120 eval rows: after 30 steps its AUC is noise (0.17-0.62 seen), so only
    # marital (AUC ~0.9) is held to a floor; both are held to the no-regression check against the baseline.
    data["evaluation"]["auc_floors"] = {"income": 0.0}
    # Piecewise-linear numeric encodings: the Trainer (and each Tuner trial) adapts their edges on the train split.
    data["model"]["numeric_bins"] = 4
    # A cosine schedule over the run's 2 epochs of 15 steps: the optimizer settings reach the Trainer (and Tuner).
    data["train"].update(schedule="cosine", cosine_epochs=2)
    # The model's own values (4 experts, 16 units, temperature 1) are outside the search space, so the
    # trained model can only match the Tuner's choice if that choice reached the Trainer.
    data["tuner"] = {"enabled": True, "max_trials": 2, "steps_per_trial": 5, "num_experts": [2, 3],
                     "expert_units": [8, 12], "gate_temperature": [0.5, 0.9]}
    return data


def _node_states(metadata_path):
    """{node: state} of the latest run recorded so far ({} while the store is new or locked)."""
    from pipelines.local_runner import latest_run

    if not os.path.isfile(metadata_path):
        return {}
    try:
        return {c.node_id: c.state for c in latest_run(metadata_path, "mmoe")[1]}
    except Exception:  # the running pipeline holds the SQLite lock: look again later
        return {}


def _run_and_kill_after(node, fingerprint, cli_args, log, metadata_path):
    """`mmoe pipeline run CLI_ARGS` in a subprocess, SIGKILLed as soon as ML Metadata records `node` COMPLETE."""
    script = ("import sys; from pipelines import configs, pipeline; "
              f"configs.code_fingerprint = pipeline.code_fingerprint = lambda: {fingerprint!r}; "
              "from pipelines.cli import main; sys.exit(main(sys.argv[1:]))")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script, "pipeline", "run", *cli_args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        deadline = time.time() + 600
        while _node_states(metadata_path).get(node) != "COMPLETE":
            assert proc.poll() is None, f"the run ended before {node} finished:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"{node} did not finish within 10 minutes"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    import yaml

    from pipelines import configs, pipeline
    from pipelines.configs import load_config_file, make_config
    from pipelines.local_runner import latest_run, run_local

    # The code fingerprint in custom_config is frozen for this module's runs (the killed subprocess included),
    # so that an edit of the sources while the tests run (other work in the same checkout) cannot void the cache.
    fingerprint = configs.code_fingerprint()
    patch = pytest.MonkeyPatch()
    patch.setattr(configs, "code_fingerprint", lambda: fingerprint)
    patch.setattr(pipeline, "code_fingerprint", lambda: fingerprint)
    base = tmp_path_factory.mktemp("pipeline")
    data = base / "data" / "census.csv"
    data.parent.mkdir()
    data.write_text("".join(_sample_lines(600)))
    config_path = base / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(_good_config_data()))
    root, serving = base / "root", base / "serving"
    metadata = str(root / "metadata.sqlite")
    _run_and_kill_after(pipeline.TRANSFORM, fingerprint, ["--data", str(data), "--config", str(config_path),
                                                          "--pipeline-root", str(root), "--serving-dir", str(serving)],
                        base / "killed_run.log", metadata)
    killed = {c.node_id: c for c in latest_run(metadata, "mmoe")[1]}
    config = make_config(load_config_file(str(config_path)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_local(config, data=str(data), pipeline_root=str(root), serving_dir=str(serving))
    yield {"base": base, "data": data, "summary": summary, "config": config, "config_path": config_path,
           "killed": killed, "warnings": [str(w.message) for w in caught]}
    patch.undo()


@pytest.mark.slow
def test_multiprocess_beam_workers_import_our_packages(tmp_path):
    """The default DirectRunner mode starts worker processes: they must import features/pipelines."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to
    from tfx.types import standard_component_specs

    from pipelines.components.spec_example_gen import _SpecFilesToExamples

    (tmp_path / "a.csv").write_text("".join(_sample_lines(30)))
    (tmp_path / "b.csv").write_text("".join(_sample_lines(20)))
    properties = {standard_component_specs.INPUT_BASE_KEY: str(tmp_path),
                  standard_component_specs.CUSTOM_CONFIG_KEY: json.dumps(
                      {"dataset": dataset_spec_to_dict(census_spec(1))})}
    options = beam.options.pipeline_options.PipelineOptions(MULTI_PROCESS)
    with beam.Pipeline(runner="DirectRunner", options=options) as p:
        count = (p | _SpecFilesToExamples(properties, "*.csv") | beam.combiners.Count.Globally())
        assert_that(count, equal_to([50]))


@pytest.mark.slow
def test_killed_run_completes_from_cache_when_started_again(good_run):
    from pipelines import pipeline as pl
    from pipelines.local_runner import format_summary

    killed = {node: c.state for node, c in good_run["killed"].items()}
    assert killed[pl.TRANSFORM] == "COMPLETE" and pl.PUSHER not in killed, killed  # killed midway
    assert killed.get(pl.TRAINER) != "COMPLETE", killed
    s = good_run["summary"]
    assert s.ok, format_summary(s)
    states = {c.node_id: c.state for c in s.components}
    for node in (pl.EXAMPLE_GEN, pl.STATISTICS_GEN, pl.SCHEMA_GEN, pl.CONFORM_SCHEMA, pl.EXAMPLE_VALIDATOR,
                 pl.ANOMALY_GATE, pl.TRANSFORM):
        assert states[node] == "CACHED", (node, states)  # reused from the killed run, not executed again
    for node in (pl.TUNER, pl.TRAINER, pl.EVALUATOR, pl.PUSHER):
        assert states[node] == "COMPLETE", (node, states)
    for node, key in ((pl.TRANSFORM, "transform_graph"), (pl.CONFORM_SCHEMA, "schema")):
        assert s.output_uri(node, key) == good_run["killed"][node].outputs[key][0].uri


@pytest.mark.slow
def test_the_trainer_does_not_warn_that_its_input_ran_out(good_run):
    # Keras warns so at the end of the eval split's first pass (unknown length): noise on every run, filtered.
    assert good_run["summary"].ok
    assert not [w for w in good_run["warnings"] if "ran out of data" in w]


@pytest.mark.slow
def test_end_to_end_artifacts(good_run):
    from pipelines import pipeline as pl

    s = good_run["summary"]
    assert s.ok, s.error
    examples = s.output_uri(pl.EXAMPLE_GEN, "examples")
    assert sorted(os.listdir(examples)) == ["Split-eval", "Split-train"]
    assert os.listdir(os.path.join(s.output_uri(pl.STATISTICS_GEN, "statistics"), "Split-train"))
    assert s.schema_inferred and os.path.isfile(s.schema_path)
    assert s.schema_path.startswith(s.output_uri(pl.CONFORM_SCHEMA, "schema"))
    assert s.anomalies == {}
    assert os.path.isdir(os.path.join(s.output_uri(pl.TRANSFORM, "transform_graph"), "transform_fn"))
    assert os.path.isfile(os.path.join(s.model_path, "saved_model.pb"))
    run_dir = s.output_uri(pl.TRAINER, "model_run")
    assert any(f.startswith("events.out.tfevents") for _, _, files in os.walk(run_dir) for f in files)
    training = json.load(open(os.path.join(run_dir, "training.json")))
    assert training["replicas"] == 1 and training["global_batch"] == 64
    assert s.blessed is True and s.pushed is True and not s.pushed_again


@pytest.mark.slow
def test_trainer_adapts_numeric_bins_on_the_transformed_train_split(good_run):
    import tensorflow as tf
    from tfx.dsl.io import fileio

    from pipelines import pipeline as pl

    s = good_run["summary"]
    with open(os.path.join(s.output_uri(pl.TRAINER, "model_run"), "training.json")) as fh:
        training = json.load(fh)
    assert training["model"]["numeric_bins"] == 4
    train_dir = os.path.join(s.output_uri(pl.TRANSFORM, "transformed_examples"), "Split-train")
    files = [os.path.join(train_dir, f) for f in fileio.listdir(train_dir)]
    ages = [tf.train.Example.FromString(r.numpy()).features.feature["age"].float_list.value[0]
            for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    assert training["numeric_bins"]["rows"] == len(ages) > 0
    edges = training["numeric_bins"]["edges"]
    assert "age" in edges and "capital_gains" in edges and len(edges["age"]) == 5
    np.testing.assert_allclose(edges["age"], np.quantile(ages, np.linspace(0, 1, 5)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tuner_best_hyperparameters_reach_the_trainer(good_run):
    from pipelines import pipeline as pl

    s = good_run["summary"]
    with open(os.path.join(s.output_uri(pl.TUNER, "best_hyperparameters"), "best_hyperparameters.txt")) as fh:
        best = json.load(fh)["values"]
    assert set(best) == {"num_experts", "expert_units", "gate_temperature", "learning_rate"}
    with open(os.path.join(s.output_uri(pl.TRAINER, "model_run"), "training.json")) as fh:
        trained = json.load(fh)["model"]
    assert best["num_experts"] in (2, 3) and trained["num_experts"] == best["num_experts"]
    assert list(trained["expert_units"]) == [best["expert_units"]]
    assert trained["gate_temperature"] == pytest.approx(best["gate_temperature"])
    assert trained["learning_rate"] == pytest.approx(best["learning_rate"])
    # The cosine schedule (train.schedule) ran its 30 steps down to 1% of the tuned rate.
    with open(os.path.join(s.output_uri(pl.TRAINER, "model_run"), "training.json")) as fh:
        optimizer = json.load(fh)["optimizer"]
    assert optimizer["steps"] == 30 and optimizer["final_learning_rate"] == pytest.approx(0.01 * best["learning_rate"])


@pytest.mark.slow
def test_tfma_metrics_per_head_and_slice(good_run):
    s = good_run["summary"]
    overall = s.metrics["overall"]
    for head in TASKS:
        for metric in ("auc", "binary_crossentropy", "calibration", "example_count", "mean_label"):
            assert metric in overall[head], (head, sorted(overall[head]))
        assert 0 <= overall[head]["auc"] <= 1 and "root_mean_squared_error" not in overall[head]
    assert overall["marital"]["auc"] > 0.7
    weeks = overall["weeks"]  # the regression head: RMSE (and MSE), no AUC
    assert "auc" not in weeks and weeks["example_count"] == overall["income"]["example_count"] > 0
    assert weeks["root_mean_squared_error"] > 0
    assert weeks["root_mean_squared_error"] == pytest.approx(weeks["mean_squared_error"] ** 0.5, rel=1e-6)
    assert any(k.startswith("sex=Female") for k in s.metrics)
    assert any(k.startswith("race=White") for k in s.metrics)
    assert "root_mean_squared_error" in s.metrics[next(k for k in s.metrics if k.startswith("sex="))]["weeks"]


@pytest.mark.slow
def test_pushed_model_loads_and_predicts_per_task(good_run):
    import tensorflow as tf
    from tfx.dsl.io import fileio

    from pipelines import pipeline as pl

    s = good_run["summary"]
    serving = good_run["base"] / "serving" / "mmoe"
    versions = os.listdir(serving)
    assert len(versions) == 1 and versions[0].isdigit()
    assert os.path.realpath(s.pushed_path) == os.path.realpath(serving / versions[0])
    experts = json.load(open(os.path.join(s.output_uri(pl.TRAINER, "model_run"), "training.json")))["model"]
    eval_dir = os.path.join(s.output_uri(pl.EXAMPLE_GEN, "examples"), "Split-eval")
    files = [os.path.join(eval_dir, f) for f in fileio.listdir(eval_dir)]
    records = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP").take(7)]
    model = tf.saved_model.load(str(serving / versions[0]))
    out = model.signatures["serving_default"](examples=tf.constant(records))
    for task in TASKS:
        p = out[task].numpy()
        assert p.shape == (7,) and np.all((p >= 0) & (p <= 1))
        assert out[f"{task}_gates"].shape == (7, experts["num_experts"])
    assert out["weeks"].shape == (7,) and np.all(np.isfinite(out["weeks"].numpy()))


@pytest.mark.slow
def test_rerun_reuses_cache_through_cli_and_does_not_push_again(good_run, capsys):
    from pipelines.cli import main

    base = good_run["base"]
    code = main(["pipeline", "run", "--data", str(good_run["data"]), "--config", str(good_run["config_path"]),
                 "--pipeline-root", str(base / "root"), "--serving-dir", str(base / "serving")])
    out = capsys.readouterr().out
    assert code == 0, out
    # Everything up to the Trainer is reused; the Evaluator runs again because its baseline input changed
    # (the first run's model is now the latest blessed one), and the Pusher finds that model already served.
    for node in ("ExampleGen", "StatisticsGen", "SchemaGen", "ConformSchema", "ExampleValidator", "Transform",
                 "Tuner", "Trainer"):
        assert any(line.startswith(node) and "CACHED" in line for line in out.splitlines()), (node, out)
    assert "income" in out and "weeks" in out and "blessed: yes" in out
    assert "already the newest version: not copied again" in out
    assert len(os.listdir(base / "serving" / "mmoe")) == 1


@pytest.mark.slow
def test_schema_command_writes_the_last_runs_schema(good_run, tmp_path, capsys):
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    from pipelines.cli import main

    out = tmp_path / "curated" / "schema.pbtxt"
    assert main(["pipeline", "schema", "--out", str(out), "--pipeline-root", str(good_run["base"] / "root")]) == 0
    assert "--schema" in capsys.readouterr().out
    assert out.read_text() == open(good_run["summary"].schema_path).read()
    features = {f.name: f for f in text_format.Parse(out.read_text(), schema_pb2.Schema()).feature}
    assert features["class_worker"].distribution_constraints.min_domain_mass == 0
    assert main(["pipeline", "schema", "--out", str(tmp_path / "other.pbtxt"), "--pipeline-root",
                 str(tmp_path / "none")]) == 2
    assert "no ML Metadata store" in capsys.readouterr().err
    # The written file is not replaced unasked; --overwrite replaces it.
    out.write_text("edited")
    root = ["--pipeline-root", str(good_run["base"] / "root")]
    assert main(["pipeline", "schema", "--out", str(out), *root]) == 2 and out.read_text() == "edited"
    assert main(["pipeline", "schema", "--out", str(out), *root, "--overwrite"]) == 0
    assert out.read_text() == open(good_run["summary"].schema_path).read()


@pytest.mark.slow
def test_worse_model_is_not_blessed_or_pushed(good_run):
    from pipelines.configs import make_config
    from pipelines.local_runner import run_local

    base = good_run["base"]
    versions = sorted(os.listdir(base / "serving" / "mmoe"))
    data = _good_config_data()
    data["tuner"]["enabled"] = False  # the Tuner's learning rate would replace the tiny one
    data["train"].update(train_steps=1, steps_per_epoch=1)
    data["model"]["learning_rate"] = 1e-7  # one tiny step: an untrained model
    summary = run_local(make_config(data), data=str(good_run["data"]), pipeline_root=str(base / "root"),
                        serving_dir=str(base / "serving"))
    assert summary.ok, summary.error
    assert summary.component("Transform").state == "CACHED"  # a model change does not redo the transform
    assert summary.baseline is not None  # compared with the latest blessed model
    assert summary.blessed is False and summary.pushed is False
    assert any("auc" in r for r in summary.blessing_reasons), summary.blessing_reasons
    assert sorted(os.listdir(base / "serving" / "mmoe")) == versions  # nothing new pushed


@pytest.mark.slow
def test_anomalies_stop_the_run_before_training(tmp_path):
    from pipelines.configs import make_config
    from pipelines.local_runner import format_summary, run_local

    spec = dataset_spec_to_dict(census_spec(1))
    spec["header"] = True
    lines = [l.rstrip("\n").split(",") for l in _sample_lines(200)]
    columns = list(census_spec(1).columns)
    drop = columns.index("weeks_worked")  # a missing column: an anomaly
    age, worker = columns.index("age"), columns.index("class_worker")
    for i, row in enumerate(lines):
        if i % 3 == 0:
            row[age] = " unknown"  # a numeric column with text: wrong type, an anomaly
        if i % 5 == 0:
            row[worker] = " Space agency"  # a new category value: not an anomaly
    header = [c for j, c in enumerate(columns) if j != drop]
    rows = [[v for j, v in enumerate(r) if j != drop] for r in lines]
    data = tmp_path / "data"
    data.mkdir()
    (data / "part-0.csv").write_text(",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    config_data = _config_data(IN_MEMORY)
    config_data["dataset"] = spec
    summary = run_local(make_config(config_data), data=str(data), pipeline_root=str(tmp_path / "root"),
                        serving_dir=str(tmp_path / "serving"))
    assert not summary.ok
    features = {f for problems in summary.anomalies.values() for f in problems}
    assert {"age", "weeks_worked"} <= features and "class_worker" not in features, summary.anomalies
    ran = {c.node_id for c in summary.components}
    assert "Transform" not in ran and "Trainer" not in ran and "Pusher" not in ran
    assert not (tmp_path / "serving").exists()
    text = format_summary(summary)
    assert "age" in text and "weeks_worked" in text and "stopped before training" in text


@pytest.mark.slow
def test_quantile_buckets_run_through_the_tfx_transform(tmp_path):
    # A bucket's quantiles once depended on the mean analyzer (missing -> mean), a two-phase analysis that the
    # TFX Transform component failed on ("ApplySavedModel[Phase1]") though the in-process transform ran it.
    import tensorflow as tf

    from pipelines.configs import make_config
    from pipelines.local_runner import format_summary, run_local

    spec = dataset_spec_to_dict(census_spec(1))
    for feature in spec["features"]:
        if feature["name"] == "age":
            feature.pop("also_bucketize", None)  # the census spec's default; bucketize replaces it here
            feature["bucketize"] = 8
        elif feature["name"] == "weeks_worked":
            feature["also_bucketize"] = 16
    data = tmp_path / "data"
    data.mkdir()
    (data / "part-0.csv").write_text("".join(_sample_lines(2000)))
    config_data = _config_data(IN_MEMORY)
    config_data["dataset"] = spec
    summary = run_local(make_config(config_data), data=str(data), pipeline_root=str(tmp_path / "root"),
                        serving_dir=str(tmp_path / "serving"))
    assert summary.ok, format_summary(summary)
    assert summary.pushed, format_summary(summary)
    transformed = tf.saved_model.load(summary.pushed_path).signatures["transform_features"]
    assert {"age", "weeks_worked", "weeks_worked_bucket"} <= set(transformed.structured_outputs)
