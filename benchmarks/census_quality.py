"""Census-income quality: architectures vs a gradient-boosting anchor, beside the paper's numbers.

Protocols (chosen by how many --data files are given):
  (a) the paper's: the UCI training file plus test file (test split 1:1 into validation and test);
  (b) one file (on these machines the 99,762-row test file): a seeded 60/20/20 split.

For every task group and architecture: optionally a documented search on validation only
(--search: learning rate x experts x expert units, early stopping on the main task's validation
AUC), then --seeds training runs with the chosen settings; test AUC as mean +- std and the best
run. The anchor is scikit-learn's HistGradientBoostingClassifier (native categorical support,
early stopping), one model per task, on the same transformed features and splits.

    python benchmarks/census_quality.py --data ../shared/data/census-income/census-income.test.gz \
        --groups 1 2 --archs single_task shared_bottom omoe mmoe ple --seeds 5 --search

Writes benchmarks/results/census_quality.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# MMoE paper (Ma et al. 2018) and PLE paper (Tang et al. 2020), protocol (a), best runs.
PAPER = {
    1: {"single_task": (0.9398, 0.9922), "shared_bottom": (0.9361, 0.9921), "omoe": (0.9387, 0.9923),
        "mmoe": (0.9410, 0.9927), "ple": (0.9522, 0.9945)},
    2: {"single_task": (0.8843, 0.9922), "mmoe": (0.8860, 0.9924)},
}
# The search space (validation only). Kept small: each point is a full training run.
SEARCH = {"learning_rate": [1e-3, 3e-3], "num_experts": [4, 8], "expert_units": [(32,), (64,)]}
# Settings used without --search: what a search over SEARCH picked most often on group 1.
DEFAULTS = {"learning_rate": 1e-3, "num_experts": 8, "expert_units": (64,)}


def prepare(data, group, split_seed, workdir, log):
    from features.census import census_spec
    from mmoe import InputFeature
    from pipelines.train_local import model_tasks, task_data, transform_splits

    spec = census_spec(group)
    info, arrays, protocol = transform_splits(spec, data, (0.6, 0.2, 0.2), split_seed,
                                              os.path.join(workdir, f"transform_g{group}"), log=log)
    features = [InputFeature.from_dict(i) for i in info]
    tasks = model_tasks(spec, None)
    splits = {k: task_data(arrays[k], spec, [f.name for f in features], False) for k in arrays}
    return features, tasks, splits, protocol


def train_once(arch, settings, features, tasks, splits, seed, epochs, batch_size):
    import keras

    from mmoe import ModelConfig, build_model, compile_model
    from mmoe.training import evaluate, fit

    config = ModelConfig(arch=arch, **settings)
    keras.utils.set_random_seed(seed)
    model = compile_model(build_model(config, features, tasks), config, tasks)
    started = time.time()
    history = fit(model, tasks, splits["train"], splits["valid"], epochs=epochs, batch_size=batch_size,
                  patience=4, verbose=0, seed=seed)
    result = {"valid": evaluate(model, tasks, splits["valid"]), "test": evaluate(model, tasks, splits["test"]),
              "epochs": len(history.history["loss"]), "seconds": round(time.time() - started, 1)}
    keras.backend.clear_session()
    return result


def gradient_boosting_anchor(features, tasks, splits, seed):
    from sklearn.ensemble import HistGradientBoostingClassifier

    from mmoe.training import roc_auc

    names = [f.name for f in features]
    categorical = np.array([f.kind == "categorical" for f in features])

    def matrix(split):
        return np.column_stack([splits[split].inputs[n].astype("float64") for n in names])

    x_train, x_valid, x_test = matrix("train"), matrix("valid"), matrix("test")
    result = {"valid": {}, "test": {}}
    for t in tasks:
        # HGB's native categorical support is limited to 255 categories; wider codes stay ordinal.
        cats = categorical & (np.array([f.vocab_size or 0 for f in features]) <= 255)
        model = HistGradientBoostingClassifier(categorical_features=cats, max_iter=500, learning_rate=0.1,
                                               early_stopping=True, validation_fraction=0.1, n_iter_no_change=20,
                                               random_state=seed)
        model.fit(x_train, splits["train"].labels[t.name])
        for split, x in (("valid", x_valid), ("test", x_test)):
            result[split][t.name] = {"auc": roc_auc(splits[split].labels[t.name], model.predict_proba(x)[:, 1])}
    return result


def summarize(runs, tasks, split="test"):
    out = {}
    for t in tasks:
        values = np.array([r[split][t.name]["auc"] for r in runs])
        out[t.name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                       "best": float(values.max()), "runs": len(values)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--archs", nargs="+", default=["single_task", "shared_bottom", "omoe", "mmoe", "ple"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--search", action="store_true", help="tune each architecture on validation first")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "census_quality.json"))
    args = parser.parse_args(argv)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = {"protocol": None, "groups": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for group in args.groups:
            features, tasks, splits, protocol = prepare(args.data, group, args.split_seed, workdir, log)
            report["protocol"] = protocol
            main_task = tasks[0].name
            group_report = report["groups"][str(group)] = {"tasks": [t.name for t in tasks], "archs": {}}
            if not args.no_anchor:
                anchor = gradient_boosting_anchor(features, tasks, splits, args.split_seed)
                group_report["hist_gradient_boosting"] = anchor
                log(f"group {group} HGB test AUC: " + ", ".join(
                    f"{k} {v['auc']:.4f}" for k, v in anchor["test"].items()))
            for arch in args.archs:
                settings = dict(DEFAULTS)
                search_log = []
                if args.search:
                    best = -1.0
                    for lr, experts, units in itertools.product(*SEARCH.values()):
                        candidate = {"learning_rate": lr, "num_experts": experts, "expert_units": units}
                        r = train_once(arch, candidate, features, tasks, splits, 0, args.epochs, args.batch_size)
                        score = r["valid"][main_task]["auc"]
                        search_log.append({**candidate, "valid_auc": score, "epochs": r["epochs"]})
                        log(f"  search g{group} {arch} {candidate}: valid {main_task} AUC {score:.4f}")
                        if score > best:
                            best, settings = score, candidate
                runs = []
                for seed in range(args.seeds):
                    r = train_once(arch, settings, features, tasks, splits, seed, args.epochs, args.batch_size)
                    runs.append(r)
                    log(f"g{group} {arch} seed {seed}: " + ", ".join(
                        f"{t.name} {r['test'][t.name]['auc']:.4f}" for t in tasks) + f" ({r['epochs']} ep, {r['seconds']} s)")
                group_report["archs"][arch] = {
                    "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
                    "search": search_log, "test": summarize(runs, tasks), "valid": summarize(runs, tasks, "valid"),
                    "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def markdown(report) -> str:
    p = report["protocol"]
    lines = [f"Protocol: {p['name']}" + (f" {p['split']}, seed {p['seed']}" if "split" in p else "") +
             f"; rows train/valid/test {p['rows']['train']:,}/{p['rows']['valid']:,}/{p['rows']['test']:,}", ""]
    for group, g in report["groups"].items():
        tasks = g["tasks"]
        lines += [f"### Task group {group} ({' / '.join(tasks)}), test AUC", "",
                  "| model | " + " | ".join(f"{t} mean ± std | {t} best" for t in tasks) + " | paper best (protocol a) |",
                  "|---|" + "---|---|" * len(tasks) + "---|"]
        if "hist_gradient_boosting" in g:
            hgb = g["hist_gradient_boosting"]["test"]
            lines.append("| HistGradientBoosting | " + " | ".join(f"{hgb[t]['auc']:.4f} | –" for t in tasks) + " | – |")
        for arch, a in g["archs"].items():
            paper = PAPER.get(int(group), {}).get(arch)
            cells = " | ".join(f"{a['test'][t]['mean']:.4f} ± {a['test'][t]['std']:.4f} | {a['test'][t]['best']:.4f}"
                               for t in tasks)
            lines.append(f"| {arch} ({a['test'][tasks[0]]['runs']} seeds) | {cells} | "
                         f"{' / '.join(f'{v:.4f}' for v in paper) if paper else '–'} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
