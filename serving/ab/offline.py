"""Offline A/B evaluation: two exported models scored on the same rows of a data file (`mmoe ab-eval --a --b`).

Model references (`resolve_model`):

* `PATH`: an export directory (holding saved_model.pb), e.g. `models/census/3`;
* `NAME`, `NAME@VERSION`, `NAME:LABEL` with `--serving-dir DIR` (TF Serving's layout `DIR/NAME/VERSION`):
  the newest version, a given version, or the version a label points to;
* with `--model-config-file F` (TF Serving's ModelServerConfig text, as for `mmoe serve`) the model's base path
  and its `version_labels` come from the config.  Labels live only in such a config, so `NAME:LABEL` needs it.

Rows and labels: the data file is read with the dataset spec (`features.io.read_dataset`), and each head's label
is derived from its raw column by the same function the tf.Transform graph uses (`features.transform._label`),
so the labels are the ones the models were trained on.  Rows are unweighted (as in `mmoe.training.evaluate`).
Each model is called through its `predict_raw` signature with the raw serving features its own
`assets.extra/mmoe_export.json` lists, in batches; heads are the export's tasks, gate outputs `<task>_gates`
(when exported) are averaged per expert.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from serving.ab import stats
from serving.ab.stats import Progress, Settings

GATES_SUFFIX = "_gates"  # mmoe.models.GATES_SUFFIX; the export names gate outputs "<task>_gates"

_REF = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+?)(?:@(?P<version>\d+)|:(?P<label>[A-Za-z0-9_.\-]+))?$")


@dataclasses.dataclass
class ModelRef:
    """A resolved model: the text it came from, its export directory, and name/version/label when known."""

    text: str
    path: str
    name: str = ""
    version: Optional[int] = None
    label: str = ""

    def describe(self) -> Dict[str, object]:
        return {"ref": self.text, "path": self.path, "name": self.name, "version": self.version,
                "label": self.label}


def resolve_model(text: str, serving_dir: Optional[str] = None, model_config_file: Optional[str] = None,
                  what: str = "model") -> ModelRef:
    """Turn `--a`/`--b` text into a ModelRef (see the module docstring for the syntax).

    Raises ValueError / FileNotFoundError naming the reference and what is available.
    """
    from serving.models import versions_on_disk

    # A bare name with a serving directory or config is a model name even where a directory of that name is in
    # the working directory (`--a mmoe` run from this repository's root, which has an `mmoe/` package).
    is_name = bool(_REF.match(text)) and os.sep not in text and bool(serving_dir or model_config_file)
    is_export = os.path.isfile(os.path.join(text, "saved_model.pb"))
    if os.path.isdir(text) and (is_export or not is_name):
        if not is_export:
            raise FileNotFoundError(f"{what} {text}: directory holds no saved_model.pb (not an export; "
                                    f"for a model in a serving directory write NAME, NAME@VERSION or NAME:LABEL)")
        base = os.path.basename(os.path.normpath(text))
        return ModelRef(text, text, name=os.path.basename(os.path.dirname(os.path.normpath(text))),
                        version=int(base) if base.isdigit() else None)
    match = _REF.match(text)
    if not match or not (serving_dir or model_config_file):
        raise FileNotFoundError(f"{what} {text!r}: no such export directory (for a model in a serving directory, "
                                f"give --serving-dir DIR or --model-config-file F with NAME, NAME@VERSION or "
                                f"NAME:LABEL)")
    name, version, label = match["name"], match["version"], match["label"]
    entry = None
    if model_config_file:
        from serving.config import load_model_config

        entries = {e.name: e for e in load_model_config(model_config_file)}
        entry = entries.get(name)
        if entry is None and not serving_dir:
            raise ValueError(f"{what} {text!r}: model {name!r} is not in {model_config_file} "
                             f"(models: {sorted(entries)})")
    base_path = entry.base_path if entry is not None else os.path.join(serving_dir, name)
    versions = sorted(versions_on_disk(base_path))
    if not versions:
        raise FileNotFoundError(f"{what} {text!r}: {base_path} holds no version directory with a saved_model.pb")
    if label:
        labels = entry.labels if entry is not None else {}
        if label not in labels:
            hint = (f"labels of {name!r}: {sorted(labels)}" if entry is not None else
                    "version labels are defined in a model config file: give --model-config-file")
            raise ValueError(f"{what} {text!r}: unknown version label {label!r} ({hint})")
        chosen = labels[label]
    else:
        chosen = int(version) if version else versions[-1]
    if chosen not in versions:
        raise FileNotFoundError(f"{what} {text!r}: {base_path} has no version {chosen}; versions: {versions}")
    return ModelRef(text, os.path.join(base_path, str(chosen)), name=name, version=chosen, label=label or "")


def load_model(ref: ModelRef, batch_size: int):
    """The export as a serving.models.Servable (its signatures and export info), without batching."""
    from serving.models import Servable

    return Servable(ref.name or "model", ref.version or 0, ref.path, batching=None, max_batch=batch_size)


def model_heads(servable) -> Dict[str, str]:
    """head -> kind ("binary"/"regression") from the export info, else every non-gate output as binary."""
    info = servable.export_info
    if info.get("tasks"):
        kinds = info.get("task_kinds", {})
        return {t: kinds.get(t, stats.BINARY) for t in info["tasks"]}
    outputs = servable.signature("predict_raw").outputs
    return {o: stats.BINARY for o in outputs if not o.endswith(GATES_SUFFIX)}


def raw_inputs(frame, servable) -> Dict[str, np.ndarray]:
    """The model's predict_raw inputs from raw rows: float32 numbers, bytes for strings.

    Typed by the signature of this export (each model may use its own feature set); raises ValueError naming
    the features the data lacks.
    """
    signature = servable.signature("predict_raw")
    missing = sorted(set(signature.inputs) - set(frame.columns))
    if missing:
        raise ValueError(f"model {servable.path}: the data has no column(s) {missing} that the model takes")
    out = {}
    for name, spec in signature.inputs.items():
        if spec.dtype.name == "string":
            out[name] = np.array([str(v).encode() for v in frame[name]], dtype=object)
        else:
            out[name] = frame[name].to_numpy(dtype=spec.dtype.as_numpy_dtype, na_value=np.nan)
    return out


def predict(servable, frame, heads: Sequence[str], batch_size: int = 8192, progress: Progress = None,
            what: str = "") -> Dict[str, np.ndarray]:
    """Score the rows: head -> [n] float64 scores, and "<head>_gates" -> [E] mean gate weight per expert
    when the export has gate outputs."""
    inputs = raw_inputs(frame, servable)
    n = len(frame)
    scores: Dict[str, List[np.ndarray]] = {h: [] for h in heads}
    gate_sums: Dict[str, np.ndarray] = {}
    started = time.time()
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in inputs.items()}
        _, outputs = servable.run("predict_raw", batch)
        for h in heads:
            scores[h].append(np.asarray(outputs[h], dtype="float64").reshape(-1))
        for key, value in outputs.items():
            if key.endswith(GATES_SUFFIX) and np.ndim(value) == 2:
                gate_sums[key] = gate_sums.get(key, 0) + np.asarray(value, dtype="float64").sum(axis=0)
        if progress:
            done = min(start + batch_size, n)
            progress(f"{what}predicting {done:,}/{n:,} rows ({done / max(time.time() - started, 1e-9):,.0f} rows/s)")
    out = {h: np.concatenate(v) for h, v in scores.items()}
    out.update({k: v / n for k, v in gate_sums.items()})
    return out


def dataset_spec(config: Optional[str], task_group: Optional[int], infos: Sequence[dict]):
    """The DatasetSpec to read the data with: --config, --task-group, or the census spec the exports name."""
    from features.census import census_spec
    from features.spec import load_dataset_spec

    if config:
        return load_dataset_spec(config)
    if task_group:
        return census_spec(task_group)
    names = {i.get("dataset") for i in infos}
    for group in (1, 2):
        if names == {f"census_group{group}"}:
            return census_spec(group)
    raise ValueError(f"the exports name data set(s) {sorted(str(n) for n in names)}; give the dataset spec with "
                     f"--config FILE (or --task-group 1|2 for census)")


def choose_heads(heads_a: Dict[str, str], heads_b: Dict[str, str], wanted: Sequence[str], spec) -> Dict[str, object]:
    """Split heads into compared (shared, labelled, same kind, in `wanted` if given) and listed-only ones.

    Raises ValueError for a `--head` that is not a shared head.
    """
    shared = [h for h in heads_a if h in heads_b]
    if wanted:
        unknown = [h for h in wanted if h not in shared]
        if unknown:
            raise ValueError(f"--head {', '.join(unknown)}: not a head of both models; shared heads: {shared}, "
                             f"only in A: {[h for h in heads_a if h not in heads_b]}, "
                             f"only in B: {[h for h in heads_b if h not in heads_a]}")
    chosen = [h for h in shared if not wanted or h in wanted]
    kind_mismatch = [h for h in chosen if heads_a[h] != heads_b[h]]
    unlabelled = [h for h in chosen if spec is not None and h not in spec.task_names]
    compared = [h for h in chosen if h not in kind_mismatch and h not in unlabelled]
    if not compared:
        raise ValueError(f"no head to compare: shared heads {shared}, kinds differ for {kind_mismatch}, "
                         f"no label in the dataset spec for {unlabelled}")
    return {"compared": {h: heads_a[h] for h in compared},
            "only_a": [h for h in heads_a if h not in heads_b], "only_b": [h for h in heads_b if h not in heads_a],
            "kind_mismatch": kind_mismatch, "unlabelled": unlabelled,
            "not_selected": [h for h in shared if wanted and h not in wanted]}


def slice_masks(frame, column: str, labels: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """value -> boolean row mask for one slice column, largest slice first.  Raises ValueError for an unknown column."""
    if column not in frame.columns:
        raise ValueError(f"--slice {column}: no such column; columns: {list(frame.columns)}")
    values = frame[column].astype(str)
    counts = values.value_counts()
    return {str(v): (values == v).to_numpy() for v in counts.index}


_STARTED = time.time()


def print_progress(line: str) -> None:
    """A progress line on stderr, stamped with the seconds since this module was imported (the command began)."""
    print(f"[{time.time() - _STARTED:6.1f}s] {line}", file=sys.stderr, flush=True)


def evaluate_offline(a: ModelRef, b: ModelRef, data: str, out_dir: str, *, spec=None, config: Optional[str] = None,
                     task_group: Optional[int] = None, heads: Sequence[str] = (), slices: Sequence[str] = (),
                     settings: Settings = Settings(), batch_size: int = 8192, plots: bool = True,
                     progress: Progress = print_progress) -> dict:
    """Compare models A and B on the rows of `data`; writes report.json, report.md and plots into out_dir.

    Args:
        a, b: resolved models (resolve_model).
        data: a data file laid out as the dataset spec says.
        out_dir: where the report goes (created).
        spec: a DatasetSpec; else from `config`, `task_group` or the exports (dataset_spec).
        heads: restrict to these heads (default: every head both models have).
        slices: raw columns to slice by (each value judged separately, too-small slices marked).
        settings: bootstrap and test settings.
        batch_size: rows per predict_raw call.
        plots: write the PNG plots.
        progress: called with progress lines (stderr by default; None for silence).
    Returns the report (the content of report.json).
    """
    from features.io import read_dataset
    from serving.ab import report as report_lib

    say = progress or (lambda line: None)
    for label, ref in (("A", a), ("B", b)):
        say(f"loading {label}: {ref.path}")
    model_a, model_b = load_model(a, batch_size), load_model(b, batch_size)
    try:
        spec = spec or dataset_spec(config, task_group, [model_a.export_info, model_b.export_info])
        choice = choose_heads(model_heads(model_a), model_heads(model_b), heads, spec)
        missing = [s for s in slices if s not in spec.columns or s in spec.drop_columns]
        if missing:
            raise ValueError(f"--slice {', '.join(missing)}: not a column of dataset {spec.name!r}; "
                             f"columns: {[c for c in spec.columns if c not in spec.drop_columns]}")
        say(f"reading {data}")
        frame = read_dataset(data, spec)
        say(f"{len(frame):,} rows; heads compared: {list(choice['compared'])}")
        compared = choice["compared"]
        scores_a = predict(model_a, frame, list(compared), batch_size, progress, "A: ")
        scores_b = predict(model_b, frame, list(compared), batch_size, progress, "B: ")
    finally:
        model_a.retire()
        model_b.retire()
    from features.transform import frame_labels

    labels = {h: frame_labels(frame, spec, h) for h in compared}
    say("labels derived; comparing")

    def head_inputs(mask=None):
        pick = (lambda x: x) if mask is None else (lambda x: x[mask])
        return {h: {"kind": kind, "labels_a": pick(labels[h]), "scores_a": pick(scores_a[h]),
                    "labels_b": pick(labels[h]), "scores_b": pick(scores_b[h])} for h, kind in compared.items()}

    overall = stats.compare(head_inputs(), settings, paired=True, progress=progress, what="overall: ")
    stats.judge([overall], settings)
    slice_results = {}
    for column in slices:
        per_value = {}
        for value, mask in slice_masks(frame, column).items():
            per_value[value] = stats.compare(head_inputs(mask), settings, paired=True, progress=progress,
                                             what=f"{column}={value}: ")
        stats.judge(list(per_value.values()), settings)
        slice_results[column] = per_value

    report = report_lib.build_report(
        mode="offline", arms={"A": a.describe(), "B": b.describe()}, data={"path": data, "rows": len(frame),
                                                                              "dataset": spec.name},
        heads=choice, overall=overall, slices=slice_results, settings=settings,
        curves={h: {"A": stats.reliability_curve(labels[h], scores_a[h], settings.bins),
                    "B": stats.reliability_curve(labels[h], scores_b[h], settings.bins)}
                for h, k in compared.items() if k == stats.BINARY},
        gates={arm: {k[:-len(GATES_SUFFIX)]: v.tolist() for k, v in s.items() if k.endswith(GATES_SUFFIX)}
               for arm, s in (("A", scores_a), ("B", scores_b))})
    figures = {}
    if plots:
        from serving.ab import plots as plots_lib

        figures = plots_lib.write_plots(out_dir, {h: {"A": (labels[h], scores_a[h]), "B": (labels[h], scores_b[h])}
                                                  for h, k in compared.items() if k == stats.BINARY},
                                        report["gates"], settings.bins)
    report_lib.write_report(out_dir, report, figures)
    return report
