"""Training throughput on an accelerator with the JAX backend (runs on CPU too, same flags).

For hosts without TensorFlow (the lent GPU has JAX only): carry the keras wheel and the
transformed data as arrays (`mmoe data export --out census_g1.npz` on a TF machine), then

    KERAS_BACKEND=jax python benchmarks/gpu_train.py --arrays census_g1.npz \
        --batch-sizes 1024 4096 16384 65536 --models paper_8x16 large_16x64

The whole training split is put on the device once; each step slices its batch on the
device inside one jitted function (forward, backward and the Adam update through Keras'
stateless API), so no host-to-device copy happens in the timed loop. bf16 mixed precision
on and off; FLOPs per example as in train_speed.py; the fraction of the device's peak
(dense bf16/fp32 tensor-core numbers for known GPUs, a measured matmul peak elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.arg_types import existing_file, positive_int  # noqa: E402

# Dense peak TFLOP/s (bf16, fp32 via TF32 tensor cores) from the vendors' data sheets.
KNOWN_PEAKS = {"H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0)}


def device_peak_tflops(mixed: bool) -> tuple[float, str]:
    import jax

    kind = jax.devices()[0].device_kind
    for name, (bf16, fp32) in KNOWN_PEAKS.items():
        if name in kind:
            return (bf16 if mixed else fp32), f"{kind} data sheet"
    # Elsewhere (the CPU): a large float32 BLAS matmul with all cores; CPUs here have no
    # faster bf16 path, so the same peak serves both precisions.
    from benchmarks.train_speed import measured_matmul_peak
    return measured_matmul_peak() / 1e3, f"{kind}: measured float32 matmul"


def throughput(model_name, arrays, batch_size, mixed, steps, warmup=3):
    import jax
    import keras

    from benchmarks.train_speed import MODELS, forward_flops
    from mmoe import ModelConfig, build_model, compile_model
    from pipelines.train_local import load_arrays

    inputs, tasks, splits, _ = load_arrays(arrays)
    train = splits["train"]
    repeats = max(1, int(np.ceil(batch_size / len(train))))
    index = np.tile(np.arange(len(train)), repeats)
    data = train.take(index)
    n = len(data)
    config = ModelConfig(mixed_precision=mixed, **MODELS[model_name])
    keras.utils.set_random_seed(0)
    model = compile_model(build_model(config, inputs, tasks), config, tasks)
    model.optimizer.build(model.trainable_variables)
    x_dev = {k: jax.device_put(v) for k, v in data.inputs.items()}
    y_dev = {k: jax.device_put(v) for k, v in data.labels.items()}
    kinds = {t.name: t.kind for t in tasks}

    def loss_fn(trainable, non_trainable, x, y):
        pred, non_trainable, aux = model.stateless_call(trainable, non_trainable, x, training=True,
                                                        return_losses=True)
        loss = sum(aux) if aux else 0.0
        for name, kind in kinds.items():
            fn = keras.losses.binary_crossentropy if kind == "binary" else keras.losses.mean_squared_error
            loss = loss + keras.ops.mean(fn(y[name][:, None], pred[name][:, None]))
        return loss, non_trainable

    @jax.jit
    def step(state, start):
        trainable, non_trainable, opt = state
        x = {k: jax.lax.dynamic_slice_in_dim(v, start, batch_size) for k, v in x_dev.items()}
        y = {k: jax.lax.dynamic_slice_in_dim(v, start, batch_size) for k, v in y_dev.items()}
        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, non_trainable, x, y)
        trainable, opt = model.optimizer.stateless_apply(opt, grads, trainable)
        return (trainable, non_trainable, opt), loss

    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in model.optimizer.variables])
    starts = [(i * batch_size) % (n - batch_size + 1) for i in range(steps + warmup)]
    first_loss = None
    for s in starts[:warmup]:
        state, loss = step(state, s)
        first_loss = float(loss) if first_loss is None else first_loss  # shows the step trains (tests)
    loss.block_until_ready()
    began = time.perf_counter()
    for s in starts[warmup:]:
        state, loss = step(state, s)
    loss.block_until_ready()
    elapsed = time.perf_counter() - began
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"{model_name} batch {batch_size}: loss is {float(loss)}")
    return {"model": model_name, "batch_size": batch_size, "mixed_precision": mixed,
            "examples_per_s": steps * batch_size / elapsed, "train_flops_per_example": 3 * forward_flops(model),
            "device": str(jax.devices()[0].device_kind), "first_loss": first_loss, "final_loss": float(loss)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arrays", required=True, type=existing_file, help=".npz from `mmoe data export`")
    parser.add_argument("--models", nargs="+", default=["paper_8x16", "large_16x64"])
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"])
    parser.add_argument("--steps", type=positive_int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_train.json"))
    args = parser.parse_args(argv)
    import keras
    if keras.backend.backend() != "jax":
        raise SystemExit("gpu_train.py runs on the JAX backend: set KERAS_BACKEND=jax")
    from benchmarks.train_speed import MODELS

    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")

    results = []
    for model_name in args.models:
        for precision in args.precisions:
            mixed = precision == "bf16"
            peak, source = device_peak_tflops(mixed)
            for batch in args.batch_sizes:
                r = throughput(model_name, args.arrays, batch, mixed, args.steps)
                r.update(peak_tflops=peak, peak_source=source)
                results.append(r)
                print(f"{model_name} {precision} batch {batch}: {r['examples_per_s']:,.0f} examples/s",
                      file=sys.stderr, flush=True)
    print("| model | precision | batch | examples/s | GFLOP/s | % of peak | peak TFLOP/s (source) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        tflops = r["examples_per_s"] * r["train_flops_per_example"] / 1e12
        print(f"| {r['model']} | {'bf16' if r['mixed_precision'] else 'float32'} | {r['batch_size']} | "
              f"{r['examples_per_s']:,.0f} | {1e3 * tflops:.1f} | {100 * tflops / r['peak_tflops']:.2f}% | "
              f"{r['peak_tflops']:.3g} ({r['peak_source']}) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
