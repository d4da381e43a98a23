"""Pusher executor that does not push the model TF Serving already serves as a new version.

Re-running the pipeline on unchanged inputs reuses the Trainer's model, but
the Evaluator runs again (its baseline, the latest blessed model, is now that
same model), so its new blessing makes TFX's Pusher run and copy the same
model to a new version directory.  `Pusher` here is TFX's Pusher component
with this executor, TFX's filesystem push with one check first: when the newest version under the push destination holds
the same files as the model, nothing is copied and the push is recorded as that
version (`pushed_version`, `pushed_destination`, plus `reused_version: 1`).
Only the newest version counts: pushing an older model back makes it served
again, so that is a real push.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Optional

from absl import logging
from tfx import types
from tfx.components.pusher import component as pusher_component
from tfx.components.pusher import executor as pusher_executor
from tfx.dsl.components.base import executor_spec
from tfx.dsl.io import fileio
from tfx.proto import pusher_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import io_utils, proto_utils

REUSED_VERSION_KEY = "reused_version"


def directory_digest(path: str) -> str:
    """sha256 over the relative paths and contents of every file under `path`."""
    digest = hashlib.sha256()
    files = []
    for root, _, names in fileio.walk(path):
        files += [os.path.join(root, n) for n in names]
    for f in sorted(files):
        digest.update(os.path.relpath(f, path).encode() + b"\0")
        with fileio.open(f, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()


def newest_version(base_directory: str) -> Optional[str]:
    """The highest numeric version directory under base_directory (what TF Serving serves), or None."""
    if not fileio.exists(base_directory):
        return None
    versions = [v.rstrip("/") for v in fileio.listdir(base_directory)]
    versions = [v for v in versions if v.isdigit()
                and fileio.exists(os.path.join(base_directory, v, "saved_model.pb"))]
    return max(versions, key=int) if versions else None


class Executor(pusher_executor.Executor):
    """TFX's filesystem Pusher, skipping the copy when the newest served version is this model."""

    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        model_push = artifact_utils.get_single_instance(output_dict[standard_component_specs.PUSHED_MODEL_KEY])
        destination = pusher_pb2.PushDestination()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.PUSH_DESTINATION_KEY], destination)
        if destination.WhichOneof("destination") == "filesystem" and self.CheckBlessing(input_dict):
            base = destination.filesystem.base_directory
            newest = newest_version(base)
            model_path = self.GetModelPath(input_dict)
            if newest is not None and directory_digest(os.path.join(base, newest)) == directory_digest(model_path):
                serving_path = os.path.join(base, newest)
                logging.info("Model is already the newest version %s; not pushed again.", serving_path)
                io_utils.copy_dir(model_path, model_push.uri)  # the archive copy TFX's Pusher keeps too
                self._MarkPushed(model_push, pushed_destination=serving_path, pushed_version=newest)
                model_push.set_int_custom_property(REUSED_VERSION_KEY, 1)
                return
        super().Do(input_dict, output_dict, exec_properties)


class Pusher(pusher_component.Pusher):
    """TFX's Pusher (same inputs, outputs and parameters) running `Executor`."""

    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)
