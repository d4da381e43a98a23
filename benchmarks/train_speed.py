"""Training throughput of the MMoE model on this machine, with the fraction of arithmetic peak.

Each configuration runs in its own subprocess (the Keras backend is fixed per process):
TensorFlow with XLA, TensorFlow without XLA, and JAX; batch sizes 256..8192; the paper-size
model (8 experts x 16 units) and a larger one (16 x 64). The ablation swaps the fused
`ExpertBank` for a Python loop of per-expert Dense layers with the same maths.

Data is the transformed census split from `mmoe data export` (in memory), repeated so that an
epoch holds at least 16 batches; throughput is measured on the fastest epoch after the first
(which includes compilation). FLOPs per example are counted from the layer shapes (training
~= 3x forward: forward, and two matmuls per weight in the backward pass).

    mmoe data export --data ../shared/data/census-income/census-income.test.gz --out benchmarks/results/census_g1.npz
    python benchmarks/train_speed.py --arrays benchmarks/results/census_g1.npz
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.arg_types import existing_file, positive_int  # noqa: E402

MODELS = {
    "paper_8x16": dict(arch="mmoe", num_experts=8, expert_units=(16,), tower_units=(8,)),
    "large_16x64": dict(arch="mmoe", num_experts=16, expert_units=(64,), tower_units=(32,)),
}


def forward_flops(model) -> int:
    """Multiply-adds x2 of the dense maths per example (embedding gathers are not FLOPs)."""
    from mmoe.layers import MLP, ExpertBank, ExpertMixture, Gate, TaskHead

    flops = 0
    for layer in model.layers:
        if isinstance(layer, ExpertBank) or type(layer).__name__ == "LoopExpertBank":
            in_dim = layer.input.shape[-1]
            for units in layer.units:
                flops += 2 * in_dim * units * layer.num_experts
                in_dim = units
        elif isinstance(layer, Gate):
            flops += 2 * layer.input.shape[-1] * layer.num_experts
        elif isinstance(layer, ExpertMixture):
            _, experts = layer.input
            flops += 2 * experts.shape[1] * experts.shape[2]
        elif isinstance(layer, MLP):
            in_dim = layer.input.shape[-1]
            for units in layer.units:
                flops += 2 * in_dim * units
                in_dim = units
        elif isinstance(layer, TaskHead):
            flops += 2 * layer.input.shape[-1]
    return int(flops)


def loop_expert_bank_class():
    """The ablation: E separate Dense stacks in a Python loop, stacked to [batch, E, U]."""
    import keras
    from keras import ops

    class LoopExpertBank(keras.layers.Layer):
        def __init__(self, num_experts, units, activation="relu", dropout=0.0, **kwargs):
            super().__init__(**kwargs)
            self.num_experts, self.units = num_experts, list(units)
            self.experts = [[keras.layers.Dense(u, activation=activation, dtype=self.dtype_policy)
                             for u in self.units] for _ in range(num_experts)]

        def call(self, inputs, training=None):
            outs = []
            for stack in self.experts:
                h = inputs
                for dense in stack:
                    h = dense(h)
                outs.append(h)
            return ops.stack(outs, axis=1)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], self.num_experts, self.units[-1])

    return LoopExpertBank


def worker(args) -> dict:
    """One configuration, in this process: returns throughput and memory."""
    import keras

    import mmoe.models
    from mmoe import ModelConfig, build_model, compile_model
    from pipelines.train_local import load_arrays

    inputs, tasks, splits, _ = load_arrays(args.arrays)
    train = splits["train"]
    repeats = max(1, int(np.ceil(16 * args.batch_size / len(train))))
    index = np.tile(np.arange(len(train)), repeats)
    data = train.take(index)
    if args.experts == "loop":
        mmoe.models.ExpertBank = loop_expert_bank_class()  # ablation only: same model, looped experts
    config = ModelConfig(mixed_precision=args.mixed_precision, **MODELS[args.model])
    keras.utils.set_random_seed(0)
    model = compile_model(build_model(config, inputs, tasks), config, tasks, jit_compile=not args.no_xla,
                          steps_per_execution=args.steps_per_execution)
    times = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(data.inputs, data.labels, batch_size=args.batch_size, epochs=args.epochs, shuffle=False,
              verbose=0, callbacks=[EpochTimer()])
    best = min(times[1:]) if len(times) > 1 else times[0]
    flops = forward_flops(model)
    backend = keras.backend.backend()
    return {"steps_per_execution": args.steps_per_execution, "model": args.model, "backend": backend,
            "xla": not args.no_xla or backend == "jax", "experts": args.experts, "lookup": args.lookup,
            "batch_size": args.batch_size,
            "mixed_precision": args.mixed_precision, "examples_per_s": len(data) / best,
            "forward_flops_per_example": flops, "train_flops_per_example": 3 * flops,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "compile_epoch_s": times[0], "rows_per_epoch": len(data)}


def measured_matmul_peak(n=2048, repeats=5) -> float:
    """GFLOP/s of a large float32 matmul with all cores: a practical peak for this machine."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype("float32")
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_config(arrays, model, backend, batch_size, no_xla=False, experts="fused", epochs=3, mixed=False,
               steps_per_execution=1, lookup="auto"):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    if backend == "jax":
        env.setdefault("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", ""))
    cmd = [sys.executable, __file__, "--worker", "--arrays", arrays, "--model", model, "--batch-size",
           str(batch_size), "--experts", experts, "--lookup", lookup, "--epochs", str(epochs), "--steps-per-execution",
           str(steps_per_execution)]
    if no_xla:
        cmd.append("--no-xla")
    if mixed:
        cmd.append("--mixed-precision")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results, peak_gflops) -> str:
    lines = ["| model | backend | XLA | experts | embedding lookup | batch | examples/s | train GFLOP/s | "
             "% of measured peak | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        gflops = r["examples_per_s"] * r["train_flops_per_example"] / 1e9
        lines.append(f"| {r['model']} | {r['backend']} | {'yes' if r['xla'] else 'no'} | {r['experts']} | "
                     f"{r.get('lookup', 'auto')} | "
                     f"{r['batch_size']} | {r['examples_per_s']:,.0f} | {gflops:.1f} | "
                     f"{100 * gflops / peak_gflops:.1f}% | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arrays", required=True, type=existing_file, help=".npz from `mmoe data export`")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--backends", nargs="+", default=["tf-xla", "tf", "jax"], choices=["tf-xla", "tf", "jax"])
    parser.add_argument("--ablation-batch-size", type=positive_int, default=4096,
                        help="batch size of the fused-vs-loop ablation (TF with XLA)")
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_speed.json"))
    # Worker mode (one configuration in this process).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="paper_8x16", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=positive_int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--experts", default="fused", choices=["fused", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--lookup", default="auto", choices=["auto", "gather", "matmul"], help=argparse.SUPPRESS)
    parser.add_argument("--no-xla", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mixed-precision", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps-per-execution", type=int, default=32,
                        help="batches per compiled call (Keras steps_per_execution)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    peak = measured_matmul_peak()
    results = []
    for model in args.models:
        for backend in args.backends:
            for batch in args.batch_sizes:
                r = run_config(args.arrays, model, "jax" if backend == "jax" else "tensorflow", batch,
                               no_xla=backend == "tf", epochs=args.epochs,
                               steps_per_execution=args.steps_per_execution)
                results.append(r)
                print(f"{model} {backend} batch {batch}: {r['examples_per_s']:,.0f} examples/s", file=sys.stderr,
                      flush=True)
        ablations = [dict(experts="fused"), dict(experts="loop"), dict(lookup="gather")]
        if "jax" in args.backends:
            ablations += [dict(backend="jax"), dict(backend="jax", lookup="gather")]
        for ablation in ablations:
            backend = ablation.pop("backend", "tensorflow")
            r = run_config(args.arrays, model, backend, args.ablation_batch_size, epochs=args.epochs,
                           steps_per_execution=args.steps_per_execution, **ablation)
            r["ablation"] = True
            results.append(r)
            print(f"{model} ablation {backend}: {r['experts']} experts, {r['lookup']} lookup: "
                  f"{r['examples_per_s']:,.0f} examples/s", file=sys.stderr, flush=True)
    print(f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; measured float32 matmul "
          f"peak {peak:.1f} GFLOP/s (numpy, 2048^3).\n")
    print(table([r for r in results if not r.get("ablation")], peak))
    print("\nAblations: fused expert contraction vs per-expert Dense loop, and gather vs matmul embedding lookup "
          "(auto = matmul for these tables)\n")
    print(table([r for r in results if r.get("ablation")], peak))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"peak_gflops": peak, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
