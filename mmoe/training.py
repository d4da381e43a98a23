"""Training and evaluation loops shared by the CLI, the TFX Trainer and the benchmarks.

Data is a `TaskData`: a dict of `[n]` input arrays, a dict of `[n]` labels per
task and optional `[n]` sample weights. Works on any Keras backend.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import keras
import numpy as np

from mmoe.config import TaskSpec


@dataclasses.dataclass
class TaskData:
    """Inputs, per-task labels and optional sample weights of one split."""

    inputs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    weights: Optional[np.ndarray] = None

    def __post_init__(self):
        sizes = {k: len(v) for k, v in {**self.inputs, **self.labels}.items()}
        if self.weights is not None:
            sizes["<weights>"] = len(self.weights)
        if len(set(sizes.values())) > 1:
            raise ValueError(f"arrays of one split differ in length: {sizes}")
        if not sizes or not next(iter(sizes.values())):
            raise ValueError("a split needs at least one row")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, index: np.ndarray) -> "TaskData":
        return TaskData({k: v[index] for k, v in self.inputs.items()},
                        {k: v[index] for k, v in self.labels.items()},
                        None if self.weights is None else self.weights[index])

    @staticmethod
    def concat(parts: Sequence["TaskData"]) -> "TaskData":
        """The rows of several splits in order (e.g. train and validation, to refit on both); weights are kept only
        if every part has them."""
        parts = list(parts)
        if not parts:
            raise ValueError("concat needs at least one split")
        for p in parts[1:]:
            if set(p.inputs) != set(parts[0].inputs) or set(p.labels) != set(parts[0].labels):
                raise ValueError(f"splits differ in inputs or labels: {sorted(parts[0].inputs)} / "
                                 f"{sorted(parts[0].labels)} against {sorted(p.inputs)} / {sorted(p.labels)}")
        weights = (np.concatenate([p.weights for p in parts]) if all(p.weights is not None for p in parts)
                   else None)
        return TaskData({k: np.concatenate([p.inputs[k] for p in parts]) for k in parts[0].inputs},
                        {k: np.concatenate([p.labels[k] for p in parts]) for k in parts[0].labels}, weights)


def monitor_for(task: TaskSpec, num_tasks: int) -> tuple[str, str]:
    """Keras history key and mode of a task's validation metric, in a model with `num_tasks` task heads.

    Keras prefixes metric names with the output name only when a model has several outputs: a one-task
    model logs `val_auc`, not `val_<task>_auc`.  A wrong key only makes Keras warn, and early stopping then
    never stops nor restores the best epoch, so the count is a required argument.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    prefix = f"val_{task.name}_" if num_tasks > 1 else "val_"
    return (prefix + "auc", "max") if task.kind == "binary" else (prefix + "rmse", "min")


def main_task_spec(tasks: Sequence[TaskSpec], name: Optional[str] = None) -> TaskSpec:
    """The task named `name` (the main task: early stopping and schedules watch it); the first task without one."""
    tasks = list(tasks)
    main = next((t for t in tasks if t.name == name), None) if name else tasks[0]
    if main is None:
        raise ValueError(f"main task {name!r} is not one of {[t.name for t in tasks]}")
    return main


def early_stopped_epoch(history: Mapping[str, Sequence[float]], task: TaskSpec, num_tasks: int) -> int:
    """The epoch (from 1) whose weights `fit`'s early stopping kept: the best validation metric of `task`, the
    main task, in a Keras `History.history`. Retraining on more rows for this many epochs is a refit."""
    monitor, mode = monitor_for(task, num_tasks)
    if not history.get(monitor):
        raise ValueError(f"the history has no {monitor!r}: was the model trained with validation data?")
    watched = np.asarray(history[monitor], dtype="float64")
    return int(np.argmax(watched) if mode == "max" else np.argmin(watched)) + 1


SCHEDULES = ("constant", "plateau", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """How the weights are stepped, beyond the learning rate (`ModelConfig.learning_rate`).

    Attributes:
        schedule: "constant"; "plateau" (learning rate x0.3 after 2 epochs without a better main-task validation
            metric, down to 1e-5); or "cosine" (cosine decay to 1% over `cosine_epochs` epochs, then constant).
        cosine_epochs: length of the cosine decay, in epochs.
        weight_decay: > 0 trains with AdamW (decoupled weight decay) instead of Adam.
        ema: > 0 keeps an exponential moving average of the weights with this momentum per step (Polyak
            averaging); validation, early stopping and the trained model use the averaged weights.
    """

    schedule: str = "constant"
    cosine_epochs: int = 20
    weight_decay: float = 0.0
    ema: float = 0.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "cosine" and self.cosine_epochs < 1:  # the length of nothing else
            raise ValueError(f"cosine_epochs must be >= 1, got {self.cosine_epochs}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "OptimizerSettings":
        """The optimizer's fields out of a wider settings mapping (a config's `train` section, a CLI's settings):
        other keys are ignored, missing ones take the defaults, and values are cast to the defaults' types (a YAML
        `1e-2` is a string)."""
        return cls(**{f.name: type(f.default)(settings[f.name]) for f in dataclasses.fields(cls)
                      if f.name in settings})


def optimizer_and_callbacks(settings: OptimizerSettings, learning_rate: float, steps_per_epoch: int,
                            main_task: TaskSpec, num_tasks: int,
                            validated: bool = True) -> tuple[keras.optimizers.Optimizer, list]:
    """(optimizer, callbacks to pass to `fit`) for `settings`: Adam or AdamW, the learning-rate schedule (cosine
    counts `steps_per_epoch` optimizer steps per epoch) and weight averaging. The defaults give plain Adam and no
    callbacks, which is what `compile_model` uses. `validated=False` is for training without validation data (a
    refit): a plateau schedule then has nothing to watch, so the rate stays at `learning_rate`."""
    callbacks = []
    lr = learning_rate
    if settings.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(learning_rate, steps_per_epoch * settings.cosine_epochs,
                                                    alpha=0.01)
    elif settings.schedule == "plateau" and validated:
        monitor, mode = monitor_for(main_task, num_tasks)
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=0.3, patience=2,
                                                           min_lr=1e-5))
    averaging = {"use_ema": True, "ema_momentum": settings.ema} if settings.ema else {}
    optimizer = (keras.optimizers.AdamW(learning_rate=lr, weight_decay=settings.weight_decay, **averaging)
                 if settings.weight_decay else keras.optimizers.Adam(learning_rate=lr, **averaging))
    if settings.ema:
        # Validation runs on the averaged weights (SwapEMAWeights swaps them in at on_test_begin), and with
        # swap_on_epoch they are also in the model at on_epoch_end, where fit's EarlyStopping (added after
        # these callbacks) records its best weights. Its restore at the end of fit comes after the optimizer's
        # finalize_variable_values (which after an early stop would put the raw weights back), so the model
        # ends with the averaged weights of the best epoch.
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    return optimizer, callbacks


def _sample_weights(data: TaskData, tasks: Sequence[TaskSpec]):
    if data.weights is None:
        return None
    w = np.asarray(data.weights, dtype="float32")
    return {t.name: w for t in tasks}


def adapt_model(model: keras.Model, inputs: Mapping[str, np.ndarray], force: bool = False) -> int:
    """Sets every data-dependent layer's state (the piecewise-linear bin edges of `numeric_bins`) from
    training inputs, dict name -> `[rows]` array; layers already adapted (e.g. a loaded model) are left
    alone unless `force`. Returns how many layers were adapted."""
    adapted = 0
    for layer in model.layers:
        if getattr(layer, "needs_adapt", False) or (force and getattr(layer, "adaptable", False)):
            layer.adapt(inputs)
            adapted += 1
    return adapted


def needs_adapt(model: keras.Model) -> bool:
    """True when `adapt_model` has something to do (so callers can skip gathering a sample)."""
    return any(getattr(layer, "needs_adapt", False) for layer in model.layers)


def fit(model: keras.Model, tasks: Sequence[TaskSpec], train: TaskData, valid: Optional[TaskData] = None, *,
        epochs: int = 10, batch_size: int = 512, patience: int = 3, main_task: Optional[str] = None,
        verbose: int | str = "auto", callbacks: Sequence[keras.callbacks.Callback] = (), seed: int = 0):
    """Trains a compiled model; with `valid`, early-stops on the main task.

    Layers that learn from the data before training (`numeric_bins` edges)
    are adapted on `train.inputs` first, unless they already are.

    Early stopping watches the main task's validation AUC (RMSE for a
    regression head) and restores the best epoch's weights.

    Returns:
        The Keras `History`.
    """
    tasks = list(tasks)
    main = main_task_spec(tasks, main_task)
    callbacks = list(callbacks)
    validation_data = None
    if valid is not None:
        validation_data = (valid.inputs, valid.labels, _sample_weights(valid, tasks))
        monitor, mode = monitor_for(main, len(tasks))
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience,
                                                       restore_best_weights=True))
    adapt_model(model, train.inputs)
    keras.utils.set_random_seed(seed)
    history = model.fit(train.inputs, train.labels, sample_weight=_sample_weights(train, tasks),
                        validation_data=validation_data, epochs=epochs, batch_size=batch_size,
                        shuffle=True, callbacks=[*callbacks, keras.callbacks.TerminateOnNaN()], verbose=verbose)
    check_converged(history.history, model)
    return history


class TrainingDiverged(ValueError):
    """The training loss or the weights became NaN or infinite: every prediction after is garbage."""


def check_converged(history: Mapping[str, Sequence[float]], model: Optional[keras.Model] = None) -> None:
    """Raises TrainingDiverged if a Keras `History.history`'s training loss is not finite in some epoch (train
    with `keras.callbacks.TerminateOnNaN` so that epoch is the last) or, with `model`, if a weight is not finite:
    the loss can stay finite while the weights overflow (clipped probabilities bound the cross-entropy), and
    such a model predicts NaN for every row."""
    for epoch, loss in enumerate(history.get("loss", []), start=1):
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged: the loss became {loss} in epoch {epoch}; lower the learning "
                                   f"rate, or look for extreme input values")
    if model is None:
        return
    broken = [w.path for w in model.weights if not np.all(np.isfinite(keras.ops.convert_to_numpy(w)))]
    if broken:
        raise TrainingDiverged(f"training diverged: {len(broken)} of the model's {len(model.weights)} weight tensors "
                               f"hold NaN or infinite values (e.g. {', '.join(broken[:3])}) although the loss stayed "
                               f"finite; lower the learning rate, or look for extreme input values")


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (ties counted half) via ranks; NaN if one class is absent."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype="float64")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    from scipy.stats import rankdata  # scipy is a dependency; lazy to keep import light
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(model: keras.Model, tasks: Sequence[TaskSpec], data: TaskData,
             batch_size: int = 4096) -> dict[str, dict[str, float]]:
    """Per-task metrics on one split: AUC, log loss and positive rate for binary
    heads; RMSE and MAE for regression heads. Unweighted, like the MMoE paper."""
    return prediction_metrics(tasks, data.labels, predict(model, data.inputs, batch_size=batch_size))


def prediction_metrics(tasks: Sequence[TaskSpec], labels: Mapping[str, np.ndarray],
                       predictions: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """`evaluate`'s metrics from predictions already made."""
    report = {}
    for t in tasks:
        y = np.asarray(labels[t.name], dtype="float64")
        p = np.asarray(predictions[t.name], dtype="float64")
        if t.kind == "binary":
            q = np.clip(p, 1e-7, 1 - 1e-7)
            report[t.name] = {"auc": roc_auc(y, p),
                              "log_loss": float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))),
                              "positive_rate": float(y.mean()), "examples": int(len(y))}
        else:
            report[t.name] = {"rmse": float(np.sqrt(np.mean((p - y) ** 2))),
                              "mae": float(np.mean(np.abs(p - y))), "examples": int(len(y))}
    return report


def predict(model: keras.Model, inputs: Mapping[str, np.ndarray], batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Predictions as a dict of numpy arrays, without a progress bar."""
    out = model.predict(dict(inputs), batch_size=batch_size, verbose=0)
    return {k: np.asarray(v) for k, v in out.items()}
