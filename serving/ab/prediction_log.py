"""Request/response logging as TF Serving `PredictionLog` TFRecords, and the reader `mmoe ab-eval --logs` uses.

Files in the log directory:

* `prediction_log-<UTC start>-<pid>-<seq>.tfrecord`: TFRecord files of
  `tensorflow_serving.apis.prediction_log_pb2.PredictionLog`, one per
  logged Predict, Classify or Regress call (request and response as they
  went over the wire).  `log_metadata` holds `model_spec` (name, the served
  version, the signature or head), `sampling_config.sampling_rate`,
  `saved_model_tags` ["serve"] and `timestamp_secs`.  Two more fields ride
  in each record, unknown to PredictionLog and skipped by protobuf parsers
  (TF Serving's tools included): 1000 `time_ms` (request time, ms since the
  epoch) and 1001 `split_arm` (the arm's name, "" when the request was not
  split); `read_prediction_logs` reads them (see `_extras_class`).
* the same name plus `.tmp`: the file being written.  It is renamed when it
  reaches the size limit and when the server stops, so a finished file is
  never partial.  A process killed mid-write leaves a `.tmp` file; the next
  PredictionLogger in the directory (if that process is gone) cuts it after
  its last complete record (TFRecord framing: length, CRC of the length,
  data, CRC of the data) and renames it.  The reader also reads `.tmp` files,
  up to their last complete record.
* `split.json`: the traffic split active while logging (`TrafficSplit.to_dict`)
  or `null`, written (write, then rename) when logging starts.

Logging happens off the request path: `PredictionLogger.log` draws the
sampling decision and puts a reference to the request and response on a
bounded queue; a writer thread serializes and writes.  When the queue is
full the record is dropped and counted (`dropped`), the request never waits.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import struct
import threading
import time
from typing import Dict, Iterator, List, Optional, Tuple

import google_crc32c  # already a dependency (via apache-beam / google-cloud-storage)
import numpy as np

log = logging.getLogger("mmoe.serving")

SPLIT_FILE = "split.json"
LOG_PREFIX = "prediction_log-"
LOG_SUFFIX = ".tfrecord"
TMP_SUFFIX = ".tmp"
_NAME = re.compile(r"^prediction_log-\d{8}T\d{6}-(\d+)-\d+\.tfrecord(\.tmp)?$")

# -- TFRecord framing ------------------------------------------------------------------------------------------


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked crc32c of the length, data, masked crc32c of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def iter_records(path: str) -> Iterator[Tuple[bytes, int]]:
    """(record, offset just past it) for every complete record, stopping at the first incomplete or corrupt one."""
    with open(path, "rb") as fh:
        offset = 0
        while True:
            header = fh.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
                log.warning("%s: corrupt record header at byte %d; reading stops there", path, offset)
                return
            data = fh.read(length)
            footer = fh.read(4)
            if len(data) < length or len(footer) < 4:
                return  # a truncated tail: the write was cut short
            if struct.unpack("<I", footer)[0] != _masked_crc(data):
                log.warning("%s: corrupt record at byte %d; reading stops there", path, offset)
                return
            offset += 12 + length + 4
            yield data, offset


def _extras_class():
    """mmoe.serving.PredictionLogExtras {int64 time_ms = 1000; string split_arm = 1001;}, declared at run time.

    Its serialization is written before the PredictionLog's in each record: protobuf merges concatenated
    messages, so the record parses as a PredictionLog (fields 1000 and 1001 are unknown to it and skipped) and
    as these extras (PredictionLog's fields skipped).  PredictionLog has no field for the arm or for
    millisecond time, and `log_metadata.model_spec.version_label` cannot hold the arm: it shares a oneof with
    `version`, the served version.
    """
    from serving.protos import Field, declare_message

    return declare_message("mmoe/serving/prediction_log_extras.proto", "PredictionLogExtras",
                           [("time_ms", 1000, Field.LABEL_OPTIONAL, Field.TYPE_INT64, None),
                            ("split_arm", 1001, Field.LABEL_OPTIONAL, Field.TYPE_STRING, None)])


# -- files -------------------------------------------------------------------------------------------------


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_partial_logs(log_dir: str) -> List[str]:
    """Finish the `.tmp` files of processes that are gone: cut after the last complete record, rename.

    Returns the recovered files (an empty leftover is deleted).  Files of live processes are left alone.
    """
    recovered = []
    for name in sorted(os.listdir(log_dir)):
        match = _NAME.match(name)
        if not match or not match.group(2) or _process_alive(int(match.group(1))):
            continue
        path = os.path.join(log_dir, name)
        end, count = 0, 0
        for _, end in iter_records(path):
            count += 1
        if count == 0:
            os.remove(path)
            log.info("prediction log %s held no complete record: removed", path)
            continue
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
        final = path[: -len(TMP_SUFFIX)]
        os.replace(path, final)
        recovered.append(final)
        log.info("prediction log %s recovered: %d complete records kept", final, count)
    return recovered


def write_split_config(log_dir: str, split: Optional[dict]) -> str:
    """Write split.json (write a temporary file, then rename, so readers never see half of it)."""
    path = os.path.join(log_dir, SPLIT_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(split, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_split_config(log_dir: str) -> Optional[dict]:
    """The split active while logging (see serving.ab.split.TrafficSplit.to_dict); None when there was none."""
    path = os.path.join(log_dir, SPLIT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON: {err}") from None
    if data is not None and not (isinstance(data, dict) and {"model", "key", "salt", "arms"} <= set(data)):
        raise ValueError(f"{path}: expected a split with model, key, salt and arms, or null")
    return data


# -- writing ---------------------------------------------------------------------------------------------


_STOP = object()


class PredictionLogger:
    """Samples calls and writes them as PredictionLog TFRecords from a background thread.

    `log()` never blocks: with the queue full, the record is dropped and counted.
    """

    def __init__(self, log_dir: str, *, sampling_rate: float = 1.0, max_file_bytes: int = 64 << 20,
                 queue_size: int = 1024, split: Optional[dict] = None):
        if not 0.0 <= sampling_rate <= 1.0:
            raise ValueError(f"prediction log sampling rate must be in [0, 1], got {sampling_rate}")
        if max_file_bytes < 1:
            raise ValueError(f"prediction log file size limit must be >= 1 byte, got {max_file_bytes}")
        if queue_size < 1:
            raise ValueError(f"prediction log queue size must be >= 1, got {queue_size}")
        os.makedirs(log_dir, exist_ok=True)
        if log_files(log_dir) and os.path.isfile(os.path.join(log_dir, SPLIT_FILE)):
            earlier = read_split_config(log_dir)
            if earlier != split:
                # One split.json describes every file of the directory: logs of two splits (another salt, a ramp
                # of the fractions, no split) would be evaluated as one experiment under the newer split.
                raise ValueError(f"prediction log directory {log_dir} holds logs of another traffic split "
                                 f"({json.dumps(earlier)}); give this split its own --prediction-log-dir, or move "
                                 f"the old logs away")
        self.log_dir = log_dir
        self.sampling_rate = sampling_rate
        self.max_file_bytes = max_file_bytes
        self.dropped = 0       # sampled but refused: the queue was full
        self._drop_lock = threading.Lock()
        self.written = 0
        self.files: List[str] = []   # finished files, in order
        self._random = random.Random()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._file = None
        self._path = ""
        self._size = 0
        self._seq = 0
        self._closed = False
        recover_partial_logs(log_dir)
        write_split_config(log_dir, split)
        self._thread = threading.Thread(target=self._loop, name="prediction-log", daemon=True)
        self._thread.start()

    def log(self, kind: str, request, response, arm: str = "", when: Optional[float] = None,
            head: str = "") -> bool:
        """Queue one call ("predict", "classify" or "regress") if sampled; True when queued.

        `head`: the task head a Classify / Regress call scored. The logged response names it as its signature,
        where the client got the name it asked for echoed ("serving_default" for the default head), so that
        the log says which head the scores are of."""
        if self._closed or not (self.sampling_rate >= 1.0 or self._random.random() < self.sampling_rate):
            return False
        try:
            self._queue.put_nowait((kind, request, response, arm, time.time() if when is None else when, head))
        except queue.Full:
            with self._drop_lock:
                self.dropped += 1
            return False
        return True

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued record is written and flushed to the OS (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then finish (rename) the current file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self.dropped:
            log.warning("prediction log: %d sampled records dropped (queue full)", self.dropped)

    # -- writer thread -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:  # write whatever else is waiting before one flush
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = False
            for item in items:
                if item is _STOP:
                    stop = True
                    continue
                try:
                    self._write(self._encode(*item))
                except Exception:  # a bad record must not stop logging
                    log.exception("prediction log: a record could not be written")
            try:
                if self._file is not None:
                    self._file.flush()  # in the OS: survives a killed process
                    if self._size >= self.max_file_bytes:
                        self._finish_file()
                if stop:
                    self._finish_file()
            except OSError:
                log.exception("prediction log: writing %s failed", self._path)
            for _ in items:
                self._queue.task_done()
            if stop:
                return

    def _encode(self, kind: str, request, response, arm: str, when: float, head: str = "") -> bytes:
        from tensorflow_serving.apis import prediction_log_pb2

        entry = prediction_log_pb2.PredictionLog()
        body = getattr(entry, f"{kind}_log")
        body.request.CopyFrom(request)
        body.response.CopyFrom(response)
        if head:
            body.response.model_spec.signature_name = head
        meta = entry.log_metadata
        meta.model_spec.CopyFrom(body.response.model_spec)  # the served version, signature or head
        meta.sampling_config.sampling_rate = self.sampling_rate
        meta.saved_model_tags.append("serve")
        meta.timestamp_secs = int(when)
        extras = _extras_class()(time_ms=int(when * 1000), split_arm=arm)
        return extras.SerializeToString() + entry.SerializeToString()

    def _write(self, data: bytes) -> None:
        if self._file is None:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            self._seq += 1
            self._path = os.path.join(self.log_dir, f"{LOG_PREFIX}{stamp}-{os.getpid()}-{self._seq:05d}"
                                                    f"{LOG_SUFFIX}{TMP_SUFFIX}")
            self._file = open(self._path, "wb")
            self._size = 0
        record = frame_record(data)
        self._file.write(record)
        self._size += len(record)
        self.written += 1

    def _finish_file(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        final = self._path[: -len(TMP_SUFFIX)]
        os.replace(self._path, final)
        self.files.append(final)


# -- reading ---------------------------------------------------------------------------------------------


def log_files(log_dir: str) -> List[str]:
    """The prediction log files of a directory, finished and in progress, oldest first."""
    return [os.path.join(log_dir, n) for n in sorted(os.listdir(log_dir)) if _NAME.match(n)]


def read_prediction_logs(log_dir: str):
    """One row per logged example: arm, model, version, signature, time_ms, in.<feature>..., out.<output>...

    Reads every complete record of every log file, `.tmp` files of killed processes included (a truncated tail
    is dropped).  Raises ValueError when the directory is missing or holds no record.
    """
    import pandas as pd

    if not os.path.isdir(log_dir):
        raise ValueError(f"prediction log directory {log_dir} does not exist")
    files = log_files(log_dir)
    rows: List[dict] = []
    for path in files:
        for record, _ in iter_records(path):
            rows.extend(_rows_of(record, path))
    if not rows:
        raise ValueError(f"prediction log directory {log_dir} holds no complete record "
                         f"({len(files)} log file(s): {LOG_PREFIX}*{LOG_SUFFIX}[{TMP_SUFFIX}])")
    # Built as objects, then typed per column: pandas would turn an integer column with a missing value into
    # float64, and a 64-bit unit id (an int64 feature) would be rounded, merging units.
    frame = pd.DataFrame(rows, dtype=object)
    fixed = ["arm", "model", "version", "signature", "time_ms"]
    inputs = sorted(c for c in frame.columns if c.startswith("in."))
    outputs = sorted(c for c in frame.columns if c.startswith("out."))
    frame = frame[fixed + inputs + outputs]
    for column in inputs:
        frame[column] = _typed(frame[column])
    for column in outputs:  # scores: float64 (NaN where a record has no such output)
        frame[column] = frame[column].astype("float64")
    return frame.astype({"arm": str, "model": str, "signature": str, "version": "int64", "time_ms": "int64"})


def _typed(column):
    """A logged input column: nullable Int64 when it holds only integers, objects (each value exact) when it mixes
    integers with other values, else as pandas infers it (float64 or text)."""
    present = column[column.notna()]
    is_int = present.map(lambda v: isinstance(v, int))
    if len(present) and is_int.all():
        return column.astype("Int64")
    if is_int.any():
        return column
    return column.infer_objects()


def _rows_of(record: bytes, path: str) -> List[dict]:
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    try:
        entry = prediction_log_pb2.PredictionLog.FromString(record)
        extras = _extras_class().FromString(record)
    except DecodeError:
        log.warning("%s: a record is not a PredictionLog; skipped", path)
        return []
    spec = entry.log_metadata.model_spec
    # Records written by other tools (e.g. TF Serving) have no extras: second resolution, no arm.
    time_ms = extras.time_ms or entry.log_metadata.timestamp_secs * 1000
    kind = entry.WhichOneof("log_type")
    if kind == "predict_log":
        features, outputs = _predict_rows(entry.predict_log.request, entry.predict_log.response)
    elif kind in ("classify_log", "regress_log"):
        call = getattr(entry, kind)
        features = [_example_features(e) for e in _request_examples(call.request.input)]
        head = call.response.model_spec.signature_name or spec.signature_name
        # A record that names the head's own signature (ours: classify_<task> / regress_<task>, as TF Serving
        # echoes them) is that task's head.
        prefix = "classify_" if kind == "classify_log" else "regress_"
        head = head[len(prefix):] if head.startswith(prefix) and len(head) > len(prefix) else head
        if kind == "classify_log":
            scores = [{c.label: c.score for c in row.classes}.get("1", float("nan"))
                      for row in call.response.result.classifications]
        else:
            scores = [r.value for r in call.response.result.regressions]
        outputs = [{f"out.{head}": float(s)} for s in scores]
    else:
        return []
    base = {"arm": extras.split_arm, "model": spec.name, "version": spec.version.value,
            "signature": spec.signature_name, "time_ms": time_ms}
    count = max(len(features), len(outputs))
    return [{**base, **(features[i] if i < len(features) else {}), **(outputs[i] if i < len(outputs) else {})}
            for i in range(count)]


def _predict_rows(request, response) -> Tuple[List[dict], List[dict]]:
    from serving.tensors import to_numpy

    limit = 1 << 30
    inputs = {k: to_numpy(v, k, limit) for k, v in request.inputs.items()}
    if "examples" in inputs and inputs["examples"].dtype == object:
        features = [_example_features(e) for e in inputs["examples"].ravel()]
    else:
        features = _columns_to_rows({f"in.{k}": v for k, v in inputs.items()})
    outputs = _columns_to_rows({f"out.{k}": to_numpy(v, k, limit) for k, v in response.outputs.items()})
    return features, outputs


def _columns_to_rows(columns: Dict[str, object]) -> List[dict]:
    """Per-row scalars ([n] or [n, 1] arrays) as n dicts; other shapes are left out."""
    keep = {}
    for name, array in columns.items():
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim == 1:
            keep[name] = array
    count = max((len(a) for a in keep.values()), default=0)
    return [{name: _scalar(a[i]) for name, a in keep.items() if i < len(a)} for i in range(count)]


def _scalar(value):
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (np.integer, int)) and not isinstance(value, (bool, np.bool_)):
        return int(value)  # exactly: a 64-bit id must not be rounded through a float
    return float(value)


def _request_examples(request_input) -> list:
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        return list(request_input.example_list.examples)
    if kind == "example_list_with_context":
        context = request_input.example_list_with_context.context
        merged = []
        for e in request_input.example_list_with_context.examples:
            m = type(e)()
            m.CopyFrom(context)
            m.MergeFrom(e)
            merged.append(m)
        return merged
    return []


def _example_features(example) -> dict:
    """in.<feature> -> its first value (str or float) of one tf.Example (serialized or parsed)."""
    if isinstance(example, (bytes, bytearray)):
        from tensorflow.core.example import example_pb2

        example = example_pb2.Example.FromString(bytes(example))
    out = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = getattr(feature, kind).value if kind else []
        if len(values):
            out[f"in.{name}"] = _scalar(values[0])
    return out
