"""Speed of `mmoe ab-eval` (offline): two real small exports on the census test file, 1,000 bootstrap resamples.

    .venv/bin/python benchmarks/ab_eval.py --data /work/shared/data/census-income.test.gz
    .venv/bin/python benchmarks/ab_eval.py --data FILE --exports DIR --resamples 1000 --rows 100000

Builds (or reuses, with --exports DIR) the tiny census exports of serving.testing.tiny_exports and a copy whose
`income` head is degraded (noise on its logit weights), then times:

* the whole command `mmoe ab-eval --a A --b B --data FILE --out DIR` in a subprocess (the issue's target: under
  60 s for 100,000 rows, 1,000 resamples, two heads), and its phases from the progress lines;
* the statistics step alone (serving.ab.stats.compare, paired) on the same number of rows, in process.

Prints a table.  The machine may be shared: the load average is printed beside the numbers.
"""
from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arg_types import positive_int  # noqa: E402

import numpy as np  # noqa: E402

TARGET_SECONDS = 60.0


def degraded_export(exports, out_dir: str, head: str = "income", noise: float = 3.0, seed: int = 0) -> str:
    """Export the tiny model again with head `head`'s logit kernel replaced by kernel + noise.

    Args:
        exports: serving.testing.TinyExports.
        out_dir: the version directory to write (e.g. <base>/degraded/1).
        head: the task whose head is made worse; the other heads are untouched (identical outputs).
        noise: noise standard deviation in units of the kernel's RMS.
        seed: noise seed.
    The shared model's weights are restored afterwards.
    """
    from serving.export import export_serving_model

    model = exports.model
    matches = [v for v in model.variables if v.path == f"head_{head}/logit/kernel"]
    if not matches:
        raise ValueError(f"the model has no head {head!r} (variables: {[v.path for v in model.variables]})")
    kernel = matches[0]
    original = np.array(kernel.numpy())
    rms = float(np.sqrt(np.mean(original ** 2))) or 1.0
    rng = np.random.default_rng(seed)
    kernel.assign(original + noise * rms * rng.normal(size=original.shape).astype(original.dtype))
    try:
        return export_serving_model(model, exports.transform_dir, exports.spec, out_dir, xla=True)
    finally:
        kernel.assign(original)


def build_exports(base: str):
    """(A export dir, B export dir): the tiny export and its income-degraded copy, reused when present."""
    a = os.path.join(base, "xla", "1")
    b = os.path.join(base, "degraded", "1")
    if os.path.isfile(os.path.join(a, "saved_model.pb")) and os.path.isfile(os.path.join(b, "saved_model.pb")):
        return a, b
    from serving.testing import tiny_exports

    exports = tiny_exports(base)
    return exports.xla_dir, degraded_export(exports, b)


def write_rows(source: str, rows: int, path: str) -> int:
    """The first `rows` lines of a (gzip) data file into `path`, repeating the file if it is shorter."""
    opener = gzip.open if open(source, "rb").read(2) == b"\x1f\x8b" else open
    with opener(source, "rt", encoding="latin-1") as fh:
        lines = [line for line in fh if line.strip()]
    if not lines:
        raise SystemExit(f"error: --data {source}: no data rows")
    out = [lines[i % len(lines)] for i in range(rows)]
    with open(path, "w") as fh:
        fh.writelines(out)
    return len(out)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/work/shared/data/census-income/census-income.test.gz")
    parser.add_argument("--rows", type=positive_int, default=100_000, help="rows scored (the file is repeated if shorter)")
    parser.add_argument("--resamples", type=positive_int, default=1000)
    parser.add_argument("--exports", metavar="DIR",
                        help="build/reuse the two exports here (default: a temporary directory, removed at the end)")
    parser.add_argument("--out", metavar="DIR", help="report directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file")

    with tempfile.TemporaryDirectory(prefix="ab-eval-bench-") as work:  # exports, rows and report unless given
        return measure(args, work)


def measure(args, work: str) -> int:
    started = time.time()
    a, b = build_exports(args.exports or os.path.join(work, "exports"))
    print(f"exports ready in {time.time() - started:.1f} s: A={a} B={b}", flush=True)
    data = os.path.join(work, "rows.csv")
    rows = write_rows(args.data, args.rows, data)
    out = args.out or os.path.join(work, "report")

    command = [os.path.join(os.path.dirname(sys.executable), "mmoe"), "ab-eval", "--a", a, "--b", b, "--data", data,
               "--out", out, "--resamples", str(args.resamples), "--task-group", "1"]
    load_before = load_average()
    started = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    phases, last = {}, started
    output = []
    for line in proc.stdout:
        output.append(line)
        now = time.time()
        for key in ("reading", "A: predicting", "B: predicting", "labels derived", "overall: bootstrap"):
            if key in line:
                phases[key] = now  # the last progress line of each phase
        last = now
    proc.wait()
    total = time.time() - started
    if proc.returncode:
        print("".join(output[-30:]))
        print(f"ab-eval failed with exit status {proc.returncode}")
        return 1
    print("".join(line for line in output if not line.startswith("[") and "  " in line)[-3000:])

    from mmoe.training import roc_auc  # noqa: F401  (imported by the stats step; keep its import out of the timing)
    from serving.ab import stats

    rng = np.random.default_rng(0)
    y = (rng.random(rows) < 0.2).astype(float)
    heads = {h: {"kind": "binary", "labels_a": y, "scores_a": rng.random(rows) * 0.5 + 0.3 * y,
                 "labels_b": y, "scores_b": rng.random(rows) * 0.5 + 0.3 * y} for h in ("income", "marital")}
    stats_started = time.time()
    stats.compare(heads, stats.Settings(resamples=args.resamples), paired=True)
    stats_seconds = time.time() - stats_started

    print(f"\nmmoe ab-eval offline, {rows:,} rows, {args.resamples} resamples, 2 heads "
          f"(load average before: {load_before}; after: {load_average()}; {os.cpu_count()} CPUs)\n")
    print("| step | seconds |\n|---|---:|")
    previous = started
    names = {"reading": "start-up: imports, load both exports", "A: predicting": "read data, predict A",
             "B: predicting": "predict B", "labels derived": "derive labels",
             "overall: bootstrap": "bootstrap + DeLong (2 heads)"}
    for key, name in names.items():
        if key in phases:
            print(f"| {name} | {phases[key] - previous:.1f} |")
            previous = phases[key]
    print(f"| report and plots | {last - previous:.1f} |")
    print(f"| **whole command** | **{total:.1f}** |")
    print(f"| stats step alone, in process (synthetic scores) | {stats_seconds:.1f} |")
    print(f"\ntarget: whole command < {TARGET_SECONDS:.0f} s: {'met' if total < TARGET_SECONDS else 'NOT met'}")
    print("command: " + " ".join(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
