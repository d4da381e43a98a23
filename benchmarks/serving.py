"""Serving latency and throughput: in-process signature call vs gRPC, XLA and non-XLA exports side by side.

    .venv/bin/python benchmarks/serving.py                 # trains a tiny model first (~1 min)
    .venv/bin/python benchmarks/serving.py --run runs/census-sample   # a `mmoe train` run directory

For each export (XLA, non-XLA) it measures
  * the in-process `serving_default` call at batch 1, 32, 256, two ways:
    "in-process": what the server does per request minus protobuf and gRPC (`serving.models.Servable.run`:
    name/dtype/shape validation, numpy -> tensor, the signature's graph function, tensors -> numpy);
    "in-proc wrapper": the public SavedModel signature wrapper (`loaded.signatures["serving_default"]`)
    called with a tensor built once outside the timed loop, outputs left as tensors;
  * gRPC Predict (TF Serving's stub) against `mmoe serve` running in a subprocess, batching off and on:
    batch 1, 32 and 256 each with 1, 8 and 32 concurrent clients;
  * "grpc canned": a Python gRPC server (`grpc.aio`, its own process) whose Predict returns the real server's reply
    bytes with no model, batch 1 from 1, 8 and 32 clients: the floor under any Python server here, and so the most
    batching could gain;
and prints p50 / p99 latency (ms) and throughput (examples/s) per cell, and for gRPC cells the server
process's CPU time per request (user + system, from /proc), which the client's own cost does not enter.

Clients run in this process (`--client aio`, the default: coroutines on one asyncio loop; `--client threads`: one
thread each; its CPU per request is printed below the table) and the server is another process, all on the same
cores, so on a small machine the throughput numbers include client overhead and contention; they are meant for
comparing rows, not as absolutes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arg_types import positive_float, positive_int  # noqa: E402

import numpy as np  # noqa: E402

# Every gRPC cell: batch sizes 1, 32, 256 crossed with 1, 8 and 32 concurrent clients.
GRPC_CELLS = tuple((batch, clients) for clients in (1, 8, 32) for batch in (1, 32, 256))
TARGETS = """targets (2-core machine): in-process batch-1 < 0.5 ms; gRPC batch-1 p99 < 3 ms (1 client);
>= 100,000 examples/s at batch 256; 32 batch-1 clients: batching >= 3x the throughput without"""


def exports_from_run(run_dir: str, out_dir: str):
    from features.io import read_dataset
    from serving.export import export_serving_model, load_run

    spec, model, transform = load_run(run_dir)
    config = json.load(open(os.path.join(run_dir, "run_config.json")))
    xla = export_serving_model(model, transform, spec, os.path.join(out_dir, "xla", "1"), xla=True)
    plain = export_serving_model(model, transform, spec, os.path.join(out_dir, "plain", "1"), xla=False)
    from features.census import CENSUS_SAMPLE_PATH

    # Requests are the run's own rows where its data is still there (runs before 2026-11-25 did not record it).
    files = [path for path in config.get("data") or [] if os.path.exists(path)]
    frame = read_dataset(files[0] if files else CENSUS_SAMPLE_PATH, spec).iloc[:512]
    return spec, frame, {"xla": xla, "plain": plain}


def summarize(latencies, examples, seconds):
    lat = np.asarray(latencies) * 1e3
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "throughput": examples / seconds, "requests": len(lat)}


def _time_calls(call, batch, seconds):
    for _ in range(20):
        call()
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and len(latencies) < 100_000:
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    return summarize(latencies, batch * len(latencies), time.perf_counter() - start)


def bench_in_process(export_dir, examples, batch, seconds):
    """The server's per-request path without gRPC: Servable.run on a numpy batch of serialized tf.Examples."""
    from serving.models import Servable

    servable = Servable("bench", 1, export_dir, None, 8192)
    inputs = {"examples": np.array(examples[:batch], dtype=object)}
    return _time_calls(lambda: servable.run("serving_default", inputs), batch, seconds)


def bench_in_process_wrapper(export_dir, examples, batch, seconds):
    """The public signature wrapper of the loaded SavedModel, input tensor built once (the pre-change measure)."""
    import tensorflow as tf

    fn = tf.saved_model.load(export_dir).signatures["serving_default"]
    arg = tf.constant(examples[:batch])
    return _time_calls(lambda: fn(examples=arg), batch, seconds)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(base=None, name=None, batching_file=None, config_file=None, extra_args=()):
    """`mmoe serve` in a subprocess on a free port, for one model (base, name) or a model config file."""
    from serving.testing import start_serve_process

    models = ["--model-config-file", config_file] if config_file else ["--model-base-path", base, "--model-name", name]
    return start_serve_process([*models, "--port", "0", *(["--batching-parameters-file", batching_file]
                                                          if batching_file else []), *extra_args])


def predict_request(name, examples, batch):
    """TF Serving's PredictRequest for model `name`: the first `batch` serialized tf.Examples as `examples`."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples[:batch], dtype=tf.string))
    return request


def _canned_server(reply: bytes, ready) -> None:
    """A `grpc.aio` PredictionService whose Predict returns `reply` (serialized PredictResponse) untouched.

    Runs in a process of its own, like `mmoe serve`: the Python gRPC server's per-request cost with no model,
    no batching and no request decoding, the floor under any Python server on this machine."""
    import asyncio

    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    response = predict_pb2.PredictResponse.FromString(reply)

    class Canned(prediction_service_pb2_grpc.PredictionServiceServicer):
        async def Predict(self, request, context):
            return response

    async def serve():
        server = grpc.aio.server()
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Canned(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())


def start_canned_server(address, name, examples):
    """(process, address) of `_canned_server` replying with what the real server at `address` answers to one
    batch-1 Predict for model `name`."""
    import multiprocessing

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict_request(name, examples, 1),
                                                                                   timeout=60)
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    process = context.Process(target=_canned_server, args=(reply.SerializeToString(), ready), daemon=True)
    process.start()
    return process, f"127.0.0.1:{ready.get(timeout=120)}"


def bench_grpc(address, name, examples, batch, clients, seconds, server_pid=None, client="aio"):
    """Predict calls of `batch` examples from `clients` concurrent clients for `seconds`.

    client "aio": the clients are coroutines on one asyncio loop sharing `grpc.aio` channels (TF Serving's stub
    works on them unchanged); "threads": one thread per client with the synchronous stub.  Both keep `clients`
    requests in flight; the asyncio client costs this process far less CPU per request, which matters when
    client and server share two cores."""
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest.FromString(predict_request(name, examples, batch).SerializeToString())
    clock = {}

    def mark(key):
        clock[key] = (time.perf_counter(), process_cpu_seconds(server_pid) if server_pid else None,
                      sum(os.times()[:2]))

    if client == "aio":
        import asyncio
        results, errors = asyncio.run(_aio_clients(address, request, clients, seconds, mark))
    elif client == "threads":
        results, errors = _thread_clients(address, request, clients, seconds, mark)
    else:
        raise ValueError(f"client must be aio or threads, got {client!r}")
    (start, cpu_start, own_start), (end, cpu_end, own_end) = clock["start"], clock["end"]
    latencies = [x for r in results for x in r]
    out = summarize(latencies, batch * len(latencies), end - start)
    out["errors"] = len(errors)
    # CPU per request (ms): the server process's, and this (client) process's; the few requests still in
    # flight when the clock stops are counted in the CPU but not in the requests (a slight overestimate).
    requests = max(len(latencies), 1)
    if server_pid:
        out["server_cpu_ms"] = (cpu_end - cpu_start) / requests * 1e3
    out["client_cpu_ms"] = (own_end - own_start) / requests * 1e3
    return out


async def _aio_clients(address, request, clients, seconds, mark):
    import asyncio

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channels = [grpc.aio.insecure_channel(address) for _ in range(min(clients, 4))]
    stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in channels]
    for s in stubs:
        for _ in range(10):
            await s.Predict(request, timeout=60)
    results = [[] for _ in range(clients)]
    errors = []
    running = True

    async def client(i):
        stub = stubs[i % len(stubs)]
        while running:
            t = time.perf_counter()
            try:
                await stub.Predict(request, timeout=60)
            except grpc.RpcError as err:
                errors.append(err.code())
                continue
            results[i].append(time.perf_counter() - t)

    mark("start")
    tasks = [asyncio.ensure_future(client(i)) for i in range(clients)]
    await asyncio.sleep(seconds)
    running = False
    await asyncio.gather(*tasks)
    mark("end")
    for c in channels:
        await c.close()
    return results, errors


def _thread_clients(address, request, clients, seconds, mark):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channels = [grpc.insecure_channel(address) for _ in range(min(clients, 4))]
    stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in channels]
    for s in stubs:
        for _ in range(10):
            s.Predict(request, timeout=60)
    results = [[] for _ in range(clients)]
    errors = []
    barrier = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(i):
        stub = stubs[i % len(stubs)]
        barrier.wait()
        while not stop.is_set():
            t = time.perf_counter()
            try:
                stub.Predict(request, timeout=60)
            except grpc.RpcError as err:
                errors.append(err.code())
                continue
            results[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    mark("start")
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    mark("end")
    for c in channels:
        c.close()
    return results, errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a `mmoe train` output directory (default: train a tiny model)")
    parser.add_argument("--seconds", type=positive_float, default=3.0, help="measuring time per cell")
    parser.add_argument("--batch-timeout-micros", type=int, default=2000)
    parser.add_argument("--max-batch-size", type=positive_int, default=256)
    parser.add_argument("--client", choices=["aio", "threads"], default="aio",
                        help="gRPC clients as coroutines on one asyncio loop (default) or one thread each")
    parser.add_argument("--intra-op-threads", type=int, default=0,
                        help="the server's --tensorflow-intra-op-parallelism (0: TensorFlow's choice)")
    parser.add_argument("--inter-op-threads", type=int, default=0,
                        help="the server's --tensorflow-inter-op-parallelism (0: TensorFlow's choice)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from serving.testing import example_bytes

    work = tempfile.mkdtemp(prefix="serving-bench-")
    try:
        if args.run:
            spec, frame, dirs = exports_from_run(args.run, work)
        else:
            from serving.testing import tiny_exports
            tiny = tiny_exports(work)
            spec, frame, dirs = tiny.spec, tiny.frame, {"xla": tiny.xla_dir, "plain": tiny.plain_dir}
        examples = example_bytes(frame, spec)
        while len(examples) < 256:
            examples = examples + examples
        batching_file = os.path.join(work, "batching.config")
        with open(batching_file, "w") as fh:
            fh.write(f"max_batch_size {{ value: {args.max_batch_size} }}\n"
                     f"batch_timeout_micros {{ value: {args.batch_timeout_micros} }}\n"
                     f"max_enqueued_batches {{ value: 1000 }}\nnum_batch_threads {{ value: 2 }}\n")

        server_args = ["--tensorflow-intra-op-parallelism", str(args.intra_op_threads),
                       "--tensorflow-inter-op-parallelism", str(args.inter_op_threads)]
        load_before = os.getloadavg()
        rows = []  # (mode, batch, clients, export, result)
        for export, path in dirs.items():
            for batch in (1, 32, 256):
                rows.append(("in-process", batch, 1, export, bench_in_process(path, examples, batch, args.seconds)))
                rows.append(("in-proc wrapper", batch, 1, export,
                             bench_in_process_wrapper(path, examples, batch, args.seconds)))
                print(".", end="", flush=True)
            for batching in (False, True):
                process, address = start_server(os.path.dirname(path), export,
                                                batching_file if batching else None, extra_args=server_args)
                try:
                    mode = "grpc batching" if batching else "grpc"
                    for batch, clients in GRPC_CELLS:
                        rows.append((mode, batch, clients, export,
                                     bench_grpc(address, export, examples, batch, clients, args.seconds,
                                                server_pid=process.pid, client=args.client)))
                        print(".", end="", flush=True)
                    if not batching and export == "xla":
                        # Once: the same reply without a model (see _canned_server), batch 1 from 1, 8, 32 clients.
                        canned, canned_address = start_canned_server(address, export, examples)
                        try:
                            for clients in (1, 8, 32):
                                rows.append(("grpc canned", 1, clients, "xla",
                                             bench_grpc(canned_address, export, examples, 1, clients, args.seconds,
                                                        server_pid=canned.pid, client=args.client)))
                        finally:
                            canned.terminate()
                            canned.join(60)
                finally:
                    process.terminate()
                    process.wait(60)
        print()
        print_table(rows)
        # The machine may be shared: the load average says how much the numbers are worth.
        print("load average (1/5/15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(
            *load_before, *os.getloadavg()))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump([{"mode": m, "batch": b, "clients": c, "export": e, **r} for m, b, c, e, r in rows], fh,
                          indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def cpu_cores_busy(result):
    """Cores kept busy by one batch-1 cell: requests/s times the server's plus the clients' CPU per request. Below
    the machine's core count while every client waits, the bound is something serial (the interpreter lock of a
    Python process), not CPU."""
    return result["throughput"] * (result.get("server_cpu_ms", 0.0) + result.get("client_cpu_ms", 0.0)) / 1e3


def print_table(rows, cores=None):
    cores = cores or os.cpu_count()
    cells = {}
    for mode, batch, clients, export, result in rows:
        cells[(mode, batch, clients, export)] = result
    keys = sorted({(m, b, c) for m, b, c, _ in cells}, key=lambda k: (k[0], k[2], k[1]))
    header = f"{'mode':<16}{'batch':>6}{'clients':>8} | " + " | ".join(
        f"{e + ' p50':>10}{'p99':>8}{'ex/s':>10}{'srv cpu':>9}" for e in ("xla", "plain"))
    print(header)
    print("-" * len(header))
    for mode, batch, clients in keys:
        parts = []
        for export in ("xla", "plain"):
            r = cells.get((mode, batch, clients, export))
            cpu = f"{r['server_cpu_ms']:>9.3f}" if r and "server_cpu_ms" in r else " " * 9
            parts.append(f"{r['p50']:>10.3f}{r['p99']:>8.3f}{r['throughput']:>10,.0f}{cpu}" if r else " " * 37)
        print(f"{mode:<16}{batch:>6}{clients:>8} | " + " | ".join(parts))
    print("srv cpu: server process CPU ms per request (user + system).  Client (this process) CPU ms per request:")
    for mode, batch, clients in keys:
        client = [cells.get((mode, batch, clients, e), {}).get("client_cpu_ms") for e in ("xla", "plain")]
        if mode.startswith("grpc") and None not in client:
            print(f"  {mode} batch {batch} clients {clients}: {client[0]:.3f} | {client[1]:.3f}")
    for export in ("xla", "plain"):
        off = cells.get(("grpc", 1, 32, export))
        on = cells.get(("grpc batching", 1, 32, export))
        if off and on:
            gain = on["throughput"] / off["throughput"]
            print(f"{export}: 32 batch-1 clients, batching on/off throughput = {gain:.2f}x (server + clients keep "
                  f"{cpu_cores_busy(on):.1f} / {cpu_cores_busy(off):.1f} of {cores} cores busy)")
        big = [(r["throughput"], mode, clients) for (mode, batch, clients, e), r in cells.items()
               if e == export and batch == 256 and mode.startswith("grpc")]
        if big:
            throughput, mode, clients = max(big)
            print(f"{export}: batch 256 over gRPC, best {throughput:,.0f} examples/s ({mode}, {clients} clients)")
    canned = cells.get(("grpc canned", 1, 32, "xla"))
    if canned:
        # No server can batch its way past the rate at which Python gRPC alone answers batch-1 requests.
        bounds = [f"{e} {canned['throughput'] / cells[('grpc', 1, 32, e)]['throughput']:.2f}x"
                  for e in ("xla", "plain") if ("grpc", 1, 32, e) in cells]
        print(f"grpc canned (a Python gRPC server replying with a fixed response, no model): 32 batch-1 clients "
              f"{canned['throughput']:,.0f} requests/s ({cpu_cores_busy(canned):.1f} of {cores} cores busy); the most "
              "batching could gain over no batching here: " + ", ".join(bounds))
    errors = sum(r.get("errors", 0) for *_, r in rows)
    print(f"failed requests: {errors}")
    print(TARGETS)


if __name__ == "__main__":
    sys.exit(main())
