"""Declarative description of a tabular multi-task data set.

A `DatasetSpec` says everything the rest of the system needs to know about a
CSV-like data set: the raw column order, how each input column is encoded
(`NumericFeature`, `CategoricalFeature`, `HashedFeature`), which columns the
task labels are derived from (`Task`) and which column, if any, holds the
per-example weight.  Reading (`features.io`), preprocessing
(`features.transform`) and the model builder all work from it, so adding a
data set means writing a spec (in Python or as a YAML/JSON file, see
`load_dataset_spec`), not code.

The spec is checked once, at construction, so mistakes surface as a clear
`ValueError` naming the offending entry instead of as a silent label leak or
a shape error deep inside TensorFlow.  In particular a column that a label or
the weight is derived from can never also be a model input.

Naming conventions (kept here so every module agrees on them):

* a transformed feature keeps its feature name (`transformed_name` is the
  identity); features are named after their raw column, so a serving request
  and a transformed batch use the same keys;
* the label of task `t` is `f"{t}_label"` (`DatasetSpec.label_key`);
* the example weight is `WEIGHT_KEY` (``"__weight__"``);
* a numeric feature with `also_bucketize` adds a second transformed input,
  its quantile-bucket id, under `bucket_name(name)` (``f"{name}_bucket"``);
  `DatasetSpec.input_names` lists every transformed input.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

# Key of the per-example weight in transformed data.  Double underscores keep
# it from clashing with any real column name.
WEIGHT_KEY = "__weight__"

TASK_KINDS = ("binary", "regression")

# Raw dtypes a column can have once read (see `DatasetSpec.raw_dtype`).
FLOAT = "float"
STRING = "string"


def transformed_name(feature_name: str) -> str:
    """Name of a feature after preprocessing.

    The identity: a feature is named after its raw column and keeps that name
    through the transform, which keeps serving requests, transformed batches
    and model inputs on one vocabulary of names.
    """
    return feature_name


BUCKET_SUFFIX = "_bucket"


def bucket_name(feature_name: str) -> str:
    """Transformed name of the quantile-bucket id a numeric feature with `also_bucketize` adds."""
    return feature_name + BUCKET_SUFFIX


def _check_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
    if name != name.strip():
        raise ValueError(f"{kind} name {name!r} has leading/trailing whitespace")


def _check_int(owner: str, field: str, value: Any, minimum: int) -> None:
    # bool is an int subclass; `bucketize: true` in YAML is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {field} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class NumericFeature:
    """A numeric column.

    By default it is z-scored with the training mean and standard deviation
    (missing values are first replaced by the training mean).  `log=True`
    applies log1p(max(x, 0)) before z-scoring, for heavy-tailed amounts such
    as capital gains.  `bucketize=N` instead maps the value to one of N
    training-quantile buckets (an integer id in [0, N)), after which the
    feature is categorical-like with cardinality N.  `also_bucketize=N`
    keeps the z-scored value and adds the N-quantile bucket id as a second
    input, `bucket_name(name)`: the network sees the number and can embed
    its range too (for a `log` feature the quantiles are taken of the
    amount itself, which gives the same buckets as its log and keeps float
    rounding of log1p out of the bucket choice).
    `zero_bucket=True` (with either) gives exactly-zero values bucket 0 and
    takes the N quantiles over the non-zero training values only (ids
    1..N): for amounts that are mostly zero, such as capital gains, whose
    plain quantiles collapse to a few buckets.
    """

    name: str
    log: bool = False
    bucketize: Optional[int] = None
    also_bucketize: Optional[int] = None
    zero_bucket: bool = False

    def __post_init__(self):
        _check_name("feature", self.name)
        if not isinstance(self.log, bool):
            raise ValueError(f"feature {self.name!r}: log must be true or false, got {self.log!r}")
        if self.bucketize is not None:
            _check_int(f"feature {self.name!r}", "bucketize", self.bucketize, 2)
        if self.also_bucketize is not None:
            _check_int(f"feature {self.name!r}", "also_bucketize", self.also_bucketize, 2)
            if self.bucketize is not None:
                raise ValueError(f"feature {self.name!r}: bucketize replaces the number by its bucket and "
                                 f"also_bucketize adds the bucket to it; give one of them")
        if not isinstance(self.zero_bucket, bool):
            raise ValueError(f"feature {self.name!r}: zero_bucket must be true or false, got {self.zero_bucket!r}")
        if self.zero_bucket and self.bucketize is None and self.also_bucketize is None:
            raise ValueError(f"feature {self.name!r}: zero_bucket applies to quantile buckets; give bucketize or "
                             f"also_bucketize too")

    @property
    def bucket_input(self) -> Optional[str]:
        """Name of the extra bucket-id input (`also_bucketize`), else None."""
        return bucket_name(self.name) if self.also_bucketize is not None else None

    @property
    def is_categorical(self) -> bool:
        return self.bucketize is not None


class _StringFeature:
    """What every string feature shares: it is an id input, and adds no bucket-id input."""

    @property
    def is_categorical(self) -> bool:
        return True

    @property
    def bucket_input(self) -> Optional[str]:
        """None: only numeric features add a bucket-id input (`NumericFeature.also_bucketize`)."""
        return None


@dataclasses.dataclass(frozen=True)
class CategoricalFeature(_StringFeature):
    """A string column encoded through a vocabulary computed on training data.

    Values are stripped of surrounding whitespace.  Values not in the
    vocabulary (unseen, or cut by `top_k` / `min_frequency`) are hashed into
    `oov_buckets` extra ids placed after the vocabulary, so ids are always in
    [0, vocabulary size + oov_buckets).  At least one OOV bucket is required:
    without one, tf.Transform maps unknown values to -1, which is not a valid
    embedding row.
    """

    name: str
    oov_buckets: int = 1
    top_k: Optional[int] = None
    min_frequency: Optional[int] = None

    def __post_init__(self):
        _check_name("feature", self.name)
        owner = f"feature {self.name!r}"
        _check_int(owner, "oov_buckets", self.oov_buckets, 1)
        if self.top_k is not None:
            _check_int(owner, "top_k", self.top_k, 1)
        if self.min_frequency is not None:
            _check_int(owner, "min_frequency", self.min_frequency, 1)


@dataclasses.dataclass(frozen=True)
class HashedFeature(_StringFeature):
    """A high-cardinality string column hashed into `hash_buckets` ids.

    No vocabulary is stored (so no analysis pass and no unbounded vocabulary
    file); collisions are the price.  Uses the stable FarmHash-based
    tf.strings.to_hash_bucket_fast, so ids do not change between runs.
    """

    name: str
    hash_buckets: int = 1000

    def __post_init__(self):
        _check_name("feature", self.name)
        _check_int(f"feature {self.name!r}", "hash_buckets", self.hash_buckets, 2)


Feature = Union[NumericFeature, CategoricalFeature, HashedFeature]
FEATURE_TYPES = {"numeric": NumericFeature, "categorical": CategoricalFeature, "hashed": HashedFeature}


@dataclasses.dataclass(frozen=True)
class Task:
    """One prediction target derived from one raw column.

    kind="binary": the label is 1.0 when the stripped column value is one of
    `positive` (a list of strings), or, for a numeric column, when
    float(value) > `threshold`; exactly one of the two must be given.
    `values`, optional with `positive`, lists every value the column may take;
    the reader then rejects any other value (a cheap guard against a shifted
    column or a mislabelled file).

    kind="regression": the label is float(value).
    """

    name: str
    kind: str
    column: str
    positive: Optional[Tuple[str, ...]] = None
    threshold: Optional[float] = None
    values: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        _check_name("task", self.name)
        owner = f"task {self.name!r}"
        _check_name(f"{owner}: column", self.column)
        if self.kind not in TASK_KINDS:
            raise ValueError(f"{owner}: unknown kind {self.kind!r}; expected one of {list(TASK_KINDS)}")
        # Accept lists from callers and YAML, store tuples so the spec stays hashable.
        for field in ("positive", "values"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise ValueError(f"{owner}: {field} must be a list of strings, got {value!r}")
            value = tuple(value)
            if not value or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{owner}: {field} must be a non-empty list of strings, got {list(value)!r}")
            object.__setattr__(self, field, tuple(v.strip() for v in value))
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                    or not math.isfinite(self.threshold):
                raise ValueError(f"{owner}: threshold must be a finite number, got {self.threshold!r}")
            object.__setattr__(self, "threshold", float(self.threshold))
        if self.kind == "binary":
            if (self.positive is None) == (self.threshold is None):
                raise ValueError(f"{owner}: a binary task needs exactly one of 'positive' or 'threshold'")
            if self.values is not None:
                if self.positive is None:
                    raise ValueError(f"{owner}: 'values' can only be given with 'positive'")
                missing = [v for v in self.positive if v not in self.values]
                if missing:
                    raise ValueError(f"{owner}: positive values {missing} are not in 'values'")
        else:
            if self.positive is not None or self.threshold is not None or self.values is not None:
                raise ValueError(f"{owner}: a regression task takes no 'positive', 'threshold' or 'values'")

    @property
    def source_dtype(self) -> str:
        """Raw dtype of the label column: strings for value lists, floats otherwise."""
        return STRING if self.positive is not None else FLOAT


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Everything about one data set: raw layout, feature encodings, tasks.

    columns: the raw columns in file order (for a file with a header, the
        header must contain them; order then does not matter).
    features: encodings of the model inputs, each named after its column.
    tasks: the prediction targets.
    weight_column: optional per-example weight column; never an input.
    header / delimiter: file layout.
    na_values: strings meaning "missing".  In numeric columns they become NaN
        (replaced by the training mean in preprocessing); in categorical
        columns they stay as a real category, because "unknown" is often
        informative (in Census, '?' marks people not asked the question).
    strip_trailing_period: strip one '.' ending each row (the UCI Census
        files end every row in '.').
    drop_columns: columns read but discarded (neither input nor label).
    """

    name: str
    columns: Tuple[str, ...]
    features: Tuple[Feature, ...]
    tasks: Tuple[Task, ...]
    weight_column: Optional[str] = None
    header: bool = False
    delimiter: str = ","
    na_values: Tuple[str, ...] = ("?",)
    strip_trailing_period: bool = False
    drop_columns: Tuple[str, ...] = ()

    def __post_init__(self):
        _check_name("dataset", self.name)
        for field in ("columns", "features", "tasks", "na_values", "drop_columns"):
            value = getattr(self, field)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise ValueError(f"dataset {self.name!r}: {field} must be a list, got {value!r}")
            object.__setattr__(self, field, tuple(value))
        for field in ("header", "strip_trailing_period"):  # a YAML "no" in quotes would otherwise read as true
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"dataset {self.name!r}: {field} must be true or false, got {getattr(self, field)!r}")
        self._validate()

    def _validate(self) -> None:
        where = f"dataset {self.name!r}"
        for c in self.columns:
            _check_name(f"{where}: column", c)
        duplicates = sorted({c for c in self.columns if self.columns.count(c) > 1})
        if duplicates:
            raise ValueError(f"{where}: duplicate columns {duplicates}")
        if not isinstance(self.delimiter, str) or len(self.delimiter) != 1:
            raise ValueError(f"{where}: delimiter must be a single character, got {self.delimiter!r}")
        if not all(isinstance(v, str) for v in self.na_values):
            raise ValueError(f"{where}: na_values must be strings, got {list(self.na_values)!r}")
        if not self.features:
            raise ValueError(f"{where}: at least one feature is required")
        if not self.tasks:
            raise ValueError(f"{where}: at least one task is required")
        known = set(self.columns)

        names = set()
        for f in self.features:
            if not isinstance(f, (NumericFeature, CategoricalFeature, HashedFeature)):
                raise ValueError(f"{where}: {f!r} is not a NumericFeature, CategoricalFeature or HashedFeature")
            if f.name in names:
                raise ValueError(f"{where}: feature {f.name!r} is listed twice")
            names.add(f.name)
            if f.name not in known:
                raise ValueError(f"{where}: feature {f.name!r} is not one of the columns")
            if f.name == WEIGHT_KEY:
                raise ValueError(f"{where}: feature name {WEIGHT_KEY!r} is reserved for the weight")
        inputs = set(names)
        for f in self.features:
            extra = f.bucket_input
            if extra is None:
                continue
            if extra in inputs:
                raise ValueError(f"{where}: feature {f.name!r} adds the input {extra!r} (also_bucketize), which "
                                 f"is already a feature or another feature's bucket input")
            inputs.add(extra)

        label_sources: Dict[str, str] = {}
        task_names = set()
        for t in self.tasks:
            if not isinstance(t, Task):
                raise ValueError(f"{where}: {t!r} is not a Task")
            if t.name in task_names:
                raise ValueError(f"{where}: task {t.name!r} is listed twice")
            task_names.add(t.name)
            if t.column not in known:
                raise ValueError(f"{where}: task {t.name!r} reads column {t.column!r}, which is not one of the columns")
            # One raw dtype per column: a column can't be both a string and a number.
            previous = label_sources.setdefault(t.column, t.source_dtype)
            if previous != t.source_dtype:
                raise ValueError(
                    f"{where}: column {t.column!r} is used as a string label (positive values) by one task "
                    f"and as a numeric label (threshold/regression) by another")
            # Invariant: a label source is never an input, or the model could read its own answer.
            if t.column in names:
                raise ValueError(
                    f"{where}: column {t.column!r} is the label source of task {t.name!r} and cannot also be a "
                    f"feature; remove it from features")
            if self.label_key(t.name) in inputs:
                raise ValueError(f"{where}: input name {self.label_key(t.name)!r} clashes with the label key of "
                                 f"task {t.name!r}")

        if self.weight_column is not None:
            if self.weight_column not in known:
                raise ValueError(f"{where}: weight_column {self.weight_column!r} is not one of the columns")
            if self.weight_column in names:
                raise ValueError(f"{where}: weight_column {self.weight_column!r} cannot also be a feature")
            if self.weight_column in label_sources:
                raise ValueError(f"{where}: weight_column {self.weight_column!r} cannot also be a label source")

        used = names | set(label_sources) | ({self.weight_column} if self.weight_column else set())
        for c in self.drop_columns:
            if c not in known:
                raise ValueError(f"{where}: drop_columns entry {c!r} is not one of the columns")
            if c in used:
                raise ValueError(f"{where}: column {c!r} is in drop_columns but is used as a feature, label or weight")

    # -- helpers ----------------------------------------------------------------

    @property
    def feature_names(self) -> List[str]:
        return [f.name for f in self.features]

    @property
    def input_names(self) -> List[str]:
        """Transformed model inputs in spec order: each feature, followed by its bucket id if it adds one."""
        out = []
        for f in self.features:
            out.append(transformed_name(f.name))
            if f.bucket_input is not None:
                out.append(f.bucket_input)
        return out

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]

    @property
    def label_columns(self) -> List[str]:
        """Raw columns the labels are read from, in first-use order, deduplicated."""
        return list(dict.fromkeys(t.column for t in self.tasks))

    @staticmethod
    def label_key(task_name: str) -> str:
        """Key of a task's float label in transformed data."""
        return f"{task_name}_label"

    @property
    def label_keys(self) -> List[str]:
        return [self.label_key(t.name) for t in self.tasks]

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"dataset {self.name!r} has no feature {name!r}")

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"dataset {self.name!r} has no task {name!r}")

    def raw_dtype(self, column: str) -> Optional[str]:
        """FLOAT or STRING for a column the model uses (feature, label, weight), else None.

        Numeric features, the weight and threshold/regression label sources are
        floats; categorical and hashed features and value-list label sources are
        strings.  Columns nothing uses are None (read as strings, then ignored).
        """
        for f in self.features:
            if f.name == column:
                return FLOAT if isinstance(f, NumericFeature) else STRING
        if column == self.weight_column:
            return FLOAT
        for t in self.tasks:
            if t.column == column:
                return t.source_dtype
        return None

    @property
    def used_columns(self) -> List[str]:
        """Columns the transform reads (features, label sources, weight), in file order."""
        return [c for c in self.columns if self.raw_dtype(c) is not None]


# -- (de)serialisation -----------------------------------------------------------

_SPEC_KEYS = {f.name for f in dataclasses.fields(DatasetSpec)}
_REQUIRED_SPEC_KEYS = ("name", "columns", "features", "tasks")
_TASK_KEYS = {f.name for f in dataclasses.fields(Task)}


def _feature_to_dict(f: Feature) -> Dict[str, Any]:
    kind = {NumericFeature: "numeric", CategoricalFeature: "categorical", HashedFeature: "hashed"}[type(f)]
    out: Dict[str, Any] = {"name": f.name, "type": kind}
    for field in dataclasses.fields(f):
        value = getattr(f, field.name)
        if field.name != "name" and value != field.default:
            out[field.name] = value
    return out


def dataset_spec_to_dict(spec: DatasetSpec) -> Dict[str, Any]:
    """Plain-data form of a spec (YAML/JSON friendly); inverse of `dataset_spec_from_dict`."""
    tasks = []
    for t in spec.tasks:
        d: Dict[str, Any] = {"name": t.name, "kind": t.kind, "column": t.column}
        if t.positive is not None:
            d["positive"] = list(t.positive)
        if t.threshold is not None:
            d["threshold"] = t.threshold
        if t.values is not None:
            d["values"] = list(t.values)
        tasks.append(d)
    return {
        "name": spec.name,
        "columns": list(spec.columns),
        "header": spec.header,
        "delimiter": spec.delimiter,
        "na_values": list(spec.na_values),
        "strip_trailing_period": spec.strip_trailing_period,
        "weight_column": spec.weight_column,
        "drop_columns": list(spec.drop_columns),
        "features": [_feature_to_dict(f) for f in spec.features],
        "tasks": tasks,
    }


def _entry_label(section: str, index: int, entry: Any) -> str:
    name = entry.get("name") if isinstance(entry, Mapping) else None
    return f"{section}[{index}]" + (f" ({name!r})" if name else "")


def _parse_feature(index: int, entry: Any) -> Feature:
    label = _entry_label("features", index, entry)
    if not isinstance(entry, Mapping):
        raise ValueError(f"{label}: expected a mapping with 'name' and 'type', got {entry!r}")
    if "name" not in entry:
        raise ValueError(f"{label}: missing key 'name'")
    if "type" not in entry:
        raise ValueError(f"{label}: missing key 'type' (one of {sorted(FEATURE_TYPES)})")
    cls = FEATURE_TYPES.get(entry["type"])
    if cls is None:
        raise ValueError(f"{label}: unknown feature type {entry['type']!r}; expected one of {sorted(FEATURE_TYPES)}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(entry) - allowed - {"type"})
    if unknown:
        raise ValueError(f"{label}: unknown key(s) {unknown} for a {entry['type']} feature; allowed: {sorted(allowed)}")
    kwargs = {k: v for k, v in entry.items() if k != "type"}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None


def _parse_task(index: int, entry: Any) -> Task:
    label = _entry_label("tasks", index, entry)
    if not isinstance(entry, Mapping):
        raise ValueError(f"{label}: expected a mapping with 'name', 'kind' and 'column', got {entry!r}")
    for key in ("name", "kind", "column"):
        if key not in entry:
            raise ValueError(f"{label}: missing key {key!r}")
    unknown = sorted(set(entry) - _TASK_KEYS)
    if unknown:
        raise ValueError(f"{label}: unknown key(s) {unknown}; allowed: {sorted(_TASK_KEYS)}")
    try:
        return Task(**entry)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None


def dataset_spec_from_dict(data: Mapping[str, Any], source: str = "spec") -> DatasetSpec:
    """Build a DatasetSpec from plain data; errors name `source` and the entry."""
    try:
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a mapping at the top level, got {type(data).__name__}")
        missing = [k for k in _REQUIRED_SPEC_KEYS if k not in data]
        if missing:
            raise ValueError(f"missing key(s) {missing}")
        unknown = sorted(set(data) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown}; allowed: {sorted(_SPEC_KEYS)}")
        for key in ("features", "tasks"):
            if not isinstance(data[key], list):
                raise ValueError(f"{key!r} must be a list, got {data[key]!r}")
        kwargs = dict(data)
        kwargs["features"] = [_parse_feature(i, e) for i, e in enumerate(data["features"])]
        kwargs["tasks"] = [_parse_task(i, e) for i, e in enumerate(data["tasks"])]
        for key in ("na_values", "drop_columns"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return DatasetSpec(**kwargs)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def load_dataset_spec(path: Union[str, os.PathLike]) -> DatasetSpec:
    """Read a DatasetSpec from a .yaml/.yml or .json file (chosen by extension)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    with open(path, "r", encoding="utf-8") as fh:
        text = fh.read()
    if ext in (".yaml", ".yml"):
        import yaml  # local import: only needed for YAML specs

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    elif ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
    else:
        raise ValueError(f"{path}: unknown spec file extension {ext!r}; use .yaml, .yml or .json")
    return dataset_spec_from_dict(data, source=path)


def save_dataset_spec(spec: DatasetSpec, path: Union[str, os.PathLike]) -> None:
    """Write a DatasetSpec as YAML or JSON (by extension)."""
    path = os.fspath(path)
    data = dataset_spec_to_dict(spec)
    ext = os.path.splitext(path)[1].lower()
    with open(path, "w", encoding="utf-8") as fh:
        if ext in (".yaml", ".yml"):
            import yaml

            yaml.safe_dump(data, fh, sort_keys=False, default_flow_style=None, width=100)
        elif ext == ".json":
            json.dump(data, fh, indent=2)
            fh.write("\n")
        else:
            raise ValueError(f"{path}: unknown spec file extension {ext!r}; use .yaml, .yml or .json")
