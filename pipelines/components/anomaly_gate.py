"""AnomalyGate: stop the run when ExampleValidator found anomalies.

ExampleValidator records anomalies (and a per-split `blessed` property) but
never fails, so on its own a pipeline would go on to transform and train on
bad data.  TFX 1.16 has no standard component that acts on the anomalies, so
this small function component does: it reads the ExampleValidator output and
raises `DataAnomaliesError` naming every anomalous feature.  The pipeline
makes Transform depend on it, hence a run with anomalies stops before
training and pushes nothing; `pipelines.local_runner` reports the features.
"""
# No `from __future__ import annotations`: the @component decorator reads the real annotations.
import os
from typing import Dict

from tfx import v1 as tfx

ANOMALIES_FILE = "SchemaDiff.pb"


class DataAnomaliesError(RuntimeError):
    """ExampleValidator reported anomalies; the message names the features."""


def read_anomalies(anomalies_uri: str) -> Dict[str, Dict[str, str]]:
    """{split: {feature (or "<dataset>"): description}} from an ExampleAnomalies artifact directory."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2
    from tfx.dsl.io import fileio

    found: Dict[str, Dict[str, str]] = {}
    if not fileio.exists(anomalies_uri):
        return found
    for entry in sorted(fileio.listdir(anomalies_uri)):
        entry = entry.rstrip("/")
        path = os.path.join(anomalies_uri, entry, ANOMALIES_FILE)
        if not entry.startswith("Split-") or not fileio.exists(path):
            continue
        with fileio.open(path, "rb") as fh:
            anomalies = anomalies_pb2.Anomalies.FromString(fh.read())
        split = entry[len("Split-"):]
        problems = {}
        for feature, info in sorted(anomalies.anomaly_info.items()):
            reasons = "; ".join(r.description or anomalies_pb2.AnomalyInfo.Type.Name(r.type) for r in info.reason)
            problems[feature] = f"{info.short_description}: {reasons}" if reasons else info.short_description
        if anomalies.HasField("dataset_anomaly_info"):
            info = anomalies.dataset_anomaly_info
            problems["<dataset>"] = info.short_description or info.description
        if problems:
            found[split] = problems
    return found


def format_anomalies(found: Dict[str, Dict[str, str]]) -> str:
    features = sorted({f for problems in found.values() for f in problems})
    lines = [f"anomalous feature(s): {', '.join(features)}"]
    for split, problems in found.items():
        for feature, description in problems.items():
            lines.append(f"  [{split}] {feature}: {description}")
    return "\n".join(lines)


@tfx.dsl.components.component
def AnomalyGate(anomalies: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.ExampleAnomalies]) -> None:
    """Raises DataAnomaliesError if any split of `anomalies` has an anomaly."""
    found = read_anomalies(anomalies.uri)
    if found:
        raise DataAnomaliesError("ExampleValidator found anomalies; the run stops before training. "
                                 + format_anomalies(found))
