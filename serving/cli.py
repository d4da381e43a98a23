"""`mmoe serve` and `mmoe predict` (registered by pipelines/cli.py through add_commands)."""
from __future__ import annotations

import logging
import os
import sys
import warnings

# Requests `mmoe predict --unit-column` keeps in flight (one unit each).
PREDICT_CONCURRENCY = 8


def add_commands(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve exported models over gRPC (TF Serving's protocol)",
        description="Serve SavedModels written by serving.export (or any TF2 SavedModel) over gRPC with TF "
                    "Serving's PredictionService, ModelService and grpc.health.v1. Polls the base path(s): new "
                    "versions load, removed ones unload.")
    source = serve.add_argument_group("models (either --model-base-path and --model-name, or --model-config-file)")
    source.add_argument("--model-base-path", metavar="DIR", help="directory holding numbered version directories")
    source.add_argument("--model-name", metavar="NAME", help="name clients use in model_spec.name")
    source.add_argument("--model-config-file", metavar="FILE",
                        help="TF Serving ModelServerConfig in text format (several models, version policies, "
                             "labels); re-read when it changes")
    serve.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500; 0 picks a free one)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to bind (default 127.0.0.1, this machine only; 0.0.0.0 for all)")
    serve.add_argument("--enable-batching", action="store_true", help="server-side batching with default parameters")
    serve.add_argument("--batching-parameters-file", metavar="FILE",
                       help="TF Serving BatchingParameters text file (implies --enable-batching)")
    serve.add_argument("--file-system-poll-wait-seconds", type=float, default=1.0,
                       help="seconds between looks at the base paths for new or removed versions (and at "
                            "--model-config-file); 0: look once, at start-up (as TF Serving)")
    serve.add_argument("--max-request-batch", type=int, default=8192,
                       help="largest batch one request may carry (bigger: RESOURCE_EXHAUSTED)")
    serve.add_argument("--ssl-cert", metavar="PEM", help="server certificate (with --ssl-key: TLS)")
    serve.add_argument("--ssl-key", metavar="PEM", help="server private key")
    serve.add_argument("--grpc-threads", type=int, default=16,
                       help="threads that run model calls which do not go through a batcher (default 16; requests "
                            "themselves are served by one asyncio event loop)")
    serve.add_argument("--tensorflow-intra-op-parallelism", type=int, default=0, metavar="N",
                       help="threads one TensorFlow op may use (TF Serving's --tensorflow_intra_op_parallelism); "
                            "0: TensorFlow's choice, one per core (see serving/README.md for when 1 helps)")
    serve.add_argument("--tensorflow-inter-op-parallelism", type=int, default=0, metavar="N",
                       help="TensorFlow ops run at once (TF Serving's --tensorflow_inter_op_parallelism); 0: "
                            "TensorFlow's choice")
    serve.add_argument("--max-concurrent-rpcs", type=int, default=1024,
                       help="RPCs in flight at once; more get RESOURCE_EXHAUSTED")
    serve.add_argument("--drain-seconds", type=float, default=10.0,
                       help="on SIGTERM, how long in-flight requests may take to finish")
    ab = serve.add_argument_group("A/B traffic split and prediction logging (serving/README.md)")
    ab.add_argument("--split-config", metavar="FILE",
                    help="JSON traffic split: model, key feature, salt, arms (name, version or label, fraction)")
    ab.add_argument("--prediction-log-dir", metavar="DIR",
                    help="log sampled Predict/Classify/Regress calls as TF Serving PredictionLog TFRecords here")
    ab.add_argument("--prediction-log-sampling-rate", type=float, default=1.0, metavar="R",
                    help="fraction of calls logged (default 1.0)")
    ab.add_argument("--prediction-log-max-file-bytes", type=int, default=64 << 20, metavar="N",
                    help="start a new log file once one reaches N bytes (default 64 MiB)")
    ab.add_argument("--prediction-log-queue-size", type=int, default=1024, metavar="N",
                    help="calls waiting for the log writer; beyond that they are dropped and counted")
    serve.set_defaults(func=cmd_serve)

    predict = subparsers.add_parser(
        "predict", help="score CSV rows against a running server",
        description="Send the rows of a CSV (header naming the raw features) to the predict_raw signature and "
                    "print one score per task and row.")
    predict.add_argument("--server", required=True, metavar="HOST:PORT")
    predict.add_argument("--model", required=True, metavar="NAME")
    pin = predict.add_mutually_exclusive_group()
    pin.add_argument("--version", type=int)
    pin.add_argument("--label")
    predict.add_argument("--csv", required=True, metavar="ROWS.csv")
    predict.add_argument("--ca-cert", metavar="PEM", help="trust this certificate (TLS)")
    predict.add_argument("--server-name", help="TLS name to check in the server certificate")
    predict.add_argument("--timeout", type=float, default=30.0, help="seconds each request may take")
    predict.add_argument("--batch-size", type=int, default=4096,
                         help="rows per request (at most the server's --max-request-batch)")
    split = predict.add_argument_group(
        "through a traffic split (serving/README.md): one request per unit, printing the arm and version that "
        "served each row")
    split.add_argument("--unit-column", metavar="COLUMN",
                       help="the CSV column naming each row's unit (the split's key, e.g. user_id)")
    split.add_argument("--unit-in", choices=("feature", "metadata"), default="feature",
                       help="send the unit as input COLUMN (a split whose key is COLUMN; default) or as gRPC "
                            "metadata mmoe-split-key (a split whose key is \"\")")
    split.add_argument("--concurrency", type=int, default=PREDICT_CONCURRENCY, metavar="N",
                       help=f"requests in flight at once with --unit-column (default {PREDICT_CONCURRENCY})")
    predict.set_defaults(func=cmd_predict)

    export = subparsers.add_parser(
        "export", help="export an `mmoe train` run as a servable version (TF Serving's layout)",
        description="Write the run's model with its tf.Transform graph as one SavedModel under "
                    "BASE_PATH/VERSION (serving/README.md, Export), which `mmoe serve --model-base-path BASE_PATH` "
                    "(or tensorflow_model_server) then loads.")
    export.add_argument("run", metavar="RUN_DIR", help="an `mmoe train --out` directory")
    export.add_argument("--base-path", required=True, metavar="DIR", help="the model's directory of versions")
    export.add_argument("--version", type=int, help="version number (default: one past the newest in DIR)")
    export.add_argument("--no-xla", action="store_true",
                        help="plain TensorFlow expert dispatch (TF Serving GPU builds, tensorflow/serving#2214)")
    export.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter says nothing to this user
    print(f"exporting {args.run} (model, tf.Transform graph{'' if args.no_xla else ', XLA expert dispatch'}) ...",
          file=sys.stderr, flush=True)
    export_dir = export_run(args.run, args.base_path, version=args.version, xla=not args.no_xla)
    base = os.path.dirname(os.path.abspath(export_dir))
    print(f"wrote {export_dir}\nserve it with: mmoe serve --model-base-path {base} "
          f"--model-name {os.path.basename(os.path.normpath(base)) or 'NAME'}")
    return 0


def export_run(run_dir: str, base_path: str, version=None, xla: bool = True) -> str:
    """An `mmoe train` run (model.keras, transform/, run_config.json) as BASE_PATH/VERSION; returns that path."""
    from serving.models import versions_on_disk

    if os.path.isfile(os.path.join(base_path, "saved_model.pb")):
        raise ValueError(f"--base-path {base_path} is itself a version (it holds saved_model.pb); give the model's "
                         f"directory of versions, {os.path.dirname(os.path.normpath(base_path)) or '..'}")
    if version is None:
        version = max(versions_on_disk(base_path), default=0) + 1
    if version < 1:
        raise ValueError(f"--version must be >= 1, got {version}")
    export_dir = os.path.join(base_path, str(version))
    if os.path.exists(export_dir):
        raise FileExistsError(f"{export_dir} exists: versions are immutable once served; give another --version")

    from serving.export import export_serving_model, load_run

    spec, model, transform = load_run(run_dir)
    return export_serving_model(model, transform, spec, export_dir, xla=xla, with_gates=True)


def _read(path: str, what: str) -> bytes:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    with open(path, "rb") as fh:
        return fh.read()


def build_server(args):
    """The Server an `mmoe serve` command line describes (not started)."""
    from serving.config import BatchingParameters, ModelEntry, load_batching_parameters, load_model_config
    from serving.models import ModelManager, set_tensorflow_threads
    from serving.server import Server

    if args.model_config_file:
        if args.model_base_path or args.model_name:
            raise ValueError("give --model-config-file or --model-base-path/--model-name, not both")
        entries = load_model_config(args.model_config_file)
    else:
        if not (args.model_base_path and args.model_name):
            raise ValueError("--model-base-path and --model-name are required (or --model-config-file)")
        if not os.path.isdir(args.model_base_path):
            raise FileNotFoundError(f"--model-base-path {args.model_base_path}: no such directory")
        entries = [ModelEntry(args.model_name, os.path.abspath(args.model_base_path))]
    batching = load_batching_parameters(args.batching_parameters_file)
    if batching is None and args.enable_batching:
        batching = BatchingParameters()
    least = {"max_request_batch": 1, "grpc_threads": 1, "max_concurrent_rpcs": 1,
             "tensorflow_intra_op_parallelism": 0, "tensorflow_inter_op_parallelism": 0}
    for flag, low in least.items():
        if getattr(args, flag) < low:
            meaning = " (0: TensorFlow's choice)" if low == 0 else ""
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {low}{meaning}, got {getattr(args, flag)}")
    if not 0 <= args.file_system_poll_wait_seconds < float("inf"):
        raise ValueError(f"--file-system-poll-wait-seconds must be >= 0 (0: poll once at start-up), got "
                         f"{args.file_system_poll_wait_seconds}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    cert = key = None
    if args.ssl_cert or args.ssl_key:
        if not (args.ssl_cert and args.ssl_key):
            raise ValueError("TLS needs both --ssl-cert and --ssl-key")
        cert, key = _read(args.ssl_cert, "--ssl-cert"), _read(args.ssl_key, "--ssl-key")
        _check_key_pair(args.ssl_cert, args.ssl_key)
    split, prediction_logger = _ab_options(args, entries)
    set_tensorflow_threads(args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism)
    manager = ModelManager(entries, batching=batching, max_batch=args.max_request_batch,
                           poll_seconds=args.file_system_poll_wait_seconds, config_path=args.model_config_file)
    return Server(manager, host=args.host, port=args.port, certificate=cert, private_key=key,
                  max_workers=args.grpc_threads, max_concurrent_rpcs=args.max_concurrent_rpcs, split=split,
                  prediction_logger=prediction_logger)


def _check_key_pair(cert_path: str, key_path: str) -> None:
    """Fails unless the files are a PEM certificate and its unencrypted private key: gRPC would report a bad pair
    only as a failure to bind the port."""
    import ssl

    def no_password():
        raise ValueError("the key is encrypted; gRPC needs it unencrypted")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=no_password)
    except (ssl.SSLError, ValueError) as err:
        raise ValueError(f"--ssl-cert {cert_path} / --ssl-key {key_path}: not a PEM certificate and its private key "
                         f"({err})") from None


def _ab_options(args, entries):
    """The checked traffic split and the prediction logger the flags ask for (each may be None)."""
    from serving.ab.prediction_log import PredictionLogger
    from serving.ab.split import REQUEST_KEY_METADATA, check_split_against_models, load_split_config

    split = None
    if args.split_config:
        split = load_split_config(args.split_config)
        check_split_against_models(split, entries)
    if not 0.0 <= args.prediction_log_sampling_rate <= 1.0:
        raise ValueError(f"--prediction-log-sampling-rate must be in [0, 1], got {args.prediction_log_sampling_rate}")
    if args.prediction_log_max_file_bytes < 1:
        raise ValueError(f"--prediction-log-max-file-bytes must be >= 1, got {args.prediction_log_max_file_bytes}")
    if args.prediction_log_queue_size < 1:
        raise ValueError(f"--prediction-log-queue-size must be >= 1, got {args.prediction_log_queue_size}")
    logger = None
    if args.prediction_log_dir:
        logger = PredictionLogger(args.prediction_log_dir, sampling_rate=args.prediction_log_sampling_rate,
                                  max_file_bytes=args.prediction_log_max_file_bytes,
                                  queue_size=args.prediction_log_queue_size,
                                  split=split.to_dict() if split is not None else None)
    log = logging.getLogger("mmoe.serving")
    if split is not None:
        log.info("traffic split on model %s by %s (salt %r): %s", split.model, split.key or REQUEST_KEY_METADATA,
                 split.salt, ", ".join(f"{a.name}={a.fraction:g} -> " + (f"version {a.version}" if a.version
                                       else f"label {a.label}") for a in split.arms))
    if logger is not None:
        log.info("logging %g%% of calls to %s", 100 * logger.sampling_rate, logger.log_dir)
    return split, logger


def cmd_serve(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(args)
    server.install_signal_handlers(args.drain_seconds)
    server.start()
    for name in server.manager.model_names:
        for version, status in server.manager.statuses(name):
            print(f"model {name} version {version}: "
                  f"{'AVAILABLE' if status.state == 30 else 'FAILED: ' + status.error_message}", flush=True)
    from serving.models import tensorflow_threads
    intra, inter = tensorflow_threads()
    print(f"TensorFlow threads: intra-op {intra or 'auto'}, inter-op {inter or 'auto'}", flush=True)
    print(f"serving on {server.host}:{server.port} ({'TLS' if args.ssl_cert else 'plaintext'})", flush=True)
    server.wait()
    print("server stopped", flush=True)
    return 0


def cmd_predict(args) -> int:
    if not 0 < args.timeout < float("inf"):
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.server_name and not args.ca_cert:
        raise ValueError("--server-name is the name to check in the server's certificate: it needs --ca-cert (TLS)")
    if args.unit_column is None and (args.unit_in != "feature" or args.concurrency != PREDICT_CONCURRENCY):
        raise ValueError("--unit-in and --concurrency go with --unit-column")
    if args.unit_column is not None:
        if args.version is not None or args.label:
            raise ValueError("--unit-column sends rows through the traffic split; --version / --label pin a version "
                             "and bypass it: give one or the other")
        if args.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    if not os.path.isfile(args.csv):  # before the ~8 s of importing TensorFlow's protos and asking the server
        raise FileNotFoundError(f"--csv {args.csv}: no such file")
    root = _read(args.ca_cert, "--ca-cert") if args.ca_cert else None
    # The client only imports TensorFlow's protos, and runs no TensorFlow op: its start-up chatter (CUDA plugin
    # registration errors on a CPU machine, google.api_core's Python-version warning) says nothing to this user.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", message="You are using a non-supported Python version", category=FutureWarning)
    import grpc

    from serving.client import ModelClient, format_scores

    served = None
    try:
        with ModelClient(args.server, root_certificates=root, server_name=args.server_name,
                         timeout=args.timeout) as client:
            if args.unit_column is None:
                scores = client.predict_csv(args.model, args.csv, version=args.version, label=args.label,
                                            batch_size=args.batch_size)
            else:
                scores, served = client.predict_csv_by_unit(
                    args.model, args.csv, args.unit_column, unit_in=args.unit_in, batch_size=args.batch_size,
                    concurrency=args.concurrency, progress=_request_progress())
    except grpc.RpcError as err:
        hint = ""
        if "is split by" in (err.details() or "") and args.unit_column is None:
            hint = ("\n(mmoe predict: give --unit-column COLUMN to send each unit through the split, or pin "
                    "--version / --label)")
        print(f"error: {err.code().name}: {err.details()}{hint}", file=sys.stderr)
        return 1
    print(format_scores(scores, served=served))
    if served is not None:
        arms = {arm: int((served["arm"] == arm).sum()) for arm in sorted(set(served["arm"]))}
        if arms.keys() == {""}:
            print(f"note: model {args.model!r} is not split on this server: every row was served by version(s) "
                  f"{sorted(set(served['version'].tolist()))}", file=sys.stderr)
        else:
            print("rows per arm: " + ", ".join(f"{arm or '(pinned)'} {n}" for arm, n in arms.items()),
                  file=sys.stderr)
    return 0


def _request_progress(every_seconds: float = 2.0):
    """A progress callback printing "requests done/total" to stderr at most every `every_seconds`."""
    import time

    started = time.monotonic()
    last = [started]  # when the last line was printed (the start: none yet)

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        # The last request closes a run of lines; a run short enough to need none prints none.
        if now - last[0] >= every_seconds or (done == total and last[0] > started):
            print(f"sent {done:,}/{total:,} requests", file=sys.stderr, flush=True)
            last[0] = now

    return report
