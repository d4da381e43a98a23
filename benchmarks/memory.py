"""Peak resident memory of training (CPU) and of the serving process per loaded model.

    .venv/bin/python benchmarks/memory.py                                  # serving only, tiny model (~1 min)
    .venv/bin/python benchmarks/memory.py --run runs/census-sample \\
        --arrays benchmarks/results/census_g1.npz --train-data ../shared/data/census-income/census-income.test.gz

Serving: `mmoe serve` runs in a subprocess with a TF Serving model config listing N copies of the same export
(N = 1, 2, 4, 8 by default); once every model answers a warm-up Predict (which also compiles the XLA path),
the server's resident set (VmRSS) and peak (VmHWM) are read from /proc. The cost of one more model is the slope
of a least-squares line through (N, RSS); the intercept is the server's own footprint (Python, TensorFlow, gRPC).

Training: peak RSS (`ru_maxrss` of that job alone, see `child_peak_mb`) of
  * the training-speed worker of `benchmarks/train_speed.py` (data in memory, no tf.Transform), per model
    and backend, with `--arrays`;
  * a whole `mmoe train` job (read, tf.Transform in process, train, evaluate), with `--train-data`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks.arg_types import positive_int  # noqa: E402
from benchmarks.serving import exports_from_run, start_server  # noqa: E402


def proc_memory_mb(pid: int) -> dict:
    """VmRSS (now) and VmHWM (peak) of a running process, in MiB (Linux /proc)."""
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return {"rss_mb": fields["VmRSS"], "peak_mb": fields["VmHWM"]}


def write_model_config(path: str, names_and_paths) -> None:
    """A TF Serving ModelServerConfig (text format) listing each (name, base path)."""
    entries = "".join(f'  config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" }}\n'
                      for name, base in names_and_paths)
    with open(path, "w") as fh:
        fh.write("model_config_list {\n" + entries + "}\n")


def serving_memory(export_dir: str, examples, counts, work: str) -> list:
    """Server RSS with 1..N copies of `export_dir` loaded and warmed up; one row per count."""
    from serving.client import ModelClient

    rows = []
    for count in counts:
        bases = []
        for i in range(count):
            base = os.path.join(work, f"copies-{count}", f"m{i}")
            shutil.copytree(export_dir, os.path.join(base, "1"))
            bases.append((f"m{i}", base))
        config = os.path.join(work, f"models-{count}.config")
        write_model_config(config, bases)
        process, address = start_server(config_file=config)
        try:
            with ModelClient(address) as client:
                for name, _ in bases:
                    _wait_predict(client, name, examples)
            time.sleep(0.5)  # let allocator caches settle before reading
            rows.append({"models": count, **proc_memory_mb(process.pid)})
        finally:
            process.terminate()
            process.wait(60)
        print(f"  {count} model(s): {rows[-1]['rss_mb']:.0f} MiB resident", file=sys.stderr, flush=True)
    return rows


def _wait_predict(client, name, examples, timeout=300.0):
    """A warm-up Predict on `name`, retried until the model has loaded."""
    import grpc

    deadline = time.time() + timeout
    while True:
        try:
            return client.predict_examples(name, examples)
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE) or time.time() > deadline:
                raise
            time.sleep(0.5)


def per_model_slope(rows) -> tuple[float, float]:
    """(MiB per extra model, intercept MiB) from a least-squares line through (models, RSS)."""
    counts = np.array([r["models"] for r in rows], dtype=float)
    rss = np.array([r["rss_mb"] for r in rows], dtype=float)
    if len(set(counts)) < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(counts, rss, 1)
    return float(slope), float(intercept)


# Linux carries a process's peak RSS across fork and exec, so a child forked straight from this (large,
# TensorFlow-holding) process would report at least our own size. A bare `python -S` forks the job instead:
# its few MiB are the floor, and it prints the job's own ru_maxrss (KiB).
_PEAK_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\\nmax_rss_kib=%d\\n" % usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def child_peak_mb(cmd, env=None) -> float:
    """Runs `cmd`; returns its own peak RSS in MiB; raises RuntimeError if it fails."""
    proc = subprocess.run([sys.executable, "-S", "-c", _PEAK_WRAPPER, *cmd], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    head, _, peak = proc.stderr.rpartition("\nmax_rss_kib=")
    if proc.returncode != 0 or not peak.strip().isdigit():
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{head[-2000:]}")
    return int(peak) / 1024


def training_memory(arrays: str | None, train_data: str | None, batch_size: int, work: str) -> list:
    rows = []
    if arrays:
        from benchmarks.train_speed import MODELS
        for model in MODELS:
            for backend in ("tensorflow", "jax"):
                cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_speed.py"), "--worker", "--arrays",
                       arrays, "--model", model, "--batch-size", str(batch_size), "--epochs", "2"]
                peak = child_peak_mb(cmd, env={**os.environ, "KERAS_BACKEND": backend})
                rows.append({"job": f"train_speed worker, {model}, {backend}, batch {batch_size}", "peak_mb": peak})
                print(f"  {rows[-1]['job']}: {peak:.0f} MiB", file=sys.stderr, flush=True)
    if train_data:
        cmd = [sys.executable, "-m", "pipelines.cli", "train", "--data", train_data, "--out",
               os.path.join(work, "train-run"), "--epochs", "2"]
        peak = child_peak_mb(cmd)
        rows.append({"job": f"mmoe train (tf.Transform + 2 epochs) on {os.path.basename(train_data)}",
                     "peak_mb": peak})
        print(f"  {rows[-1]['job']}: {peak:.0f} MiB", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a `mmoe train` output directory to export (default: train a tiny model)")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="numbers of models loaded at once in the server")
    parser.add_argument("--no-serving", action="store_true", help="measure training only")
    parser.add_argument("--arrays", help=".npz from `mmoe data export`: measure the training-speed worker")
    parser.add_argument("--train-data", help="a data file: measure a whole `mmoe train` job on it")
    parser.add_argument("--batch-size", type=positive_int, default=4096)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.counts):
        parser.error("--counts must be >= 1")
    if args.no_serving and not (args.arrays or args.train_data):
        parser.error("--no-serving leaves nothing to measure: add --arrays and/or --train-data")
    if args.no_serving and args.run:
        parser.error("--run is the model to serve; it means nothing with --no-serving")

    from serving.testing import example_bytes

    work = tempfile.mkdtemp(prefix="memory-bench-")
    results = {"serving": {}, "training": []}
    try:
        if args.no_serving:
            dirs = {}
        elif args.run:
            spec, frame, dirs = exports_from_run(args.run, os.path.join(work, "exports"))
        else:
            from serving.testing import tiny_exports
            tiny = tiny_exports(os.path.join(work, "exports"))
            spec, frame, dirs = tiny.spec, tiny.frame, {"xla": tiny.xla_dir, "plain": tiny.plain_dir}
        for export, path in dirs.items():
            print(f"serving, {export} export:", file=sys.stderr, flush=True)
            results["serving"][export] = serving_memory(path, example_bytes(frame, spec, rows=32),
                                                        sorted(set(args.counts)), os.path.join(work, export))
        results["training"] = training_memory(args.arrays, args.train_data, args.batch_size, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if results["serving"]:
        print("\nServing process (`mmoe serve`), resident memory after loading and warming up N models\n")
        print("| export | models | RSS MiB | peak MiB | MiB per extra model | server alone (intercept) MiB |")
        print("|---|---|---|---|---|---|")
        for export, rows in results["serving"].items():
            slope, intercept = per_model_slope(rows)
            for i, r in enumerate(rows):
                extra = f"{slope:.0f} | {intercept:.0f}" if i == 0 else " | "
                print(f"| {export} | {r['models']} | {r['rss_mb']:.0f} | {r['peak_mb']:.0f} | {extra} |")
    if results["training"]:
        print("\nTraining, peak resident memory of the process\n")
        print("| job | peak RSS MiB |")
        print("|---|---|")
        for r in results["training"]:
            print(f"| {r['job']} | {r['peak_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
