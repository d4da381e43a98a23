"""The TFX batch training pipeline.

    ExampleGen -> StatisticsGen -> SchemaGen -> ConformSchema (or ImportSchemaGen) -> ExampleValidator -> AnomalyGate
      -> Transform -> [Tuner] -> Trainer -> Evaluator (+ latest blessed model) -> Pusher

* ExampleGen: TFX's FileBasedExampleGen with `components.spec_example_gen`'s
  executor: reads the files the DatasetSpec describes (the UCI files as they
  are: no header, gzip) and writes tf.Examples typed by the spec, split by
  hash into train/eval (4:1 by default, configurable).
* Schema: with no curated schema, SchemaGen infers one from the statistics
  and `components.spec_schema.ConformSchema` holds it to the dataset spec's
  contract (every used column present once with the spec's type and scalar
  shape, label columns limited to their values, categorical inputs open to
  new values): a missing column or a wrong type is an anomaly, a new category
  value is not.  `schema_file=` (`--schema FILE`) imports a curated schema
  with ImportSchemaGen instead; `mmoe pipeline schema --out FILE` writes the
  last run's schema as a starting point.
* AnomalyGate: fails the run when ExampleValidator found anomalies (before
  Transform, so nothing trains or is pushed).
* Transform/Tuner/Trainer: `pipelines.trainer_module` (preprocessing_fn,
  tuner_fn, run_fn), configured through custom_config.
* Evaluator: TFMA on the eval split through the exported model's
  `serving_default` signature, labels from its `transform_features`
  signature; per head AUC, binary cross-entropy, calibration, mean
  label/prediction and example count (RMSE and MSE for regression heads),
  overall and sliced by the configured columns; blesses when every binary
  head's AUC is at least its floor and drops by at most `max_auc_drop` from
  the latest blessed model (LatestBlessedModelStrategy).
* Pusher: copies a blessed model to `<serving_dir>/<model_name>/<version>`,
  unless the newest version there is already that model (`components.pusher`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional

from pipelines.configs import PipelineConfig, code_fingerprint

# Component ids (also the names in ML Metadata and in the benchmark table).
EXAMPLE_GEN = "ExampleGen"
STATISTICS_GEN = "StatisticsGen"
SCHEMA_GEN = "SchemaGen"  # SchemaGen (inferred) or ImportSchemaGen (--schema FILE)
CONFORM_SCHEMA = "ConformSchema"
EXAMPLE_VALIDATOR = "ExampleValidator"
ANOMALY_GATE = "AnomalyGate"
TRANSFORM = "Transform"
TUNER = "Tuner"
TRAINER = "Trainer"
BASELINE_RESOLVER = "LatestBlessedModelResolver"
EVALUATOR = "Evaluator"
PUSHER = "Pusher"

MODULE = "pipelines.trainer_module"


def _stable_copy(directory: str, prefix: str, text: str) -> str:
    """Write `text` to directory/<prefix>-<sha>/schema.pbtxt once; the content-addressed path keeps caching exact."""
    from tfx.dsl.io import fileio

    sha = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = os.path.join(directory, f"{prefix}-{sha}", "schema.pbtxt")
    if not fileio.exists(path):
        fileio.makedirs(os.path.dirname(path))
        tmp = path + ".tmp"
        with fileio.open(tmp, "w") as fh:
            fh.write(text)
        fileio.rename(tmp, path, overwrite=True)
    return path


def import_schema(pipeline_root: str, schema_file: str) -> str:
    """Checks a curated schema file and copies it under the pipeline root, content-addressed, for ImportSchemaGen."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    if not os.path.isfile(schema_file):
        raise FileNotFoundError(f"--schema {schema_file}: no such file")
    try:
        with open(schema_file, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise ValueError(f"--schema {schema_file}: not a text file (a text-format tensorflow_metadata Schema)") \
            from None
    schema = schema_pb2.Schema()
    try:
        text_format.Parse(text, schema)
    except text_format.ParseError as e:
        raise ValueError(f"--schema {schema_file}: not a text-format tensorflow_metadata Schema: {e}") from None
    if not schema.feature:  # an empty file parses, and would check nothing
        raise ValueError(f"--schema {schema_file}: the schema lists no feature")
    return _stable_copy(os.path.join(pipeline_root, "schema"), "curated", text)


def input_location(data: str):
    """(input_base directory, file pattern) for --data FILE or --data DIR."""
    data = os.path.abspath(data)
    if os.path.isdir(data):
        return data, "*"
    if os.path.isfile(data):
        return os.path.dirname(data), os.path.basename(data)
    raise FileNotFoundError(f"--data {data}: no such file or directory")


def eval_config(config: PipelineConfig):
    import tensorflow_model_analysis as tfma

    spec = config.spec
    ev = config.evaluation
    metrics_specs = []
    for task in spec.tasks:
        if task.kind == "binary":
            floor = float(ev.auc_floors.get(task.name, ev.auc_floor))
            # Thresholds on the overall slice only: small slices have noisy (or undefined) AUCs.
            auc = tfma.MetricConfig(class_name="AUC", per_slice_thresholds=[tfma.PerSliceMetricThreshold(
                slicing_specs=[tfma.SlicingSpec()], threshold=tfma.MetricThreshold(
                    value_threshold=tfma.GenericValueThreshold(lower_bound={"value": floor}),
                    change_threshold=tfma.GenericChangeThreshold(
                        direction=tfma.MetricDirection.HIGHER_IS_BETTER,
                        absolute={"value": -float(ev.max_auc_drop)})))])
            metrics = [tfma.MetricConfig(class_name="ExampleCount"), auc,
                       tfma.MetricConfig(class_name="BinaryCrossEntropy"),
                       tfma.MetricConfig(class_name="Calibration"),
                       tfma.MetricConfig(class_name="MeanLabel"),
                       tfma.MetricConfig(class_name="MeanPrediction")]
        else:
            rmse = tfma.MetricConfig(class_name="RootMeanSquaredError", module="pipelines.components.tfma_metrics")
            if ev.rmse_ceiling is not None or ev.max_rmse_increase is not None:
                threshold = tfma.MetricThreshold()
                if ev.rmse_ceiling is not None:
                    threshold.value_threshold.upper_bound.value = float(ev.rmse_ceiling)
                if ev.max_rmse_increase is not None:
                    threshold.change_threshold.direction = tfma.MetricDirection.LOWER_IS_BETTER
                    threshold.change_threshold.absolute.value = float(ev.max_rmse_increase)
                rmse.per_slice_thresholds.add(threshold=threshold).slicing_specs.add()
            metrics = [tfma.MetricConfig(class_name="ExampleCount"), rmse,
                       tfma.MetricConfig(class_name="MeanSquaredError"),
                       tfma.MetricConfig(class_name="MeanLabel"),
                       tfma.MetricConfig(class_name="MeanPrediction")]
        metrics_specs.append(tfma.MetricsSpec(output_names=[task.name], metrics=metrics))
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(signature_name="serving_default",
                                    preprocessing_function_names=["transform_features"],
                                    label_keys={t.name: spec.label_key(t.name) for t in spec.tasks})],
        slicing_specs=[tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=[s]) for s in ev.slices],
        metrics_specs=metrics_specs)


def create_pipeline(config: PipelineConfig, *, data: str, pipeline_root: str, serving_dir: str,
                    metadata_path: Optional[str] = None, schema_file: Optional[str] = None,
                    enable_cache: bool = True, beam_args: Optional[List[str]] = None,
                    metadata_connection_config=None):
    """The pipeline (tfx.dsl.Pipeline) for `config`; `data` is a file or a directory of files."""
    from tfx import v1 as tfx
    from tfx.components import FileBasedExampleGen
    from tfx.dsl.components.base import executor_spec
    from tfx.proto import example_gen_pb2

    from pipelines.components import spec_example_gen
    from pipelines.components.pusher import Pusher
    from pipelines.components.anomaly_gate import AnomalyGate
    from pipelines.components.spec_schema import ConformSchema

    input_base, pattern = input_location(data) if not data.startswith(("gs://", "s3://")) else (data, "*")
    pipeline_root = os.path.abspath(pipeline_root) if "://" not in pipeline_root else pipeline_root
    serving_dir = os.path.abspath(serving_dir) if "://" not in serving_dir else serving_dir
    module_config = config.module_config()
    split = config.split
    split_config = example_gen_pb2.SplitConfig(
        splits=[example_gen_pb2.SplitConfig.Split(name="train", hash_buckets=int(split.train_buckets)),
                example_gen_pb2.SplitConfig.Split(name="eval", hash_buckets=int(split.eval_buckets))])
    if split.partition_feature:
        split_config.partition_feature_name = split.partition_feature
    output_config = example_gen_pb2.Output(split_config=split_config)
    example_gen = FileBasedExampleGen(
        input_base=input_base,
        input_config=example_gen_pb2.Input(splits=[example_gen_pb2.Input.Split(name="single_split",
                                                                              pattern=pattern)]),
        output_config=output_config,
        custom_config={spec_example_gen.DATASET_KEY: config.dataset, "code": code_fingerprint()},
        custom_executor_spec=executor_spec.BeamExecutorSpec(spec_example_gen.Executor)).with_id(EXAMPLE_GEN)

    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"]).with_id(STATISTICS_GEN)
    if schema_file:
        schema_gen = tfx.components.ImportSchemaGen(
            schema_file=import_schema(pipeline_root, schema_file)).with_id(SCHEMA_GEN)
        schema = schema_gen.outputs["schema"]
        schema_components = [schema_gen]
    else:
        schema_gen = tfx.components.SchemaGen(statistics=statistics_gen.outputs["statistics"]).with_id(SCHEMA_GEN)
        conform = ConformSchema(inferred=schema_gen.outputs["schema"],
                                dataset=json.dumps(config.dataset, sort_keys=True),
                                code=code_fingerprint()).with_id(CONFORM_SCHEMA)
        schema = conform.outputs["schema"]
        schema_components = [schema_gen, conform]
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema).with_id(EXAMPLE_VALIDATOR)
    gate = AnomalyGate(anomalies=example_validator.outputs["anomalies"]).with_id(ANOMALY_GATE)

    transform = tfx.components.Transform(
        examples=example_gen.outputs["examples"], schema=schema,
        # Only what the preprocessing depends on: a model or training change must not invalidate the transform.
        preprocessing_fn=f"{MODULE}.preprocessing_fn",
        custom_config={"dataset": module_config["dataset"], "code": module_config["code"]},
        force_tf_compat_v1=False, disable_statistics=True).with_id(TRANSFORM)
    transform.add_upstream_node(gate)

    train_args = tfx.proto.TrainArgs(num_steps=int(config.train.train_steps))
    eval_args = tfx.proto.EvalArgs(num_steps=int(config.train.eval_steps) if config.train.eval_steps else None)
    components = [example_gen, statistics_gen, *schema_components, example_validator, gate, transform]

    hyperparameters = None
    if config.tuner.enabled:
        tuner = tfx.components.Tuner(
            tuner_fn=f"{MODULE}.tuner_fn", examples=transform.outputs["transformed_examples"],
            transform_graph=transform.outputs["transform_graph"], train_args=train_args, eval_args=eval_args,
            custom_config=module_config).with_id(TUNER)
        hyperparameters = tuner.outputs["best_hyperparameters"]
        components.append(tuner)

    trainer = tfx.components.Trainer(
        run_fn=f"{MODULE}.run_fn", examples=transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"], schema=schema,
        hyperparameters=hyperparameters, train_args=train_args, eval_args=eval_args,
        custom_config=module_config).with_id(TRAINER)

    baseline = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing)).with_id(BASELINE_RESOLVER)

    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs["examples"], model=trainer.outputs["model"],
        baseline_model=baseline.outputs["model"], eval_config=eval_config(config),
        module_path="pipelines.components.tfma_extractors").with_id(EVALUATOR)

    pusher = Pusher(
        model=trainer.outputs["model"], model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(filesystem=tfx.proto.PushDestination.Filesystem(
            base_directory=os.path.join(serving_dir, config.model_name)))).with_id(PUSHER)
    components += [trainer, baseline, evaluator, pusher]

    if metadata_connection_config is None and metadata_path is not None:
        metadata_connection_config = tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata_path)
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name, pipeline_root=pipeline_root, components=components,
        enable_cache=enable_cache, metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(config.beam_args if beam_args is None else beam_args))
