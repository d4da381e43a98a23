"""A gRPC model server speaking TF Serving's protocol.

Implements `tensorflow.serving.PredictionService` (Predict, Classify,
Regress, GetModelMetadata) and `tensorflow.serving.ModelService`
(GetModelStatus) with the protos and servicer bases from
tensorflow-serving-api, so TF Serving's own `PredictionServiceStub` works
unchanged, plus the standard `grpc.health.v1.Health` service.

The server is `grpc.aio`: handlers are coroutines on one event loop, and a
model call is awaited (a future completed by a batch thread, or by the model
thread pool), so a waiting request costs no thread.

Every handler turns problems into a gRPC status with a message naming the
problem (see `serving.tensors.ServingError`); an unexpected exception becomes
INTERNAL and is logged, never a crash.

Classify and Regress pick a task head with `model_spec.signature_name`:
empty or `serving_default` means the first binary head (Classify) or the
first head (Regress); otherwise it names the task (e.g. `marital`).  A binary
head classifies into classes "0" and "1" with scores 1-p and p.

With a traffic split (`serving.ab.split`), Predict, Classify and Regress
for the split model go to the arm of the request's unit unless the request
pins a version or label; the response's `model_spec.version` is the served
version and its trailing metadata `mmoe-split-arm` names the arm.  With a
`PredictionLogger` (`serving.ab.prediction_log`) sampled calls are logged
off the request path.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from concurrent import futures
from typing import Optional

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
                                     regression_pb2)

from serving.ab.split import ARM_METADATA
from serving.models import ModelManager, Servable, select_outputs
from serving.tensors import ServingError, invalid, to_numpy, to_proto

log = logging.getLogger("mmoe.serving")

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_RPCS = 1024
# Caps the values one request may hold before anything is allocated (see tensors.to_numpy).
MAX_VALUES_PER_INPUT = 1 << 24


def _spec_version(model_spec):
    return model_spec.version.value if model_spec.HasField("version") else None


def _fill_spec(out_spec, servable: Servable, signature_name: Optional[str]):
    out_spec.name = servable.name
    out_spec.version.value = servable.version
    if signature_name is not None:
        out_spec.signature_name = signature_name


def _handle(fn):
    """Runs an async handler; ServingError -> its status, anything else -> INTERNAL (logged)."""
    async def wrapper(self, request, context):
        try:
            return await fn(self, request, context)
        except ServingError as err:
            await context.abort(err.code, err.message)
        except Exception as err:  # the server must survive any request
            log.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Handlers are coroutines on the server's event loop: decoding, routing and encoding run there, and a
    model call is awaited, never waited for by a thread (see `_run`)."""

    def __init__(self, manager: ModelManager, executor: futures.Executor, split=None, prediction_logger=None):
        self.manager = manager
        self.executor = executor  # runs model calls that do not go through a batcher
        self.split = split                          # serving.ab.split.TrafficSplit or None
        self.prediction_logger = prediction_logger  # serving.ab.prediction_log.PredictionLogger or None

    def _resolve(self, model_spec, route=None):
        if not model_spec.name:
            raise invalid("model_spec.name is empty; models: " + ", ".join(self.manager.model_names))
        if route is not None:
            return self.manager.use(model_spec.name, route.version, route.label)
        return self.manager.use(model_spec.name, _spec_version(model_spec), model_spec.version_label)

    def _route(self, model_spec, inputs, context):
        """The split's Route for this request (None without a split)."""
        if self.split is None or not model_spec.name:
            return None
        return self.split.route(model_spec, inputs, context.invocation_metadata() or ())

    async def _run(self, servable: Servable, signature_key: str, inputs, output_filter=None):
        """(signature, outputs) of one call, awaited: queued on the batcher, or run on the executor.

        Awaiting keeps the event loop free while the model runs, so one loop thread serves every client; a
        synchronous handler would hold a thread per waiting request, and with 32 clients the thread switches
        alone capped requests/s (see BENCHMARKS.md, Serving)."""
        sig, size = servable.prepare(signature_key, inputs, output_filter)
        outputs = await asyncio.wrap_future(servable.submit(sig, inputs, size, self.executor))
        return sig, select_outputs(outputs, output_filter)

    def _finish(self, kind: str, request, response, route, started: float, context, head: str = "") -> None:
        """Name the arm in the trailing metadata and log the call (sampled, never blocking); `head`: the task
        head a Classify / Regress call scored (see PredictionLogger.log)."""
        arm = route.arm if route is not None else ""
        if arm:
            context.set_trailing_metadata(((ARM_METADATA, arm),))
        if self.prediction_logger is not None:
            self.prediction_logger.log(kind, request, response, arm, started, head=head)

    @_handle
    async def Predict(self, request, context):
        """Runs a signature (default serving_default) on the request's named input tensors."""
        started = time.time()
        inputs = {}
        for name, proto in request.inputs.items():
            inputs[name] = to_numpy(proto, name, MAX_VALUES_PER_INPUT)
        if not inputs:
            raise invalid("the request has no inputs")
        route = self._route(request.model_spec, inputs, context)
        with self._resolve(request.model_spec, route) as servable:
            if self.split is not None:
                inputs = self.split.model_inputs(request.model_spec.name, inputs,
                                                 servable.signature(request.model_spec.signature_name).inputs)
            sig, outputs = await self._run(servable, request.model_spec.signature_name, inputs,
                                           list(request.output_filter))
            response = predict_pb2.PredictResponse()
            _fill_spec(response.model_spec, servable, sig.name)
        for name, value in outputs.items():
            to_proto(value, response.outputs[name])
        self._finish("predict", request, response, route, started, context)
        return response

    def _examples(self, request_input) -> np.ndarray:
        kind = request_input.WhichOneof("kind")
        if kind == "example_list":
            examples = [e.SerializeToString() for e in request_input.example_list.examples]
        elif kind == "example_list_with_context":
            context_example = request_input.example_list_with_context.context
            examples = []
            for e in request_input.example_list_with_context.examples:
                merged = type(e)()
                merged.CopyFrom(context_example)
                merged.MergeFrom(e)  # the example's own features win over the context's
                examples.append(merged.SerializeToString())
        else:
            raise invalid("the request's input holds no example_list or example_list_with_context")
        if not examples:
            raise invalid("empty batch: the request holds no examples")
        return np.array(examples, dtype=object)

    def _head(self, servable: Servable, signature_name: str, kind: Optional[str]) -> str:
        kinds = servable.export_info.get("task_kinds")
        if not kinds:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model {servable.name!r} version {servable.version} has no task heads recorded "
                               f"(not exported by serving.export); use Predict")
        if signature_name in ("", "serving_default"):
            for task, task_kind in kinds.items():
                if kind is None or task_kind == kind:
                    return task
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model {servable.name!r} has no {kind} head; heads: {kinds}")
        # The export's TF Serving signatures (classify_<task>, regress_<task>) name the same heads.
        prefix = "classify_" if kind == "binary" else "regress_"
        if signature_name not in kinds and signature_name.startswith(prefix) and signature_name[len(prefix):] in kinds:
            signature_name = signature_name[len(prefix):]
        if signature_name not in kinds:
            raise invalid(f"signature_name {signature_name!r} names no task head of model {servable.name!r}; "
                          f"heads: {sorted(kinds)}")
        if kind is not None and kinds[signature_name] != kind:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"head {signature_name!r} is a {kinds[signature_name]} head, not {kind}; "
                               f"use Regress" if kind == "binary" else "use Classify")
        return signature_name

    @_handle
    async def Classify(self, request, context):
        """Scores tf.Examples with one binary head: classes "0" and "1"."""
        started = time.time()
        examples = self._examples(request.input)
        route = self._route(request.model_spec, {"examples": examples}, context)
        with self._resolve(request.model_spec, route) as servable:
            head = self._head(servable, request.model_spec.signature_name, "binary")
            _, outputs = await self._run(servable, "serving_default", {"examples": examples}, [head])
            response = classification_pb2.ClassificationResponse()
            # The name asked for, echoed as TF Serving does ("serving_default" when none).
            _fill_spec(response.model_spec, servable, request.model_spec.signature_name or "serving_default")
        for p in outputs[head].astype(float):
            result = response.result.classifications.add()
            result.classes.add(label="0", score=1.0 - p)
            result.classes.add(label="1", score=p)
        self._finish("classify", request, response, route, started, context, head=head)
        return response

    @_handle
    async def Regress(self, request, context):
        """Scores tf.Examples with one head (the probability for a binary head)."""
        started = time.time()
        examples = self._examples(request.input)
        route = self._route(request.model_spec, {"examples": examples}, context)
        with self._resolve(request.model_spec, route) as servable:
            head = self._head(servable, request.model_spec.signature_name, None)
            _, outputs = await self._run(servable, "serving_default", {"examples": examples}, [head])
            response = regression_pb2.RegressionResponse()
            _fill_spec(response.model_spec, servable, request.model_spec.signature_name or "serving_default")
        for value in outputs[head].astype(float):
            response.result.regressions.add(value=value)
        self._finish("regress", request, response, route, started, context, head=head)
        return response

    @_handle
    async def GetModelMetadata(self, request, context):
        """Signature defs of one version (metadata_field must be ["signature_def"], as in TF Serving)."""
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            raise invalid(f"metadata_field must be ['signature_def'], got {fields}")
        with self._resolve(request.model_spec) as servable:
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            _fill_spec(response.model_spec, servable, None)
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for key, sig_def in servable.signature_defs.items():
                sig_map.signature_def[key].CopyFrom(sig_def)
        response.metadata["signature_def"].Pack(sig_map)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    @_handle
    async def GetModelStatus(self, request, context):
        """State of every version of a model (or of one version/label), with load errors."""
        spec = request.model_spec
        if not spec.name:
            raise invalid("model_spec.name is empty")
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, status in self.manager.statuses(spec.name, _spec_version(spec), spec.version_label):
            entry = response.model_version_status.add(version=version, state=status.state)
            entry.status.error_code = status.error_code
            entry.status.error_message = status.error_message
        return response

    @_handle
    async def HandleReloadConfigRequest(self, request, context):
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                           "reload the config by editing --model-config-file; the server polls it")


class Server:
    """The gRPC server (`grpc.aio`), its model manager and its health service.

    The server runs on an asyncio event loop in a thread of its own, so the
    API stays synchronous: `start()` loads the models (first poll) and starts
    serving; `stop(grace)` refuses new RPCs, lets in-flight ones finish within
    `grace` seconds, then stops polling and batching and closes the prediction
    log; `wait()` blocks until then.  Model calls that do not go through a
    batcher run on a pool of `max_workers` threads.  Beyond
    `max_concurrent_rpcs` RPCs in flight, new ones get RESOURCE_EXHAUSTED
    (waiting requests cost no thread, so this bounds memory, not threads).
    `split` (a checked `TrafficSplit`) and `prediction_logger` are optional.
    """

    def __init__(self, manager: ModelManager, *, host: str = "127.0.0.1", port: int = 8500,
                 certificate: Optional[bytes] = None, private_key: Optional[bytes] = None,
                 max_workers: int = 16, max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, split=None, prediction_logger=None):
        if (certificate is None) != (private_key is None):
            raise ValueError("TLS needs both a certificate and a private key")
        if max_workers < 1 or max_concurrent_rpcs < 1:
            raise ValueError(f"max_workers and max_concurrent_rpcs must be >= 1, got {max_workers} and "
                             f"{max_concurrent_rpcs}")
        self.manager = manager
        self.prediction_logger = prediction_logger
        self.host = host
        self._executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="model")
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._loop_thread.start()
        self._stopped = threading.Event()
        self._done = threading.Event()
        services = PredictionService(manager, self._executor, split=split, prediction_logger=prediction_logger)
        try:
            self.port = self._on_loop(self._bind(services, f"{host}:{port}", certificate, private_key,
                                                 max_message_bytes, max_concurrent_rpcs))
        except BaseException:
            self._close_loop()
            raise

    async def _bind(self, services, address, certificate, private_key, max_message_bytes, max_rpcs) -> int:
        # Created on the loop's own thread: grpc.aio binds the server to the running loop.
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self._server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_rpcs)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(services, self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(self.manager), self._server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        try:
            if certificate is not None:
                creds = grpc.ssl_server_credentials([(private_key, certificate)])
                bound = self._server.add_secure_port(address, creds)
            else:
                bound = self._server.add_insecure_port(address)
        except RuntimeError as err:  # grpc.aio raises where the synchronous server returned 0
            raise OSError(f"cannot bind {address}: {err}") from None
        if bound == 0:
            raise OSError(f"cannot bind {address}")
        return bound

    def _on_loop(self, coroutine, timeout: Optional[float] = None):
        """Run a coroutine on the server's loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _set_health_async(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
            await self.health.set(service, status)

    def _set_health(self, serving: bool) -> None:
        if not self._loop.is_closed():
            self._on_loop(self._set_health_async(serving), timeout=30)

    def start(self) -> "Server":
        self._set_health(False)
        self._on_loop(self._server.start())
        # SERVING once every configured model has an available version, NOT_SERVING while one has none.
        self.manager.on_poll = lambda: None if self._stopped.is_set() else self._set_health(self.manager.ready())
        self.manager.start()
        return self

    def stop(self, grace: float = 10.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_health(False)
        # stop() refuses new RPCs at once and waits for in-flight ones up to `grace`, then cancels them.
        self._on_loop(self._release_server(grace))
        self.manager.stop()
        self._executor.shutdown(wait=True)
        if self.prediction_logger is not None:
            self.prediction_logger.close()
        self._close_loop()
        self._done.set()

    async def _release_server(self, grace: float) -> None:
        await self._server.stop(grace)
        # grpc.aio stops its completion-queue poller thread only when its last server (or channel) object is
        # freed. Left to interpreter exit, that daemon thread can take the GIL while Python finalizes, which
        # aborts the process ("FATAL: exception not rethrown", exit -6) after a clean drain.
        self._server = None
        gc.collect()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(30)
        self._loop.close()

    def wait(self) -> None:
        """Blocks until stop() has drained the requests and stopped the model manager."""
        self._done.wait()

    def install_signal_handlers(self, grace: float = 10.0) -> None:
        """SIGTERM / SIGINT: drain in-flight requests, then return from wait()."""
        def handler(signum, frame):
            log.info("signal %d: draining in-flight requests (up to %.0fs)", signum, grace)
            threading.Thread(target=self.stop, args=(grace,), daemon=True).start()
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
