"""Census-income quality: architectures vs a gradient-boosting anchor, beside the paper's numbers.

Protocols (chosen by how many --data files are given):
  (a) the paper's: the UCI training file plus test file (test split 1:1 into validation and test);
  (b) one file (on these machines the 99,762-row test file): a seeded 60/20/20 split.

For every task group and architecture: optionally a documented search on validation only
(--search: a coordinate search, one axis at a time from the best point so far, over the numeric
input representation, learning rate, batch size, learning-rate schedule, weight decay, dropout,
widths, experts, tower width, embedding width, the census instance weight, patience, the main
task's loss weight, the bucket count, weight averaging (EMA) and the money columns' representation
(log scale, zero as its own bucket), then a second pass over bucket count, learning rate, cosine
length, embedding width, widths, dropout and weight averaging (`search_axes`); each point is one
training run, seed 0, early stopping on the main task's validation AUC); optionally (--refine) a short
search for every architecture from that result (learning rate, width, experts, tower, dropout,
DCN-v2 cross layers in front of the experts, then cross layers inside each expert, then piecewise-linear
numeric encodings: `refine_axes`; then an edge pass, one step past each axis whose choice was the first or
last of its candidates: `edge_axes`), so no architecture is compared at settings tuned for another; each
refine point is scored on the mean validation AUC of --select-seeds seeds (default 2, as in the published
tables: the differences it chooses between are about one seed's std); then --seeds training runs with the
chosen settings (CHOSEN, which records those results); test AUC as mean +- std and the best run.
--significance then tests each architecture's mean test AUC over the seeds against the anchor's on the
same test rows (paired DeLong; the seeds are retrained for their predictions, which the run cache does
not keep). --refit adds a second protocol beside it: every run (and the anchor) retrained on the
training and validation rows together for the epoch count (trees: iterations) its early stopping chose,
so validation still makes every choice and then trains too; its test AUC is a second table.

The anchor is scikit-learn's HistGradientBoostingClassifier (native categorical support), one
model per task, on the same transformed features, rows and splits; like the networks it is
stopped at the boosting iteration with the best validation AUC, and its learning rate and leaf
count are chosen on validation by the same kind of coordinate search (--search or --anchor-search;
HGB_AXES). --anchor-numeric gives it the networks' numeric inputs (bucket ids beside the numbers),
--anchor-money their money bucket ids (zero as its own bucket).

    mmoe data export --data ../shared/data/census-income/census-income.test.gz --task-group 1 --out /tmp/g1.npz
    python benchmarks/census_quality.py --arrays /tmp/g1.npz --archs mmoe shared_bottom --seeds 5 --search

`--arrays` takes `mmoe data export` files (one per task group; the group is read from their
tasks) so repeated runs skip tf.Transform; `--data` runs the transform instead. Every training
run is cached in benchmarks/results/census_runs.json under its full description (data, group,
architecture, settings, seed, epochs), so an interrupted command resumes where it stopped;
--fresh ignores the cache. Writes benchmarks/results/census_quality.json and its figure beside it (.png:
every seed's test AUC against the anchor and the targets), and prints the search tables and a markdown
table of test AUC. `--plot REPORT...` draws finished reports (e.g. both groups') into one figure without
training anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.arg_types import existing_file, non_negative_int, positive_int  # noqa: E402
from benchmarks.run_cache import RunCache  # noqa: E402
from mmoe.config import ARCHITECTURES  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# MMoE paper (Ma et al. 2018) and PLE paper (Tang et al. 2020), protocol (a), best runs.
PAPER = {
    1: {"single_task": (0.9398, 0.9922), "shared_bottom": (0.9361, 0.9921), "omoe": (0.9387, 0.9923),
        "mmoe": (0.9410, 0.9927), "ple": (0.9522, 0.9945)},
    2: {"single_task": (0.8843, 0.9922), "mmoe": (0.8860, 0.9924)},
}
GROUP_TASKS = {("income", "marital"): 1, ("education", "marital"): 2}
# Issue 6's targets for MMoE under protocol (b), mean test AUC over the seeds: drawn as lines by `plot`.
TARGETS = {1: {"income": 0.950, "marital": 0.994}, 2: {"education": 0.89}}

# Starting point of every search, and the settings used without --search. Keys are ModelConfig
# fields plus the training settings batch_size and use_weights (census instance weight as sample weight).
BASE = {"learning_rate": 1e-3, "batch_size": 512, "num_experts": 8, "expert_units": (64,), "bottom_units": (128,),
        "tower_units": (32,), "expert_dropout": 0.0, "tower_dropout": 0.0, "embedding_dim": 16,
        "use_weights": False}
# Training-only settings (not ModelConfig fields); absent means the default given here, and a setting
# equal to its default is left out of the cache key so runs from before the key existed still match.
#   numeric: how numeric inputs reach the network: "zscore" (the z-scored value only), "buckets" (only a
#     quantile-bucket id, embedded) or "both"; bucket ids are the spec's `also_bucketize` twins
#     (`<name>_bucket`) when the arrays have them, else derived here from training-split quantiles
#     (`numeric_buckets` of them) of the transformed value.
#   schedule, cosine_epochs, weight_decay, ema: the optimizer (`mmoe.training.OptimizerSettings`, which
#     `mmoe train` takes as flags too).
#   patience: early-stopping patience (epochs) on the main task's validation AUC.
#   main_loss_weight: weight of the main task's loss (the other task's stays 1).
#   money: how the mostly-zero money columns (MONEY_COLUMNS) enter: "plain" like the other numeric inputs;
#     "log": their z-scored input is log-scaled (`money_log`); "zero": zero gets its own bucket id and the
#     quantile buckets are taken over the non-zero training values (`zero_buckets`; derived bucket ids only,
#     so with numeric "both" or "buckets"); "log_zero": both.
TRAIN_DEFAULTS = {"numeric": "zscore", "numeric_buckets": 16, "schedule": "constant", "cosine_epochs": 20,
                  "weight_decay": 0.0, "patience": None, "main_loss_weight": 1.0, "ema": 0.0, "money": "plain"}
# Census money amounts: 90-98% zeros and a long tail, so 64 quantile buckets collapse to two or three.
MONEY_COLUMNS = ("wage_per_hour", "capital_gains", "capital_losses", "stock_dividends")
MONEY_MODES = ("plain", "log", "zero", "log_zero")
TRAIN_KEYS = {"batch_size", "use_weights", *TRAIN_DEFAULTS}
# Each group's MMoE search result (--search, seed 0; the tables print with the group's command): the point
# every architecture's --refine starts from. Group 1: validation income AUC 0.9481 against 0.9411 at BASE
# (0.9427 before the ema/money axes and the second pass). Group 2: validation education AUC 0.8949 against
# 0.8900 at BASE.
_SEARCHED_G1_MMOE = {**BASE, "batch_size": 256, "numeric": "both", "numeric_buckets": 128, "schedule": "cosine",
                     "cosine_epochs": 40, "learning_rate": 2e-3, "money": "log_zero", "ema": 0.99}
_SEARCHED_G2_MMOE = {**BASE, "learning_rate": 3e-3, "numeric": "both", "numeric_buckets": 64, "schedule": "cosine",
                     "embedding_dim": 8, "ema": 0.99, "money": "log"}
SEARCHED = {(1, "mmoe"): _SEARCHED_G1_MMOE, (2, "mmoe"): _SEARCHED_G2_MMOE}
# What each architecture's --refine changed on its group's search result (benchmarks/results/
# census_quality_g{1,2}.md list every point). Both groups' refines score each point on the mean of seeds 0 and 1
# (--select-seeds 2); the edge pass (edge_axes) is part of the refine.
REFINED = {
    (1, "mmoe"): {"learning_rate": 3e-3, "expert_units": (128, 64), "num_experts": 16, "tower_units": (64,),
                  "cross_layers": 2, "expert_cross_layers": 2, "expert_cross_rank": 32},
    (1, "shared_bottom"): {"bottom_units": (256, 128), "cross_layers": 2},
    (1, "single_task"): {"learning_rate": 3e-3, "bottom_units": (256, 128), "cross_layers": 3, "numeric_bins": 48},
    (1, "omoe"): {"learning_rate": 3e-3, "expert_units": (256, 128), "cross_layers": 3, "numeric_bins": 48},
    (1, "ple"): {"learning_rate": 3e-3, "expert_units": (256, 128), "cross_layers": 2},
    (2, "mmoe"): {"num_experts": 32, "cross_layers": 1, "numeric_bins": 48},
    (2, "shared_bottom"): {"bottom_units": (256,), "numeric_bins": 16},
    (2, "single_task"): {"learning_rate": 2e-3, "bottom_units": (256, 128), "cross_layers": 3, "numeric_bins": 48},
    (2, "omoe"): {"expert_units": (512, 256), "cross_layers": 1, "numeric_bins": 96},
    (2, "ple"): {"cross_layers": 2, "numeric_bins": 48, "tower_units": (16,)},
}
# Chosen settings per (group, arch), used without --search / --refine: the group's search result plus the
# architecture's own refinement.
CHOSEN: dict = {(group, arch): {**SEARCHED[(group, "mmoe")], **REFINED.get((group, arch), {})}
                for group in (1, 2) for arch in ("single_task", "shared_bottom", "omoe", "mmoe", "ple")}


def width_axis(arch):
    """The setting that sizes an architecture's hidden layers: its experts' widths, or its bottom's."""
    return "expert_units" if arch in ("mmoe", "omoe", "cgc", "ple") else "bottom_units"


def search_axes(arch):
    """The coordinate search: (axis name, candidate changes), tried in this order from the best point so far.

    Kept short because each point is a full training run on a shared 2-core machine (about 5 minutes each
    there); the axes are the ones expected to matter most on 60k rows: regularisation, then width.
    """
    width = width_axis(arch)
    widths = [(32,), (64,), (128,), (128, 64)] if width == "expert_units" else [(128,), (256,), (256, 128)]
    axes = [("numeric", [{"numeric": v} for v in ("zscore", "buckets", "both")]),
            ("learning_rate", [{"learning_rate": v} for v in (1e-3, 3e-4, 3e-3)]),
            ("batch_size", [{"batch_size": v} for v in (512, 256, 2048)]),
            ("schedule", [{"schedule": v} for v in ("constant", "plateau", "cosine")]),
            ("weight_decay", [{"weight_decay": v} for v in (0.0, 1e-4, 1e-2)]),
            ("dropout", [{"expert_dropout": v, "tower_dropout": v} for v in (0.0, 0.2)]),
            (width, [{width: v} for v in widths])]
    if arch in ("mmoe", "omoe"):
        axes.append(("num_experts", [{"num_experts": v} for v in (8, 4, 16)]))
    axes += [("tower_units", [{"tower_units": v} for v in ((32,), (64,))]),
             ("embedding_dim", [{"embedding_dim": v} for v in (16, 8, 32)]),
             ("use_weights", [{"use_weights": v} for v in (False, True)]),
             ("patience", [{"patience": v} for v in (None, 8)]),
             ("main_loss_weight", [{"main_loss_weight": v} for v in (1.0, 3.0, 0.5)]),
             ("numeric_buckets", [{"numeric_buckets": v} for v in (16, 32, 64)]),
             ("ema", [{"ema": v} for v in (0.0, 0.99, 0.999)]),
             ("money", [{"money": v} for v in MONEY_MODES])]
    # A second, shorter pass over the axes most likely to move at the new money inputs.
    axes += [("numeric_buckets 2", [{"numeric_buckets": v} for v in (32, 64, 128)]),
             ("learning_rate 2", [{"learning_rate": v} for v in (1e-3, 2e-3, 5e-4)]),
             ("cosine_epochs", [{"cosine_epochs": v} for v in (20, 40)]),
             ("embedding_dim 2", [{"embedding_dim": v} for v in (16, 32)]),
             (f"{width} 2", [{width: v} for v in widths[1:]]),
             ("dropout 2", [{"expert_dropout": v, "tower_dropout": v} for v in (0.0, 0.1)]),
             # Weight averaging once more: its first trial came before the money inputs and the faster schedule.
             ("ema 2", [{"ema": v} for v in (0.0, 0.99)])]
    return axes


def refine_axes(arch):
    """The short coordinate search of --refine, run for every architecture from the same point (its group's
    MMoE search result): the axes where architectures differ most, capacity and step size."""
    width = width_axis(arch)
    widths = ([(32,), (64,), (128,), (128, 64), (256, 128)] if width == "expert_units"
              else [(128,), (256,), (256, 128)])
    axes = [("learning_rate", [{"learning_rate": v} for v in (1e-3, 2e-3, 3e-3)]),
            (width, [{width: v} for v in widths])]
    if arch in ("mmoe", "omoe"):
        axes.append(("num_experts", [{"num_experts": v} for v in (4, 8, 16)]))
    elif arch in ("cgc", "ple"):
        axes.append(("task_experts", [{"task_experts": v} for v in (1, 2, 4)]))
    axes += [("tower_units", [{"tower_units": v} for v in ((32,), (64,))]),
             ("dropout", [{"expert_dropout": v, "tower_dropout": v} for v in (0.0, 0.1)]),
             # DCN-v2 cross layers in front of the experts (or bottom): last, because they came after the other
             # axes had been run (every earlier point stays a cached run).
             ("cross_layers", [{"cross_layers": v} for v in (1, 2, 3)])]
    if width == "expert_units":
        # DCN-style experts: each expert's own low-rank cross stack before its MLP (after the shared crosses
        # above, so those points stay cached runs too).
        axes.append(("expert_cross_layers", [{"expert_cross_layers": v, "expert_cross_rank": 32} for v in (1, 2)]))
    # Piecewise-linear encoding of the numeric inputs (Gorishniy et al. 2022), newest and so last.
    axes.append(("numeric_bins", [{"numeric_bins": v} for v in (16, 48)]))
    return axes


# One step past each end of a refine axis's candidates (below its first, above its last), for the edge pass;
# None where nothing lies past that end (no dropout below 0; below its first value an axis is at the start
# point's own setting, already scored: no cross layers, no bins).
REFINE_BEYOND = {
    "learning_rate": ({"learning_rate": 5e-4}, {"learning_rate": 5e-3}),
    "expert_units": ({"expert_units": (16,)}, {"expert_units": (512, 256)}),
    "bottom_units": ({"bottom_units": (64,)}, {"bottom_units": (512, 256)}),
    "num_experts": ({"num_experts": 2}, {"num_experts": 32}),
    "task_experts": (None, {"task_experts": 8}),
    "tower_units": ({"tower_units": (16,)}, {"tower_units": (128,)}),
    "dropout": (None, {"expert_dropout": 0.2, "tower_dropout": 0.2}),
    "cross_layers": (None, {"cross_layers": 4}),
    "expert_cross_layers": (None, {"expert_cross_layers": 3, "expert_cross_rank": 32}),
    "numeric_bins": (None, {"numeric_bins": 96}),
}


def edge_axes(arch, settings):
    """The refine's edge pass: for each refine axis whose chosen candidate is its first or its last, one more
    candidate a step past it (REFINE_BEYOND), since the best value may lie outside the range tried. An axis
    chosen inside its range, or left at the start point's own value, gets none. One pass, not repeated.
    """
    def chosen(change):
        return all(jsonable({k: settings.get(k)}) == jsonable({k: v}) for k, v in change.items())

    axes = []
    for axis, changes in refine_axes(arch):
        below, above = REFINE_BEYOND[axis]
        past = (below if chosen(changes[0]) else None) or (above if chosen(changes[-1]) else None)
        if past:
            axes.append((f"{axis} edge", [past]))
    return axes


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


def train_setting(settings, name):
    return settings.get(name, TRAIN_DEFAULTS.get(name))


def key_settings(settings):
    """Settings as they enter the cache key: training settings at their defaults are left out."""
    return jsonable({k: v for k, v in settings.items() if not (k in TRAIN_DEFAULTS and v == TRAIN_DEFAULTS[k])})


def _quantile_buckets(train_values, values, n):
    """Ids in [0, len(boundaries)] from n-quantile boundaries of the training values (repeated ones merged)."""
    boundaries = np.unique(np.quantile(train_values, np.arange(1, n) / n))
    return np.searchsorted(boundaries, values, side="right").astype("int64"), len(boundaries) + 1


def zero_buckets(train_values, values, n):
    """Like `_quantile_buckets`, but the training minimum (a money column's zero) is id 0 and the n-quantile
    boundaries are taken over the training values above it (ids from 1); returns (ids, vocabulary size)."""
    low = train_values.min()
    ids, size = _quantile_buckets(train_values[train_values > low], values, n)
    return np.where(values <= low, 0, ids + 1).astype("int64"), size + 1


def money_log(train_values, values):
    """z-score of log1p(x / m), x = value minus the training minimum (a money column's zero), m = the median
    non-zero training x. Scale-free, so it works on the already z-scored arrays: log1p(amount / median amount)."""
    low = train_values.min()
    above = train_values[train_values > low] - low
    scale = float(np.median(above)) if len(above) else 1.0

    def log(v):
        return np.log1p(np.maximum(v - low, 0) / scale)

    t = log(train_values.astype("float64"))
    return ((log(values.astype("float64")) - t.mean()) / (t.std() or 1.0)).astype("float32")


def numeric_inputs(features, splits, mode, n_buckets, money="plain"):
    """(features, splits) with numeric inputs as `mode` and `money` say (see TRAIN_DEFAULTS); the splits are not
    copied."""
    from features.spec import bucket_name
    from mmoe import InputFeature
    from mmoe.training import TaskData

    if mode not in ("zscore", "buckets", "both"):
        raise ValueError(f"numeric must be zscore, buckets or both, got {mode!r}")
    if money not in MONEY_MODES:
        raise ValueError(f"money must be one of {MONEY_MODES}, got {money!r}")
    names = {f.name for f in features}
    numeric = [f for f in features if f.kind == "numeric"]
    twins = {f.name: bucket_name(f.name) for f in numeric if bucket_name(f.name) in names}
    inputs = {k: dict(d.inputs) for k, d in splits.items()}
    out = list(features)
    if mode == "zscore":
        out = [f for f in features if f.name not in twins.values()]
    for f in numeric:
        if mode == "zscore" or f.name in twins:
            continue
        train = splits["train"].inputs[f.name]
        bucketize = zero_buckets if money in ("zero", "log_zero") and f.name in MONEY_COLUMNS else _quantile_buckets
        size = None
        for k in inputs:
            inputs[k][bucket_name(f.name)], size = bucketize(train, inputs[k][f.name], n_buckets)
        out.append(InputFeature(bucket_name(f.name), "categorical", vocab_size=size))
        twins[f.name] = bucket_name(f.name)
    if money in ("log", "log_zero"):
        for f in numeric:
            if f.name in MONEY_COLUMNS:
                train = splits["train"].inputs[f.name]
                for k in inputs:
                    inputs[k][f.name] = money_log(train, inputs[k][f.name])
    if mode == "buckets":
        out = [f for f in out if f.name not in twins]
    return out, {k: TaskData({f.name: inputs[k][f.name] for f in out}, d.labels, d.weights)
                 for k, d in splits.items()}


def _setup(arch, settings, features, tasks, splits):
    """(config, tasks, features, splits) of one run: the main task's loss weight applied, and the numeric inputs as
    the settings say (bucket ids and money scaling derived from `splits["train"]`)."""
    from mmoe import ModelConfig

    config = ModelConfig(arch=arch, **{k: v for k, v in settings.items() if k not in TRAIN_KEYS})
    main_weight = train_setting(settings, "main_loss_weight")
    if main_weight != 1.0:
        tasks = [dataclasses.replace(tasks[0], loss_weight=tasks[0].loss_weight * main_weight), *tasks[1:]]
    features, splits = numeric_inputs(features, splits, train_setting(settings, "numeric"),
                                      train_setting(settings, "numeric_buckets"), train_setting(settings, "money"))
    return config, tasks, features, splits


def _compiled_model(config, settings, features, tasks, n_train, seed, validated=True):
    """(model, callbacks): the model built and compiled with the settings' optimizer (schedule, weight decay, EMA);
    `validated=False` for a refit, which trains without validation rows."""
    import keras

    from mmoe import build_model, compile_model
    from mmoe.training import OptimizerSettings, optimizer_and_callbacks

    keras.utils.set_random_seed(seed)
    model = build_model(config, features, tasks)
    optimizer, callbacks = optimizer_and_callbacks(OptimizerSettings.from_settings(settings), config.learning_rate,
                                                   -(-n_train // settings["batch_size"]), tasks[0], len(tasks),
                                                   validated)
    return compile_model(model, config, tasks, steps_per_execution=16, optimizer=optimizer), callbacks


def train_once(arch, settings, features, tasks, splits, seed, epochs, patience=4, test_scores=False):
    """One training run: validation and test metrics per task, and `best_epoch`, the epoch whose weights early
    stopping kept; with `test_scores`, also the test predictions (`"test_scores"`: task -> `[rows]`, for
    `--significance`; not for the run cache)."""
    import keras

    from mmoe.training import TaskData, early_stopped_epoch, evaluate, fit, predict, prediction_metrics

    config, tasks, features, splits = _setup(arch, settings, features, tasks, splits)
    patience = train_setting(settings, "patience") or patience
    train, valid = splits["train"], splits["valid"]
    if not settings.get("use_weights"):
        train = TaskData(train.inputs, train.labels)
    # Validation for early stopping is unweighted, like the reported AUC.
    valid = TaskData(valid.inputs, valid.labels)
    model, callbacks = _compiled_model(config, settings, features, tasks, len(train), seed)
    started = time.time()
    history = fit(model, tasks, train, valid, epochs=epochs, batch_size=settings["batch_size"],
                  patience=patience, verbose=0, seed=seed, callbacks=callbacks)
    test_predictions = predict(model, splits["test"].inputs)
    result = {"valid": evaluate(model, tasks, splits["valid"]),
              "test": prediction_metrics(tasks, splits["test"].labels, test_predictions),
              "epochs": len(history.history["loss"]),
              "best_epoch": early_stopped_epoch(history.history, tasks[0], len(tasks)),
              "seconds": round(time.time() - started, 1), "params": model.count_params()}
    if test_scores:
        result["test_scores"] = {k: np.asarray(v, dtype="float64").ravel() for k, v in test_predictions.items()}
    keras.backend.clear_session()
    return result


def best_epoch(run, max_epochs, patience):
    """The epoch whose weights a run kept; for cached runs from before `best_epoch` was recorded, `patience` epochs
    before the last when early stopping ended the run (it stops exactly that many after the best), None when the
    run used all `max_epochs` (its best could be any of them)."""
    if "best_epoch" in run:
        return run["best_epoch"]
    return run["epochs"] - patience if run["epochs"] < max_epochs else None


def refit_splits(splits):
    """The splits a refit uses: training and validation rows together as "train", and the same test rows."""
    from mmoe.training import TaskData

    return {"train": TaskData.concat([splits["train"], splits["valid"]]), "test": splits["test"]}


def refit_once(arch, settings, features, tasks, splits, seed, epochs, test_scores=False):
    """The run again on the training and validation rows together, for `epochs` epochs (a run's `best_epoch`, which
    validation chose) and with no early stopping; test metrics per task. What this benchmark derives from the
    training rows (bucket ids, money scaling, piecewise-linear bin edges) comes from both; the export's own
    transform (z-scores, vocabularies) stays as fitted on the training split. `test_scores` as for `train_once`."""
    import keras

    from mmoe.training import TaskData, fit, predict, prediction_metrics

    config, tasks, features, merged = _setup(arch, settings, features, tasks, refit_splits(splits))
    train = merged["train"] if settings.get("use_weights") else TaskData(merged["train"].inputs, merged["train"].labels)
    model, callbacks = _compiled_model(config, settings, features, tasks, len(train), seed, validated=False)
    started = time.time()
    fit(model, tasks, train, None, epochs=epochs, batch_size=settings["batch_size"], verbose=0, seed=seed,
        callbacks=callbacks)
    test_predictions = predict(model, merged["test"].inputs)
    result = {"test": prediction_metrics(tasks, merged["test"].labels, test_predictions),
              "epochs": epochs, "rows": len(train), "seconds": round(time.time() - started, 1)}
    if test_scores:
        result["test_scores"] = {k: np.asarray(v, dtype="float64").ravel() for k, v in test_predictions.items()}
    keras.backend.clear_session()
    return result


def inputs_fingerprint(features):
    """Short hash of the transformed inputs (names, kinds, vocabulary sizes): runs on other features never match."""
    import hashlib

    text = json.dumps([[f.name, f.kind, f.vocab_size] for f in features])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


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


def hgb_fit(features, splits, task, params, seed=0, use_weights=False, test_scores=False):
    """One HistGradientBoostingClassifier for one task, stopped at the iteration with the best validation AUC.

    Grown HGB_CHUNK iterations at a time (warm start, which builds the same trees as one long fit);
    stops once the validation AUC has not improved for HGB_PATIENCE iterations or at HGB_MAX_ITER.
    Returns {"valid": auc, "test": auc, "iterations": n, "seconds": s}, with `test_scores` also the test
    predictions at that iteration (`"test_scores"`, `[rows]`).
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
    scores = next(p for i, p in enumerate(model.staged_predict_proba(_matrix(features, splits["test"])))
                  if i == best)[:, 1]
    result = {"valid": valid_aucs[best], "test": roc_auc(y_test, scores), "iterations": best + 1,
              "seconds": round(time.time() - started, 1)}
    if test_scores:
        result["test_scores"] = scores
    return result


def gradient_boosting_anchor(features, tasks, splits, cache, base_key, search, seeds, log, numeric="zscore",
                             numeric_buckets=TRAIN_DEFAULTS["numeric_buckets"], money="plain"):
    """The anchor per task; `numeric`, `numeric_buckets`, `money` as for the networks (TRAIN_DEFAULTS), so it can
    see the same inputs."""
    report = {"search": {}, "settings": {}, "runs": [], "valid": {}, "test": {}, "numeric": numeric, "money": money}
    features, splits = numeric_inputs(features, splits, numeric, numeric_buckets, money)
    for t in tasks:
        def run(params, seed=0):
            key = {**base_key, "model": "hist_gradient_boosting", "task": t.name, "params": params, "seed": seed,
                   "max_iter": HGB_MAX_ITER, "stop": [HGB_CHUNK, HGB_PATIENCE],
                   **({"numeric": numeric, "numeric_buckets": numeric_buckets} if numeric != "zscore" else {}),
                   **({"money": money} if money != "plain" else {})}
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


def _anchor_inputs(anchor, task):
    """(numeric, money) of the anchor's chosen inputs for a task: `best_anchor` records them per task; a report of a
    single input representation only at its top."""
    chosen = anchor["settings"][task]
    return (chosen.get("numeric", anchor.get("numeric", "zscore")),
            chosen.get("money", anchor.get("money", "plain")))


def _anchor_per_task(features, tasks, splits, anchor, anchor_buckets):
    """Per task, what refitting the anchor needs: (task, its features and splits with the anchor's chosen numeric
    inputs, its HGB params, the iterations its early stopping chose)."""
    for i, t in enumerate(tasks):
        numeric, money = _anchor_inputs(anchor, t.name)
        task_features, task_splits = numeric_inputs(features, splits, numeric, anchor_buckets, money)
        params = {name: anchor["settings"][t.name][name] for name, _ in HGB_AXES}
        yield t, task_features, task_splits, params, anchor["runs"][i][t.name][0]["iterations"]


def anchor_test_scores(features, tasks, splits, anchor, anchor_buckets, refit=False):
    """The anchor's test predictions per task, refitted at its chosen settings (its fit is deterministic); with
    `refit`, those of its refit on train + valid (`hgb_refit`, at its chosen iterations)."""
    scores = {}
    for t, task_features, task_splits, params, iterations in _anchor_per_task(
            features, tasks, refit_splits(splits) if refit else splits, anchor, anchor_buckets):
        if refit:
            fitted = hgb_refit(task_features, task_splits, t.name, params, iterations, test_scores=True)
        else:
            fitted = hgb_fit(task_features, task_splits, t.name, params, test_scores=True)
        scores[t.name] = fitted["test_scores"]
    return scores


def hgb_refit(features, splits, task, params, iterations, seed=0, use_weights=False, test_scores=False):
    """`hgb_fit`'s model again on the training and validation rows together, grown to `iterations` trees (the count
    validation chose) with no early stopping; {"test": auc, "iterations": n, "rows": n, "seconds": s}, with
    `test_scores` also the test predictions."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from mmoe.training import roc_auc

    categorical = np.array([f.kind == "categorical" for f in features])
    started = time.time()
    train = splits["train"]
    model = HistGradientBoostingClassifier(categorical_features=categorical, max_iter=iterations, early_stopping=False,
                                           random_state=seed, **params)
    model.fit(_matrix(features, train), train.labels[task], sample_weight=train.weights if use_weights else None)
    scores = model.predict_proba(_matrix(features, splits["test"]))[:, 1]
    result = {"test": roc_auc(splits["test"].labels[task], scores), "iterations": iterations, "rows": len(train),
              "seconds": round(time.time() - started, 1)}
    return {**result, "test_scores": scores} if test_scores else result


def anchor_refit(features, tasks, splits, anchor, anchor_buckets, cache, base_key):
    """The anchor per task refitted on the training and validation rows at its chosen settings and iteration count
    (`hgb_refit`); reported like `summarize`'s test block, plus the iterations."""
    out = {"test": {}, "iterations": {}}
    for t, task_features, task_splits, params, iterations in _anchor_per_task(
            features, tasks, refit_splits(splits), anchor, anchor_buckets):
        numeric, money = _anchor_inputs(anchor, t.name)
        key = {**base_key, "model": "hist_gradient_boosting", "task": t.name, "params": params,
               "numeric": numeric, "numeric_buckets": anchor_buckets, "money": money,
               "refit": "train+valid", "iterations": iterations}
        r = cache.get(key, lambda: hgb_refit(task_features, task_splits, t.name, params, iterations))
        out["test"][t.name] = {"mean": r["test"], "std": 0.0, "best": r["test"], "runs": 1}
        out["iterations"][t.name] = iterations
    return out


def detectable_difference(se):
    """The smallest true difference a two-sided 5 % test with this standard error finds significant four times in
    five (80 % power): (z 0.975 + z 0.8) x SE, the SE taken as measured."""
    return (1.959964 + 0.841621) * se


def versus_anchor(labels, anchor_scores, seed_scores):
    """Per task: paired DeLong test of the mean test AUC over the seeds minus the anchor's (the tables' two
    numbers), with a 95% normal interval, and `detectable` (`detectable_difference`): a difference far below it is
    a tie these test rows cannot resolve, not evidence that there is none.
    `seed_scores`: one {task: [rows]} per seed."""
    from serving.ab.stats import delong_paired

    out = {}
    for task, anchor in anchor_scores.items():
        test = delong_paired(labels[task], anchor, np.vstack([run[task] for run in seed_scores]))
        out[task] = {"diff": test["diff"], "se": test["se"], "p_value": test["p_value"],
                     "ci": [test["diff"] - 1.959964 * test["se"], test["diff"] + 1.959964 * test["se"]],
                     "detectable": detectable_difference(test["se"])}
    return out


def warn_if_retrained_differently(retrained, cached, tasks, log):
    """--significance retrains runs for their predictions: they must be the cached ones, or the test would be about
    other models."""
    for seed, (again, before) in enumerate(zip(retrained, cached)):
        for t in tasks:
            if abs(again["test"][t.name]["auc"] - before["test"][t.name]["auc"]) > 1e-4:
                log(f"  warning: seed {seed} {t.name} retrained to test AUC {again['test'][t.name]['auc']:.5f}, "
                    f"cached {before['test'][t.name]['auc']:.5f}")


def best_anchor(reports, tasks):
    """One anchor report from several (one per input representation): per task the best on validation."""
    if len(reports) == 1:
        return reports[0]
    out = {"search": {}, "settings": {}, "runs": [], "valid": {}, "test": {}}
    for i, t in enumerate(tasks):
        best = max(reports, key=lambda r: r["valid"][t.name]["mean"])
        out["search"][t.name] = [{**row, "numeric": r["numeric"], **_money(r)} for r in reports
                                 for row in r["search"].get(t.name, [])]
        out["settings"][t.name] = {**best["settings"][t.name], "numeric": best["numeric"], **_money(best)}
        out["valid"][t.name], out["test"][t.name] = best["valid"][t.name], best["test"][t.name]
        out["runs"].append(best["runs"][i])
    return out


def _money(report):
    return {"money": report["money"]} if report.get("money", "plain") != "plain" else {}


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
    source.add_argument("--data", nargs="+", type=existing_file,
                        help="census file(s): one file = protocol (b), two = protocol (a)")
    source.add_argument("--arrays", nargs="+", type=existing_file, help="`mmoe data export` files, one per task group")
    source.add_argument("--plot", nargs="+", metavar="REPORT",
                        help="train nothing: draw one figure of the groups in these finished reports (JSON files "
                        "this script wrote) to --out's .png")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                        help="task groups (with --data; --arrays files name their own group)")
    parser.add_argument("--archs", nargs="+", default=["single_task", "shared_bottom", "omoe", "mmoe", "ple"])
    parser.add_argument("--seeds", type=positive_int, default=5)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--search", action="store_true", help="tune each architecture on validation first")
    parser.add_argument("--search-archs", nargs="+", help="search only these architectures; the others take "
                        "the settings chosen for --search-like (default mmoe) in the same group")
    parser.add_argument("--search-like", default="mmoe")
    parser.add_argument("--refine", action="store_true",
                        help="then tune every architecture (the searched one too) with a short search "
                        "(refine_axes) from the --search-like architecture's chosen settings, on validation")
    parser.add_argument("--select-seeds", type=int, default=2,
                        help="--refine scores each point on the mean main-task validation AUC of seeds 0..N-1 "
                        "(default 2, as in the published tables: one seed's noise is as large as the differences "
                        "the refine chooses between)")
    parser.add_argument("--epochs", type=positive_int, default=40)
    parser.add_argument("--patience", type=non_negative_int, default=4)
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--anchor-numeric", nargs="+", default=["zscore"], choices=["zscore", "both", "buckets"],
                        help="numeric inputs of the anchor (see TRAIN_DEFAULTS['numeric']); with several, each task "
                        "keeps the one with the best validation AUC (give the networks' choice among them)")
    parser.add_argument("--anchor-buckets", type=int, default=TRAIN_DEFAULTS["numeric_buckets"],
                        help="quantile buckets per numeric input with --anchor-numeric both/buckets")
    parser.add_argument("--anchor-money", nargs="+", default=["plain"], choices=["plain", "zero"],
                        help="money columns of the anchor (TRAIN_DEFAULTS['money']; the trees are blind to the log, "
                        "and zero only changes bucket ids, so it is tried with --anchor-numeric both/buckets only)")
    parser.add_argument("--anchor-search", action="store_true", help="tune the anchor on validation even "
                        "without --search (--search tunes it too)")
    parser.add_argument("--anchor-seeds", type=int, default=1, help="the anchor is deterministic; 1 is enough")
    parser.add_argument("--significance", action="store_true",
                        help="test each architecture's mean test AUC over the seeds against the anchor's (paired "
                        "DeLong on the test rows); retrains the seeds to get their predictions (not cached)")
    parser.add_argument("--refit", action="store_true",
                        help="also retrain every run on the training and validation rows together for the epochs "
                        "early stopping chose (the anchor for its chosen iterations) and report that test AUC in a "
                        "second table: validation still chooses everything, then trains too")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument("--cache", default=str(RESULTS / "census_runs.json"))
    parser.add_argument("--out", default=str(RESULTS / "census_quality.json"),
                        help="the report (JSON); its figure goes beside it with .png (with --plot: the figure only)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.archs) - set(ARCHITECTURES))
    if unknown:
        parser.error(f"--archs: unknown {unknown}; choose from {list(ARCHITECTURES)}")
    if args.data and len(args.data) > 2:
        parser.error(f"--data takes one file (protocol b) or two (protocol a), got {len(args.data)}")
    if args.select_seeds < 1:
        parser.error(f"--select-seeds must be >= 1, got {args.select_seeds}")
    if args.significance and args.no_anchor:
        parser.error("--significance tests against the anchor; drop --no-anchor")

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    png = Path(args.out).with_suffix(".png")
    if args.plot:
        try:
            reports = [json.loads(Path(path).read_text()) for path in args.plot]
            plot(merge_reports(reports), png)
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--plot: {err}")
        print(f"wrote {png}")
        return 0
    try:
        cache = RunCache(args.cache, fresh=args.fresh)
    except ValueError as err:
        parser.error(str(err))
    report = {"protocol": None, "groups": {}, "command": " ".join(sys.argv), "select_seeds": args.select_seeds}
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
            report["groups"][str(group)] = GroupBench(args, group, features, tasks, splits, protocol, cache,
                                                      log).report()
    Path(args.out).write_text(json.dumps(report, indent=1))
    plot(report, png)
    print(markdown(report))
    log(f"wrote {args.out} and {png}")
    return 0


class GroupBench:
    """One task group's part of the command: the anchor, then for each architecture its settings (as chosen, or
    searched and refined on validation), its seeds' runs, and with --refit / --significance their refits and the
    comparison with the anchor. Every training run goes through the run cache, keyed by `run_key`."""

    def __init__(self, args, group, features, tasks, splits, protocol, cache, log):
        self.args, self.group, self.features, self.tasks, self.splits = args, group, features, tasks, splits
        self.cache, self.log = cache, log
        self.main_task = tasks[0].name
        self.base_key = {"group": group, "protocol": {k: v for k, v in protocol.items() if k != "files"},
                         "files": [os.path.basename(f) for f in protocol.get("files", [])],
                         "inputs": inputs_fingerprint(features)}

    def report(self) -> dict:
        """The group's part of the report: its tasks, each architecture's results and the anchor's."""
        args, group = self.args, self.group
        group_report = {"tasks": [t.name for t in self.tasks], "archs": {}}
        anchor = None if args.no_anchor else self.anchor()
        if anchor is not None:
            group_report["hist_gradient_boosting"] = anchor
        anchor_scores = anchor_refit_scores = None
        if args.significance and anchor is not None:
            self.log(f"group {group}: the anchor's test predictions (for --significance)")
            anchor_scores = anchor_test_scores(self.features, self.tasks, self.splits, anchor, args.anchor_buckets)
            if args.refit:
                anchor_refit_scores = anchor_test_scores(self.features, self.tasks, self.splits, anchor,
                                                         args.anchor_buckets, refit=True)
        chosen_in_group = {}
        for arch in sorted(args.archs, key=lambda a: a != args.search_like):  # the searched one first
            group_report["archs"][arch] = self.arch_report(arch, chosen_in_group, anchor_scores,
                                                           anchor_refit_scores)
        return group_report

    def anchor(self) -> dict:
        """The HGB anchor: the best of its numeric / money input variants per task, refitted with --refit."""
        args, group = self.args, self.group
        self.log(f"group {group}: HistGradientBoosting anchor")
        anchor = best_anchor([gradient_boosting_anchor(self.features, self.tasks, self.splits, self.cache,
                                                       self.base_key, args.search or args.anchor_search,
                                                       args.anchor_seeds, self.log, numeric=numeric,
                                                       numeric_buckets=args.anchor_buckets, money=money)
                              for numeric in args.anchor_numeric for money in args.anchor_money
                              if numeric != "zscore" or money == "plain"], self.tasks)
        if args.refit:
            self.log(f"group {group}: the anchor refitted on train + valid (--refit)")
            anchor["refit"] = anchor_refit(self.features, self.tasks, self.splits, anchor, args.anchor_buckets,
                                           self.cache, self.base_key)
        self.log(f"group {group} HGB test AUC: " + ", ".join(
            f"{k} {v['mean']:.4f}" for k, v in anchor["test"].items()))
        return anchor

    def run_key(self, arch, settings, seed) -> dict:
        return {**self.base_key, "arch": arch, "settings": key_settings(settings), "seed": seed,
                "epochs": self.args.epochs, "patience": self.args.patience}

    def run(self, arch, settings, seed=0) -> dict:
        """One training run (`train_once`), from the cache when it holds it."""
        key = self.run_key(arch, settings, seed)

        def compute():
            r = train_once(arch, settings, self.features, self.tasks, self.splits, seed, self.args.epochs,
                           self.args.patience)
            self.log(f"    g{self.group} {arch} seed {seed} {key_settings(settings)}: valid " + ", ".join(
                f"{t.name} {r['valid'][t.name]['auc']:.4f}" for t in self.tasks) +
                f" ({r['epochs']} ep, {r['seconds']} s)")
            return r
        return self.cache.get(key, compute)

    def choose(self, arch, chosen_in_group) -> tuple[dict, list, bool]:
        """(settings, search log, searched): CHOSEN's settings, or --search's and --refine's choice on validation.
        A searched architecture's choice goes into `chosen_in_group`, where the others start from."""
        args, main_task, log = self.args, self.main_task, self.log
        settings, search_log = {**TRAIN_DEFAULTS, **CHOSEN.get((self.group, arch), BASE)}, []
        searched = args.search and (args.search_archs is None or arch in args.search_archs)
        if searched:
            log(f"search g{self.group} {arch} (validation {main_task} AUC, seed 0)")
            settings, table = coordinate_search(search_axes(arch), {**TRAIN_DEFAULTS, **BASE},
                                                lambda s: self.run(arch, s)["valid"][main_task]["auc"], log)
            search_log = [{"axis": a, **key_settings(s), "valid_auc": v} for a, s, v in table]
            chosen_in_group[arch] = settings
        elif args.search and args.search_like in chosen_in_group:
            settings = dict(chosen_in_group[args.search_like])
        if args.refine:
            # Every architecture, the searched one included, gets the same short search from the same
            # point, so none is compared at settings tuned for another.
            start = dict(chosen_in_group.get(args.search_like)
                         or {**TRAIN_DEFAULTS, **SEARCHED.get((self.group, args.search_like), BASE)})
            seeds = range(args.select_seeds)
            log(f"refine g{self.group} {arch} from {args.search_like}'s settings (validation {main_task} AUC, "
                f"mean of seeds {list(seeds)})")

            def score(s):
                return float(np.mean([self.run(arch, s, seed)["valid"][main_task]["auc"] for seed in seeds]))
            settings, table = coordinate_search(refine_axes(arch), start, score, log)
            search_log += [{"axis": f"refine: {a}", **key_settings(s), "valid_auc": v} for a, s, v in table]
            edges = edge_axes(arch, settings)
            if edges:
                log(f"refine g{self.group} {arch}: edge pass over {', '.join(a for a, _ in edges)}")
                settings, table = coordinate_search(edges, settings, score, log)
                search_log += [{"axis": f"refine: {a}", **key_settings(s), "valid_auc": v}
                               for a, s, v in table[1:]]  # table[0] is the refine's best, listed above
        return settings, search_log, searched

    def arch_report(self, arch, chosen_in_group, anchor_scores=None, anchor_refit_scores=None) -> dict:
        """An architecture's settings, search log, seeds' runs and their summaries; its refits with --refit, and
        with the anchor's test predictions (--significance) the paired comparison with them."""
        args, tasks, log = self.args, self.tasks, self.log
        settings, search_log, searched = self.choose(arch, chosen_in_group)
        runs = [self.run(arch, settings, seed) for seed in range(args.seeds)]
        for seed, r in enumerate(runs):
            log(f"g{self.group} {arch} seed {seed}: test " + ", ".join(
                f"{t.name} {r['test'][t.name]['auc']:.4f}" for t in tasks) + f" ({r['epochs']} ep)")
        out = {"settings": key_settings(settings), "searched": searched, "refined": args.refine,
               "search": search_log, "test": summarize(runs, tasks), "valid": summarize(runs, tasks, "valid"),
               "runs": runs}
        if args.refit:
            out["refit"] = self.refit_runs(arch, settings, runs)
        labels = self.splits["test"].labels
        if anchor_scores is not None:
            log(f"g{self.group} {arch}: retraining {args.seeds} seeds for their test predictions (--significance)")
            scored = [train_once(arch, settings, self.features, tasks, self.splits, seed, args.epochs,
                                 args.patience, test_scores=True) for seed in range(args.seeds)]
            warn_if_retrained_differently(scored, runs, tasks, log)
            out["vs_anchor"] = versus_anchor(labels, anchor_scores, [r["test_scores"] for r in scored])
        if anchor_refit_scores is not None:
            refit = out["refit"]
            log(f"g{self.group} {arch}: refitting {args.seeds} seeds again for their test predictions")
            scored = [refit_once(arch, settings, self.features, tasks, self.splits, seed, epochs, test_scores=True)
                      for seed, epochs in enumerate(refit["epochs"])]
            warn_if_retrained_differently(scored, refit["runs"], tasks, log)
            refit["vs_anchor"] = versus_anchor(labels, anchor_refit_scores, [r["test_scores"] for r in scored])
        return out

    def refit_runs(self, arch, settings, runs) -> dict:
        """Each seed's run refitted on train + valid for its best epoch count (cached like the runs)."""
        args = self.args
        refits = []
        for seed, r in enumerate(runs):
            epochs = best_epoch(r, args.epochs, train_setting(settings, "patience") or args.patience)
            if epochs is None:  # a cached run that used every epoch: train it again to learn its best
                epochs = train_once(arch, settings, self.features, self.tasks, self.splits, seed, args.epochs,
                                    args.patience)["best_epoch"]

            def compute(seed=seed, epochs=epochs):
                refit = refit_once(arch, settings, self.features, self.tasks, self.splits, seed, epochs)
                self.log(f"    g{self.group} {arch} seed {seed} refit on train + valid ({epochs} ep): test " +
                         ", ".join(f"{t.name} {refit['test'][t.name]['auc']:.4f}" for t in self.tasks))
                return refit
            refits.append(self.cache.get({**self.run_key(arch, settings, seed), "refit": "train+valid",
                                          "refit_epochs": epochs}, compute))
        return {"test": summarize(refits, self.tasks), "epochs": [r["epochs"] for r in refits], "runs": refits}


def _fmt(settings):
    short = {"learning_rate": "lr", "batch_size": "batch", "num_experts": "experts", "expert_units": "expert",
             "bottom_units": "bottom", "tower_units": "tower", "expert_dropout": "drop", "embedding_dim": "emb",
             "use_weights": "weights", "numeric": "numeric", "schedule": "schedule", "weight_decay": "wd",
             "patience": "patience", "main_loss_weight": "main weight", "numeric_buckets": "buckets",
             "cosine_epochs": "cosine epochs", "ema": "ema", "money": "money", "task_experts": "task experts",
             "cross_layers": "cross", "expert_cross_layers": "expert cross", "expert_cross_rank": "expert cross rank",
             "numeric_bins": "piecewise bins"}
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
        refitted = {arch: a["refit"] for arch, a in g["archs"].items() if "refit" in a}
        if refitted:
            rows = p["rows"]["train"] + p["rows"]["valid"]
            lines += [f"Refit (--refit): every run retrained on the training and validation rows together "
                      f"({rows:,}) for the epochs its early stopping chose (the anchor: its iterations), test AUC:",
                      "", "| model | " + " | ".join(f"{t} mean ± std | {t} best" for t in tasks) +
                      " | epochs (trees: iterations) |", "|---|" + "---|---|" * len(tasks) + "---|"]
            digits = {t: 4 if t == main_task else 5 for t in tasks}  # the other task's AUCs sit near 0.995
            hgb_refit_report = g.get("hist_gradient_boosting", {}).get("refit")
            if hgb_refit_report:
                lines.append("| HistGradientBoosting | " + " | ".join(
                    f"{hgb_refit_report['test'][t]['mean']:.{digits[t]}f} | –" for t in tasks) + " | " +
                    ", ".join(f"{t} {n}" for t, n in hgb_refit_report["iterations"].items()) + " |")
            for arch, r in refitted.items():
                epochs = sorted(set(r["epochs"]))
                epochs = f"{epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else str(epochs[0])
                lines.append(f"| {arch} ({r['test'][main_task]['runs']} seeds) | " + " | ".join(
                    f"{r['test'][t]['mean']:.{digits[t]}f} ± {r['test'][t]['std']:.{digits[t]}f} | "
                    f"{r['test'][t]['best']:.{digits[t]}f}" for t in tasks) + f" | {epochs} |")
            lines.append("")
        tested = {arch: a["vs_anchor"] for arch, a in g["archs"].items() if "vs_anchor" in a}
        tested.update({f"{arch} (refit, against the refitted anchor)": a["refit"]["vs_anchor"]
                       for arch, a in g["archs"].items() if "vs_anchor" in a.get("refit", {})})
        if tested:
            lines += ["Against the anchor (test; mean AUC over the seeds minus HGB's, paired DeLong, 95% interval; "
                      "detectable: the smallest true difference these rows show at 5 % four times in five):",
                      "", "| model | " + " | ".join(f"{t}: difference ± SE [95%] (p) | detectable" for t in tasks) +
                      " |", "|---|" + "---|---|" * len(tasks)]
            for arch, v in tested.items():
                lines.append(f"| {arch} | " + " | ".join(
                    f"{v[t]['diff']:+.5f} ± {v[t]['se']:.5f} [{v[t]['ci'][0]:+.5f}, {v[t]['ci'][1]:+.5f}] "
                    f"({v[t]['p_value']:.3f}) | {detectable_difference(v[t]['se']):.5f}" for t in tasks) + " |")
            lines.append("")
        lines.append("Settings: " + "; ".join(f"{arch}: {_fmt(a['settings'])}" for arch, a in g["archs"].items()))
        if "hist_gradient_boosting" in g:
            lines.append("HGB: " + "; ".join(f"{t}: {p}" for t, p in g["hist_gradient_boosting"]["settings"].items()))
        lines.append("")
        for arch, a in g["archs"].items():
            if a["search"]:
                kind = ("Search" + (" and refine" if a.get("refined") else "") if a["searched"]
                        else "Refine (from the searched architecture's settings)")
                seeds = report.get("select_seeds", 1)
                scored = "seed 0" if seeds == 1 else f"search: seed 0; refine: mean of seeds 0-{seeds - 1}"
                lines += [f"{kind}, group {group} {arch} ({scored}, validation {main_task} AUC):", "",
                          "| axis | settings | valid AUC |", "|---|---|---|"]
                lines += [f"| {row['axis']} | {_fmt(row)} | {row['valid_auc']:.4f} |" for row in a["search"]]
                lines.append("")
        if "hist_gradient_boosting" in g:
            for t, rows in g["hist_gradient_boosting"]["search"].items():
                lines += [f"Search, group {group} HGB {t} (validation AUC):", "", "| axis | params | valid AUC |",
                          "|---|---|---|"]
                lines += [f"| {row['axis']} | " + ", ".join(f"{k} {row[k]}" for k, _ in HGB_AXES) +
                          (f", numeric {row['numeric']}" if "numeric" in row else "") +
                          (f", money {row['money']}" if "money" in row else "") +
                          f" | {row['valid_auc']:.4f} |" for row in rows]
                lines.append("")
    return "\n".join(lines)


def merge_reports(reports):
    """One report holding the groups of several (e.g. the group 1 and group 2 runs), which must share a protocol."""
    merged = {"protocol": reports[0]["protocol"], "groups": {}}
    for report in reports:
        if report["protocol"] != merged["protocol"]:
            raise ValueError(f"the reports' protocols differ: {merged['protocol']} and {report['protocol']}")
        for group in report["groups"]:
            if group in merged["groups"]:
                raise ValueError(f"task group {group} is in more than one report")
        merged["groups"].update(report["groups"])
    return merged


def plot(report, path):
    """Test AUC of every run: one panel per (task group, task), a column per model, each seed a dot (early-stopped
    and, where the report has them, refitted), its mean a bar; the anchor's AUCs as lines across the panel and
    issue 6's targets as dashed lines, so every model reads against both. Returns the figure (saved to `path`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(report["groups"].items(), key=lambda item: int(item[0]))
    width = max(len(g["tasks"]) for _, g in groups)
    fig, axes = plt.subplots(len(groups), width, figsize=(5.2 * width, 3.8 * len(groups)), squeeze=False)
    colors = {"test": "tab:blue", "refit": "tab:orange"}
    offsets = {"test": -0.12, "refit": 0.12}
    for row, (group, g) in zip(axes, groups):
        archs = list(g["archs"])
        hgb = g.get("hist_gradient_boosting")
        columns = (["HGB"] if hgb else []) + archs
        for ax, task in zip(row, g["tasks"]):
            values = []
            for x, arch in enumerate(columns):
                if arch == "HGB":
                    runs = {"test": [r["test"] for r in dict(_hgb_runs(hgb))[task]]}
                    if "refit" in hgb:
                        runs["refit"] = [hgb["refit"]["test"][task]["mean"]]
                else:
                    a = g["archs"][arch]
                    runs = {"test": [r["test"][task]["auc"] for r in a["runs"]]}
                    if "refit" in a:
                        runs["refit"] = [r["test"][task]["auc"] for r in a["refit"]["runs"]]
                for kind, aucs in runs.items():
                    shift = offsets[kind] if len(runs) > 1 else 0.0
                    ax.scatter(np.full(len(aucs), x + shift), aucs, s=14, color=colors[kind], zorder=3)
                    ax.hlines(np.mean(aucs), x + shift - 0.1, x + shift + 0.1, color=colors[kind], linewidth=2)
                    values += aucs
            if hgb:
                for kind, auc in [("test", hgb["test"][task]["mean"])] + (
                        [("refit", hgb["refit"]["test"][task]["mean"])] if "refit" in hgb else []):
                    ax.axhline(auc, color=colors[kind], linestyle=":", linewidth=1, alpha=0.8)
            low, high = min(values), max(values)
            pad = 0.1 * (high - low) or 1e-4  # every AUC equal (one run): a small window around it
            low, high = low - pad, high + pad
            ax.set_ylim(low, high)
            target = TARGETS.get(int(group), {}).get(task) if "split" in report["protocol"] else None
            if target is not None and low <= target <= high:
                ax.axhline(target, color="tab:red", linestyle="--", linewidth=1)
            elif target is not None:  # drawn to scale it would flatten the seeds into one line
                where = "below" if target < low else "above"
                ax.text(0.01, 0.02 if target < low else 0.93, f"target {target:g}: {where} this panel",
                        transform=ax.transAxes, fontsize=7, color="tab:red")
            ax.set_xticks(range(len(columns)), [c.replace("_", "\n") for c in columns], fontsize=8)
            ax.set_title(f"group {group}: {task}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            ax.set_ylabel("test AUC")
        for ax in row[len(g["tasks"]):]:
            ax.set_visible(False)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", linestyle="", color=colors["test"], label="early-stopped (one dot a seed)"),
               Line2D([], [], marker="o", linestyle="", color=colors["refit"], label="refit on train + valid"),
               Line2D([], [], linestyle=":", color="gray", label="HistGradientBoosting (same colours)"),
               Line2D([], [], linestyle="--", color="tab:red", label="target (issue 6, MMoE's mean)")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    p = report["protocol"]
    fig.suptitle(f"Census-income, {p['name']}" + (f" {p['split']}" if "split" in p else "") +
                 ": test AUC per seed, bars at the means", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def _hgb_runs(hgb):
    """The anchor's runs by task: its report keeps them as a list of one-task mappings."""
    for entry in hgb["runs"]:
        yield from entry.items()


if __name__ == "__main__":
    sys.exit(main())
