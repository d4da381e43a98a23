"""The TFX pipeline: config, schema, ExampleGen reader, Kubeflow compile (fast), and end-to-end runs (slow).

The slow tests share one successful run (module-scoped fixture) on 600 census
rows with 30 training steps; a second run on the same store checks caching
through the command line (and that the unchanged model is not pushed again),
a third one trains a much worse model that must not be blessed or pushed, and
a run on broken data must stop before training.  One more run, with the Tuner
and a regression head, is killed once Transform has finished and started
again: it must complete from the cache.
"""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from features.census import CENSUS_SAMPLE_PATH, census_spec
from features.spec import dataset_spec_to_dict

TASKS = ["income", "marital"]


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
    # A bare dataset spec file is the dataset section.
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(dataset_spec_to_dict(census_spec(2))))
    assert make_config(load_config_file(str(path))).spec.name == "census_group2"


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

    path.write_text(lines[0] + "1,2,3\n")
    with pytest.raises(InputDataError, match=r"line 2: expected 42 fields"):
        list(file_to_examples(str(path), dataset_spec_to_dict(spec)))


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


# -- slow: end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    from pipelines import configs, pipeline
    from pipelines.configs import make_config
    from pipelines.local_runner import run_local

    # The code fingerprint in custom_config is frozen for this module's runs, so that an edit of the
    # sources while the tests run (other work in the same checkout) cannot defeat the cache check.
    fingerprint = configs.code_fingerprint()
    patch = pytest.MonkeyPatch()
    patch.setattr(configs, "code_fingerprint", lambda: fingerprint)
    patch.setattr(pipeline, "code_fingerprint", lambda: fingerprint)
    base = tmp_path_factory.mktemp("pipeline")
    data = base / "data" / "census.csv"
    data.parent.mkdir()
    data.write_text("".join(_sample_lines(600)))
    config = make_config(_config_data(IN_MEMORY))
    summary = run_local(config, data=str(data), pipeline_root=str(base / "root"),
                        serving_dir=str(base / "serving"))
    yield {"base": base, "data": data, "summary": summary, "config": config}
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
def test_end_to_end_artifacts(good_run):
    from pipelines import pipeline as pl

    s = good_run["summary"]
    assert s.ok, s.error
    states = {c.node_id: c.state for c in s.components}
    for node in (pl.EXAMPLE_GEN, pl.STATISTICS_GEN, pl.SCHEMA_GEN, pl.EXAMPLE_VALIDATOR, pl.ANOMALY_GATE,
                 pl.TRANSFORM, pl.TRAINER, pl.EVALUATOR, pl.PUSHER):
        assert states.get(node) == "COMPLETE", (node, states)
    examples = s.output_uri(pl.EXAMPLE_GEN, "examples")
    assert sorted(os.listdir(examples)) == ["Split-eval", "Split-train"]
    assert os.listdir(os.path.join(s.output_uri(pl.STATISTICS_GEN, "statistics"), "Split-train"))
    assert os.path.isfile(os.path.join(s.output_uri(pl.SCHEMA_GEN, "schema"), "schema.pbtxt"))
    assert s.anomalies == {}
    assert os.path.isdir(os.path.join(s.output_uri(pl.TRANSFORM, "transform_graph"), "transform_fn"))
    assert os.path.isfile(os.path.join(s.model_path, "saved_model.pb"))
    run_dir = s.output_uri(pl.TRAINER, "model_run")
    assert any(f.startswith("events.out.tfevents") for _, _, files in os.walk(run_dir) for f in files)
    training = json.load(open(os.path.join(run_dir, "training.json")))
    assert training["replicas"] == 1 and training["global_batch"] == 64
    assert s.blessed is True and s.pushed is True


@pytest.mark.slow
def test_tfma_metrics_per_head_and_slice(good_run):
    s = good_run["summary"]
    overall = s.metrics["overall"]
    for head in TASKS:
        for metric in ("auc", "binary_crossentropy", "calibration", "example_count", "mean_label"):
            assert metric in overall[head], (head, sorted(overall[head]))
        assert 0 <= overall[head]["auc"] <= 1
    assert overall["marital"]["auc"] > 0.7
    assert any(k.startswith("sex=Female") for k in s.metrics)
    assert any(k.startswith("race=White") for k in s.metrics)


@pytest.mark.slow
def test_pushed_model_loads_and_predicts_per_task(good_run):
    import tensorflow as tf

    s = good_run["summary"]
    serving = good_run["base"] / "serving" / "mmoe"
    versions = os.listdir(serving)
    assert len(versions) == 1 and versions[0].isdigit()
    assert os.path.realpath(s.pushed_path) == os.path.realpath(serving / versions[0])
    from pipelines import pipeline as pl
    from tfx.dsl.io import fileio

    eval_dir = os.path.join(s.output_uri(pl.EXAMPLE_GEN, "examples"), "Split-eval")
    files = [os.path.join(eval_dir, f) for f in fileio.listdir(eval_dir)]
    records = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP").take(7)]
    model = tf.saved_model.load(str(serving / versions[0]))
    out = model.signatures["serving_default"](examples=tf.constant(records))
    for task in TASKS:
        p = out[task].numpy()
        assert p.shape == (7,) and np.all((p >= 0) & (p <= 1))
        assert out[f"{task}_gates"].shape == (7, 4)


@pytest.mark.slow
def test_rerun_reuses_cache_through_cli(good_run, tmp_path, capsys):
    import yaml

    from pipelines.cli import main

    base = good_run["base"]
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(_config_data(IN_MEMORY)))
    code = main(["pipeline", "run", "--data", str(good_run["data"]), "--config", str(config),
                 "--pipeline-root", str(base / "root"), "--serving-dir", str(base / "serving")])
    out = capsys.readouterr().out
    assert code == 0, out
    # Everything up to the Trainer is reused; the Evaluator runs again because its baseline input changed
    # (the first run's model is now the latest blessed one).
    for node in ("ExampleGen", "StatisticsGen", "ExampleValidator", "Transform", "Trainer"):
        assert any(line.startswith(node) and "CACHED" in line for line in out.splitlines()), (node, out)
    assert "income" in out and "marital" in out and "blessed: yes" in out


@pytest.mark.slow
def test_worse_model_is_not_blessed_or_pushed(good_run):
    from pipelines.configs import make_config
    from pipelines.local_runner import run_local

    base = good_run["base"]
    versions = sorted(os.listdir(base / "serving" / "mmoe"))
    data = _config_data(IN_MEMORY, train_steps=1, steps_per_epoch=1)
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
def test_tuner_fn_searches_and_run_fn_config_takes_the_best(good_run, tmp_path):
    """The Tuner's tuner_fn on the shared run's Transform output (the Tuner component calls exactly this)."""
    from types import SimpleNamespace

    from pipelines import pipeline as pl
    from pipelines.trainer_module import model_config, tuner_fn

    s = good_run["summary"]
    examples = s.output_uri(pl.TRANSFORM, "transformed_examples")
    custom_config = good_run["config"].module_config()
    custom_config["tuner"].update(max_trials=2, steps_per_trial=4)
    fn_args = SimpleNamespace(custom_config=custom_config, working_dir=str(tmp_path),
                              transform_graph_path=s.output_uri(pl.TRANSFORM, "transform_graph"),
                              train_files=[os.path.join(examples, "Split-train", "*")],
                              eval_files=[os.path.join(examples, "Split-eval", "*")], train_steps=4, eval_steps=None)
    result = tuner_fn(fn_args)
    result.tuner.search(**result.fit_kwargs)
    best = result.tuner.get_best_hyperparameters()[0]
    assert set(best.values) == {"num_experts", "expert_units", "gate_temperature", "learning_rate"}
    config = model_config(custom_config, best.get_config())  # what run_fn does with the Tuner's output
    assert config.num_experts == best.values["num_experts"]
    assert config.expert_units == (best.values["expert_units"],)
    assert config.learning_rate == pytest.approx(best.values["learning_rate"])
