"""Loaded model versions (`Servable`) and the manager that loads, serves and retires them.

The manager polls each model's base path the way tensorflow_model_server
does: version directories are positive integers holding a saved_model.pb; the
version policy (latest N, all, specific) says which to serve.

Rules that keep requests from failing while versions come and go:

* a new version is loaded and warmed up before it becomes visible, and an
  old one is retired only after its replacement is available;
* a request holds a reference to the version it resolved, so retiring a
  version waits for its in-flight requests before stopping its batchers;
* a version that fails to load is recorded (GetModelStatus reports it), is
  skipped by the "latest" policy, and is not retried until its directory
  changes, so it never replaces a serving version.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import warnings
from concurrent.futures import Executor, Future
from typing import Dict, List, Optional, Tuple

import grpc
import numpy as np

from serving.batching import Batcher
from serving.config import BatchingParameters, ModelEntry, load_model_config
from serving.tensors import ServingError, invalid

log = logging.getLogger("mmoe.serving")

# tensorflow_serving.apis.get_model_status_pb2.ModelVersionStatus.State values.
START, LOADING, AVAILABLE, UNLOADING, END = 10, 20, 30, 40, 50
STATE_NAMES = {START: "START", LOADING: "LOADING", AVAILABLE: "AVAILABLE", UNLOADING: "UNLOADING", END: "END"}

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
EXPORT_INFO = os.path.join("assets.extra", "mmoe_export.json")


def set_tensorflow_threads(intra_op: int = 0, inter_op: int = 0) -> None:
    """Thread pools of the TensorFlow runtime (0 leaves TensorFlow's default, one thread per core).

    They can only be set before TensorFlow runs its first op, so the server sets them before loading a model.
    On a few cores, 1 can serve more small requests (a batch-1 op gains little from more threads, which compete
    with the event loop for the cores) and fewer large ones (XLA's batch-256 loops then run on one core).
    """
    import tensorflow as tf

    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError as err:
        raise RuntimeError(f"TensorFlow's thread pools must be set before it runs anything: {err}") from None


def tensorflow_threads() -> Tuple[int, int]:
    """(intra-op, inter-op) threads TensorFlow was configured with; 0 is its default."""
    import tensorflow as tf

    return (tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads())


def select_outputs(outputs: Dict[str, np.ndarray], output_filter: Optional[List[str]]) -> Dict[str, np.ndarray]:
    """The outputs `output_filter` names (all of them when it is empty), in its order."""
    return {k: outputs[k] for k in output_filter} if output_filter else outputs


def _first_line(message: str) -> str:
    """The part of a TensorFlow error message that names the problem.

    Graph errors read "Graph execution error:\n\nDetected at node ...\n<stack
    traces unavailable>\n<THE PROBLEM>\n\t [[{{node ...}}]] [Op:...]"; clients
    only need <THE PROBLEM>.
    """
    text = str(message).split("\n\t [[")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    noise = ("Graph execution error", "Detected at node", "<stack traces unavailable>")
    lines = [line for line in lines if not line.startswith(noise)] or lines
    text = " ".join(lines)
    text = text.replace("Name: <unknown>, ", "")
    return text[:2000]


class Signature:
    """One signature of a loaded SavedModel: its function and input/output specs.

    `call(inputs)` runs the signature on numpy inputs and returns numpy outputs.
    It calls the signature's graph function with its flat argument list, bound
    once here (input order, captured variables, which flat output is which
    name), instead of the signature wrapper's per-call work (keyword binding,
    structure checks and packing, distribution-context lookups): about a third
    of a batch-1 call.  The graph is the same function the wrapper runs; when
    TensorFlow's internals differ from what this expects, `call` falls back to
    the public wrapper (`fast_call` is then False).
    """

    def __init__(self, name: str, fn):
        self.name = name
        self.fn = fn
        _, kwargs = fn.structured_input_signature
        self.inputs = dict(kwargs)  # name -> tf.TensorSpec
        self.outputs = list(fn.structured_outputs)
        # Batchable when every input's first dimension is the (unknown) batch dimension.
        self.batchable = bool(self.inputs) and all(
            s.shape.rank is not None and s.shape.rank >= 1 and s.shape[0] is None for s in self.inputs.values())
        import tensorflow as tf

        self._constant = tf.constant
        self._dtypes = {k: spec.dtype for k, spec in self.inputs.items()}
        # What validate() checks, as plain Python values: TensorShape.is_compatible_with and dtype conversions
        # cost ~20 us per request, a tenth of the server's Python work for a batch-1 request.
        self._checks = {k: (np.dtype(object) if spec.dtype == tf.string else np.dtype(spec.dtype.as_numpy_dtype),
                            None if spec.shape.rank is None else tuple(spec.shape.as_list()))
                        for k, spec in self.inputs.items()}
        # Our exports' predict_raw reads NaN as a missing value; an infinite one has no meaning and would score
        # anyway, so its float inputs must be finite.
        from serving.export import PREDICT_RAW

        self._finite = {k for k, spec in self.inputs.items() if spec.dtype.is_floating} if name == PREDICT_RAW \
            else set()
        self._flat = self._bind_flat_call(fn)
        self.fast_call = self._flat is not None

    def _bind_flat_call(self, fn):
        """(graph function, input names in argument order, captured tensors, output names by flat position)."""
        try:
            atomic = fn._inference_function
            order = list(fn._arg_keywords)
            captured = list(fn.captured_inputs)
            # Which flat output is which name: TensorFlow's own packing of the flat outputs, applied to their
            # positions.
            count = len(atomic.function_type.flat_outputs)
            packed = atomic.function_type.pack_output(list(range(count)))
            names = [None] * count
            for name, position in packed.items():
                names[position] = name
            ok = (callable(getattr(atomic, "call_flat", None)) and sorted(order) == sorted(self.inputs)
                  and None not in names and sorted(names) == sorted(self.outputs)
                  and len(atomic.cached_definition.signature.input_arg) == len(order) + len(captured)
                  and not any(callable(c) for c in fn._captured_inputs))
        except (AttributeError, KeyError, TypeError, IndexError, ValueError):
            ok = False
        if not ok:
            log.warning("signature %s: calling it through the public wrapper (the flat call is unavailable in "
                        "this TensorFlow version)", self.name)
            return None
        return atomic, order, captured, names

    def call(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Runs the signature (inputs already validated); TensorFlow errors propagate."""
        constant, dtypes = self._constant, self._dtypes
        if self._flat is None:
            out = self.fn(**{k: constant(v, dtype=dtypes[k]) for k, v in inputs.items()})
            return {k: v.numpy() for k, v in out.items()}
        atomic, order, captured, names = self._flat
        args = [constant(inputs[k], dtype=dtypes[k]) for k in order]
        flat = atomic.call_flat(*args, *captured)
        return {name: value.numpy() for name, value in zip(names, flat)}

    def validate(self, inputs: Dict[str, np.ndarray], max_batch: int) -> int:
        """Checks names, dtypes and shapes; returns the batch size.  Raises ServingError."""
        missing = sorted(set(self.inputs) - set(inputs))
        if missing:
            raise invalid(f"signature {self.name!r}: missing input(s) {missing}")
        unknown = sorted(set(inputs) - set(self.inputs))
        if unknown:
            raise invalid(f"signature {self.name!r}: unknown input(s) {unknown}; it takes {sorted(self.inputs)}")
        sizes = set()
        for name, (dtype, dims) in self._checks.items():
            value = inputs[name]
            if value.dtype != dtype:
                got = "DT_STRING" if value.dtype == object else f"DT_{value.dtype.name.upper()}"
                raise invalid(f"signature {self.name!r}: input {name!r} must be "
                              f"DT_{self._dtypes[name].name.upper()}, got {got}")
            shape = value.shape
            if dims is not None and (len(shape) != len(dims) or
                                     any(d is not None and d != n for d, n in zip(dims, shape))):
                raise invalid(f"signature {self.name!r}: input {name!r} has shape {list(shape)}, "
                              f"expected {list(dims)} (None = any size)")
            if shape:
                sizes.add(shape[0])
            if name in self._finite and np.isinf(value).any():
                row = int(np.flatnonzero(np.isinf(np.ravel(value)))[0])
                raise invalid(f"signature {self.name!r}: input {name!r} holds an infinite value (row {row}); "
                              f"numbers must be finite (NaN: missing)")
        if len(sizes) > 1:
            raise invalid(f"signature {self.name!r}: inputs have different batch sizes {sorted(sizes)}")
        size = sizes.pop() if sizes else 1
        if size == 0:
            raise invalid(f"signature {self.name!r}: empty batch (0 examples)")
        if size > max_batch:
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"batch of {size} examples exceeds the server's limit of {max_batch} per request")
        return size


class Servable:
    """One loaded version of one model."""

    def __init__(self, name: str, version: int, path: str, batching: Optional[BatchingParameters],
                 max_batch: int):
        import tensorflow as tf
        from tensorflow.python.saved_model import loader_impl

        self.name, self.version, self.path = name, version, path
        self.max_batch = max_batch
        self._tf = tf
        # Parse first: a corrupt saved_model.pb then fails with a message that says so.
        with warnings.catch_warnings():
            # protobuf warns on a truncated file before the check below turns it into a clear error.
            warnings.simplefilter("ignore", RuntimeWarning)
            saved = loader_impl.parse_saved_model(path)
        if len(saved.meta_graphs) != 1:
            raise ValueError(f"{path}/saved_model.pb holds {len(saved.meta_graphs)} MetaGraphs, expected 1 "
                             f"(corrupt, or not written by tf.saved_model.save)")
        self.signature_defs = dict(saved.meta_graphs[0].signature_def)
        self._loaded = tf.saved_model.load(path)
        self.signatures = {k: Signature(k, fn) for k, fn in self._loaded.signatures.items()}
        if not self.signatures:
            raise ValueError(f"{path}: the SavedModel has no signatures")
        info_path = os.path.join(path, EXPORT_INFO)
        self.export_info = json.load(open(info_path)) if os.path.isfile(info_path) else {}
        self._batchers: Dict[str, Batcher] = {}
        if batching is not None:
            for key, sig in self.signatures.items():
                if sig.batchable:
                    self._batchers[key] = Batcher(lambda inputs, s=sig: self._call(s, inputs), batching,
                                                  name=f"{name}-v{version}-{key}")
        self._refs = 0
        self._retired = False
        self._lock = threading.Lock()

    # -- calls --------------------------------------------------------------------------------------

    def signature(self, key: str) -> Signature:
        key = key or "serving_default"
        sig = self.signatures.get(key)
        if sig is None:
            raise invalid(f"model {self.name!r} version {self.version} has no signature {key!r}; "
                          f"signatures: {sorted(self.signatures)}")
        return sig

    def _call(self, sig: Signature, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        tf = self._tf
        try:
            return sig.call(inputs)
        except tf.errors.InvalidArgumentError as err:
            raise invalid(_first_line(err.message)) from None
        except UnicodeDecodeError:
            # TensorFlow echoes the offending value in its message; binary junk then cannot even be
            # decoded into an error message.  In practice that value is a serialized input.
            what = ("a serialized tf.Example is malformed" if "examples" in sig.inputs
                    else "an input value is malformed")
            raise invalid(f"Could not parse example input: {what} (the error echoed non-UTF-8 bytes)") from None
        except (TypeError, ValueError) as err:
            raise invalid(_first_line(str(err))) from None
        except tf.errors.ResourceExhaustedError as err:
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, _first_line(err.message)) from None
        except tf.errors.OpError as err:
            raise ServingError(grpc.StatusCode.INTERNAL, _first_line(err.message)) from None

    def prepare(self, signature_key: str, inputs: Dict[str, np.ndarray],
                output_filter: Optional[List[str]] = None) -> Tuple[Signature, int]:
        """The signature a request names and its batch size, after checking inputs and output_filter."""
        sig = self.signature(signature_key)
        if output_filter:
            repeated = sorted({o for o in output_filter if list(output_filter).count(o) > 1})
            if repeated:  # as TF Serving: a repeated name is a malformed request, not one to tidy up
                raise invalid(f"output_filter repeats {repeated}")
            unknown = sorted(set(output_filter) - set(sig.outputs))
            if unknown:
                raise invalid(f"output_filter names unknown output(s) {unknown}; signature {sig.name!r} "
                              f"has {sorted(sig.outputs)}")
        return sig, sig.validate(inputs, self.max_batch)

    def submit(self, sig: Signature, inputs: Dict[str, np.ndarray], size: int, executor: Executor) -> Future:
        """Start a prepared call without blocking: queued on the signature's batcher when it has one and the
        request is smaller than a batch, else run on `executor`.  The future holds all outputs."""
        batcher = self._batchers.get(sig.name)
        if batcher is not None and size < batcher.max_batch_size:
            return batcher.submit(inputs, size)
        return executor.submit(self._call, sig, inputs)

    def run(self, signature_key: str, inputs: Dict[str, np.ndarray],
            output_filter: Optional[List[str]] = None) -> Tuple[Signature, Dict[str, np.ndarray]]:
        """Blocking call on this thread (or through the batcher): (signature, outputs after output_filter)."""
        sig, size = self.prepare(signature_key, inputs, output_filter)
        batcher = self._batchers.get(sig.name)
        outputs = batcher.run(inputs, size) if batcher is not None else self._call(sig, inputs)
        return sig, select_outputs(outputs, output_filter)

    def warmup(self) -> int:
        """Replays assets.extra/tf_serving_warmup_requests (TF Serving's format); returns how many ran."""
        path = os.path.join(self.path, WARMUP_FILE)
        if not os.path.isfile(path):
            return 0
        from tensorflow_serving.apis import prediction_log_pb2

        from serving.tensors import to_numpy

        count = 0
        first = None
        for record in self._tf.data.TFRecordDataset(path).take(100):
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            if entry.WhichOneof("log_type") != "predict_log":
                continue
            request = entry.predict_log.request
            inputs = {k: to_numpy(v, k, 1 << 24) for k, v in request.inputs.items()}
            sig = self.signature(request.model_spec.signature_name)
            self._call(sig, inputs)  # bypass batching: one call per warmup shape
            first = first or (sig, inputs)
            count += 1
        if first is not None and self._batchers and self.export_info.get("xla"):
            # Merged batches take any size up to max_batch_size; the XLA export pads them to powers of
            # two, so compile each of those buckets now rather than stall the first batch that hits one:
            # up to the power of two that max_batch_size itself pads to (1000 -> 1024).
            sig, inputs = first
            size, limit = 1, max(b.max_batch_size for b in self._batchers.values())
            while True:
                self._call(sig, {k: np.resize(v, (size,) + v.shape[1:]) for k, v in inputs.items()})
                count += 1
                if size >= limit:
                    break
                size *= 2
        return count

    # -- lifetime --------------------------------------------------------------------------------------

    def acquire(self) -> None:
        with self._lock:
            self._refs += 1

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            close = self._retired and self._refs == 0
        if close:
            self._close()

    def retire(self, wait: bool = False) -> None:
        """No new requests will reach this version; close it when the last in-flight one ends.

        wait: if none is in flight, stop the batch threads before returning (at server shutdown, so that no
        batch thread is left running while Python finalizes); otherwise they stop in the background.
        """
        with self._lock:
            self._retired = True
            close = self._refs == 0
        if close:
            self._close(wait)

    def _close(self, wait: bool = False) -> None:
        # Stopping a batcher drains its queue first; done off the request thread unless asked to wait.
        batchers, self._batchers = self._batchers, {}

        def stop_all():
            for b in batchers.values():
                b.stop()

        if wait:
            stop_all()
        elif batchers:
            threading.Thread(target=stop_all, daemon=True).start()


class VersionStatus:
    __slots__ = ("state", "error_code", "error_message", "mtime")

    def __init__(self, state: int, error_code: int = 0, error_message: str = "", mtime: float = 0.0):
        self.state, self.error_code, self.error_message, self.mtime = state, error_code, error_message, mtime


class _Model:
    def __init__(self, entry: ModelEntry):
        self.entry = entry
        self.servables: Dict[int, Servable] = {}
        self.status: Dict[int, VersionStatus] = {}
        self.base_path_error = ""
        self.warned_empty = False  # the "no version directory" warning was given (once until versions appear)


def versions_on_disk(base_path: str) -> Dict[int, float]:
    """version -> mtime of its saved_model.pb, for positive integer directories holding one."""
    out = {}
    try:
        names = os.listdir(base_path)
    except OSError:
        return out
    for name in names:
        if not name.isdigit() or int(name) <= 0:
            continue
        pb = os.path.join(base_path, name, "saved_model.pb")
        try:
            out[int(name)] = os.stat(pb).st_mtime
        except OSError:
            continue
    return out


class ModelManager:
    """Serves every configured model; `poll()` syncs loaded versions with what is on disk."""

    def __init__(self, entries: List[ModelEntry], *, batching: Optional[BatchingParameters] = None,
                 max_batch: int = 8192, poll_seconds: float = 1.0, config_path: Optional[str] = None):
        # Called after every poll (the server updates its health status from ready()).
        self.on_poll = None
        self._models: Dict[str, _Model] = {e.name: _Model(e) for e in entries}
        self._batching = batching
        self._max_batch = max_batch
        self._poll_seconds = poll_seconds
        self._config_path = config_path
        self._config_mtime = os.stat(config_path).st_mtime if config_path else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._poll_lock = threading.Lock()

    # -- requests ------------------------------------------------------------------------------------

    @property
    def model_names(self) -> List[str]:
        return sorted(self._models)

    @contextlib.contextmanager
    def use(self, name: str, version: Optional[int] = None, label: str = ""):
        """Resolve (name, version or label) to a Servable held for the duration of the block."""
        servable = self.resolve(name, version, label)
        try:
            yield servable
        finally:
            servable.release()

    def resolve(self, name: str, version: Optional[int] = None, label: str = "") -> Servable:
        """The servable for a request, already acquired (call release()).  Raises ServingError."""
        with self._lock:
            model = self._model(name)
            if version is not None and label:
                raise invalid("model_spec sets both version and version_label; set one")
            if label:
                target = self._labelled_version(model, name, label)
                servable = model.servables.get(target)
                if servable is None:
                    raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"version label {label!r} of model {name!r} points to version {target}, "
                                       f"which is not available ({self._describe(model, target)})")
            elif version is not None:
                servable = model.servables.get(version)
                if servable is None:
                    status = model.status.get(version)
                    if status is not None and status.error_message:
                        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"version {version} of model {name!r} failed to load: "
                                           f"{status.error_message}")
                    if status is not None and status.state == LOADING:
                        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"version {version} of model {name!r} is still loading")
                    raise ServingError(grpc.StatusCode.NOT_FOUND,
                                       f"model {name!r} has no version {version}; available versions: "
                                       f"{sorted(model.servables)}")
            else:
                if not model.servables:
                    detail = model.base_path_error or self._describe_all(model)
                    raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"model {name!r} has no available version ({detail})")
                servable = model.servables[max(model.servables)]
            servable.acquire()
            return servable

    def _model(self, name: str) -> _Model:
        """The configured model called `name` (caller holds the lock); NOT_FOUND otherwise."""
        model = self._models.get(name)
        if model is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not served; models: {self.model_names}")
        return model

    @staticmethod
    def _labelled_version(model: _Model, name: str, label: str) -> int:
        """The version a label points to; NOT_FOUND for an unknown label."""
        if label not in model.entry.labels:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version label {label!r}; "
                                                          f"labels: {sorted(model.entry.labels)}")
        return model.entry.labels[label]

    @staticmethod
    def _describe(model: _Model, version: int) -> str:
        status = model.status.get(version)
        if status is None:
            return "not found on disk"
        if status.error_message:
            return f"failed to load: {status.error_message}"
        return STATE_NAMES[status.state]

    def _describe_all(self, model: _Model) -> str:
        if not model.status:
            return f"no version directory under {model.entry.base_path}"
        return "; ".join(f"version {v}: {self._describe(model, v)}" for v in sorted(model.status))

    def statuses(self, name: str, version: Optional[int] = None, label: str = "") -> List[Tuple[int, VersionStatus]]:
        with self._lock:
            model = self._model(name)
            if label:
                version = self._labelled_version(model, name, label)
            items = sorted(model.status.items())
            if version is not None:
                items = [(v, s) for v, s in items if v == version]
                if not items:
                    raise ServingError(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {version}")
            return items

    def ready(self) -> bool:
        with self._lock:
            return all(m.servables for m in self._models.values())

    # -- polling ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self.poll()
        if self._poll_seconds <= 0:  # TF Serving's meaning of 0: the start-up poll is the only one
            return
        self._thread = threading.Thread(target=self._poll_loop, name="model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            servables = [s for m in self._models.values() for s in m.servables.values()]
            for m in self._models.values():
                m.servables = {}
        for s in servables:
            s.retire(wait=True)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.poll()
            except Exception:  # a poll must never kill the poller
                log.exception("model poll failed")

    def _reload_config(self) -> None:
        try:
            mtime = os.stat(self._config_path).st_mtime
        except OSError:
            return
        if mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            entries = load_model_config(self._config_path)
        except (ValueError, OSError) as err:
            log.error("keeping the previous model config: %s", err)
            return
        retired = []
        with self._lock:
            models = {}
            for e in entries:
                model = self._models.get(e.name) or _Model(e)
                model.entry = e
                models[e.name] = model
            for name, model in self._models.items():
                if name not in models:
                    retired.extend(model.servables.values())
            self._models = models
        for s in retired:
            s.retire()
        log.info("model config reloaded: %s", sorted(models))

    def poll(self) -> None:
        """One sync of every model with its base path (also called at start-up and by tests)."""
        with self._poll_lock:
            if self._config_path:
                self._reload_config()
            for model in list(self._models.values()):
                self._sync(model)
        if self.on_poll is not None:
            self.on_poll()

    def _sync(self, model: _Model) -> None:
        entry = model.entry
        if not os.path.isdir(entry.base_path):
            model.base_path_error = f"base path {entry.base_path} does not exist"
            log.warning("model %s: %s", entry.name, model.base_path_error)
            on_disk = {}
        else:
            model.base_path_error = ""
            on_disk = versions_on_disk(entry.base_path)
            if not on_disk and not model.warned_empty:
                # Said once per model (the poller comes back every second): the usual mistake is one level off.
                hint = ""
                if os.path.exists(os.path.join(entry.base_path, "saved_model.pb")):
                    hint = "; it holds saved_model.pb itself: pass its parent, whose numbered directories are versions"
                else:  # one level too high, e.g. the pipeline's --serving-dir, which holds <model_name>/<version>
                    models = sorted(d for d in os.listdir(entry.base_path)
                                    if versions_on_disk(os.path.join(entry.base_path, d)))
                    if models:
                        hint = (f"; its subdirector{'y' if len(models) == 1 else 'ies'} {', '.join(models)} "
                                f"hold{'s' if len(models) == 1 else ''} versions: pass "
                                f"{os.path.join(entry.base_path, models[0])}")
                log.warning("model %s: no numbered version directory under %s yet%s", entry.name, entry.base_path,
                            hint)
            model.warned_empty = not on_disk
        # Failed versions stay failed until their saved_model.pb changes.
        failed = {v for v, s in model.status.items()
                  if s.error_message and v in on_disk and on_disk[v] == s.mtime}
        wanted = entry.policy.select([v for v in on_disk if v not in failed])
        for v in sorted(set(wanted) - set(model.servables), reverse=True):
            self._load(model, v, on_disk[v])
        # Versions that just failed drop out, so the policy falls back to the next ones already serving.
        failed = {v for v, s in model.status.items()
                  if s.error_message and v in on_disk and on_disk[v] == s.mtime}
        wanted = entry.policy.select([v for v in on_disk if v not in failed])
        with self._lock:
            # Only after the new versions are available: retire what the policy no longer wants.
            keep = set(wanted) & set(model.servables)
            if not keep and model.servables and on_disk:
                keep = {max(model.servables)} if max(model.servables) in on_disk else set()
            gone = {v: s for v, s in model.servables.items() if v not in keep}
            model.servables = {v: s for v, s in model.servables.items() if v in keep}
            for v in gone:
                model.status[v] = VersionStatus(END)
            for v in list(model.status):
                if v not in on_disk and v not in model.servables and model.status[v].state != END:
                    model.status[v] = VersionStatus(END)
        for v, s in gone.items():
            log.info("model %s: unloading version %d", entry.name, v)
            s.retire()

    def _load(self, model: _Model, version: int, mtime: float) -> None:
        name = model.entry.name
        path = os.path.join(model.entry.base_path, str(version))
        with self._lock:
            model.status[version] = VersionStatus(LOADING, mtime=mtime)
        started = time.time()
        servable = None
        try:
            servable = Servable(name, version, path, self._batching, self._max_batch)
            warmed = servable.warmup()
        except Exception as err:  # any load failure is reported, never raised into the poller
            if servable is not None:
                servable.retire()  # stops its batch threads
            message = _first_line(f"{type(err).__name__}: {err}")
            log.error("model %s: version %d failed to load: %s", name, version, message)
            with self._lock:
                model.status[version] = VersionStatus(END, error_code=2, error_message=message, mtime=mtime)
            return
        with self._lock:
            if self._models.get(name) is not model:  # removed from the config while loading
                servable.retire()
                return
            model.servables[version] = servable
            model.status[version] = VersionStatus(AVAILABLE, mtime=mtime)
        log.info("model %s: version %d available (%.1fs, %d warmup requests)", name, version,
                 time.time() - started, warmed)
