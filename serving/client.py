"""A small Python client for the model server (or tensorflow_model_server: same protocol).

    from serving.client import ModelClient
    with ModelClient("127.0.0.1:8500") as client:
        scores = client.predict_csv("census", "rows.csv")            # {"income": array, "marital": array, ...}
        scores = client.predict_examples("census", serialized_examples, label="stable")

`predict_csv` needs no dataset spec: it asks the server for the
`predict_raw` signature (GetModelMetadata) and converts each CSV column to
the dtype that signature declares.
"""
from __future__ import annotations

import csv
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import grpc
import numpy as np
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from features.io import ASCII_WHITESPACE
from serving.tensors import to_numpy, to_proto

MISSING_VALUES = ("", "?", "NA", "nan", "NaN")


def channel(target: str, root_certificates: Optional[bytes] = None, server_name: Optional[str] = None):
    """Insecure channel, or TLS trusting `root_certificates` (PEM) when given."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
               ("grpc.max_send_message_length", 64 * 1024 * 1024)]
    if root_certificates is None:
        return grpc.insecure_channel(target, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root_certificates), options)


class ModelClient:
    def __init__(self, target: str, *, root_certificates: Optional[bytes] = None, server_name: Optional[str] = None,
                 timeout: float = 30.0):
        self.channel = channel(target, root_certificates, server_name)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.timeout = timeout

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def _spec(spec, model: str, version: Optional[int], label: Optional[str], signature: str = "") -> None:
        if version is not None and label:
            raise ValueError("give a version or a label, not both")
        spec.name = model
        if version is not None:
            spec.version.value = int(version)
        if label:
            spec.version_label = label
        if signature:
            spec.signature_name = signature

    def predict(self, model: str, inputs: Dict[str, np.ndarray], *, signature: str = "serving_default",
                version: Optional[int] = None, label: Optional[str] = None,
                output_filter: Sequence[str] = ()) -> Dict[str, np.ndarray]:
        return self._predict_call(model, inputs, signature=signature, version=version, label=label,
                                  output_filter=output_filter)[0]

    def _predict_call(self, model: str, inputs: Dict[str, np.ndarray], *, signature: str,
                      version: Optional[int] = None, label: Optional[str] = None, output_filter: Sequence[str] = (),
                      metadata=None):
        """One Predict call: (outputs, the version that served it, the split arm that did, "" when none)."""
        from serving.ab.split import ARM_METADATA

        request = predict_pb2.PredictRequest(output_filter=list(output_filter))
        self._spec(request.model_spec, model, version, label, signature)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(to_proto(np.asarray(value)))
        response, call = self.predictions.Predict.with_call(request, timeout=self.timeout, metadata=metadata)
        outputs = {k: to_numpy(v, k, 1 << 30) for k, v in response.outputs.items()}
        return outputs, response.model_spec.version.value, dict(call.trailing_metadata() or ()).get(ARM_METADATA, "")

    def predict_examples(self, model: str, examples: Iterable[bytes], **kwargs) -> Dict[str, np.ndarray]:
        """serving_default on serialized tf.Examples."""
        return self.predict(model, {"examples": np.array(list(examples), dtype=object)}, **kwargs)

    def raw_inputs(self, model: str, version: Optional[int] = None, label: Optional[str] = None) -> Dict[str, str]:
        """predict_raw's inputs: name -> "DT_FLOAT" | "DT_STRING" (from GetModelMetadata)."""
        from tensorflow.core.framework import types_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, model, version, label)
        response = self.predictions.GetModelMetadata(request, timeout=self.timeout)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)
        if "predict_raw" not in sig_map.signature_def:
            raise ValueError(f"model {model!r} has no predict_raw signature (not exported by serving.export)")
        return {name: types_pb2.DataType.Name(info.dtype)
                for name, info in sig_map.signature_def["predict_raw"].inputs.items()}

    def predict_csv(self, model: str, path: str, *, version: Optional[int] = None, label: Optional[str] = None,
                    output_filter: Sequence[str] = (), batch_size: int = 4096) -> Dict[str, np.ndarray]:
        """Scores every row of a CSV with a header row naming (at least) the model's raw features, `batch_size`
        rows a request (the server refuses requests past its --max-request-batch, 8192 by default)."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        columns = self.raw_inputs(model, version, label)
        inputs = read_csv_columns(path, columns)
        rows = len(next(iter(inputs.values())))
        parts = [self.predict(model, {k: v[start:start + batch_size] for k, v in inputs.items()},
                              signature="predict_raw", version=version, label=label, output_filter=output_filter)
                 for start in range(0, rows, batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def predict_csv_by_unit(self, model: str, path: str, unit_column: str, *, unit_in: str = "feature",
                            output_filter: Sequence[str] = (), batch_size: int = 4096, concurrency: int = 8,
                            progress: Optional[Callable[[int, int], None]] = None):
        """Scores a CSV through the server's traffic split: one request per unit (and `batch_size` rows), since
        the split gives each unit one arm and refuses a request holding several units.

        `unit_column` names the CSV column identifying each row's unit (e.g. user_id). `unit_in` says where the
        split reads it: "feature" sends it as an input of that name (a split whose "key" is that column; the
        server drops it before the signature), "metadata" as the gRPC metadata mmoe-split-key (a split whose
        "key" is ""). A model that is not split refuses the unit as an unknown input: the unit then goes as
        metadata, which it ignores. Units are grouped by the key the server hashes: the column's text as written
        (so "42" and "42.0" are two units), or its number when the column is a numeric model input (42 and 42.0
        one unit).

        Returns (scores, served): each task's scores in CSV row order (gate outputs left out; NaN in the rows of
        an arm whose model lacks the head), and served["unit"], served["arm"] (the arm's name; "" where the model
        is not split) and served["version"] per row.
        """
        from serving.ab.split import REQUEST_KEY_METADATA, unit_key

        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if unit_in not in ("feature", "metadata"):
            raise ValueError(f"unit_in must be 'feature' or 'metadata', got {unit_in!r}")
        columns = self.raw_inputs(model)
        if unit_column in columns and unit_in == "metadata":
            raise ValueError(f"{unit_column!r} is an input of the model; a split keyed by it reads it from the "
                             f"request's inputs (unit_in='feature')")
        table = read_csv_columns(path, {**columns, unit_column: columns.get(unit_column, "DT_STRING")})
        # A missing-value marker is no unit (a numeric column's NaN already is not).
        units = [None if isinstance(value, bytes) and value.decode(errors="replace") in MISSING_VALUES
                 else unit_key(value) for value in table[unit_column]]
        if unit_column not in columns:
            del table[unit_column]
        groups: Dict[bytes, List[int]] = {}
        for row, unit in enumerate(units):
            if unit is None:
                raise ValueError(f"{path}:{row + 2}: column {unit_column!r} is empty; every row needs its unit")
            groups.setdefault(unit, []).append(row)
        if unit_in == "metadata":
            for unit in groups:
                if not _metadata_value(unit):
                    raise ValueError(f"{path}: unit {unit!r} cannot be sent as gRPC metadata (printable ASCII "
                                     f"only); split by a feature instead")
        # (unit, row indices) of each request, units in order of first appearance.
        requests = [(unit, np.array(rows[start:start + batch_size]))
                    for unit, rows in groups.items() for start in range(0, len(rows), batch_size)]

        as_feature = [unit_in == "feature" and unit_column not in columns]  # until the server refuses it

        def send(item):
            unit, rows = item
            while True:
                inputs = {name: column[rows] for name, column in table.items()}
                metadata = None
                feature = as_feature[0]
                if feature:
                    inputs[unit_column] = np.array([unit] * len(rows), dtype=object)
                elif unit_in == "metadata" or _metadata_value(unit):
                    metadata = [(REQUEST_KEY_METADATA, unit.decode())]
                try:
                    return self._predict_call(model, inputs, signature="predict_raw", output_filter=output_filter,
                                              metadata=metadata)
                except grpc.RpcError as err:
                    # Not split by this feature, so the signature got an input it does not take (the server drops
                    # the key only for the split keyed by it): send the unit as metadata from now on.
                    if not (feature and err.code() == grpc.StatusCode.INVALID_ARGUMENT
                            and "unknown input" in (err.details() or "") and repr(unit_column) in err.details()):
                        raise
                    as_feature[0] = False

        rows_total = len(units)
        scores: Dict[str, np.ndarray] = {}
        served = {"unit": np.empty(rows_total, dtype=object), "arm": np.empty(rows_total, dtype=object),
                  "version": np.zeros(rows_total, dtype=np.int64)}
        from concurrent import futures

        with futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            for done, ((unit, rows), (outputs, served_version, arm)) in enumerate(
                    zip(requests, pool.map(send, requests)), start=1):
                for name, values in outputs.items():
                    if values.ndim != 1:  # gate outputs: [rows, experts], whose width differs between arms
                        continue
                    if name not in scores:  # NaN: rows of an arm whose model has no such head
                        scores[name] = np.full(rows_total, np.nan)
                    scores[name][rows] = values
                served["unit"][rows] = unit.decode(errors="replace")
                served["arm"][rows] = arm
                served["version"][rows] = served_version
                if progress is not None:
                    progress(done, len(requests))
        return scores, served

    def status(self, model: str, version: Optional[int] = None, label: Optional[str] = None):
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, model, version, label)
        return self.models.GetModelStatus(request, timeout=self.timeout)


def _metadata_value(unit: bytes) -> bool:
    """Whether a unit key can travel as a gRPC metadata value (printable ASCII only)."""
    return all(32 <= b < 127 for b in unit)


def read_csv_columns(path: str, dtypes: Dict[str, str]) -> Dict[str, np.ndarray]:
    """CSV (header row) -> one array per wanted column: float32 for DT_FLOAT (missing -> NaN), bytes otherwise."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets start with a byte-order mark
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [r for r in reader if r]
    except FileNotFoundError:
        raise FileNotFoundError(f"--csv {path}: no such file") from None
    if not header:
        raise ValueError(f"{path}: empty file; expected a header row naming the model's features")
    header = [h.strip() for h in header]
    missing = sorted(set(dtypes) - set(header))
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} needed by the model")
    if not rows:
        raise ValueError(f"{path}: no data rows")
    index = {name: header.index(name) for name in dtypes}
    out = {}
    for name, dtype in dtypes.items():
        i = index[name]
        values = []
        for line, row in enumerate(rows, start=2):
            if len(row) != len(header):
                raise ValueError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            values.append(row[i].strip(ASCII_WHITESPACE))  # as training data is read
        if dtype == "DT_FLOAT":
            try:
                numbers = np.array([np.nan if v in MISSING_VALUES else float(v) for v in values])
            except ValueError as err:
                raise ValueError(f"{path}: column {name!r} must be numeric: {err}") from None
            huge = np.flatnonzero(np.abs(np.nan_to_num(numbers)) > np.finfo(np.float32).max)
            if len(huge):  # inf, or past float32, where it would become inf: the model has no answer for it
                raise ValueError(f"{path}:{huge[0] + 2}: column {name!r} holds {values[huge[0]]!r}, not a finite "
                                 f"float32 (missing values are written {' '.join(repr(m) for m in MISSING_VALUES)})")
            out[name] = numbers.astype(np.float32)
        else:
            out[name] = np.array([v.encode() for v in values], dtype=object)
    return out


def format_scores(scores: Dict[str, np.ndarray], tasks: Optional[List[str]] = None,
                  served: Optional[Dict[str, np.ndarray]] = None) -> str:
    """One line per row: the row number and each task's score (gate outputs left out); with `served` (from
    predict_csv_by_unit), then the row's unit, the arm that served it ("-" when not split) and the version."""
    tasks = tasks or [k for k, v in scores.items() if np.ndim(v) == 1]
    tasks = sorted(tasks)
    extra = ["unit", "arm", "version"] if served is not None else []
    lines = ["\t".join(["row"] + tasks + extra)]
    n = len(scores[tasks[0]]) if tasks else 0
    for i in range(n):
        fields = [str(i)] + [f"{float(scores[t][i]):.6f}" for t in tasks]
        if served is not None:
            fields += [served["unit"][i], served["arm"][i] or "-", str(served["version"][i])]
        lines.append("\t".join(fields))
    return "\n".join(lines)
