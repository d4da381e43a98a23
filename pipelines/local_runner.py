"""Run the pipeline in this process: TFX's LocalDagRunner, a SQLite ML Metadata store, Beam's DirectRunner.

`run_local(...)` runs `pipelines.pipeline.create_pipeline` and returns a
`RunSummary` read back from ML Metadata: what each component did (ran,
cached, failed) and how long it took, the anomalies, the TFMA metrics per
head and slice, whether the model was blessed and why not, and where it was
pushed.  Results of components whose inputs did not change are reused
(TFX caching), so running again after a crash or a kill completes the run
from where it stopped.

Beam runs on the DirectRunner in multi-process mode by default
(`--direct_running_mode=multi_processing --direct_num_workers=0`, one worker
per core).  Any other Beam arguments pass through unchanged, e.g. for Flink:

    mmoe pipeline run --data DIR -- --runner=FlinkRunner --flink_master=host:8081 --environment_type=LOOPBACK

(Spark: `--runner=SparkRunner --spark_master_url=...`; Dataflow: `--runner=DataflowRunner --project=P
--region=R --temp_location=gs://B/tmp`, with `--pipeline-root gs://B/root`; the workers need this repository
installed, e.g. through `--sdk_container_image`.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import math
import os
import time
from typing import Any, Dict, List, Optional

from pipelines import pipeline as pl
from pipelines.configs import PipelineConfig


@dataclasses.dataclass
class ComponentRun:
    node_id: str
    state: str  # COMPLETE, CACHED, FAILED, RUNNING, ...
    seconds: Optional[float]
    outputs: Dict[str, List[Any]]  # output key -> MLMD artifacts


@dataclasses.dataclass
class RunSummary:
    pipeline_root: str
    metadata_path: str
    run_id: Optional[str] = None
    components: List[ComponentRun] = dataclasses.field(default_factory=list)
    total_seconds: float = 0.0
    error: Optional[str] = None  # why the run stopped, if it did
    anomalies: Dict[str, Dict[str, str]] = dataclasses.field(default_factory=dict)
    metrics: Dict[str, Dict[str, Dict[str, float]]] = dataclasses.field(default_factory=dict)  # slice->head->metric
    blessed: Optional[bool] = None
    blessing_reasons: List[str] = dataclasses.field(default_factory=list)
    baseline: Optional[str] = None
    pushed: Optional[bool] = None
    pushed_path: Optional[str] = None
    pushed_again: bool = False  # the model was already the newest served version: nothing copied
    schema_path: Optional[str] = None  # the schema the run validated and transformed with
    schema_inferred: bool = False  # SchemaGen + ConformSchema (no --schema)
    model_path: Optional[str] = None  # the Trainer's serving model (Format-Serving)

    @property
    def ok(self) -> bool:
        return self.error is None

    def component(self, node_id: str) -> Optional[ComponentRun]:
        return next((c for c in self.components if c.node_id == node_id), None)

    def output_uri(self, node_id: str, key: str) -> Optional[str]:
        c = self.component(node_id)
        if c is None or not c.outputs.get(key):
            return None
        return c.outputs[key][0].uri


# -- ML Metadata ----------------------------------------------------------------------------


def _store(metadata_path: str):
    from ml_metadata.metadata_store import metadata_store
    from tfx.orchestration import metadata

    return metadata_store.MetadataStore(metadata.sqlite_metadata_connection_config(metadata_path))


def latest_run(metadata_path: str, pipeline_name: str):
    """(run_id, [ComponentRun]) of the most recent run of the pipeline recorded in the store."""
    from ml_metadata.proto import metadata_store_pb2

    store = _store(metadata_path)
    runs = [c for c in store.get_contexts_by_type("pipeline_run")]
    pipeline_ctx = store.get_context_by_type_and_name("pipeline", pipeline_name)
    if pipeline_ctx is None or not runs:
        return None, []
    executions_of_pipeline = {e.id for e in store.get_executions_by_context(pipeline_ctx.id)}
    candidates = []
    for ctx in runs:
        execs = store.get_executions_by_context(ctx.id)
        if execs and all(e.id in executions_of_pipeline for e in execs):
            candidates.append((ctx.create_time_since_epoch, ctx.id, ctx, execs))
    if not candidates:
        return None, []
    _, _, run_ctx, executions = max(candidates, key=lambda c: (c[0], c[1]))
    node_type = store.get_context_type("node")
    result = []
    state_names = {v: k for k, v in metadata_store_pb2.Execution.State.items()}
    for execution in sorted(executions, key=lambda e: (e.create_time_since_epoch, e.id)):
        node_id = None
        for ctx in store.get_contexts_by_execution(execution.id):
            if ctx.type_id == node_type.id:
                node_id = ctx.name.split(".", 1)[-1]
        outputs: Dict[str, List[Any]] = {}
        events = store.get_events_by_execution_ids([execution.id])
        ids = [e.artifact_id for e in events if e.type in (metadata_store_pb2.Event.OUTPUT,
                                                           metadata_store_pb2.Event.DECLARED_OUTPUT)]
        artifacts = {a.id: a for a in store.get_artifacts_by_id(ids)} if ids else {}
        for e in events:
            if e.artifact_id in artifacts and e.path.steps:
                outputs.setdefault(e.path.steps[0].key, []).append(artifacts[e.artifact_id])
        seconds = None
        if execution.last_update_time_since_epoch and execution.create_time_since_epoch:
            seconds = (execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000.0
        result.append(ComponentRun(node_id or f"execution-{execution.id}",
                                   state_names.get(execution.last_known_state, "UNKNOWN"), seconds, outputs))
    return run_ctx.name, result


def _custom_property(artifact, name):
    if name not in artifact.custom_properties:
        return None
    value = artifact.custom_properties[name]
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


# -- TFMA results --------------------------------------------------------------------------


def _slice_name(slice_key) -> str:
    if not slice_key:
        return "overall"
    return ", ".join(f"{k}={v.decode() if isinstance(v, bytes) else v}" for k, v in slice_key)


def read_metrics(evaluation_uri: str) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{slice: {head: {metric: value}}} from an Evaluator output."""
    import tensorflow_model_analysis as tfma

    result = tfma.load_eval_result(evaluation_uri)
    metrics: Dict[str, Dict[str, Dict[str, float]]] = {}
    for slice_key, by_output in result.slicing_metrics:
        heads = metrics.setdefault(_slice_name(slice_key), {})
        for output, by_sub_key in by_output.items():
            for _, values in by_sub_key.items():
                for name, value in values.items():
                    number = value.get("doubleValue") if isinstance(value, dict) else value
                    if isinstance(number, (int, float)):
                        heads.setdefault(output or "", {})[name] = float(number)
    return metrics


def read_validation(evaluation_uri: str) -> List[str]:
    """Human-readable reasons why validation failed (empty when it passed)."""
    import tensorflow_model_analysis as tfma

    try:
        validation = tfma.load_validation_result(evaluation_uri)
    except Exception:  # no validation file: no thresholds configured
        return []
    reasons = []
    for per_slice in validation.metric_validations_per_slice:
        try:
            from tensorflow_model_analysis.slicer import slicer_lib

            where = _slice_name(slicer_lib.deserialize_slice_key(per_slice.slice_key))
        except Exception:
            where = "?"
        for failure in per_slice.failures:
            key = failure.metric_key
            metric = f"{key.output_name + ' ' if key.output_name else ''}{key.name}"
            if key.is_diff:
                metric += " (change vs. baseline)"
            reasons.append(f"{metric} = {failure.metric_value.double_value.value:.4f} fails "
                           f"{_threshold_text(failure.metric_threshold)} [{where}]")
    if not validation.validation_ok and not reasons:
        reasons.append("validation failed (see the Evaluator's validations file)")
    return reasons


def _threshold_text(threshold) -> str:
    if threshold.HasField("value_threshold"):
        v = threshold.value_threshold
        parts = []
        if v.HasField("lower_bound"):
            parts.append(f">= {v.lower_bound.value:g}")
        if v.HasField("upper_bound"):
            parts.append(f"<= {v.upper_bound.value:g}")
        return "value " + " and ".join(parts)
    if threshold.HasField("change_threshold"):
        c = threshold.change_threshold
        return f"change threshold (absolute {c.absolute.value:g})"
    return str(threshold).replace("\n", " ")


# -- running -------------------------------------------------------------------------------


class _ProgressFilter(std_logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        return message.startswith("Component ") and message.endswith(("is running.", "is finished."))


# Beam's job service relays every worker's log; these two come from each worker of each component and say
# nothing about the run: we register no Beam schemas or logical types (what a semi-persistent directory would
# restore), and the arguments discarded are the direct runner's own.
_BEAM_WORKER_NOISE = ("No semi_persistent_directory found", "Discarding unparseable args")
BEAM_JOB_SERVICE_LOGGER = "apache_beam.runners.portability.local_job_service"


class _BeamWorkerNoiseFilter(std_logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        return not any(noise in message for noise in _BEAM_WORKER_NOISE)


# Beam's worker processes start fresh interpreters, so the CLI's warnings filter does not reach them; this does.
# google.api_core warns on import in every worker that Python 3.10 is unsupported (TFX 1.16 needs < 3.11).
WORKER_WARNINGS = "ignore::FutureWarning"


def _with_worker_warnings(value: Optional[str]) -> str:
    """PYTHONWARNINGS for the workers: ours first, so the user's own entries (later, which win) still apply."""
    entries = [e for e in (value or "").split(",") if e]
    return ",".join([WORKER_WARNINGS] + [e for e in entries if e != WORKER_WARNINGS])


@contextlib.contextmanager
def _progress_logging(echo):
    """Show only TFX's 'Component X is running/finished' lines (timestamped); keep absl's noise at WARNING, and
    quiet Beam's workers (WORKER_WARNINGS, _BEAM_WORKER_NOISE) for the run."""
    from absl import logging as absl_logging

    logger = std_logging.getLogger("absl")
    handler = None
    old_level = logger.level
    absl_handler = absl_logging.get_absl_handler()
    old_handler_level = absl_handler.level
    if echo is not None:
        class _Echo(std_logging.Handler):
            def emit(self, record):
                echo(time.strftime("%H:%M:%S ") + record.getMessage())

        handler = _Echo()
        handler.addFilter(_ProgressFilter())
        logger.addHandler(handler)
    absl_handler.setLevel(std_logging.WARNING)
    beam_noise = _BeamWorkerNoiseFilter()
    std_logging.getLogger(BEAM_JOB_SERVICE_LOGGER).addFilter(beam_noise)
    old_warnings = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = _with_worker_warnings(old_warnings)
    old_propagate = logger.propagate
    logger.propagate = False  # a root handler (logging.basicConfig somewhere) would print every INFO line
    # Through absl's verbosity flag, not the logger's level alone: absl sets the level again from the flag when
    # flags are parsed (TensorFlow's SavedModel export in the Trainer does), which had silenced every line after
    # "Component Trainer is running."
    old_verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    logger.setLevel(std_logging.INFO)
    try:
        yield
    finally:
        absl_logging.set_verbosity(old_verbosity)
        if handler is not None:
            logger.removeHandler(handler)
        std_logging.getLogger(BEAM_JOB_SERVICE_LOGGER).removeFilter(beam_noise)
        if old_warnings is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = old_warnings
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        absl_handler.setLevel(old_handler_level)


def run_local(config: PipelineConfig, *, data: str, pipeline_root: str, serving_dir: str,
              metadata_path: Optional[str] = None, schema_file: Optional[str] = None, enable_cache: bool = True,
              beam_args: Optional[List[str]] = None, echo=print) -> RunSummary:
    """Run the whole pipeline with LocalDagRunner and summarise it (never raises for a failed component)."""
    from tfx import v1 as tfx

    os.makedirs(pipeline_root, exist_ok=True)
    metadata_path = metadata_path or os.path.join(pipeline_root, "metadata.sqlite")
    summary = RunSummary(pipeline_root=os.path.abspath(pipeline_root), metadata_path=os.path.abspath(metadata_path))
    pipeline = pl.create_pipeline(config, data=data, pipeline_root=pipeline_root, serving_dir=serving_dir,
                                  metadata_path=metadata_path, schema_file=schema_file, enable_cache=enable_cache,
                                  beam_args=beam_args)
    started = time.time()
    try:
        with _progress_logging(echo):
            tfx.orchestration.LocalDagRunner().run(pipeline)
    except Exception as e:  # a component failed: summarise what happened, the caller decides the exit code
        summary.error = f"{type(e).__name__}: {e}"
    summary.total_seconds = time.time() - started
    summarise(summary, config.pipeline_name)
    return summary


def summarise(summary: RunSummary, pipeline_name: str) -> RunSummary:
    from pipelines.components.anomaly_gate import read_anomalies

    from pipelines.components.pusher import REUSED_VERSION_KEY
    from pipelines.components.spec_schema import SCHEMA_FILE

    summary.run_id, summary.components = latest_run(summary.metadata_path, pipeline_name)
    schema_uri = summary.output_uri(pl.CONFORM_SCHEMA, "schema")
    summary.schema_inferred = schema_uri is not None
    schema_uri = schema_uri or summary.output_uri(pl.SCHEMA_GEN, "schema")
    if schema_uri:
        summary.schema_path = os.path.join(schema_uri, SCHEMA_FILE)
    uri = summary.output_uri(pl.EXAMPLE_VALIDATOR, "anomalies")
    if uri:
        summary.anomalies = read_anomalies(uri)
    if summary.error is None:
        failed = [c.node_id for c in summary.components if c.state == "FAILED"]
        if failed:
            summary.error = f"component(s) failed: {failed}"
    if summary.anomalies and summary.component(pl.TRANSFORM) is None:
        summary.error = "ExampleValidator found anomalies; the run stopped before training"
    model_uri = summary.output_uri(pl.TRAINER, "model")
    if model_uri:
        summary.model_path = os.path.join(model_uri, "Format-Serving")
    evaluation = summary.output_uri(pl.EVALUATOR, "evaluation")
    if evaluation:
        summary.metrics = read_metrics(evaluation)
        summary.blessing_reasons = read_validation(evaluation)
    evaluator_run = summary.component(pl.EVALUATOR)
    if evaluator_run and evaluator_run.outputs.get("blessing"):
        # The Evaluator records the baseline it compared with on its blessing.
        summary.baseline = _custom_property(evaluator_run.outputs["blessing"][0], "baseline_model") or None
    evaluator = summary.component(pl.EVALUATOR)
    if evaluator and evaluator.outputs.get("blessing"):
        summary.blessed = bool(_custom_property(evaluator.outputs["blessing"][0], "blessed"))
    pusher = summary.component(pl.PUSHER)
    if pusher and pusher.outputs.get("pushed_model"):
        artifact = pusher.outputs["pushed_model"][0]
        summary.pushed = bool(_custom_property(artifact, "pushed"))
        if summary.pushed:
            summary.pushed_path = _custom_property(artifact, "pushed_destination")
            summary.pushed_again = bool(_custom_property(artifact, REUSED_VERSION_KEY))
    return summary


def _slice_auc(metrics: Dict[str, float]) -> str:
    """A slice's AUC for a head, or why it has none.

    TFMA reports an AUC of 0.0 for a slice whose labels are all one class (say a small group with no income
    above $50K), where AUC is undefined; printed as 0.000 it would read as a model that ranks that group
    backwards."""
    label = metrics.get("mean_label")
    if label is not None and label <= 0.0:
        return "n/a (no positives)"
    if label is not None and label >= 1.0:
        return "n/a (no negatives)"
    return f"{metrics['auc']:.3f}"


def format_summary(summary: RunSummary, heads: Optional[List[str]] = None) -> str:
    lines = []
    if summary.components:
        lines.append(f"{'component':<28}{'state':<10}{'seconds':>9}")
        for c in summary.components:
            seconds = "" if c.seconds is None else f"{c.seconds:9.1f}"
            lines.append(f"{c.node_id:<28}{c.state:<10}{seconds:>9}")
        lines.append(f"{'total (wall)':<38}{summary.total_seconds:9.1f}")
    if summary.anomalies:
        from pipelines.components.anomaly_gate import format_anomalies

        lines.append("ANOMALIES: " + format_anomalies(summary.anomalies))
    overall = summary.metrics.get("overall", {})
    if overall:
        names = ["example_count", "auc", "binary_crossentropy", "calibration", "mean_label", "mean_prediction",
                 "root_mean_squared_error"]
        shown = [n for n in names if any(n in m for m in overall.values())]
        lines.append("")
        lines.append(f"{'head (eval split)':<18}" + "".join(f"{n[:16]:>17}" for n in shown))
        for head in heads or sorted(overall):
            m = overall.get(head, {})
            lines.append(f"{head:<18}" + "".join(
                f"{m[n]:>17.4f}" if n in m and not math.isnan(m[n]) and n != "example_count"
                else (f"{int(m[n]):>17d}" if n in m and n == "example_count" else f"{'-':>17}") for n in shown))
        slices = [s for s in summary.metrics if s != "overall"]
        if slices:
            lines.append(f"AUC by slice ({len(slices)} slices; the full table is in the Evaluator output):")
            for s in sorted(slices)[:12]:
                aucs = ", ".join(f"{h} {_slice_auc(m)}" for h, m in sorted(summary.metrics[s].items()) if "auc" in m)
                count = next((int(m["example_count"]) for m in summary.metrics[s].values() if "example_count" in m), 0)
                lines.append(f"  {s:<40} n={count:<6} {aucs}")
            if len(slices) > 12:
                lines.append(f"  ... and {len(slices) - 12} more")
    if summary.blessed is not None:
        if summary.blessed:
            why = "every head passed its AUC floor" + (
                " and the comparison with the latest blessed model" if summary.baseline
                else " (no blessed model to compare with yet)")
            lines.append(f"blessed: yes ({why})")
        else:
            lines.append("blessed: NO")
            for r in summary.blessing_reasons:
                lines.append(f"  - {r}")
    if summary.pushed:
        lines.append(f"pushed: {summary.pushed_path}" + (" (already the newest version: not copied again)"
                                                         if summary.pushed_again else ""))
    elif summary.pushed is False:
        lines.append("pushed: nothing (model not blessed)")
    if summary.error:
        lines.append(f"STOPPED: {summary.error.splitlines()[0][:500]}")
    if summary.schema_path:
        lines.append(f"schema: {summary.schema_path}" + (
            " (inferred by SchemaGen, held to the dataset spec; to curate it: mmoe pipeline schema --out FILE, "
            "edit, then run with --schema FILE)" if summary.schema_inferred else " (curated, imported)"))
    lines.append(f"pipeline root: {summary.pipeline_root} (ML Metadata: {summary.metadata_path})")
    return "\n".join(lines)
