"""Online A/B evaluation: logged predictions of a traffic split joined with outcomes (`mmoe ab-eval --logs`).

Inputs:

* `--logs DIR`: the server's prediction logs (`mmoe serve --prediction-log-dir`), read with
  `serving.ab.prediction_log.read_prediction_logs` (one row per logged example, its arm, `in.<feature>`,
  `out.<head>`) and the split that was active (`split.json`: arms and fractions).
* `--labels FILE`: a CSV with a header: the key column, and one column per head holding the outcome.  A head's
  column is named after the head (`income`) or its label key in the dataset spec (`income_label`); binary heads
  take 0/1, regression heads numbers; an empty cell is an outcome not known yet (that row is left out of that
  head).  A head counts as binary when all its known outcomes are 0 or 1.
* `--key COLUMN`: the unit key, a column of the labels file and a logged input feature (`in.COLUMN`); defaults to
  the split's key feature.  Values are compared as text, with integral numbers written without ".0" (a logged
  float 1234.0 matches "1234").

Units and the join: only split traffic is used (arm != ""); every logged example is one prediction; when a key
was logged several times in one arm, its first prediction (in time) is kept, because that is when the unit was
exposed.  A key logged in both arms (the split changed, or requests were pinned) is dropped from both and counted.
Rows are joined with the labels on the key; predictions without an outcome and outcomes without a prediction
are counted in the report.

Comparison: the arms served different units, so it is UNPAIRED (each arm bootstrapped on its own, DeLong with the
two variances added).  Sample-ratio mismatch: chi-square of the units per arm (distinct keys when the split hashed
a logged feature, else logged examples) against the split fractions, on every logged split unit (labelled or not);
p < threshold (default 0.001) puts "SRM: do not trust this test" at the top of the report.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional, Sequence

import numpy as np

from serving.ab import stats
from serving.ab.stats import Progress, Settings


_INTEGER_TEXT = re.compile(r"[+-]?\d+(\.0*)?")


def key_text(values) -> np.ndarray:
    """Keys as comparable text: stripped, and numbers that are integral written as integers ("1234.0" and
    1234.0 -> "1234"), so a key logged as a float matches the same key in the labels CSV.  NaN -> "".
    Integers and integer text are converted exactly (a 64-bit id is not rounded through a float)."""
    import pandas as pd

    out = []
    for v in values:
        text = str(v).strip()
        if not isinstance(v, (str, bytes)) and pd.isna(v):  # NaN, None, pandas' NA (an Int64 column's missing)
            text = ""
        elif isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            text = str(int(v))
        elif _INTEGER_TEXT.fullmatch(text):
            text = str(int(text.split(".")[0]))
        elif _is_number(text) and math.isfinite(float(text)) and float(text).is_integer():
            text = str(int(float(text)))  # e.g. "1e3"
        out.append(text)
    return np.array(out, dtype=object)


def read_labels(path: str, key: str) -> "object":
    """The outcomes CSV as a DataFrame indexed by key text; raises ValueError for a missing key column or a
    duplicated key."""
    import pandas as pd

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--labels {path}: no such file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"--labels {path}: empty file (expected a header with {key!r} and one column per head)")
    if key not in frame.columns:
        raise ValueError(f"--labels {path}: no key column {key!r}; columns: {list(frame.columns)}")
    frame.index = key_text(frame[key])
    duplicated = frame.index[frame.index.duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"--labels {path}: key(s) {list(duplicated[:3])} appear more than once "
                         f"({len(duplicated)} duplicated key(s)); one outcome per unit")
    return frame.drop(columns=[key])


def _outcomes(column, path: str, head: str) -> np.ndarray:
    """Label text -> float, '' -> NaN; raises ValueError naming non-numeric values."""
    text = column.str.strip()
    values = np.full(len(text), np.nan)
    known = (text != "").to_numpy()
    try:
        values[known] = text[known].astype(float).to_numpy()
    except ValueError:
        bad = [t for t in text[known] if not _is_number(t)][:3]
        raise ValueError(f"--labels {path}: column for head {head!r} has non-numeric value(s) {bad}") from None
    return values


def _head_kind(head: str, outcomes: np.ndarray, scores: np.ndarray, path: str) -> str:
    """BINARY when every outcome is 0 or 1, else REGRESSION: the logs do not record the head's kind. A head that
    looks binary (every score a probability, nearly every outcome 0 or 1) with a few other outcomes is a mistake in
    the outcomes file, not a regression head: judging it by RMSE would be a silent switch of metric."""
    is_01 = (outcomes == 0) | (outcomes == 1)
    if len(outcomes) and is_01.all():
        return stats.BINARY
    if len(outcomes) and is_01.mean() >= 0.9 and np.all((scores >= 0) & (scores <= 1)):
        odd = np.unique(outcomes[~is_01])
        raise ValueError(f"--labels {path}: head {head!r} looks binary (its scores are probabilities and "
                         f"{is_01.mean():.1%} of its outcomes are 0 or 1) but has {int((~is_01).sum()):,} other "
                         f"outcome(s) (e.g. {[float(v) for v in odd[:3]]}); a binary head takes 0/1 only")
    return stats.REGRESSION


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def evaluate_online(log_dir: str, labels_path: str, key: Optional[str] = None, out_dir: Optional[str] = None, *,
                    control: Optional[str] = None, treatment: Optional[str] = None, heads: Sequence[str] = (),
                    slices: Sequence[str] = (), settings: Settings = Settings(), srm_threshold: float = 0.001,
                    plots: bool = True, progress: Progress = None, logs=None, split=None) -> dict:
    """Compare the arms of a logged traffic split on the outcomes in `labels_path`.

    Args:
        log_dir: the prediction log directory.
        labels_path: outcomes CSV (see the module docstring).
        key: the unit key column (default: the split's key feature).
        out_dir: where report.json, report.md and the plots go (None: nothing written).
        control, treatment: the arms compared as A and B (default: the split's first two arms).
        heads: restrict to these heads; slices: logged input features to slice by (`in.<name>`).
        settings: bootstrap and test settings; srm_threshold: p-value that flags a sample-ratio mismatch.
        plots: write PNG plots; progress: called with progress lines.
        logs, split: the already-read logs DataFrame and split dict (tests); default: read from log_dir.
    Returns the report dict.
    """
    from serving.ab import report as report_lib
    from serving.ab.prediction_log import read_prediction_logs, read_split_config

    say = progress or (lambda line: None)
    if logs is None:
        say(f"reading prediction logs in {log_dir}")
        logs = read_prediction_logs(log_dir)
        split = read_split_config(log_dir)
    if split is None:
        raise ValueError(f"{log_dir}: no traffic split was active while logging (split.json is missing or null); "
                         f"an online A/B evaluation needs split traffic")
    arms = [a["name"] for a in split["arms"]]
    control = control or arms[0]
    treatment = treatment or (arms[1] if len(arms) > 1 else None)
    for name, value in (("--control", control), ("--treatment", treatment)):
        if value not in arms:
            raise ValueError(f"{name} {value!r}: not an arm of the split; arms: {arms}")
    if control == treatment:
        raise ValueError(f"--control and --treatment are the same arm {control!r}")
    key = key or split["key"]
    if not key:
        raise ValueError("the split took its key from request metadata (key \"\"), which is not logged; give "
                         "--key COLUMN naming a logged input feature that identifies the unit")
    split_rows = logs[logs["arm"] != ""]
    if split_rows.empty:
        raise ValueError(f"{log_dir}: {len(logs)} logged examples, none from split traffic (all pinned or unsplit)")
    key_column = f"in.{key}"
    if key_column not in logs.columns:
        raise ValueError(f"--key {key}: not a logged input feature; logged features: "
                         f"{sorted(c[3:] for c in logs.columns if c.startswith('in.'))}")

    # Sample-ratio mismatch over every logged split unit: distinct units, not logged examples (a unit makes any
    # number of requests, so examples per arm are clustered and their chi-square alarms on a sound split). The
    # split's own key where it was logged, else --key (a split keyed by metadata).
    srm_key = split["key"] if split["key"] and f"in.{split['key']}" in logs.columns else key
    keys_by_arm = {a: key_text(split_rows.loc[split_rows["arm"] == a, f"in.{srm_key}"]) for a in arms}
    counts = {a: len(set(k) - {""}) for a, k in keys_by_arm.items()}
    srm = stats.sample_ratio_mismatch(counts, {a["name"]: a["fraction"] for a in split["arms"]}, srm_threshold)
    srm["units"] = f"distinct values of {srm_key!r}"

    # No unit in both arms; each head then keeps the unit's first prediction of it in its arm (below).
    rows = split_rows[split_rows["arm"].isin([control, treatment])].copy()
    rows["key"] = key_text(rows[key_column])
    rows = rows[rows["key"] != ""].sort_values("time_ms", kind="stable")
    both = set(rows.loc[rows["arm"] == control, "key"]) & set(rows.loc[rows["arm"] == treatment, "key"])
    rows = rows[~rows["key"].isin(both)]
    units = rows.drop_duplicates(["arm", "key"])
    # Versions each arm was served by: a label moved during the test pools two models in one arm.
    versions = {arm: {int(v): int(n) for v, n in rows.loc[rows["arm"] == arm, "version"].value_counts().items()}
                for arm in (control, treatment)}
    for arm, served in versions.items():
        if len(served) > 1:
            say(f"warning: arm {arm!r} was served by versions {sorted(served)} (a label moved during the test?); "
                f"they are compared as one arm")

    labels = read_labels(labels_path, key)
    outputs = [c[4:] for c in logs.columns if c.startswith("out.")]
    label_columns = {}
    for head in outputs:
        for name in (head, f"{head}_label"):
            if name in labels.columns:
                label_columns[head] = name
                break
    if heads:
        unknown = [h for h in heads if h not in outputs]
        if unknown:
            raise ValueError(f"--head {', '.join(unknown)}: not a logged output; logged heads: {outputs}")
        missing = [h for h in heads if h not in label_columns]
        if missing:
            raise ValueError(f"--labels {labels_path}: no label column for head(s) {missing} "
                             f"(name it after the head or <head>_label); columns: {list(labels.columns)}")
    chosen = [h for h in (heads or outputs) if h in label_columns]
    if not chosen:
        raise ValueError(f"--labels {labels_path}: no label column for any logged head {outputs} (name a column "
                         f"after the head or <head>_label); columns: {list(labels.columns)}")
    joined = rows[rows["key"].isin(labels.index)]
    joined_units = units[units["key"].isin(labels.index)]
    join = {"split_units_logged": int(sum(counts.values())), "units_in_both_arms_dropped": len(both),
            "predictions_compared": int(len(units)),
            "predictions_without_outcome": int(len(units) - len(joined_units)),
            "outcomes_without_prediction": int(len(set(labels.index) - set(units["key"]))),
            "versions_by_arm": versions, "per_head": {}}
    if joined.empty:
        raise ValueError(f"no logged prediction of arms {control!r}/{treatment!r} has an outcome in {labels_path} "
                         f"(keys compared as text; e.g. logged {list(units['key'][:3])}, labels "
                         f"{list(labels.index[:3])})")
    say(f"{len(joined_units):,} predictions joined with outcomes ({join['predictions_without_outcome']:,} without)")

    inputs, kinds, data = {}, {}, {}
    for head in chosen:
        y_all = _outcomes(labels[label_columns[head]], labels_path, head)
        y_by_key = dict(zip(labels.index, y_all))
        # A Classify / Regress call logs one head per record, so a unit's first row may lack this head's score:
        # the unit's first prediction *of this head* is the one kept.
        scored = joined[np.isfinite(joined[f"out.{head}"].to_numpy(dtype="float64"))]
        scored = scored.drop_duplicates(["arm", "key"])
        per_arm, lost = {}, {}
        for arm_name, arm in (("A", control), ("B", treatment)):
            part = scored[scored["arm"] == arm]
            y = np.array([y_by_key[k] for k in part["key"]], dtype="float64")
            p = part[f"out.{head}"].to_numpy(dtype="float64")
            known = np.isfinite(y)
            per_arm[arm_name] = (y[known], p[known], part[known.tolist()])
            arm_units = joined_units[joined_units["arm"] == arm]
            lost[arm] = {"no_score": int(len(arm_units) - len(part)), "outcome_unknown": int((~known).sum())}
        join["per_head"][head] = lost
        ys = np.concatenate([per_arm["A"][0], per_arm["B"][0]])
        kinds[head] = _head_kind(head, ys, np.concatenate([per_arm["A"][1], per_arm["B"][1]]), labels_path)
        data[head] = per_arm
        inputs[head] = {"kind": kinds[head], "labels_a": per_arm["A"][0], "scores_a": per_arm["A"][1],
                        "labels_b": per_arm["B"][0], "scores_b": per_arm["B"][1]}
        for arm_name in "AB":
            if len(per_arm[arm_name][0]) == 0:
                raise ValueError(f"head {head!r}: arm {control if arm_name == 'A' else treatment!r} has no "
                                 f"prediction with a known outcome")
    overall = stats.compare(inputs, settings, paired=False, progress=progress, what="overall: ")
    stats.judge([overall], settings)

    slice_results = {}
    for column in slices:
        field = f"in.{column}"
        if field not in joined.columns:
            raise ValueError(f"--slice {column}: not a logged input feature; logged features: "
                             f"{sorted(c[3:] for c in logs.columns if c.startswith('in.'))}")
        values = joined[field].astype(str).value_counts().index
        per_value = {}
        for value in values:
            sliced = {}
            for head in chosen:
                h = dict(inputs[head])
                for arm_name, suffix in (("A", "a"), ("B", "b")):
                    mask = data[head][arm_name][2][field].astype(str).to_numpy() == value
                    h[f"labels_{suffix}"] = data[head][arm_name][0][mask]
                    h[f"scores_{suffix}"] = data[head][arm_name][1][mask]
                sliced[head] = h
            per_value[str(value)] = stats.compare(sliced, settings, paired=False, progress=progress,
                                                  what=f"{column}={value}: ")
        stats.judge(list(per_value.values()), settings)
        slice_results[column] = per_value

    arm_info = {a["name"]: a for a in split["arms"]}
    report = report_lib.build_report(
        mode="online", arms={"A": {"arm": control, **_arm_desc(arm_info[control], split)},
                             "B": {"arm": treatment, **_arm_desc(arm_info[treatment], split)}},
        data={"logs": log_dir, "labels": labels_path, "key": key},
        heads={"compared": {h: kinds[h] for h in chosen}, "only_a": [], "only_b": [],
               "unlabelled": [h for h in outputs if h not in label_columns],
               "not_selected": [h for h in outputs if heads and h not in heads and h in label_columns]},
        overall=overall, slices=slice_results, settings=settings, srm=srm,
        curves={h: {arm: stats.reliability_curve(data[h][arm][0], data[h][arm][1], settings.bins) for arm in "AB"}
                for h in chosen if kinds[h] == stats.BINARY},
        gates={}, extra={"join": join})
    if out_dir:
        figures = {}
        if plots:
            from serving.ab import plots as plots_lib

            figures = plots_lib.write_plots(out_dir, {h: {arm: data[h][arm][:2] for arm in "AB"}
                                                      for h in chosen if kinds[h] == stats.BINARY}, {},
                                            settings.bins)
        report_lib.write_report(out_dir, report, figures)
    return report


def _arm_desc(arm: dict, split: dict) -> dict:
    return {"model": split["model"], "version": arm.get("version"), "label": arm.get("label"),
            "fraction": arm["fraction"]}
