"""TF Serving's configuration files, read with TF Serving's own protos.

* `--model-config-file`: a `ModelServerConfig` in protobuf text format, the
  exact file `tensorflow_model_server --model_config_file` reads:

      model_config_list {
        config {
          name: "census"
          base_path: "/models/census"
          model_platform: "tensorflow"
          model_version_policy { specific { versions: 1 versions: 2 } }
          version_labels { key: "stable" value: 1 }
          version_labels { key: "canary" value: 2 }
        }
      }

* `--batching-parameters-file`: TF Serving's `BatchingParameters` text
  format (`max_batch_size { value: 32 }` ...).  That message is not shipped
  in the tensorflow-serving-api wheel, so the subset we honour is declared
  here as a proto with the same field names, numbers and wrapper types; a
  file written for tensorflow_model_server parses unchanged; `allowed_batch_sizes`
  is honoured (merged batches are padded up to the next allowed size), other
  fields we do not implement are accepted and ignored.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

from google.protobuf import text_format
from google.protobuf import wrappers_pb2  # noqa: F401  (registers google/protobuf/wrappers.proto in the pool)
from tensorflow_serving.config import model_server_config_pb2

from serving.protos import Field, declare_message


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk to serve: the latest N, all, or a fixed list (TF Serving's ServableVersionPolicy)."""

    kind: str = "latest"          # latest | all | specific
    num_versions: int = 1
    versions: tuple = ()

    def select(self, on_disk: List[int]) -> List[int]:
        on_disk = sorted(on_disk)
        if self.kind == "all":
            return on_disk
        if self.kind == "specific":
            return [v for v in on_disk if v in self.versions]
        return on_disk[-self.num_versions:] if on_disk else []


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    base_path: str
    policy: VersionPolicy = VersionPolicy()
    labels: Dict[str, int] = dataclasses.field(default_factory=dict)


def _entry_from_proto(config, source: str) -> ModelEntry:
    where = f"{source}: model {config.name!r}"
    if not config.name:
        raise ValueError(f"{source}: a model config has no name")
    if not config.base_path:
        raise ValueError(f"{where} has no base_path")
    platform = config.model_platform or "tensorflow"
    if platform != "tensorflow":
        raise ValueError(f"{where}: model_platform {platform!r} is not supported (only 'tensorflow')")
    which = config.model_version_policy.WhichOneof("policy_choice")
    if which == "all":
        policy = VersionPolicy("all")
    elif which == "specific":
        versions = tuple(int(v) for v in config.model_version_policy.specific.versions)
        if not versions:
            raise ValueError(f"{where}: model_version_policy.specific lists no versions")
        policy = VersionPolicy("specific", versions=versions)
    else:
        n = config.model_version_policy.latest.num_versions if which == "latest" else 1
        policy = VersionPolicy("latest", num_versions=max(1, int(n)))
    labels = {str(k): int(v) for k, v in config.version_labels.items()}
    for label in labels:
        if not label or not all(c.isalnum() or c in "_-" for c in label):
            raise ValueError(f"{where}: version label {label!r} must be letters, digits, '-' or '_'")
    return ModelEntry(config.name, os.path.abspath(config.base_path), policy, labels)


def parse_model_config(text: str, source: str = "model config") -> List[ModelEntry]:
    """ModelServerConfig text -> entries; raises ValueError naming the problem."""
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise ValueError(f"{source}: not a ModelServerConfig in text format: {err}") from None
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError(f"{source}: expected a model_config_list")
    entries = [_entry_from_proto(c, source) for c in config.model_config_list.config]
    if not entries:
        raise ValueError(f"{source}: model_config_list holds no model")
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{source}: model name(s) {duplicates} configured twice")
    return entries


def load_model_config(path: str) -> List[ModelEntry]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model-config-file {path}: no such file")
    with open(path) as fh:
        return parse_model_config(fh.read(), source=path)


# -- batching parameters --------------------------------------------------------------------------------


def _batching_message_class():
    """Declare tensorflow.serving.BatchingParameters (field numbers from session_bundle_config.proto)."""
    optional, message = Field.LABEL_OPTIONAL, Field.TYPE_MESSAGE
    int64, string, boolean = (".google.protobuf.Int64Value", ".google.protobuf.StringValue",
                              ".google.protobuf.BoolValue")
    fields = [("max_batch_size", 1, optional, message, int64),
              ("batch_timeout_micros", 2, optional, message, int64),
              ("max_enqueued_batches", 3, optional, message, int64),
              ("num_batch_threads", 4, optional, message, int64),
              ("thread_pool_name", 5, optional, message, string),
              ("allowed_batch_sizes", 6, Field.LABEL_REPEATED, Field.TYPE_INT64, None),
              ("pad_variable_length_inputs", 7, optional, Field.TYPE_BOOL, None),
              ("enable_large_batch_splitting", 8, optional, message, boolean),
              ("max_execution_batch_size", 9, optional, message, int64)]
    return declare_message("mmoe/serving/batching_parameters.proto", "BatchingParameters", fields,
                           dependencies=["google/protobuf/wrappers.proto"])


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's batching knobs, with TF Serving's defaults."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 1
    # Sizes a merged batch is padded up to (TF Serving's rule: strictly increasing, the last = max_batch_size).
    allowed_batch_sizes: tuple = ()

    def __post_init__(self):
        for field in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, field) < 1:
                raise ValueError(f"batching parameter {field} must be >= 1, got {getattr(self, field)}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batching parameter batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}")
        sizes = tuple(int(s) for s in self.allowed_batch_sizes)
        object.__setattr__(self, "allowed_batch_sizes", sizes)
        if sizes:
            if sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
                raise ValueError(f"batching parameter allowed_batch_sizes must be positive and strictly increasing, "
                                 f"got {list(sizes)}")
            if sizes[-1] != self.max_batch_size:
                raise ValueError(f"batching parameter allowed_batch_sizes must end with max_batch_size "
                                 f"({self.max_batch_size}), got {list(sizes)}")


def parse_batching_parameters(text: str, source: str = "batching parameters") -> BatchingParameters:
    message = _batching_message_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as err:
        raise ValueError(f"{source}: not BatchingParameters in text format: {err}") from None
    values = {}
    for field in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        if message.HasField(field):
            values[field] = int(getattr(message, field).value)
    if message.allowed_batch_sizes:
        values["allowed_batch_sizes"] = tuple(int(v) for v in message.allowed_batch_sizes)
    try:
        return BatchingParameters(**values)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def load_batching_parameters(path: Optional[str]) -> Optional[BatchingParameters]:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--batching-parameters-file {path}: no such file")
    with open(path) as fh:
        return parse_batching_parameters(fh.read(), source=path)
