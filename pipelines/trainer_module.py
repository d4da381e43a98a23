"""The TFX module: Transform's `preprocessing_fn`, Trainer's `run_fn`, Tuner's `tuner_fn`.

The pipeline refers to these functions by dotted path
(`pipelines.trainer_module.run_fn`), not with `module_file=`: our packages are
installed in the environment (and must be in any worker or container image,
since the functions import `features`, `mmoe` and `serving`), so there is no
wheel to build per run.  So that a code change still invalidates cached
results, the pipeline puts a fingerprint of the source files into each
component's `custom_config` (`pipelines.configs.code_fingerprint`).

Everything a function needs arrives through `custom_config` as plain data:

* `dataset`: the DatasetSpec (`features.spec.dataset_spec_to_dict`), so any
  data set with a spec works, not only census;
* `model`: the ModelConfig (`mmoe.ModelConfig.to_dict`): architecture,
  experts, gates, towers, learning rate, mixed precision;
* `train`: batch size per replica, steps per epoch, early-stopping patience,
  main task, per-task loss weights, sample weights on/off, XLA on/off, seed,
  the optimizer's schedule, weight decay and weight averaging;
* `tuner`: the search space and number of trials (Tuner only).

Keras 3 (`import keras`) throughout; tf.Transform and the export use
TensorFlow directly.
"""
from __future__ import annotations

import functools
import json
import math
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import logging

# Training rows the numeric bin edges (ModelConfig.numeric_bins) are taken from: quantiles settle long before.
ADAPT_ROWS = 100_000
# Hyperparameters the Tuner may set and how they map onto ModelConfig.
TUNABLE = ("num_experts", "expert_units", "gate_temperature", "learning_rate")


# -- shared helpers ----------------------------------------------------------------------


def dataset_spec(custom_config: Mapping[str, Any]):
    from features.spec import dataset_spec_from_dict

    if not custom_config or "dataset" not in custom_config:
        raise ValueError("custom_config needs 'dataset' (features.spec.dataset_spec_to_dict of the DatasetSpec)")
    return dataset_spec_from_dict(custom_config["dataset"], source="custom_config['dataset']")


def train_settings(custom_config: Mapping[str, Any]) -> Dict[str, Any]:
    """custom_config["train"] over the defaults of pipelines.configs.TrainConfig (their one definition)."""
    from pipelines.configs import TrainConfig

    settings = TrainConfig().module_settings()
    given = dict(custom_config.get("train") or {})
    unknown = sorted(set(given) - set(settings))
    if unknown:
        raise ValueError(f"unknown train setting(s) {unknown}; known: {sorted(settings)}")
    settings.update(given)
    return settings


def optimizer_summary(optimizer) -> Dict[str, Any]:
    """What training.json records of the optimizer: its class, steps taken and learning rate at the end."""
    import keras

    return {"class": type(optimizer).__name__, "steps": int(keras.ops.convert_to_numpy(optimizer.iterations)),
            "final_learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate))}


def apply_hyperparameters(config, values: Optional[Mapping[str, Any]]):
    """ModelConfig with the tunable fields replaced by `values` (Tuner output)."""
    if not values:
        return config
    changes = {}
    for name in TUNABLE:
        if name in values:
            value = values[name]
            if name == "expert_units":
                value = tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
            elif name == "num_experts":
                value = int(value)
            else:
                value = float(value)
            changes[name] = value
    return config.replace(**changes)


def model_config(custom_config: Mapping[str, Any], hyperparameters: Optional[Mapping[str, Any]] = None):
    from mmoe import ModelConfig

    config = ModelConfig.from_dict(dict(custom_config.get("model") or {}))
    if hyperparameters:
        import keras_tuner

        values = keras_tuner.HyperParameters.from_config(hyperparameters).values \
            if "space" in hyperparameters else dict(hyperparameters)
        config = apply_hyperparameters(config, values)
    return config


def _quiet_validation_end_warning() -> None:
    """Keras 3 warns "Your input ran out of data; interrupting training" when a dataset of unknown length ends,
    which the eval split does at the end of every first validation pass, as it should; the training dataset
    repeats forever, so the warning can only be that one and says nothing to the user."""
    warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)


def epoch_plan(train_steps: int, steps_per_epoch: int) -> tuple:
    """(steps per epoch, epochs) for `train_steps` steps in all (TFX's train_args.num_steps is the total) with
    epochs of at most `steps_per_epoch`: Keras runs whole epochs, so the epochs share the steps evenly and the
    total is train_steps, or at most epochs - 1 more when it does not divide (250 with 200 -> 2 x 125)."""
    train_steps, steps_per_epoch = max(1, int(train_steps)), max(1, int(steps_per_epoch))
    epochs = math.ceil(train_steps / steps_per_epoch)
    return math.ceil(train_steps / epochs), epochs


def input_features(spec, tft_output):
    from features.transform import transformed_feature_info
    from mmoe import InputFeature

    return [InputFeature(i["name"], i["kind"], i["vocab_size"]) for i in transformed_feature_info(spec, tft_output)]


def _files(patterns: Sequence[str]) -> List[str]:
    import tensorflow as tf

    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not files:
        raise FileNotFoundError(f"no transformed examples match {list(patterns)}")
    return files


def make_dataset(patterns: Sequence[str], tft_output, spec, features, batch_size: int, *, training: bool,
                 use_weights: bool, seed: int = 0, shuffle_buffer: int = 10_000):
    """(inputs, labels[, sample weights]) batches of transformed examples, keyed as the model expects."""
    import tensorflow as tf

    from features.spec import WEIGHT_KEY

    files = _files(patterns)
    compression = "GZIP" if files[0].endswith(".gz") else ""
    feature_spec = tft_output.transformed_feature_spec()
    kinds = {f.name: (tf.float32 if f.kind == "numeric" else tf.int32) for f in features}
    tasks = spec.task_names

    def split(batch):
        inputs = {name: tf.cast(batch[name], dtype) for name, dtype in kinds.items()}
        labels = {t: tf.cast(batch[spec.label_key(t)], tf.float32) for t in tasks}
        if use_weights:
            w = tf.cast(batch[WEIGHT_KEY], tf.float32)
            return inputs, labels, {t: w for t in tasks}
        return inputs, labels

    ds = tf.data.TFRecordDataset(files, compression_type=compression, num_parallel_reads=tf.data.AUTOTUNE)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size, drop_remainder=False)
    ds = ds.map(lambda x: tf.io.parse_example(x, feature_spec), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(split, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def dataset_inputs(dataset, max_rows: int) -> Dict[str, Any]:
    """The model inputs of a `make_dataset` dataset's first `max_rows` rows (at least one batch), as numpy
    arrays: what `mmoe.training.adapt_model` sets the numeric bin edges from."""
    import numpy as np

    parts: Dict[str, list] = {}
    rows = 0
    for batch in dataset:
        for name, values in batch[0].items():
            parts.setdefault(name, []).append(values.numpy())
        rows += len(next(iter(parts.values()))[-1])
        if rows >= max_rows:
            break
    if not parts:
        raise ValueError("no training examples to adapt the model's numeric bins on")
    return {name: np.concatenate(values)[:max_rows] for name, values in parts.items()}


def training_sample(fn_args, tft_output, spec, features, batch_size: int):
    """A function returning the model inputs of the first `ADAPT_ROWS` training rows, read in file order
    without shuffling: read on the first call only, so Tuner trials share one read."""
    @functools.lru_cache(maxsize=None)
    def read() -> Dict[str, Any]:
        dataset = make_dataset(fn_args.train_files, tft_output, spec, features, batch_size, training=False,
                               use_weights=False)
        return dataset_inputs(dataset, ADAPT_ROWS)
    return read


def adapt_on_training_files(model, sample) -> int:
    """Sets the model's data-dependent state (`numeric_bins` edges) from `sample()` (see `training_sample`).
    Returns the rows used: 0, and `sample` not called, when the model has no such state."""
    from mmoe.training import adapt_model, needs_adapt

    if not needs_adapt(model):
        return 0
    inputs = sample()
    adapt_model(model, inputs)
    rows = len(next(iter(inputs.values())))
    logging.info("adapted the numeric bin edges on %d training rows", rows)
    return rows


def bin_edges(model) -> Dict[str, List[float]]:
    """{numeric input: bin edges} of the model's piecewise-linear encodings (the first embedding's)."""
    for layer in model.layers:
        edges = layer.bin_edges() if hasattr(layer, "bin_edges") else {}
        if edges:
            return edges
    return {}


def distribution_strategy():
    """MirroredStrategy over every visible GPU; on a machine without one, one CPU replica."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or ["/cpu:0"]
    return tf.distribute.MirroredStrategy(devices=devices)


# -- Transform -----------------------------------------------------------------------------


def preprocessing_fn(inputs, custom_config):
    """Transform's preprocessing_fn: the foundation's, for the spec in custom_config."""
    from features.transform import make_preprocessing_fn

    return make_preprocessing_fn(dataset_spec(custom_config))(inputs)


# -- Trainer -------------------------------------------------------------------------------


def run_fn(fn_args) -> None:
    """Trainer entry point: build from custom_config, train with XLA, write TensorBoard logs, export."""
    import keras
    import tensorflow as tf
    import tensorflow_transform as tft

    from mmoe import build_model, compile_model
    from mmoe.training import (OptimizerSettings, check_converged, main_task_spec, monitor_for,
                               optimizer_and_callbacks)
    from pipelines.train_local import model_tasks
    from serving.export import export_serving_model

    custom_config = fn_args.custom_config or {}
    spec = dataset_spec(custom_config)
    settings = train_settings(custom_config)
    config = model_config(custom_config, getattr(fn_args, "hyperparameters", None))
    tasks = model_tasks(spec, settings["loss_weights"])
    main = main_task_spec(tasks, settings["main_task"])

    tft_output = tft.TFTransformOutput(fn_args.transform_output)
    features = input_features(spec, tft_output)
    strategy = distribution_strategy()
    replicas = strategy.num_replicas_in_sync
    global_batch = int(settings["batch_size"]) * replicas
    keras.utils.set_random_seed(int(settings["seed"]))

    train_ds = make_dataset(fn_args.train_files, tft_output, spec, features, global_batch, training=True,
                            use_weights=settings["use_weights"], seed=int(settings["seed"]),
                            shuffle_buffer=int(settings["shuffle_buffer"]))
    eval_ds = make_dataset(fn_args.eval_files, tft_output, spec, features, global_batch, training=False,
                           use_weights=settings["use_weights"])
    train_steps = int(fn_args.train_steps or settings["steps_per_epoch"])
    steps_per_epoch, epochs = epoch_plan(train_steps, settings["steps_per_epoch"])
    with strategy.scope():
        optimizer, optimizer_callbacks = optimizer_and_callbacks(OptimizerSettings.from_settings(settings),
                                                                 config.learning_rate, steps_per_epoch, main,
                                                                 len(tasks))
        model = compile_model(build_model(config, features, tasks), config, tasks, jit_compile=bool(settings["xla"]),
                              optimizer=optimizer)
    adapted_rows = adapt_on_training_files(model, training_sample(fn_args, tft_output, spec, features, global_batch))

    monitor, mode = monitor_for(main, len(tasks))
    log_dir = fn_args.model_run_dir
    # The optimizer's callbacks (plateau schedule, weight averaging) come before early stopping, which must record
    # the weights they leave in the model at the end of an epoch.
    callbacks = [keras.callbacks.TensorBoard(log_dir=log_dir, update_freq="epoch"), *optimizer_callbacks,
                 keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=int(settings["patience"]),
                                               restore_best_weights=True), keras.callbacks.TerminateOnNaN()]
    logging.info("training %s (%d parameters) on %d replica(s), global batch %d, %d steps (%d epochs of %d)",
                 config.arch, model.count_params(), replicas, global_batch, train_steps, epochs, steps_per_epoch)
    with warnings.catch_warnings():
        _quiet_validation_end_warning()
        history = model.fit(train_ds, steps_per_epoch=steps_per_epoch, epochs=epochs, validation_data=eval_ds,
                            validation_steps=fn_args.eval_steps or None, callbacks=callbacks, verbose=2)
    check_converged(history.history, model)  # a diverged model must fail the Trainer, not reach the Evaluator

    os.makedirs(log_dir, exist_ok=True)
    with tf.io.gfile.GFile(os.path.join(log_dir, "training.json"), "w") as fh:
        json.dump({"model": config.to_dict(), "tasks": [t.to_dict() for t in tasks],
                   "inputs": [f.to_dict() for f in features], "train": settings, "replicas": replicas,
                   "global_batch": global_batch, "train_steps": train_steps, "epochs_run": len(history.epoch),
                   "optimizer": optimizer_summary(model.optimizer),
                   "numeric_bins": {"rows": adapted_rows, "edges": bin_edges(model)},
                   "history": {k: [float(v) for v in vals] for k, vals in history.history.items()}}, fh, indent=1)
    export_serving_model(model, fn_args.transform_output, spec, fn_args.serving_model_dir,
                         xla=bool(settings["xla"]), with_gates=True)
    logging.info("serving model exported to %s", fn_args.serving_model_dir)


# -- Tuner ---------------------------------------------------------------------------------


def search_space(tuner_config: Mapping[str, Any]):
    import keras_tuner

    from pipelines.configs import TunerConfig  # the defaults' one definition

    cfg = {**TunerConfig().module_settings(), **(tuner_config or {})}
    hp = keras_tuner.HyperParameters()
    hp.Choice("num_experts", [int(v) for v in cfg["num_experts"]])
    hp.Choice("expert_units", [int(v) for v in cfg["expert_units"]])
    low, high = (float(v) for v in cfg["gate_temperature"])
    hp.Float("gate_temperature", low, high, sampling="log")
    low, high = (float(v) for v in cfg["learning_rate"])
    hp.Float("learning_rate", low, high, sampling="log")
    return hp, cfg


def tuner_fn(fn_args):
    """Tuner entry point: random search on the main task's validation metric."""
    import keras_tuner
    import tensorflow_transform as tft
    from tfx.components.tuner.component import TunerFnResult

    from mmoe import build_model, compile_model
    from mmoe.training import OptimizerSettings, main_task_spec, monitor_for, optimizer_and_callbacks
    from pipelines.train_local import model_tasks

    custom_config = fn_args.custom_config or {}
    spec = dataset_spec(custom_config)
    settings = train_settings(custom_config)
    base = model_config(custom_config)
    tasks = model_tasks(spec, settings["loss_weights"])
    main = main_task_spec(tasks, settings["main_task"])
    hp, cfg = search_space(custom_config.get("tuner") or {})
    tft_output = tft.TFTransformOutput(fn_args.transform_graph_path)
    features = input_features(spec, tft_output)

    sample = training_sample(fn_args, tft_output, spec, features, int(settings["batch_size"]))
    steps_per_epoch, epochs = epoch_plan(cfg["steps_per_trial"] or fn_args.train_steps or settings["steps_per_epoch"],
                                         settings["steps_per_epoch"])
    optimizer_settings = OptimizerSettings.from_settings(settings)

    def build(hparams):
        # Each trial trains the way the Trainer will (schedule, weight decay, averaging) at its learning rate.
        config = apply_hyperparameters(base, hparams.values)
        optimizer, _ = optimizer_and_callbacks(optimizer_settings, config.learning_rate, steps_per_epoch, main,
                                               len(tasks))
        model = compile_model(build_model(config, features, tasks), config, tasks, jit_compile=bool(settings["xla"]),
                              optimizer=optimizer)
        adapt_on_training_files(model, sample)
        return model

    monitor, mode = monitor_for(main, len(tasks))
    tuner = keras_tuner.RandomSearch(build, objective=keras_tuner.Objective(monitor, mode),
                                     max_trials=int(cfg["max_trials"]), hyperparameters=hp,
                                     directory=fn_args.working_dir, project_name="mmoe_tuning",
                                     seed=int(settings["seed"]), overwrite=True)
    batch = int(settings["batch_size"])
    train_ds = make_dataset(fn_args.train_files, tft_output, spec, features, batch, training=True,
                            use_weights=settings["use_weights"], seed=int(settings["seed"]))
    eval_ds = make_dataset(fn_args.eval_files, tft_output, spec, features, batch, training=False,
                           use_weights=settings["use_weights"])
    _, callbacks = optimizer_and_callbacks(optimizer_settings, base.learning_rate, steps_per_epoch, main, len(tasks))
    _quiet_validation_end_warning()  # for the search TFX runs after this returns (see the function)
    return TunerFnResult(tuner=tuner, fit_kwargs={
        "x": train_ds, "validation_data": eval_ds, "steps_per_epoch": steps_per_epoch,
        "epochs": epochs, "validation_steps": fn_args.eval_steps or None,
        "callbacks": callbacks, "verbose": 2})
