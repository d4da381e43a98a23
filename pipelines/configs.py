"""Configuration of the TFX pipeline: one `PipelineConfig`, defaults for everything but the data.

A config file (`mmoe pipeline run --config FILE`, YAML or JSON) holds any of
these sections; what it leaves out keeps its default:

    dataset:            # a DatasetSpec inline (see features/configs/), or
      spec: features/configs/census_group1.yaml   # a path to one, or
      task_group: 1     # the census task group (the default)
    model: {arch: mmoe, num_experts: 8, expert_units: [64], gate: softmax, learning_rate: 0.001}
    train: {train_steps: 2000, eval_steps: null, batch_size: 512, steps_per_epoch: 200, patience: 4,
            main_task: null, loss_weights: {income: 1.0, marital: 1.0}, use_weights: false, xla: true}
    split: {train_buckets: 4, eval_buckets: 1, partition_feature: null}   # hash split, 80/20
    evaluation: {auc_floor: 0.6, auc_floors: {marital: 0.8}, max_auc_drop: 0.01, rmse_ceiling: null,
                 slices: [sex, race]}
    tuner: {enabled: false, max_trials: 4, num_experts: [4, 8], expert_units: [32, 64],
            gate_temperature: [0.5, 2.0], learning_rate: [0.0003, 0.003]}
    beam_args: [--direct_running_mode=multi_processing, --direct_num_workers=0]
    pipeline_name: mmoe
    model_name: mmoe    # TF Serving model name: pushed to <serving_dir>/<model_name>/<version>

A file that is itself a DatasetSpec (top-level `columns`, `features`, `tasks`,
like `mmoe train --config`) is taken as the `dataset` section.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from mmoe.config import dataclass_from_mapping, typed_value

DEFAULT_BEAM_ARGS = ("--direct_running_mode=multi_processing", "--direct_num_workers=0")

_CODE_PACKAGES = ("features", "mmoe", "serving")
# The pipelines/ modules the components run (the Trainer and Tuner import configs and train_local too).
_CODE_FILES = ("pipelines/trainer_module.py", "pipelines/configs.py", "pipelines/train_local.py",
               "pipelines/components/spec_example_gen.py", "pipelines/components/spec_schema.py")


@dataclasses.dataclass
class TrainConfig:
    train_steps: int = 2000
    eval_steps: Optional[int] = None  # None: the whole eval split
    batch_size: int = 512
    steps_per_epoch: int = 200
    patience: int = 4
    main_task: Optional[str] = None
    loss_weights: Dict[str, float] = dataclasses.field(default_factory=dict)
    use_weights: bool = False
    xla: bool = True
    seed: int = 0
    # mmoe.training.OptimizerSettings; an epoch is steps_per_epoch steps.
    schedule: str = "constant"
    cosine_epochs: int = 20
    weight_decay: float = 0.0
    ema: float = 0.0
    shuffle_buffer: int = 10_000  # training examples shuffled together (tf.data)

    def __post_init__(self):
        from mmoe.training import OptimizerSettings

        for name in ("train_steps", "batch_size", "steps_per_epoch", "shuffle_buffer"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.patience) < 0:
            raise ValueError(f"train.patience must be >= 0, got {self.patience}")
        if not 0 <= int(self.seed) < 2 ** 32:
            raise ValueError(f"train.seed must be in [0, 2**32), got {self.seed}")
        if self.eval_steps is not None and int(self.eval_steps) < 1:
            raise ValueError(f"train.eval_steps must be >= 1 or null, got {self.eval_steps}")
        try:
            OptimizerSettings.from_settings(dataclasses.asdict(self))
        except ValueError as err:
            raise ValueError(f"train.{err}") from None

    def module_settings(self) -> Dict[str, Any]:
        """The part the Trainer's run_fn reads (custom_config['train'])."""
        d = dataclasses.asdict(self)
        d.pop("train_steps")
        d.pop("eval_steps")
        return d


@dataclasses.dataclass
class SplitConfig:
    train_buckets: int = 4
    eval_buckets: int = 1
    partition_feature: Optional[str] = None  # hash this feature instead of the whole example

    def __post_init__(self):
        if int(self.train_buckets) < 1 or int(self.eval_buckets) < 1:
            raise ValueError(f"split buckets must be >= 1, got train {self.train_buckets}, eval {self.eval_buckets}")


@dataclasses.dataclass
class EvaluationConfig:
    auc_floor: float = 0.6  # absolute lower bound on every binary head's AUC
    auc_floors: Dict[str, float] = dataclasses.field(default_factory=dict)  # per-head overrides
    max_auc_drop: float = 0.01  # allowed AUC regression against the latest blessed model
    rmse_ceiling: Optional[float] = None  # absolute upper bound on regression heads' RMSE
    max_rmse_increase: Optional[float] = None  # allowed RMSE increase against the baseline
    slices: List[str] = dataclasses.field(default_factory=lambda: ["sex", "race"])

    def __post_init__(self):
        if not 0 <= float(self.auc_floor) <= 1:
            raise ValueError(f"evaluation.auc_floor must be in [0, 1], got {self.auc_floor}")
        if float(self.max_auc_drop) < 0:
            raise ValueError(f"evaluation.max_auc_drop must be >= 0, got {self.max_auc_drop}")
        for task, floor in self.auc_floors.items():  # a floor above 1 could never bless a model
            if not 0 <= float(floor) <= 1:
                raise ValueError(f"evaluation.auc_floors.{task} must be in [0, 1], got {floor}")
        if self.rmse_ceiling is not None and not float(self.rmse_ceiling) > 0:
            raise ValueError(f"evaluation.rmse_ceiling must be > 0 or null, got {self.rmse_ceiling}")
        if self.max_rmse_increase is not None and not float(self.max_rmse_increase) >= 0:
            raise ValueError(f"evaluation.max_rmse_increase must be >= 0 or null, got {self.max_rmse_increase}")


@dataclasses.dataclass
class TunerConfig:
    enabled: bool = False
    max_trials: int = 4
    num_experts: List[int] = dataclasses.field(default_factory=lambda: [4, 8])
    expert_units: List[int] = dataclasses.field(default_factory=lambda: [32, 64])
    gate_temperature: List[float] = dataclasses.field(default_factory=lambda: [0.5, 2.0])  # log-uniform range
    learning_rate: List[float] = dataclasses.field(default_factory=lambda: [3e-4, 3e-3])  # log-uniform range
    steps_per_trial: Optional[int] = None  # default: the Tuner's train_args.num_steps

    def __post_init__(self):
        if int(self.max_trials) < 1:
            raise ValueError(f"tuner.max_trials must be >= 1, got {self.max_trials}")
        for name in ("num_experts", "expert_units"):  # choices
            values = getattr(self, name)
            if not values or any(int(v) < 1 for v in values):
                raise ValueError(f"tuner.{name} must list one or more positive integers, got {values}")
        for name in ("gate_temperature", "learning_rate"):  # log-uniform ranges
            values = getattr(self, name)
            if len(values) != 2 or not 0 < float(values[0]) <= float(values[1]) < float("inf"):
                raise ValueError(f"tuner.{name} must be a range [low, high] with 0 < low <= high, got {values}")
        if self.steps_per_trial is not None and int(self.steps_per_trial) < 1:
            raise ValueError(f"tuner.steps_per_trial must be >= 1 or null, got {self.steps_per_trial}")

    def module_settings(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("enabled")
        return d


def _section(cls, data: Any, name: str):
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    return dataclass_from_mapping(cls, data, f"config section {name!r}")


@dataclasses.dataclass
class PipelineConfig:
    """Everything `create_pipeline` needs besides the paths of the run."""

    dataset: Dict[str, Any]  # features.spec.dataset_spec_to_dict(spec)
    model: Dict[str, Any] = dataclasses.field(default_factory=dict)  # mmoe.ModelConfig.to_dict()
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    tuner: TunerConfig = dataclasses.field(default_factory=TunerConfig)
    beam_args: List[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_BEAM_ARGS))
    pipeline_name: str = "mmoe"
    model_name: str = "mmoe"

    def __post_init__(self):
        from features.spec import dataset_spec_from_dict
        from mmoe import ModelConfig

        for name in ("pipeline_name", "model_name"):
            typed_value(getattr(self, name), str, name)
        self.beam_args = typed_value(self.beam_args, List[str], "beam_args")  # a string is not a list of args
        self.train = _section(TrainConfig, self.train, "train")
        self.split = _section(SplitConfig, self.split, "split")
        self.evaluation = _section(EvaluationConfig, self.evaluation, "evaluation")
        self.tuner = _section(TunerConfig, self.tuner, "tuner")
        spec = dataset_spec_from_dict(self.dataset, source="config 'dataset'")  # validates early
        self.model = ModelConfig.from_dict(dict(self.model or {})).to_dict()
        if self.train.main_task is not None and self.train.main_task not in spec.task_names:
            raise ValueError(f"train.main_task {self.train.main_task!r} is not one of the tasks {spec.task_names}")
        unknown = sorted(set(self.train.loss_weights) - set(spec.task_names))
        if unknown:
            raise ValueError(f"train.loss_weights names unknown task(s) {unknown}; tasks are {spec.task_names}")
        unknown = sorted(set(self.evaluation.auc_floors) - set(spec.task_names))
        if unknown:
            raise ValueError(f"evaluation.auc_floors names unknown task(s) {unknown}; tasks are {spec.task_names}")
        if self.split.partition_feature is not None and self.split.partition_feature not in spec.columns:
            raise ValueError(f"split.partition_feature {self.split.partition_feature!r} is not a column of the "
                             f"dataset ({list(spec.columns)})")
        for s in self.evaluation.slices:
            if s not in spec.used_columns:
                raise ValueError(f"evaluation.slices: {s!r} is not a column the dataset uses ({spec.used_columns})")
        for name in ("pipeline_name", "model_name"):
            value = getattr(self, name)
            if not value or not all(c.isalnum() or c in "-_" for c in value):
                raise ValueError(f"{name} must be letters, digits, '-' or '_', got {value!r}")

    @property
    def spec(self):
        from features.spec import dataset_spec_from_dict

        return dataset_spec_from_dict(self.dataset)

    def module_config(self) -> Dict[str, Any]:
        """custom_config of Transform, Tuner and Trainer (plain JSON data)."""
        return {"dataset": self.dataset, "model": self.model, "train": self.train.module_settings(),
                "tuner": self.tuner.module_settings(), "code": code_fingerprint()}

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def dataset_from_section(section: Any, base_dir: str = ".") -> Dict[str, Any]:
    """The `dataset` section (inline spec, {spec: PATH} or {task_group: N}) as a spec dict."""
    from features.census import census_spec
    from features.spec import dataset_spec_to_dict, load_dataset_spec

    if section is None:
        return dataset_spec_to_dict(census_spec(1))
    if not isinstance(section, Mapping):
        raise ValueError(f"config section 'dataset' must be a mapping, got {section!r}")
    if "spec" in section or "task_group" in section:
        if set(section) - {"spec", "task_group"} or len(section) != 1:
            raise ValueError("config section 'dataset' takes either 'spec: PATH' or 'task_group: N', "
                             f"or an inline spec; got keys {sorted(section)}")
        if "spec" in section:
            path = typed_value(section["spec"], str, "dataset.spec")
            if not os.path.isabs(path):
                path = os.path.join(base_dir, path)
            return dataset_spec_to_dict(load_dataset_spec(path))
        group = section["task_group"]
        if group not in (1, 2) or isinstance(group, bool):
            raise ValueError(f"dataset.task_group must be 1 or 2, got {group!r}")
        return dataset_spec_to_dict(census_spec(group))
    from features.spec import dataset_spec_from_dict

    return dataset_spec_to_dict(dataset_spec_from_dict(dict(section), source="config 'dataset'"))


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML/JSON config; a bare DatasetSpec file becomes {'dataset': spec}."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--config {path}: a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--config {path}: not a text file (YAML or JSON)") from None
    if path.lower().endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if {"columns", "features", "tasks"} <= set(data):
        data = {"dataset": data}
    data = dict(data)
    data["dataset"] = dataset_from_section(data.get("dataset"), base_dir=os.path.dirname(os.path.abspath(path)))
    return data


def make_config(data: Optional[Mapping[str, Any]] = None, **overrides) -> PipelineConfig:
    """PipelineConfig from plain data (a loaded file) plus keyword overrides of whole sections."""
    data = dict(data or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "dataset" not in data or data["dataset"] is None or ("columns" not in data["dataset"]):
        data["dataset"] = dataset_from_section(data.get("dataset"))
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known: {sorted(known)}")
    return PipelineConfig(**data)


def code_fingerprint() -> str:
    """sha256 over the sources the components run, so a code change invalidates cached results."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    paths = [root / f for f in _CODE_FILES]
    for package in _CODE_PACKAGES:
        paths.extend(sorted((root / package).rglob("*.py")))
    for p in sorted(paths):
        if p.is_file():
            digest.update(str(p.relative_to(root)).encode())
            digest.update(p.read_bytes())
    return digest.hexdigest()[:16]
