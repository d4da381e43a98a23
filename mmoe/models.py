"""Builds multi-task models from an expert block, gates and towers.

One builder serves the CLI, the TFX Trainer and the benchmarks:
`build_model(config, inputs, tasks)` returns a functional Keras model with a
dict of `[batch]` inputs and a dict of `[batch]` outputs, one per task.
`with_gate_outputs(model)` adds each task's `[batch, E]` gate weights as
`"<task>_gates"` outputs, sharing the weights (for analysis and serving).

Architectures (all share the input embedding, and the optional DCN-v2 cross
layers on it, `config.cross_layers`):
- `mmoe`: experts shared by all tasks, one gate and one tower per task
  (Ma et al., KDD 2018).
- `omoe`: the same experts with one gate shared by all tasks.
- `shared_bottom`: one shared MLP, one tower per task.
- `single_task`: an independent bottom and tower per task (no sharing
  besides the input layout; embeddings are per task too).
- `cgc`: shared experts plus task-specific experts; each task's gate mixes
  the shared and its own experts (Tang et al., RecSys 2020).
- `ple`: `ple_levels` stacked extraction levels; below the last, a shared
  gate over all experts feeds the next level's shared experts.
"""
from __future__ import annotations

from typing import Sequence

import keras

from mmoe.config import InputFeature, ModelConfig, TaskSpec
from mmoe.layers import MLP, ExpertBank, ExpertMixture, FeatureCross, FeatureEmbedding, Gate, TaskHead

GATES_SUFFIX = "_gates"
MIXTURE_PREFIX = "mixture_"


def model_inputs(features: Sequence[InputFeature]) -> dict[str, keras.KerasTensor]:
    """One scalar-per-example `keras.Input` per feature."""
    return {f.name: keras.Input(shape=(), dtype="float32" if f.kind == "numeric" else "int32", name=f.name)
            for f in features}


def build_model(config: ModelConfig, features: Sequence[InputFeature], tasks: Sequence[TaskSpec],
                name: str | None = None) -> keras.Model:
    """Builds (does not compile) the model described by `config`.

    Args:
        config: architecture settings.
        features: model inputs, in a fixed order.
        tasks: task heads; names must be unique and not clash with inputs.

    Returns:
        A functional `keras.Model`.
    """
    features = [f if isinstance(f, InputFeature) else InputFeature.from_dict(f) for f in features]
    tasks = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in tasks]
    if not tasks:
        raise ValueError("at least one task is needed")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    clash = set(names) & {f.name for f in features}
    if clash:
        raise ValueError(f"task names clash with input names: {sorted(clash)}")
    if not features:
        raise ValueError("at least one input feature is needed")

    compute = "mixed_bfloat16" if config.mixed_precision else "float32"
    inputs = model_inputs(features)
    feature_dicts = [f.to_dict() for f in features]

    def embed(suffix=""):
        x = FeatureEmbedding(feature_dicts, max_embedding_dim=config.embedding_dim, lookup=config.embedding_lookup,
                             numeric_bins=config.numeric_bins, name=f"embedding{suffix}")(inputs)
        if config.cross_layers:
            # float32 like the embedding: the gates read this too, and they stay float32 under mixed precision.
            x = FeatureCross(config.cross_layers, projection_dim=config.cross_rank or None, name=f"cross{suffix}")(x)
        return x

    def experts(n, suffix):
        return ExpertBank(n, config.expert_units, activation=config.expert_activation,
                          dropout=config.expert_dropout, cross_layers=config.expert_cross_layers,
                          cross_rank=config.expert_cross_rank or None, dtype=compute, name=f"experts{suffix}")

    def gate(n, suffix):
        return Gate(n, gate_type=config.gate, temperature=config.gate_temperature,
                    top_k=min(config.top_k, n), balance_loss_weight=config.balance_loss_weight,
                    name=f"gate{suffix}")

    task_inputs: dict[str, object] = {}

    if config.arch in ("mmoe", "omoe"):
        x = embed()
        expert_out = experts(config.num_experts, "")(x)
        # OMoE's one gate runs once for all tasks: called per task it would add its balance loss once per task
        # and, noisy top-k, draw each task its own noise (so its own experts) in training.
        shared_gate = gate(config.num_experts, "")(x) if config.arch == "omoe" else None
        for t in tasks:
            g = shared_gate if shared_gate is not None else gate(config.num_experts, f"_{t.name}")(x)
            task_inputs[t.name] = ExpertMixture(name=f"{MIXTURE_PREFIX}{t.name}")([g, expert_out])
    elif config.arch == "shared_bottom":
        x = embed()
        bottom = MLP(config.bottom_units, dropout=config.expert_dropout, dtype=compute, name="bottom")(x)
        task_inputs = {t.name: bottom for t in tasks}
    elif config.arch == "single_task":
        for t in tasks:
            x = embed(f"_{t.name}")
            task_inputs[t.name] = MLP(config.bottom_units, dropout=config.expert_dropout, dtype=compute,
                                      name=f"bottom_{t.name}")(x)
    else:  # cgc, ple
        levels = 1 if config.arch == "cgc" else config.ple_levels
        x = embed()
        shared_in = x
        level_in = {t.name: x for t in tasks}
        for level in range(levels):
            last = level == levels - 1
            sfx = f"_l{level}" if levels > 1 else ""
            shared_out = experts(config.num_experts, f"_shared{sfx}")(shared_in)
            task_out = {t.name: experts(config.task_experts, f"_{t.name}{sfx}")(level_in[t.name]) for t in tasks}
            n_task_gate = config.num_experts + config.task_experts
            next_in = {}
            for t in tasks:
                pool = keras.layers.Concatenate(axis=1, name=f"pool_{t.name}{sfx}")([shared_out, task_out[t.name]])
                g = gate(n_task_gate, f"_{t.name}{sfx}")(level_in[t.name])
                # The last level's mixture per task is the one `with_gate_outputs` reads.
                mix_name = f"{MIXTURE_PREFIX}{t.name}" if last else f"{MIXTURE_PREFIX}{t.name}{sfx}"
                next_in[t.name] = ExpertMixture(name=mix_name)([g, pool])
            if not last:
                pool_all = keras.layers.Concatenate(axis=1, name=f"pool_shared{sfx}")(
                    [shared_out] + [task_out[t.name] for t in tasks])
                g = gate(config.num_experts + config.task_experts * len(tasks), f"_shared{sfx}")(shared_in)
                shared_in = ExpertMixture(name=f"mixture_shared{sfx}")([g, pool_all])
            level_in = next_in
        task_inputs = level_in

    outputs = {}
    for t in tasks:
        h = MLP(config.tower_units, dropout=config.tower_dropout, dtype=compute, name=f"tower_{t.name}")(
            task_inputs[t.name])
        outputs[t.name] = TaskHead(t.kind, name=f"head_{t.name}")(h)
    return keras.Model(inputs=inputs, outputs=outputs, name=name or config.arch)


def with_gate_outputs(model: keras.Model) -> keras.Model:
    """The same model (shared weights) with `"<task>_gates"` outputs added.

    Gate outputs live in a separate model rather than in the training model,
    so training compiles losses and metrics for task heads only. Models
    without gates (Shared-Bottom, Single-Task) are returned unchanged.
    """
    outputs = dict(model.output) if isinstance(model.output, dict) else None
    if outputs is None:
        raise ValueError("expected a model built by mmoe.build_model (dict outputs)")
    for name in list(outputs):
        try:
            mixture = model.get_layer(f"{MIXTURE_PREFIX}{name}")
        except ValueError:
            continue
        outputs[name + GATES_SUFFIX] = mixture.input[0]
    if len(outputs) == len(model.output):
        return model
    return keras.Model(inputs=model.input, outputs=outputs, name=f"{model.name}_with_gates")


def task_losses(tasks: Sequence[TaskSpec]) -> dict[str, keras.losses.Loss]:
    return {t.name: keras.losses.BinaryCrossentropy(name=f"{t.name}_bce") if t.kind == "binary"
            else keras.losses.MeanSquaredError(name=f"{t.name}_mse") for t in tasks}


def task_metrics(tasks: Sequence[TaskSpec]) -> dict[str, list]:
    return {t.name: [keras.metrics.AUC(name="auc", num_thresholds=1000)] if t.kind == "binary"
            else [keras.metrics.RootMeanSquaredError(name="rmse")] for t in tasks}


def compile_model(model: keras.Model, config: ModelConfig, tasks: Sequence[TaskSpec],
                  jit_compile: bool | str = True, steps_per_execution: int = 1,
                  optimizer: keras.optimizers.Optimizer | None = None) -> keras.Model:
    """Compiles with `optimizer` (default: Adam at `config.learning_rate`; see
    `mmoe.training.optimizer_and_callbacks` for schedules, AdamW and weight averaging), one loss and metric per
    task and per-task loss weights.

    `jit_compile=True` asks for XLA on the TensorFlow backend (JAX always
    compiles with XLA). `steps_per_execution > 1` runs several batches per
    compiled call, which amortises the per-step Python and dispatch overhead
    that dominates small models. Gate outputs, if any, carry no loss.
    """
    tasks = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in tasks]
    if keras.backend.backend() not in ("tensorflow", "jax"):
        jit_compile = False
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss=task_losses(tasks),
        loss_weights={t.name: t.loss_weight for t in tasks},
        metrics=task_metrics(tasks),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model
