"""Census-income quality: architectures vs a gradient-boosting anchor, beside the paper's numbers.

Protocols (chosen by how many --data files are given):
  (a) the paper's: the UCI training file plus test file (test split 1:1 into validation and test);
  (b) one file (on these machines the 99,762-row test file): a seeded 60/20/20 split.

For every task group and architecture: optionally a documented search on validation only
(--search: a coordinate search, one axis at a time from the best point so far, over learning
rate, batch size, widths, experts, dropout, embedding width and the census instance weight;
each point is one training run, seed 0, early stopping on the main task's validation AUC),
then --seeds training runs with the chosen settings; test AUC as mean +- std and the best run.

The anchor is scikit-learn's HistGradientBoostingClassifier (native categorical support), one
model per task, on the same transformed features, rows and splits; like the networks it is
stopped at the boosting iteration with the best validation AUC, and its learning rate, leaf
count, leaf size and L2 are chosen on validation by the same kind of coordinate search.

    mmoe data export --data ../shared/data/census-income/census-income.test.gz --task-group 1 --out /tmp/g1.npz
    python benchmarks/census_quality.py --arrays /tmp/g1.npz --archs mmoe shared_bottom --seeds 5 --search

`--arrays` takes `mmoe data export` files (one per task group; the group is read from their
tasks) so repeated runs skip tf.Transform; `--data` runs the transform instead. Every training
run is cached in benchmarks/results/census_runs.json under its full description (data, group,
architecture, settings, seed, epochs), so an interrupted command resumes where it stopped;
--fresh ignores the cache. Writes benchmarks/results/census_quality.json and prints the search
tables and a markdown table of test AUC.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results"
# MMoE paper (Ma et al. 2018) and PLE paper (Tang et al. 2020), protocol (a), best runs.
PAPER = {
    1: {"single_task": (0.9398, 0.9922), "shared_bottom": (0.9361, 0.9921), "omoe": (0.9387, 0.9923),
        "mmoe": (0.9410, 0.9927), "ple": (0.9522, 0.9945)},
    2: {"single_task": (0.8843, 0.9922), "mmoe": (0.8860, 0.9924)},
}
GROUP_TASKS = {("income", "marital"): 1, ("education", "marital"): 2}

# Starting point of every search, and the settings used without --search. Keys are ModelConfig
# fields plus the training settings batch_size and use_weights (census instance weight as sample weight).
BASE = {"learning_rate": 1e-3, "batch_size": 512, "num_experts": 8, "expert_units": (64,), "bottom_units": (128,),
        "tower_units": (32,), "expert_dropout": 0.0, "tower_dropout": 0.0, "embedding_dim": 16,
        "use_weights": False}
# Chosen settings per (group, arch) found by --search; used without --search (see BENCHMARKS.md).
CHOSEN: dict = {}


def search_axes(arch):
    """The coordinate search: (axis name, candidate changes), tried in this order from the best point so far.

    Kept short because each point is a full training run on a shared 2-core machine (about 5 minutes each
    there); the axes are the ones expected to matter most on 60k rows: regularisation, then width.
    """
    width = "expert_units" if arch in ("mmoe", "omoe", "cgc", "ple") else "bottom_units"
    widths = [(64,), (128,)] if width == "expert_units" else [(128,), (256,)]
    return [("dropout", [{"expert_dropout": v, "tower_dropout": v} for v in (0.0, 0.2)]),
            (width, [{width: v} for v in widths])]


# The anchor's search, same scheme: (axis, candidate values) from the first point.
HGB_AXES = [("learning_rate", [0.1, 0.05]), ("max_leaf_nodes", [31, 15])]
HGB_MAX_ITER, HGB_CHUNK, HGB_PATIENCE = 1000, 20, 60


# -- data ---------------------------------------------------------------------------------


def prepare_arrays(path):
    """(group, features, tasks, {split: TaskData with weights}, protocol) from an `mmoe data export` file."""
    from features.spec import WEIGHT_KEY
    from pipelines.train_local import load_arrays

    features, tasks, splits, protocol = load_arrays(path)
    with np.load(path, allow_pickle=False) as npz:
        for name, data in splits.items():
            data.weights = npz[f"{name}/{WEIGHT_KEY}"].astype("float32")
    group = GROUP_TASKS.get(tuple(t.name for t in tasks))
    if group is None:
        raise SystemExit(f"{path}: tasks {[t.name for t in tasks]} are not a census task group")
    return group, features, tasks, splits, protocol


def prepare_data(data, group, split_seed, workdir, log):
    from features.census import census_spec
    from mmoe import InputFeature
    from pipelines.train_local import model_tasks, task_data, transform_splits

    spec = census_spec(group)
    info, arrays, protocol = transform_splits(spec, data, (0.6, 0.2, 0.2), split_seed,
                                              os.path.join(workdir, f"transform_g{group}"), log=log)
    features = [InputFeature.from_dict(i) for i in info]
    tasks = model_tasks(spec, None)
    splits = {k: task_data(arrays[k], spec, [f.name for f in features], True) for k in arrays}
    return group, features, tasks, splits, protocol


# -- one training run ---------------------------------------------------------------------


def train_once(arch, settings, features, tasks, splits, seed, epochs, patience=4):
    import keras

    from mmoe import ModelConfig, build_model, compile_model
    from mmoe.training import TaskData, evaluate, fit

    model_keys = {k: v for k, v in settings.items() if k not in ("batch_size", "use_weights")}
    config = ModelConfig(arch=arch, **model_keys)
    train, valid = splits["train"], splits["valid"]
    if not settings.get("use_weights"):
        train = TaskData(train.inputs, train.labels)
    # Validation for early stopping is unweighted, like the reported AUC.
    valid = TaskData(valid.inputs, valid.labels)
    keras.utils.set_random_seed(seed)
    model = compile_model(build_model(config, features, tasks), config, tasks, steps_per_execution=16)
    started = time.time()
    history = fit(model, tasks, train, valid, epochs=epochs, batch_size=settings["batch_size"],
                  patience=patience, verbose=0, seed=seed)
    result = {"valid": evaluate(model, tasks, splits["valid"]), "test": evaluate(model, tasks, splits["test"]),
              "epochs": len(history.history["loss"]), "seconds": round(time.time() - started, 1),
              "params": model.count_params()}
    keras.backend.clear_session()
    return result


class RunCache:
    """Training results keyed by everything that determines them; saved after every run."""

    def __init__(self, path, fresh=False):
        self.path = Path(path)
        self.runs = {} if fresh or not self.path.exists() else json.loads(self.path.read_text())

    def get(self, key, compute):
        text = json.dumps(key, sort_keys=True)
        if text not in self.runs:
            self.runs[text] = compute()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.runs, indent=0))
            tmp.replace(self.path)
        return self.runs[text]


def jsonable(settings):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(settings.items())}


def coordinate_search(axes, base, score, log=lambda msg: None):
    """Tries each axis's candidates from the best point so far; keeps a change only if it scores higher.

    Returns (best settings, [(axis, settings, score), ...] in the order tried; the current point is scored once).
    """
    best, best_score = dict(base), score(base)
    table = [("start", dict(best), best_score)]
    for axis, changes in axes:
        for change in changes:
            candidate = {**best, **change}
            if candidate == best:
                continue
            s = score(candidate)
            table.append((axis, candidate, s))
            log(f"  {axis} {change}: {s:.4f} (best so far {best_score:.4f})")
        # Pick after the whole axis so the order of candidates does not matter.
        for ax, cand, s in table:
            if ax == axis and s > best_score:
                best, best_score = cand, s
    return best, table


# -- the anchor ---------------------------------------------------------------------------


def _matrix(features, data):
    return np.column_stack([data.inputs[f.name].astype("float64") for f in features])


def hgb_fit(features, splits, task, params, seed=0, use_weights=False):
    """One HistGradientBoostingClassifier for one task, stopped at the iteration with the best validation AUC.

    Grown HGB_CHUNK iterations at a time (warm start, which builds the same trees as one long fit);
    stops once the validation AUC has not improved for HGB_PATIENCE iterations or at HGB_MAX_ITER.
    Returns {"valid": auc, "test": auc, "iterations": n, "seconds": s}.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    from mmoe.training import roc_auc

    categorical = np.array([f.kind == "categorical" for f in features])
    started = time.time()
    model = HistGradientBoostingClassifier(categorical_features=categorical, max_iter=HGB_CHUNK, warm_start=True,
                                           early_stopping=False, random_state=seed, **params)
    train = splits["train"]
    x_train, x_valid = _matrix(features, train), _matrix(features, splits["valid"])
    y_valid, y_test = splits["valid"].labels[task], splits["test"].labels[task]
    valid_aucs = []
    while True:
        model.fit(x_train, train.labels[task], sample_weight=train.weights if use_weights else None)
        for i, p in enumerate(model.staged_predict_proba(x_valid)):
            if i >= len(valid_aucs):
                valid_aucs.append(roc_auc(y_valid, p[:, 1]))
        best = int(np.nanargmax(valid_aucs))
        if len(valid_aucs) - 1 - best >= HGB_PATIENCE or model.max_iter >= HGB_MAX_ITER:
            break
        model.set_params(max_iter=model.max_iter + HGB_CHUNK)
    test_scores = next(p for i, p in enumerate(model.staged_predict_proba(_matrix(features, splits["test"])))
                       if i == best)[:, 1]
    return {"valid": valid_aucs[best], "test": roc_auc(y_test, test_scores), "iterations": best + 1,
            "seconds": round(time.time() - started, 1)}


def gradient_boosting_anchor(features, tasks, splits, cache, base_key, search, seeds, log):
    report = {"search": {}, "settings": {}, "runs": [], "valid": {}, "test": {}}
    for t in tasks:
        def run(params, seed=0):
            key = {**base_key, "model": "hist_gradient_boosting", "task": t.name, "params": params, "seed": seed,
                   "max_iter": HGB_MAX_ITER, "stop": [HGB_CHUNK, HGB_PATIENCE]}
            return cache.get(key, lambda: hgb_fit(features, splits, t.name, params, seed))

        params = {name: values[0] for name, values in HGB_AXES}
        if search:
            axes = [(name, [{name: v} for v in values]) for name, values in HGB_AXES]
            params, table = coordinate_search(axes, params, lambda p: run(p)["valid"], log)
            report["search"][t.name] = [{"axis": a, **p, "valid_auc": s} for a, p, s in table]
        report["settings"][t.name] = params
        # Without subsampling or an internal validation split the fit is deterministic (seeds give
        # identical models), so one run per task unless more are asked for.
        runs = [run(params, seed) for seed in range(seeds)]
        for split in ("valid", "test"):
            values = np.array([r[split] for r in runs])
            report[split][t.name] = {"mean": float(values.mean()),
                                     "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                     "best": float(values.max()), "runs": len(values)}
        report["runs"].append({t.name: runs})
    return report


def summarize(runs, tasks, split="test"):
    out = {}
    for t in tasks:
        values = np.array([r[split][t.name]["auc"] for r in runs])
        out[t.name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                       "best": float(values.max()), "runs": len(values)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", help="census file(s): one file = protocol (b), two = protocol (a)")
    source.add_argument("--arrays", nargs="+", help="`mmoe data export` files, one per task group")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                        help="task groups (with --data; --arrays files name their own group)")
    parser.add_argument("--archs", nargs="+", default=["single_task", "shared_bottom", "omoe", "mmoe", "ple"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--search", action="store_true", help="tune each architecture on validation first")
    parser.add_argument("--search-archs", nargs="+", help="search only these architectures; the others take "
                        "the settings chosen for --search-like (default mmoe) in the same group")
    parser.add_argument("--search-like", default="mmoe")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--anchor-seeds", type=int, default=1, help="the anchor is deterministic; 1 is enough")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument("--cache", default=str(RESULTS / "census_runs.json"))
    parser.add_argument("--out", default=str(RESULTS / "census_quality.json"))
    args = parser.parse_args(argv)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cache = RunCache(args.cache, fresh=args.fresh)
    report = {"protocol": None, "groups": {}, "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as workdir:
        sources = ([("arrays", p) for p in args.arrays] if args.arrays
                   else [("data", g) for g in args.groups])
        for kind, source in sources:
            if kind == "arrays":
                group, features, tasks, splits, protocol = prepare_arrays(source)
            else:
                group, features, tasks, splits, protocol = prepare_data(args.data, source, args.split_seed,
                                                                        workdir, log)
            report["protocol"] = protocol
            base_key = {"group": group, "protocol": {k: v for k, v in protocol.items() if k != "files"},
                        "files": [os.path.basename(f) for f in protocol.get("files", [])]}
            main_task = tasks[0].name
            group_report = report["groups"][str(group)] = {"tasks": [t.name for t in tasks], "archs": {}}
            if not args.no_anchor:
                log(f"group {group}: HistGradientBoosting anchor")
                anchor = gradient_boosting_anchor(features, tasks, splits, cache, base_key, args.search,
                                                  args.anchor_seeds, log)
                group_report["hist_gradient_boosting"] = anchor
                log(f"group {group} HGB test AUC: " + ", ".join(
                    f"{k} {v['mean']:.4f}" for k, v in anchor["test"].items()))
            chosen_in_group = {}
            archs = sorted(args.archs, key=lambda a: a != args.search_like)  # the searched one first
            for arch in archs:
                def run(settings, seed=0, arch=arch):
                    key = {**base_key, "arch": arch, "settings": jsonable(settings), "seed": seed,
                           "epochs": args.epochs, "patience": args.patience}

                    def compute():
                        r = train_once(arch, settings, features, tasks, splits, seed, args.epochs, args.patience)
                        log(f"    g{group} {arch} seed {seed} {jsonable(settings)}: valid " + ", ".join(
                            f"{t.name} {r['valid'][t.name]['auc']:.4f}" for t in tasks) +
                            f" ({r['epochs']} ep, {r['seconds']} s)")
                        return r
                    return cache.get(key, compute)

                settings, search_log = dict(CHOSEN.get((group, arch), BASE)), []
                searched = args.search and (args.search_archs is None or arch in args.search_archs)
                if searched:
                    log(f"search g{group} {arch} (validation {main_task} AUC, seed 0)")
                    settings, table = coordinate_search(search_axes(arch), BASE,
                                                        lambda s: run(s)["valid"][main_task]["auc"], log)
                    search_log = [{"axis": a, **jsonable(s), "valid_auc": v} for a, s, v in table]
                    chosen_in_group[arch] = settings
                elif args.search and args.search_like in chosen_in_group:
                    settings = dict(chosen_in_group[args.search_like])
                runs = [run(settings, seed) for seed in range(args.seeds)]
                for seed, r in enumerate(runs):
                    log(f"g{group} {arch} seed {seed}: test " + ", ".join(
                        f"{t.name} {r['test'][t.name]['auc']:.4f}" for t in tasks) + f" ({r['epochs']} ep)")
                group_report["archs"][arch] = {
                    "settings": jsonable(settings), "searched": searched, "search": search_log,
                    "test": summarize(runs, tasks), "valid": summarize(runs, tasks, "valid"), "runs": runs}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def _fmt(settings):
    short = {"learning_rate": "lr", "batch_size": "batch", "num_experts": "experts", "expert_units": "expert",
             "bottom_units": "bottom", "expert_dropout": "drop", "embedding_dim": "emb", "use_weights": "weights"}
    parts = []
    for k, name in short.items():
        if k in settings:
            v = settings[k]
            parts.append(f"{name} {'x'.join(map(str, v)) if isinstance(v, list) else v}")
    return ", ".join(parts)


def markdown(report) -> str:
    p = report["protocol"]
    lines = [f"Protocol: {p['name']}" + (f" {p['split']}, seed {p['seed']}" if "split" in p else "") +
             f"; rows train/valid/test {p['rows']['train']:,}/{p['rows']['valid']:,}/{p['rows']['test']:,}", ""]
    for group, g in report["groups"].items():
        tasks = g["tasks"]
        main_task = tasks[0]
        lines += [f"### Task group {group} ({' / '.join(tasks)}), test AUC", "",
                  "| model | " + " | ".join(f"{t} mean ± std | {t} best" for t in tasks) +
                  f" | valid {main_task} mean | paper best (protocol a) |",
                  "|---|" + "---|---|" * len(tasks) + "---|---|"]
        if "hist_gradient_boosting" in g:
            hgb = g["hist_gradient_boosting"]
            runs = hgb["test"][main_task]["runs"]
            cells = " | ".join(f"{hgb['test'][t]['mean']:.4f} ± {hgb['test'][t]['std']:.4f} | "
                               f"{hgb['test'][t]['best']:.4f}" for t in tasks)
            lines.append(f"| HistGradientBoosting ({runs} seeds) | {cells} | "
                         f"{hgb['valid'][main_task]['mean']:.4f} | – |")
        for arch, a in g["archs"].items():
            paper = PAPER.get(int(group), {}).get(arch)
            cells = " | ".join(f"{a['test'][t]['mean']:.4f} ± {a['test'][t]['std']:.4f} | {a['test'][t]['best']:.4f}"
                               for t in tasks)
            lines.append(f"| {arch} ({a['test'][main_task]['runs']} seeds) | {cells} | "
                         f"{a['valid'][main_task]['mean']:.4f} | "
                         f"{' / '.join(f'{v:.4f}' for v in paper) if paper else '–'} |")
        lines.append("")
        lines.append("Settings: " + "; ".join(f"{arch}: {_fmt(a['settings'])}" for arch, a in g["archs"].items()))
        if "hist_gradient_boosting" in g:
            lines.append("HGB: " + "; ".join(f"{t}: {p}" for t, p in g["hist_gradient_boosting"]["settings"].items()))
        lines.append("")
        for arch, a in g["archs"].items():
            if a["search"]:
                lines += [f"Search, group {group} {arch} (seed 0, validation {main_task} AUC):", "",
                          "| axis | settings | valid AUC |", "|---|---|---|"]
                lines += [f"| {row['axis']} | {_fmt(row)} | {row['valid_auc']:.4f} |" for row in a["search"]]
                lines.append("")
        if "hist_gradient_boosting" in g:
            for t, rows in g["hist_gradient_boosting"]["search"].items():
                lines += [f"Search, group {group} HGB {t} (validation AUC):", "", "| axis | params | valid AUC |",
                          "|---|---|---|"]
                lines += [f"| {row['axis']} | " + ", ".join(f"{k} {row[k]}" for k, _ in HGB_AXES) +
                          f" | {row['valid_auc']:.4f} |" for row in rows]
                lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
