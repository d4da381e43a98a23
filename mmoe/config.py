"""Configuration objects shared by the model builder, the CLI, the TFX Trainer and the benchmarks.

Plain dataclasses with `to_dict`/`from_dict` so a config can travel through JSON
(TFX `custom_config`, `metrics.json`, YAML files) without pickling.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Any, Mapping, Optional

ARCHITECTURES = ("mmoe", "omoe", "shared_bottom", "single_task", "cgc", "ple")
GATE_TYPES = ("softmax", "noisy_top_k")
EMBEDDING_LOOKUPS = ("auto", "gather", "matmul")
TASK_KINDS = ("binary", "regression")
FEATURE_KINDS = ("numeric", "categorical")


def json_safe(value):
    """`value` as strict JSON data: every NaN or infinite float None (JSON has no NaN; Python writes one that jq and
    JavaScript refuse, and a metric is undefined e.g. on a split with one class), numpy scalars as Python ones,
    mapping keys as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return value


def dataclass_from_mapping(cls, data: Mapping[str, Any], what: str):
    """`cls(**data)`, with errors that name `what` and any unknown keys (config files are hand-written), and each
    value held to its field's type (`typed_value`): a YAML `"false"` is not a true bool, `"64"` not the widths 6, 4."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; known keys: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: typed_value(v, hints[k], f"{what} {k}") for k, v in data.items()})


def typed_value(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type `hint` names (bool, int, float, str, tuples and lists of them, Dict[str, X], Optional),
    or a ValueError naming `where`. Integral floats pass as ints and numeric strings as floats (PyYAML reads `1e-3`
    as a string); nothing else is converted. Other hints pass the value through."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)] or [hint]
        return typed_value(value, hint, where)
    if origin in (tuple, list):
        item = args[0] if args else Any
        if origin is tuple and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = [value]  # one width
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return origin(typed_value(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return {k: typed_value(v, args[1] if args else Any, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and float(value).is_integer():
            value = int(value)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {value!r}") from None
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class InputFeature:
    """One model input, as produced by the feature transform.

    Attributes:
        name: input name (the transformed feature's key).
        kind: "numeric" (a float scalar per example) or "categorical" (an
            integer id in `[0, vocab_size)` per example).
        vocab_size: number of distinct ids, including OOV buckets
            (categorical only).
        embedding_dim: embedding width for a categorical input; None picks
            `min(max_embedding_dim, round(6 * vocab_size ** 0.25))`.
    """

    name: str
    kind: str = "numeric"
    vocab_size: Optional[int] = None
    embedding_dim: Optional[int] = None

    def __post_init__(self):
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"input {self.name!r}: kind must be one of {FEATURE_KINDS}, got {self.kind!r}")
        if self.kind == "categorical" and (self.vocab_size is None or self.vocab_size < 1):
            raise ValueError(f"categorical input {self.name!r} needs vocab_size >= 1, got {self.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputFeature":
        return dataclass_from_mapping(cls, data, "input feature")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task head.

    Attributes:
        name: output name of the head (also its label key in training data).
        kind: "binary" (sigmoid, cross-entropy, AUC) or "regression" (linear,
            MSE, RMSE).
        loss_weight: weight of this task's loss in the total loss.
    """

    name: str
    kind: str = "binary"
    loss_weight: float = 1.0

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if not self.loss_weight >= 0:
            raise ValueError(f"task {self.name!r}: loss_weight must be >= 0, got {self.loss_weight}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskSpec":
        return dataclass_from_mapping(cls, data, "task")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and optimisation settings of a multi-task model.

    Attributes:
        arch: one of `ARCHITECTURES`.
        num_experts: experts shared by all tasks (MMoE, OMoE); for CGC/PLE the
            shared experts per level.
        task_experts: task-specific experts per task and level (CGC/PLE).
        ple_levels: extraction levels (PLE; CGC is one level).
        expert_units: hidden widths of each expert's MLP; the last is the
            expert output width.
        expert_activation, expert_dropout: expert MLP activation and dropout.
        bottom_units: hidden widths of the shared bottom (Shared-Bottom) or of
            each task's own network (Single-Task).
        tower_units, tower_dropout: per-task tower MLP before the head.
        gate: "softmax" or "noisy_top_k" (Shazeer et al. 2017).
        gate_temperature: softmax temperature of the gates (>0; <1 sharpens).
        top_k: experts kept per example by a noisy top-k gate.
        balance_loss_weight: weight of the load-balancing auxiliary loss
            (squared coefficient of variation of expert importance).
        cross_layers: DCN-v2 cross layers on the embedded input, shared by
            every expert, bottom and gate (0: none; see
            `mmoe.layers.FeatureCross`). Single-Task gets its own per task.
        cross_rank: rank of each cross layer's matrix; 0 for full rank.
        expert_cross_layers: DCN-v2 cross layers inside each expert, before
            its MLP (0: none; MMoE, OMoE, CGC and PLE experts; see
            `mmoe.layers.ExpertBank`).
        expert_cross_rank: rank of the experts' cross matrices; 0 for full
            rank.
        numeric_bins: with `T > 0`, each numeric input also enters as its
            `T`-bin piecewise-linear encoding, bin edges at training-data
            quantiles (0: off; see `mmoe.layers.PiecewiseLinearEncoding`;
            `mmoe.training.fit` and the Trainer set the edges).
        embedding_dim: width cap for categorical embeddings.
        embedding_lookup: "auto", "gather" or "matmul": how embedding tables
            are read (same values; see `mmoe.layers.FeatureEmbedding`).
        mixed_precision: bfloat16 compute in experts and towers; gates and
            outputs stay float32.
        learning_rate: Adam learning rate.
    """

    arch: str = "mmoe"
    num_experts: int = 8
    task_experts: int = 2
    ple_levels: int = 2
    expert_units: tuple[int, ...] = (64,)
    expert_activation: str = "relu"
    expert_dropout: float = 0.0
    bottom_units: tuple[int, ...] = (128,)
    tower_units: tuple[int, ...] = (32,)
    tower_dropout: float = 0.0
    gate: str = "softmax"
    gate_temperature: float = 1.0
    top_k: int = 2
    balance_loss_weight: float = 0.0
    cross_layers: int = 0
    cross_rank: int = 0
    expert_cross_layers: int = 0
    expert_cross_rank: int = 0
    numeric_bins: int = 0
    embedding_dim: int = 16
    embedding_lookup: str = "auto"
    mixed_precision: bool = False
    learning_rate: float = 1e-3

    def __post_init__(self):
        # Lists from JSON/YAML become tuples so the config stays hashable.
        for name in ("expert_units", "bottom_units", "tower_units"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value,)
            value = tuple(int(v) for v in value)
            if any(v < 1 for v in value):
                raise ValueError(f"{name} must be positive widths, got {list(value)}")
            object.__setattr__(self, name, value)
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.gate not in GATE_TYPES:
            raise ValueError(f"gate must be one of {GATE_TYPES}, got {self.gate!r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.arch in ("cgc", "ple") and self.task_experts < 1:
            raise ValueError(f"task_experts must be >= 1 for {self.arch}, got {self.task_experts}")
        if self.ple_levels < 1:
            raise ValueError(f"ple_levels must be >= 1, got {self.ple_levels}")
        if not self.expert_units:
            raise ValueError("expert_units needs at least one width")
        if not 0 < self.gate_temperature < math.inf:
            raise ValueError(f"gate_temperature must be > 0 and finite, got {self.gate_temperature}")
        if self.gate == "noisy_top_k" and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        gated = {"mmoe": self.num_experts, "omoe": self.num_experts, "cgc": self.num_experts + self.task_experts,
                 "ple": self.num_experts + self.task_experts}.get(self.arch)  # the experts a task's gate weighs
        if self.gate == "noisy_top_k" and gated is not None and self.top_k > gated:
            raise ValueError(f"top_k ({self.top_k}) is more than the {gated} experts each {self.arch} task gate "
                             f"weighs")
        for name in ("expert_dropout", "tower_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.balance_loss_weight < math.inf:
            raise ValueError(f"balance_loss_weight must be >= 0 and finite, got {self.balance_loss_weight}")
        if self.cross_layers < 0 or self.cross_rank < 0:
            raise ValueError(f"cross_layers and cross_rank must be >= 0, got {self.cross_layers} and "
                             f"{self.cross_rank}")
        if self.expert_cross_layers < 0 or self.expert_cross_rank < 0:
            raise ValueError(f"expert_cross_layers and expert_cross_rank must be >= 0, got "
                             f"{self.expert_cross_layers} and {self.expert_cross_rank}")
        if self.numeric_bins < 0:
            raise ValueError(f"numeric_bins must be >= 0, got {self.numeric_bins}")
        if self.embedding_lookup not in EMBEDDING_LOOKUPS:
            raise ValueError(f"embedding_lookup must be one of {EMBEDDING_LOOKUPS}, got {self.embedding_lookup!r}")
        if not 0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate must be > 0 and finite, got {self.learning_rate}")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("expert_units", "bottom_units", "tower_units"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return dataclass_from_mapping(cls, data, "model config")
