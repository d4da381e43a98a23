"""`mmoe train`: preprocess with tf.Transform in-process, train, evaluate, write a run directory.

The run directory holds everything needed to reuse or serve the model:

    DIR/model.keras          the trained Keras 3 model (with --refit, the one refitted on train + valid)
    DIR/transform/           the tf.Transform output (transform_fn, metadata)
    DIR/metrics.json         per task: validation and test metrics (with --refit, also the refit's test
                             metrics), the split protocol
    DIR/run_config.json      dataset spec, model config, tasks and training settings
    DIR/history.json, DIR/training_curves.png   per-epoch losses and metrics
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


@dataclasses.dataclass
class TrainSettings:
    """How to split, weigh and train (model architecture lives in ModelConfig)."""

    epochs: int = 20
    batch_size: int = 512
    patience: int = 4
    seed: int = 0
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    use_weights: bool = False
    main_task: Optional[str] = None
    loss_weights: Optional[dict] = None
    # After early stopping on validation, train a fresh model on train + valid for the epochs it kept and save
    # that one: validation still chooses, then trains too (census: +0.001 test AUC on the main task).
    refit: bool = False
    # The optimizer beyond the learning rate: mmoe.training.OptimizerSettings (which checks them).
    schedule: str = "constant"
    cosine_epochs: int = 20
    weight_decay: float = 0.0
    ema: float = 0.0
    jit_compile: bool = True
    # Batches per compiled call: amortises per-step dispatch, which dominates
    # these small models (2.5x faster at batch 1024 on 2 CPU cores).
    steps_per_execution: int = 16

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.steps_per_execution < 1:
            raise ValueError(f"steps per execution must be >= 1, got {self.steps_per_execution}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if not 0 <= self.seed < 2 ** 32:  # numpy's and Keras's seeds
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        self.optimizer_settings()

    def optimizer_settings(self):
        from mmoe.training import OptimizerSettings

        return OptimizerSettings.from_settings(dataclasses.asdict(self))


def parse_split(text: str) -> tuple[float, float, float]:
    """'60/20/20' -> (0.6, 0.2, 0.2); the parts must be positive and sum to 100."""
    parts = text.replace(",", "/").split("/")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split must look like 60/20/20, got {text!r}") from None
    if len(values) != 3 or not all(0 < v < 100 for v in values) or abs(sum(values) - 100) > 1e-6:
        raise ValueError(f"--split needs three positive percentages summing to 100, got {text!r}")
    return tuple(v / 100 for v in values)


def load_splits(data: Sequence[str], spec, split, seed: int, log=print):
    """Reads the data and splits it; returns (train, valid, test, protocol)."""
    from features.io import paper_split, read_dataset, split_frame

    paths = [str(p) for p in data]
    if len(paths) == 1:
        frame = read_dataset(paths[0], spec)
        log(f"read {len(frame):,} rows from {paths[0]}")
        train, valid, test = split_frame(frame, split, seed=seed)
        protocol = {"name": "single-file split", "split": "/".join(f"{100 * s:g}" for s in split), "seed": seed,
                    "files": paths}
    elif len(paths) == 2:
        if os.path.realpath(paths[0]) == os.path.realpath(paths[1]):
            raise ValueError(f"--data names the same file twice ({paths[0]}): the test rows would be training rows")
        train_frame, test_frame = read_dataset(paths[0], spec), read_dataset(paths[1], spec)
        log(f"read {len(train_frame):,} training rows from {paths[0]} and {len(test_frame):,} rows from {paths[1]}")
        train, valid, test = paper_split(train_frame, test_frame, seed=seed)
        protocol = {"name": "paper (train file; test file split 1:1 into validation and test)", "seed": seed,
                    "files": paths}
    else:
        raise ValueError(f"--data takes one file (then split) or a train file and a test file, got {len(paths)}")
    rows = {"train": len(train), "valid": len(valid), "test": len(test)}
    empty = [name for name, n in rows.items() if n == 0]
    if empty:
        how = f"--split {protocol['split']} of {len(frame):,} rows" if len(paths) == 1 else \
            f"{len(train_frame):,} training rows and {len(test_frame):,} test rows split 1:1"
        raise ValueError(f"too few rows: {how} leaves the {' and '.join(empty)} split(s) empty ({rows})")
    from features.transform import frame_labels

    for name, split_frame_ in (("valid", valid), ("test", test)):
        for t in spec.tasks:
            if t.kind == "binary" and len(np.unique(frame_labels(split_frame_, spec, t.name))) < 2:
                log(f"warning: the {name} split has one class only for task {t.name!r}: its AUC is undefined "
                    f"(null in metrics.json){' and early stopping has nothing to watch' if name == 'valid' else ''}")
    protocol.update(rows=rows)
    return train, valid, test, protocol


def transform_splits(spec, data: Sequence[str], split, seed: int, transform_dir: str, log=print):
    """Reads and splits the data, fits tf.Transform on train and applies it to every split.

    Returns (inputs, arrays, protocol): the model-neutral input descriptions
    (`transformed_feature_info`), `arrays[split][key]` and the split protocol.
    """
    from features.transform import transform_in_process, transformed_feature_info

    train_df, valid_df, test_df, protocol = load_splits(data, spec, split, seed, log=log)
    tft_output, arrays = transform_in_process(spec, train_df, {"valid": valid_df, "test": test_df},
                                              str(transform_dir), progress=log)
    return transformed_feature_info(spec, tft_output), arrays, protocol


def task_data(arrays: dict, spec, input_names: Sequence[str], use_weights: bool):
    from features.spec import WEIGHT_KEY
    from mmoe.training import TaskData

    return TaskData(inputs={n: arrays[n] for n in input_names},
                    labels={t.name: arrays[spec.label_key(t.name)].astype("float32") for t in spec.tasks},
                    weights=arrays[WEIGHT_KEY].astype("float32") if use_weights else None)


def model_tasks(spec, loss_weights: Optional[dict]):
    from mmoe import TaskSpec

    loss_weights = dict(loss_weights or {})
    unknown = sorted(set(loss_weights) - set(spec.task_names))
    if unknown:
        raise ValueError(f"loss weight given for unknown task(s) {unknown}; tasks are {spec.task_names}")
    return [TaskSpec(t.name, t.kind, float(loss_weights.get(t.name, 1.0))) for t in spec.tasks]


def train_run(spec, data: Sequence[str], out_dir: str, model_config, settings: TrainSettings,
              overwrite: bool = False, log=print) -> dict:
    """The whole `mmoe train` job; returns the metrics written to metrics.json. The run is written beside `out_dir`
    and moved there when it finishes, so a failed run changes nothing (see `staged_run_dir`)."""
    from mmoe.training import main_task_spec

    out = Path(out_dir).resolve()  # `--out .` must name the directory, so that it can be checked and moved
    check_run_dir(out, overwrite)
    tasks = model_tasks(spec, settings.loss_weights)  # bad task names fail before any slow work
    main = main_task_spec(tasks, settings.main_task)
    if settings.use_weights and spec.weight_column is None:
        raise ValueError("--use-weights: the dataset spec names no weight column (weight_column)")
    with staged_run_dir(out) as stage:
        return _train_run(spec, data, out, stage, tasks, main, model_config, settings, log)


def check_run_dir(out: Path, overwrite: bool) -> None:
    """Refuses an --out that is a file, one that holds a finished run unless `overwrite`, and one that holds other
    files always: --overwrite replaces the whole directory, so it must be a run (not `--out .` in a repository)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / "metrics.json").exists():
        raise FileExistsError(f"--out {out} holds files but no finished run (no metrics.json); --overwrite replaces "
                              f"only a finished run, so choose another --out or empty this one")
    if not overwrite:
        raise FileExistsError(f"--out {out} already holds a run (metrics.json); pass --overwrite to replace it, or "
                              f"choose another --out")


@contextlib.contextmanager
def staged_run_dir(out: Path):
    """A fresh directory beside `out` to write the run into; it replaces `out` only when the run finishes.

    A run that fails (bad data found late, a diverged loss, Ctrl-C) leaves `out` as it was, an earlier run in it
    included, and no half-written files: tf.Transform refuses to write into an existing transform directory, and a
    half-written run would otherwise block the next one."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would make the run unreadable to others once in place
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _train_run(spec, data, out: Path, stage: Path, tasks, main, model_config, settings: TrainSettings, log) -> dict:
    """train_run's work, written into `stage` (which becomes `out`)."""
    import keras

    from mmoe import InputFeature, build_model, compile_model
    from mmoe.training import TaskData, early_stopped_epoch, evaluate, fit, optimizer_and_callbacks

    started = time.time()
    inputs, arrays, protocol = transform_splits(spec, data, settings.split, settings.seed, stage / "transform",
                                                log=log)
    features = [InputFeature.from_dict(i) for i in inputs]
    names = [f.name for f in features]
    splits = {k: task_data(arrays[k], spec, names, settings.use_weights) for k in ("train", "valid", "test")}
    if settings.use_weights and not splits["train"].weights.any():
        raise ValueError(f"--use-weights: every training row's weight ({spec.weight_column!r}) is 0")

    def new_model(rows, validated=True):
        """(model, callbacks) compiled with the settings' optimizer; a cosine schedule spans `rows` per epoch."""
        keras.utils.set_random_seed(settings.seed)
        model = build_model(model_config, features, tasks)
        optimizer, callbacks = optimizer_and_callbacks(settings.optimizer_settings(), model_config.learning_rate,
                                                       -(-rows // settings.batch_size), main, len(tasks), validated)
        return compile_model(model, model_config, tasks, jit_compile=settings.jit_compile,
                             steps_per_execution=settings.steps_per_execution, optimizer=optimizer), callbacks

    model, callbacks = new_model(len(splits["train"]))
    log(f"training {model_config.arch} ({model.count_params():,} parameters) on {len(splits['train']):,} rows, "
        f"backend {keras.backend.backend()}")
    verbose = 1 if sys.stdout.isatty() else 2
    fit_started = time.time()
    history = fit(model, tasks, splits["train"], splits["valid"], epochs=settings.epochs,
                  batch_size=settings.batch_size, patience=settings.patience, main_task=settings.main_task,
                  verbose=verbose, seed=settings.seed, callbacks=callbacks)
    train_seconds = time.time() - fit_started

    metrics = {
        "protocol": protocol,
        "arch": model_config.arch,
        "backend": keras.backend.backend(),
        "epochs_trained": len(history.history.get("loss", [])),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": None,
        "tasks": {},
    }
    valid_metrics = evaluate(model, tasks, splits["valid"])
    test_metrics = evaluate(model, tasks, splits["test"])
    for t in tasks:
        metrics["tasks"][t.name] = {"kind": t.kind, "valid": valid_metrics[t.name], "test": test_metrics[t.name]}
    if settings.refit:
        epochs = early_stopped_epoch(history.history, main, len(tasks))
        both = TaskData.concat([splits["train"], splits["valid"]])
        log(f"refit: a new model on train + valid ({len(both):,} rows) for {epochs} epochs, the count early "
            f"stopping kept; it is the one saved")
        model, callbacks = new_model(len(both), validated=False)
        refit_started = time.time()
        fit(model, tasks, both, None, epochs=epochs, batch_size=settings.batch_size, verbose=verbose,
            seed=settings.seed, callbacks=callbacks)
        metrics["refit"] = {"epochs": epochs, "rows": len(both),
                            "train_seconds": round(time.time() - refit_started, 1)}
        refit_test = evaluate(model, tasks, splits["test"])
        for t in tasks:
            metrics["tasks"][t.name]["refit_test"] = refit_test[t.name]

    model.save(stage / "model.keras")
    (stage / "history.json").write_text(json.dumps(
        {k: [float(v) for v in vals] for k, vals in history.history.items()}, indent=1))
    plot_history(history.history, tasks, stage / "training_curves.png")
    from features.spec import dataset_spec_to_dict
    (stage / "run_config.json").write_text(json.dumps({
        "data": [os.path.abspath(path) for path in data],  # provenance; the serving benchmark samples from it
        "dataset": dataset_spec_to_dict(spec), "model": model_config.to_dict(),
        "tasks": [t.to_dict() for t in tasks], "inputs": [f.to_dict() for f in features],
        "train": {**dataclasses.asdict(settings), "split": list(settings.split)}}, indent=1))
    metrics["total_seconds"] = round(time.time() - started, 1)
    from mmoe.config import json_safe

    (stage / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1, allow_nan=False))
    log(format_metrics(metrics))
    log(f"wrote {out}/: model.keras, transform/, metrics.json, run_config.json, history.json, training_curves.png")
    return metrics


def npz_path(path) -> str:
    """`path` as numpy will write it: numpy adds ".npz" to a name without it."""
    path = str(path)
    return path if path.endswith(".npz") else path + ".npz"


def export_arrays(spec, data: Sequence[str], out_path: str, split, seed: int, log=print,
                  overwrite: bool = False) -> str:
    """Transforms like `train_run` and saves the splits with `save_arrays` (to `npz_path(out_path)`, returned)."""
    import tempfile

    tasks = model_tasks(spec, None)
    out_path = npz_path(out_path)
    if Path(out_path).exists() and not overwrite:
        raise FileExistsError(f"--out {out_path} exists; pass --overwrite to replace it")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)  # fails now, not after the transform
    with tempfile.TemporaryDirectory() as tmp:
        inputs, arrays, protocol = transform_splits(spec, data, split, seed, tmp, log=log)
    save_arrays(out_path, inputs, tasks, {t.name: spec.label_key(t.name) for t in tasks}, protocol, arrays)
    log(f"wrote {out_path} ({', '.join(f'{k} {v:,}' for k, v in protocol['rows'].items())} rows)")
    return str(out_path)


def save_arrays(out_path: str, inputs: Sequence[dict], tasks, label_keys: dict, protocol: dict, arrays: dict) -> str:
    """Saves `<split>/<key>` arrays (`arrays`: split -> key -> array) plus a JSON header in one .npz.

    The header (`__meta__`) lists the model inputs (`InputFeature.to_dict()`: name, kind, vocab_size), the tasks,
    the array key of each task's label and the split protocol, so `load_arrays` rebuilds `TaskData` without
    TensorFlow or tf.Transform.
    """
    meta = {"inputs": list(inputs), "tasks": [t.to_dict() for t in tasks], "protocol": protocol,
            "label_keys": dict(label_keys)}
    payload = {f"{split_name}/{key}": value for split_name, split_arrays in arrays.items()
               for key, value in split_arrays.items()}
    payload["__meta__"] = np.array(json.dumps(meta))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **payload)
    return str(out_path)


def load_arrays(path: str):
    """Reads a `save_arrays` file: (inputs, tasks, {split: TaskData}, protocol); needs only numpy and keras."""
    from mmoe import InputFeature, TaskSpec
    from mmoe.training import TaskData

    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["__meta__"]))
        inputs = [InputFeature.from_dict(i) for i in meta["inputs"]]
        tasks = [TaskSpec.from_dict(t) for t in meta["tasks"]]
        splits = {}
        for split_name in ("train", "valid", "test"):
            splits[split_name] = TaskData(
                inputs={f.name: npz[f"{split_name}/{f.name}"] for f in inputs},
                labels={t.name: npz[f"{split_name}/{meta['label_keys'][t.name]}"].astype("float32") for t in tasks})
    return inputs, tasks, splits, meta["protocol"]


def format_metrics(metrics: dict) -> str:
    """A small per-task table for the terminal."""
    refit = metrics.get("refit")
    lines = [f"{'task':<14}{'metric':<8}{'valid':>9}{'test':>9}" + (f"{'refit test':>12}" if refit else "")]
    for name, m in metrics["tasks"].items():
        key = "auc" if m["kind"] == "binary" else "rmse"
        lines.append(f"{name:<14}{key:<8}{m['valid'][key]:>9.4f}{m['test'][key]:>9.4f}" +
                     (f"{m['refit_test'][key]:>12.4f}" if refit else ""))
    p = metrics["protocol"]
    lines.append(f"protocol: {p['name']}" + (f" {p['split']}" if "split" in p else "") +
                 f", seed {p['seed']}; rows train/valid/test {p['rows']['train']:,}/{p['rows']['valid']:,}/"
                 f"{p['rows']['test']:,}; {metrics['epochs_trained']} epochs in {metrics['train_seconds']} s")
    if refit:
        lines.append(f"refit (the saved model): {refit['epochs']} epochs on train + valid ({refit['rows']:,} rows) "
                     f"in {refit['train_seconds']} s")
    return "\n".join(lines)


def history_panels(tasks) -> list:
    """(history key, title) of each panel of plot_history: the total loss, then each task's metric under the
    key Keras logs it by (a one-task model logs `auc`, not `<task>_auc`)."""
    from mmoe.training import monitor_for

    return [("loss", "total loss")] + [
        (monitor_for(t, len(tasks))[0][len("val_"):], f"{t.name} " + ("AUC" if t.kind == "binary" else "RMSE"))
        for t in tasks]


def plot_history(history: dict, tasks, path) -> None:
    """Training/validation loss and main metric per task, one panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], history_panels(tasks)):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + key)
            if values:
                ax.plot(np.arange(1, len(values) + 1), values, style, label="validation" if prefix else "train")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
