"""The MMoE paper's synthetic experiment (Ma et al. 2018, section 4).

Two regression tasks whose label correlation is controlled by rho (features.synthetic).
Shared-Bottom, OMoE and MMoE of comparable size are trained on each rho for several
seeds; the training loss curves (mean over seeds) are saved as a PNG and the final
losses printed as a table. The paper's finding to reproduce: MMoE's advantage over the
others grows as the tasks are less correlated (rho 1.0 -> 0.5).

    python benchmarks/synthetic.py --rhos 0.5 0.9 1.0 --seeds 3 --epochs 30
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Sizes in the spirit of the paper's synthetic setup: 8 experts of 16 units; the shared
# bottom's width is chosen so the three models have similar parameter counts.
MODELS = {
    "shared_bottom": dict(arch="shared_bottom", bottom_units=(113,), tower_units=(8,)),
    "omoe": dict(arch="omoe", num_experts=8, expert_units=(16,), tower_units=(8,)),
    "mmoe": dict(arch="mmoe", num_experts=8, expert_units=(16,), tower_units=(8,)),
}


def run(model_name, rho, seed, n, dim, epochs, batch_size, learning_rate):
    import keras

    from features.synthetic import make_synthetic
    from mmoe import InputFeature, ModelConfig, TaskSpec, build_model, compile_model
    from mmoe.training import TaskData, fit

    x, y1, y2 = make_synthetic(n, rho, dim=dim, seed=seed)
    # Standardise labels so the two tasks' MSEs are on one scale.
    y1 = (y1 - y1.mean()) / y1.std()
    y2 = (y2 - y2.mean()) / y2.std()
    inputs = {f"x{i}": x[:, i] for i in range(dim)}
    features = [InputFeature(f"x{i}") for i in range(dim)]
    tasks = [TaskSpec("task1", "regression"), TaskSpec("task2", "regression")]
    config = ModelConfig(learning_rate=learning_rate, **MODELS[model_name])
    keras.utils.set_random_seed(seed)
    model = compile_model(build_model(config, features, tasks), config, tasks)
    data = TaskData(inputs, {"task1": y1.astype("float32"), "task2": y2.astype("float32")})
    history = fit(model, tasks, data, epochs=epochs, batch_size=batch_size, verbose=0, seed=seed)
    params = model.count_params()
    keras.backend.clear_session()
    return np.array(history.history["loss"]), params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.9, 1.0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "synthetic"))
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves, params = {}, {}
    for rho in args.rhos:
        for name in args.models:
            runs = []
            for seed in range(args.seeds):
                started = time.time()
                loss, params[name] = run(name, rho, seed, args.n, args.dim, args.epochs, args.batch_size,
                                         args.learning_rate)
                runs.append(loss)
                print(f"rho {rho} {name} seed {seed}: final loss {loss[-1]:.4f} ({time.time() - started:.0f} s)",
                      file=sys.stderr, flush=True)
            curves[(rho, name)] = np.mean(runs, axis=0)

    lines = ["| rho | " + " | ".join(f"{m} final loss" for m in args.models) + " | MMoE gain vs best other |",
             "|---|" + "---|" * len(args.models) + "---|"]
    for rho in args.rhos:
        finals = {m: curves[(rho, m)][-1] for m in args.models}
        others = [v for m, v in finals.items() if m != "mmoe"]
        gain = (min(others) - finals["mmoe"]) if "mmoe" in finals and others else float("nan")
        lines.append(f"| {rho} | " + " | ".join(f"{finals[m]:.4f}" for m in args.models) + f" | {gain:+.4f} |")
    table = "\n".join(lines)
    print(f"Training loss (sum of the two standardised MSEs), mean of {args.seeds} seeds after {args.epochs} "
          f"epochs; parameters: " + ", ".join(f"{m} {params[m]:,}" for m in args.models) + "\n\n" + table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.rhos), figsize=(4.5 * len(args.rhos), 3.6), sharey=True, squeeze=False)
    for ax, rho in zip(axes[0], args.rhos):
        for name in args.models:
            ax.plot(np.arange(1, args.epochs + 1), curves[(rho, name)], label=name)
        ax.set_title(f"task correlation rho = {rho}")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "synthetic_loss.png", dpi=110)
    (out / "synthetic.json").write_text(json.dumps(
        {"args": vars(args), "params": params,
         "curves": {f"{rho}/{m}": c.tolist() for (rho, m), c in curves.items()}}, indent=1))
    print(f"\nwrote {out / 'synthetic_loss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
