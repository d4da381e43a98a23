"""The A/B report: report.json (machine-readable), report.md (for people) and the verdict table printed at the end.

report.json holds: mode ("offline" paired / "online" unpaired), the arms (what A and B are), the data, the
settings (resamples, seed, alpha, power, MDE factor, slice minimums), the heads (compared, only in A, only in B,
...), `srm` (online mode), `overall` (head -> rows, metrics {name: {a, b, diff, ci, se, p_value}}, test {metric,
method, p_value, p_holm, mde, ...}, verdict) and `slices` (column -> value -> the same per head), the
reliability curves, the mean gate weight per expert (when exported) and the plot files.  NaN is written as null.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, List, Optional

from serving.ab import stats

_METRIC_NAMES = {"auc": "AUC", "log_loss": "log loss", "ece": "ECE", "rmse": "RMSE", "mae": "MAE"}


def build_report(*, mode: str, arms: Dict[str, dict], data: dict, heads: dict, overall: dict, slices: dict,
                 settings: stats.Settings, curves: dict, gates: dict, srm: Optional[dict] = None,
                 extra: Optional[dict] = None) -> dict:
    """Everything report.json holds (see the module docstring); `extra` adds mode-specific facts (join counts)."""
    return {
        "mode": mode,
        "comparison": "paired (same rows)" if mode == "offline" else "unpaired (different units per arm)",
        "arms": arms, "data": data,
        "settings": {**dataclasses.asdict(settings), "mde_factor": stats.mde_factor(settings.alpha, settings.power),
                     "ci_level": 1 - settings.alpha,
                     "multiple_testing": "Holm across the heads (overall) and across heads x values (per slice "
                                         "column)"},
        "srm": srm,
        "heads": {k: v for k, v in heads.items() if k != "compared"} | {"compared": list(heads["compared"])},
        "overall": overall, "slices": slices, "reliability": curves, "gates": gates, **(extra or {}),
    }


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _p(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def _rows(result: dict) -> str:
    if "rows" in result:
        return f"{result['rows']:,}"
    return f"{result['rows_a']:,} / {result['rows_b']:,}"


def verdict_lines(results: Dict[str, dict], prefix: str = "") -> List[List[str]]:
    """Table rows (under verdict_header): head, rows, metric, A, B, B - A [CI], p (Holm), MDE, verdict."""
    lines = []
    for head, r in results.items():
        if "test" not in r:
            lines.append([prefix + head, _rows(r), "", "", "", "", "", "", r["verdict"]])
            continue
        t = r["test"]
        m = r["metrics"][t["metric"]]
        lines.append([prefix + head, _rows(r), _METRIC_NAMES[t["metric"]], _num(m["a"]), _num(m["b"]),
                      f"{m['diff']:+.4f} [{m['ci'][0]:+.4f}, {m['ci'][1]:+.4f}]", _p(t.get("p_holm")),
                      _num(t["mde"]), r["verdict"]])
    return lines


def verdict_header(report: dict) -> List[str]:
    return ["head", "rows", "metric", "A", "B", f"B - A [{_level(report)} CI]", "p (Holm)", "MDE", "verdict"]


def _level(report: dict) -> str:
    """The intervals' level as a percentage ("95%", "90%", "99.5%")."""
    return f"{100 * report['settings']['ci_level']:.3g}%"


def _text_table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def verdict_table(report: dict) -> str:
    """The short table printed at the end of `mmoe ab-eval` (overall per head; SRM warning on top)."""
    lines = []
    if report.get("srm") and report["srm"].get("flagged"):
        lines.append("!! " + report["srm"]["message"])
    lines.append(_text_table(verdict_header(report), verdict_lines(report["overall"])))
    listed = _listed_heads(report)
    if listed:
        lines.append(listed)
    return "\n".join(lines)


def _listed_heads(report: dict) -> str:
    heads = report["heads"]
    parts = [f"{what}: {', '.join(heads[key])}" for key, what in
             (("only_a", "heads only in A"), ("only_b", "heads only in B"),
              ("kind_mismatch", "heads of different kinds (not compared)"),
              ("unlabelled", "heads without labels (not compared)"), ("not_selected", "heads not selected"))
             if heads.get(key)]
    return "; ".join(parts)


def markdown(report: dict, figures: Dict[str, str]) -> str:
    """report.md: SRM check, verdicts, every metric with its CI, slices, plots."""
    s = report["settings"]
    out = ["# A/B evaluation", ""]
    if report.get("srm"):
        srm = report["srm"]
        out += [f"**{srm['message']}**" if srm["flagged"] else f"Sample-ratio check: {srm['message']}.", "",
                _md_table(["arm", "units", "expected"],
                          [[a, f"{srm['counts'][a]:,}", f"{srm['expected'][a]:,.1f}"] for a in srm["counts"]]),
                f"\nUnits: {srm.get('units', 'rows')}.", ""]
    for arm, desc in report["arms"].items():
        out.append(f"* **{arm}**: " + ", ".join(f"{k} `{v}`" for k, v in desc.items() if v not in (None, "")))
    data = report["data"]
    out += ["* data: " + ", ".join(f"{k} `{v}`" for k, v in data.items()),
            f"* comparison: {report['comparison']}; {s['resamples']} bootstrap resamples (seed {s['seed']}), "
            f"{_level(report)} percentile intervals; AUC tested with DeLong, RMSE with the bootstrap SE; "
            f"p-values Holm-corrected ({s['multiple_testing']}); verdict at alpha {s['alpha']}.",
            "* The intervals, and the p-values of the metrics table, are per metric and unadjusted; the verdict "
            "is the Holm-adjusted test of each head's primary metric, so an interval can exclude 0 where the "
            "verdict finds no difference.",
            f"* MDE (minimum detectable effect of the primary metric at this sample size, power {s['power']}): "
            f"(z(1 - alpha/(2m)) + z(power)) x bootstrap SE, m the tests judged together (Holm's strictest "
            f"level; {s['mde_factor']:.2f} x SE for one test).",
            f"* slices with fewer than {s['min_rows']} rows (per arm) or fewer than {s['min_class']} positives or "
            f"negatives are marked, not judged.", ""]
    listed = _listed_heads(report)
    if listed:
        out += [f"Not compared: {listed}.", ""]
    out += ["## Verdict", "", _md_table(verdict_header(report), verdict_lines(report["overall"])), "", "## Metrics",
            ""]
    rows = []
    for head, r in report["overall"].items():
        for name, m in r.get("metrics", {}).items():
            rows.append([head, _METRIC_NAMES[name], _num(m["a"]), _num(m["b"]), f"{m['diff']:+.4f}",
                         f"[{m['ci'][0]:+.4f}, {m['ci'][1]:+.4f}]", _num(m["se"]), _p(m["p_value"])])
    out += [_md_table(["head", "metric", "A", "B", "B - A", f"{_level(report)} CI (unadjusted)", "SE",
                       "p (unadjusted)"], rows), ""]
    for column, values in report["slices"].items():
        out += [f"## Slices by `{column}`", ""]
        rows = []
        for value, results in values.items():
            rows += verdict_lines(results, prefix=f"{column}={value}: ")
        out += [_md_table(verdict_header(report), rows), ""]
    if figures:
        out += ["## Plots", ""] + [f"![{name}]({os.path.basename(path)})" for name, path in figures.items()] + [""]
    return "\n".join(out)


def write_report(out_dir: str, report: dict, figures: Dict[str, str]) -> Dict[str, str]:
    """Write report.json and report.md into out_dir (created); returns their paths."""
    from mmoe.config import json_safe  # here: importing the mmoe package loads Keras, which the rest of this needs not

    os.makedirs(out_dir, exist_ok=True)
    report["plots"] = {name: os.path.basename(path) for name, path in figures.items()}
    paths = {"json": os.path.join(out_dir, "report.json"), "md": os.path.join(out_dir, "report.md")}
    with open(paths["json"], "w") as fh:
        json.dump(json_safe(report), fh, indent=1)
        fh.write("\n")
    with open(paths["md"], "w") as fh:
        fh.write(markdown(report, figures))
    return paths
