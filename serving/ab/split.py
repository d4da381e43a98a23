"""The traffic split: which arm (version or version label) of a model serves a request.

A split config is a JSON file (`mmoe serve --split-config FILE`):

    {"model": "census", "key": "user_id", "salt": "exp-7",
     "arms": [{"name": "A", "label": "stable", "fraction": 0.9},
              {"name": "B", "version": 2, "fraction": 0.1}]}

Assignment is deterministic per unit: the unit's key (the value of feature
`key` in the request, or the gRPC metadata `mmoe-split-key` when `key` is "")
is hashed with sha256(salt, 0x00, key) into [0, 1), and the arms take
consecutive intervals of that range in the order listed.  The same key and
salt always give the same arm (across restarts and machines); a new salt
reshuffles the units.

Rules (also in serving/README.md):

* a request that pins `model_spec.version` or `version_label` gets what it
  pinned and is not part of the split (logged with arm "");
* requests for other models are not split; GetModelMetadata is never split;
* a missing key (feature absent, empty or NaN, or no `mmoe-split-key`
  metadata) is INVALID_ARGUMENT;
* every row of a batch must carry the same key: a batch holding several
  units is INVALID_ARGUMENT, since one response has one served version and a
  unit must always see one arm.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # assignment alone imports neither TensorFlow nor gRPC (tools hash keys without them)
    from serving.config import ModelEntry

# gRPC metadata carrying the unit key when the split's "key" is "" (metadata keys are lower case).
REQUEST_KEY_METADATA = "mmoe-split-key"
# Trailing metadata of a split response: the arm that served it.
ARM_METADATA = "mmoe-split-arm"
# The tf.Example input of serving_default, Classify and Regress.
EXAMPLES_INPUT = "examples"

_FRACTION_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    version: Optional[int]
    label: Optional[str]
    fraction: float


@dataclasses.dataclass(frozen=True)
class Route:
    """Where one request goes: the version or label to resolve, and the arm ("" when not split)."""

    version: Optional[int]
    label: str
    arm: str


@dataclasses.dataclass(frozen=True)
class TrafficSplit:
    model: str
    key: str          # feature hashed for assignment; "" = the request's mmoe-split-key metadata
    salt: str
    arms: tuple       # of Arm

    def bucket(self, key: bytes) -> float:
        """The unit's position in [0, 1): the first 8 bytes of sha256(salt 0x00 key)."""
        digest = hashlib.sha256(self.salt.encode() + b"\x00" + key).digest()
        return int.from_bytes(digest[:8], "big") / 2.0 ** 64

    def assign(self, key: bytes) -> Arm:
        """The arm of the unit `key` (bytes; see unit_key for how values become bytes)."""
        position = self.bucket(key)
        upper = 0.0
        for arm in self.arms:
            upper += arm.fraction
            if position < upper:
                return arm
        # Rounding: fractions sum to 1 within 1e-6; the last arm with traffic takes the remainder.
        return [a for a in self.arms if a.fraction > 0][-1]

    def to_dict(self) -> dict:
        """The split as written to split.json beside the prediction logs."""
        return {"model": self.model, "key": self.key, "salt": self.salt,
                "arms": [{"name": a.name, "version": a.version, "label": a.label, "fraction": a.fraction}
                         for a in self.arms]}

    # -- requests ----------------------------------------------------------------------------------------

    def route(self, model_spec, inputs: Dict[str, np.ndarray], metadata: Iterable = ()) -> Route:
        """The Route for one request: its pin, or its unit's arm.  Raises ServingError(INVALID_ARGUMENT)."""
        pinned_version = model_spec.version.value if model_spec.HasField("version") else None
        if model_spec.name != self.model or pinned_version is not None or model_spec.version_label:
            return Route(pinned_version, model_spec.version_label, "")
        arm = self.assign(self.request_key(inputs, metadata))
        return Route(arm.version, arm.label or "", arm.name)

    def model_inputs(self, model_name: str, inputs: Dict[str, np.ndarray], accepted) -> Dict[str, np.ndarray]:
        """`inputs` without the key feature when the signature does not take it: a unit id (e.g. a user id) is
        rarely a model input, yet clients send it as a raw tensor for the split and the prediction log."""
        if model_name != self.model or not self.key or self.key not in inputs or self.key in accepted:
            return inputs
        return {k: v for k, v in inputs.items() if k != self.key}

    def request_key(self, inputs: Dict[str, np.ndarray], metadata: Iterable = ()) -> bytes:
        """The unit key of a request: one value shared by all its rows."""
        from serving.tensors import invalid
        if not self.key:
            values = [v for k, v in metadata if k == REQUEST_KEY_METADATA]
            if not values or not values[0]:
                raise invalid(f"model {self.model!r} is split by request key: send gRPC metadata "
                              f"{REQUEST_KEY_METADATA!r} (or pin model_spec.version / version_label)")
            value = values[0]
            return value if isinstance(value, bytes) else str(value).encode()
        if self.key in inputs:
            column = inputs[self.key]
            if column.ndim == 2 and column.shape[1] == 1:
                column = column[:, 0]
            if column.ndim > 1:
                raise invalid(f"split key feature {self.key!r} has shape {list(column.shape)}; "
                              f"it must hold one value per row")
            keys = [unit_key(v) for v in np.atleast_1d(column)]
        elif EXAMPLES_INPUT in inputs and inputs[EXAMPLES_INPUT].dtype == object:
            keys = [self._example_key(e) for e in np.ravel(inputs[EXAMPLES_INPUT])]
        else:
            raise invalid(f"model {self.model!r} is split by feature {self.key!r}, which the request lacks "
                          f"(inputs: {sorted(inputs)}); send it, or pin model_spec.version / version_label")
        for row, value in enumerate(keys):
            if value is None:
                raise invalid(f"model {self.model!r} is split by feature {self.key!r}, which row {row} of the "
                              f"request lacks (missing, empty or NaN)")
        distinct = sorted(set(keys))
        if len(distinct) > 1:
            shown = ", ".join(repr(k.decode(errors="replace")) for k in distinct[:3])
            raise invalid(f"model {self.model!r} is split by feature {self.key!r}: one request must hold one "
                          f"unit, this batch holds {len(distinct)} ({shown}{', ...' if len(distinct) > 3 else ''}); "
                          f"send one request per {self.key!r}")
        if not keys:
            raise invalid("empty batch: the request holds no examples")
        return keys[0]

    def _example_key(self, serialized) -> Optional[bytes]:
        from google.protobuf.message import DecodeError
        from tensorflow.core.example import example_pb2

        from serving.tensors import invalid

        try:
            example = example_pb2.Example.FromString(bytes(serialized))
        except DecodeError:
            raise invalid("Could not parse example input: a serialized tf.Example is malformed") from None
        feature = example.features.feature.get(self.key)
        if feature is None:
            return None
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        if len(values) > 1:
            raise invalid(f"split key feature {self.key!r} holds {len(values)} values in one tf.Example; "
                          f"it must hold one")
        return unit_key(values[0]) if values else None


def unit_key(value) -> Optional[bytes]:
    """A key value as hashed: bytes as they are, text as UTF-8, integral numbers as integers ("42", whether
    sent as float or int), other numbers by repr.  None for NaN (a missing float feature)."""
    if isinstance(value, bytes):
        return value or None
    if isinstance(value, str):
        return value.encode() or None
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return str(int(value)).encode()
    number = float(value)
    if math.isnan(number):
        return None
    if number.is_integer():
        return str(int(number)).encode()
    return repr(number).encode()


# -- config -------------------------------------------------------------------------------------------------


_TOP_FIELDS = {"model", "key", "salt", "arms"}
_ARM_FIELDS = {"name", "version", "label", "fraction"}


def parse_split_config(text: str, source: str = "split config") -> TrafficSplit:
    """JSON text -> TrafficSplit; raises ValueError naming the problem (not checked against the models)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object with {sorted(_TOP_FIELDS)}")
    unknown = sorted(set(data) - _TOP_FIELDS)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; a split has {sorted(_TOP_FIELDS)}")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{source}: 'model' must name the served model whose traffic is split")
    if "key" not in data:
        raise ValueError(f"{source}: 'key' is missing: name the feature whose value identifies a unit "
                         f"(e.g. a user id), or \"\" to use the request's {REQUEST_KEY_METADATA!r} gRPC metadata")
    key, salt = data["key"], data.get("salt", "")
    if not isinstance(key, str):
        raise ValueError(f"{source}: 'key' must be a string, got {key!r}")
    if not isinstance(salt, str):
        raise ValueError(f"{source}: 'salt' must be a string, got {salt!r}")
    arms_data = data.get("arms")
    if not isinstance(arms_data, list) or len(arms_data) < 2:
        raise ValueError(f"{source}: 'arms' must list at least two arms")
    arms = [_parse_arm(a, i, source) for i, a in enumerate(arms_data)]
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{source}: arm name(s) {duplicates} used twice")
    total = sum(a.fraction for a in arms)
    if abs(total - 1.0) > _FRACTION_TOLERANCE:
        raise ValueError(f"{source}: arm fractions must sum to 1, they sum to {total:g} "
                         f"({', '.join(f'{a.name}={a.fraction:g}' for a in arms)})")
    return TrafficSplit(model, key, salt, tuple(arms))


def _parse_arm(data, index: int, source: str) -> Arm:
    where = f"{source}: arm {index}"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object with {sorted(_ARM_FIELDS)}")
    unknown = sorted(set(data) - _ARM_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; an arm has {sorted(_ARM_FIELDS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'name' must be a non-empty string")
    where = f"{source}: arm {name!r}"
    version, label = data.get("version"), data.get("label")
    if (version is None) == (label is None):
        raise ValueError(f"{where}: give exactly one of 'version' and 'label'")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ValueError(f"{where}: 'version' must be a positive integer, got {version!r}")
    if label is not None and (not isinstance(label, str) or not label):
        raise ValueError(f"{where}: 'label' must be a non-empty string, got {label!r}")
    fraction = data.get("fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
        raise ValueError(f"{where}: 'fraction' must be a number in [0, 1], got {fraction!r}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"{where}: 'fraction' must be in [0, 1], got {fraction:g}")
    return Arm(name, version, label, float(fraction))


def load_split_config(path: str) -> TrafficSplit:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--split-config {path}: no such file")
    with open(path) as fh:
        return parse_split_config(fh.read(), source=path)


def check_split_against_models(split: TrafficSplit, entries: Sequence["ModelEntry"]) -> None:
    """Start-up check: the model is served, every label is configured, every version is on disk and wanted by
    the model's version policy.  Raises ValueError naming the arm."""
    from serving.models import versions_on_disk

    by_name = {e.name: e for e in entries}
    entry = by_name.get(split.model)
    if entry is None:
        raise ValueError(f"split config: model {split.model!r} is not served; models: {sorted(by_name)}")
    served: Optional[List[int]] = None
    for arm in split.arms:
        where = f"split config: arm {arm.name!r}"
        if arm.label is not None and arm.label not in entry.labels:
            raise ValueError(f"{where}: model {split.model!r} has no version label {arm.label!r}; "
                             f"labels: {sorted(entry.labels)} (version_labels in --model-config-file)")
        if served is None:
            on_disk = sorted(versions_on_disk(entry.base_path))
            served = entry.policy.select(on_disk)
        version = arm.version if arm.label is None else entry.labels[arm.label]
        if version not in served:  # the arm's share of traffic would all fail
            via = "" if arm.label is None else f" (label {arm.label!r} points to it)"
            raise ValueError(f"{where}: model {split.model!r} serves no version {version}{via}; versions the "
                             f"policy serves from {entry.base_path}: {served}")
