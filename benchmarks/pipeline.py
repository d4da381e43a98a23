"""Wall time of the TFX pipeline per component and in total.

    python benchmarks/pipeline.py [--data ../shared/data/census-income/census-income.test.gz] [--train-steps N]
                                  [--out benchmarks/results/pipeline.json] [-- BEAM ARGS]

Runs the whole pipeline (LocalDagRunner, SQLite ML Metadata, Beam DirectRunner
multi-process by default) in a fresh pipeline root, without cache, on the
99,762-row UCI census test file by default, and prints one row per component
(seconds from ML Metadata: execution start to finish) plus the wall time of
the run and of the process (which includes importing TFX).  Target on the
2-core development machine: the whole pipeline under 10 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

_STARTED = time.time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "census-income", "census-income.test.gz")


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--train-steps", type=int, default=None, help="default: the pipeline's (2000)")
    parser.add_argument("--workdir", default=None, help="pipeline root (default: a fresh temporary directory)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "pipeline.json"))
    parser.add_argument("beam_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.train_steps is not None and args.train_steps < 1:
        parser.error(f"--train-steps must be >= 1, got {args.train_steps}")
    if args.workdir and os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        parser.error(f"--workdir {args.workdir}: a file, not a directory")
    if not os.path.isfile(args.data):
        print(f"error: --data {args.data}: no such file (the full census test file lives in ../shared/data)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    from pipelines.configs import make_config
    from pipelines.local_runner import format_summary, run_local

    config = make_config()
    if args.train_steps is not None:
        config.train.train_steps = args.train_steps
    beam_args = [a for a in args.beam_args if a != "--"] or None
    workdir = args.workdir or tempfile.mkdtemp(prefix="mmoe-pipeline-bench-")
    imported = time.time() - _STARTED
    summary = run_local(config, data=args.data, pipeline_root=os.path.join(workdir, "root"),
                        serving_dir=os.path.join(workdir, "serving"), enable_cache=False, beam_args=beam_args)
    print(format_summary(summary, config.spec.task_names))
    rows = [{"component": c.node_id, "state": c.state, "seconds": c.seconds} for c in summary.components]
    result = {"data": os.path.abspath(args.data), "train_steps": config.train.train_steps,
              "beam_args": beam_args or config.beam_args, "cpus": os.cpu_count(), "components": rows,
              "pipeline_seconds": round(summary.total_seconds, 1), "import_seconds": round(imported, 1),
              "process_seconds": round(time.time() - _STARTED, 1), "error": summary.error,
              "blessed": summary.blessed,
              "auc": {h: m.get("auc") for h, m in summary.metrics.get("overall", {}).items()}}
    print(f"\n| component | state | seconds |\n|---|---|---:|")
    for r in rows:
        seconds = r["seconds"] if r["seconds"] is None else round(r["seconds"], 1)
        print(f"| {r['component']} | {r['state']} | {seconds} |")
    print(f"| **pipeline (LocalDagRunner.run)** | | **{result['pipeline_seconds']}** |")
    print(f"| process (incl. {result['import_seconds']} s of imports) | | {result['process_seconds']} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0 if summary.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
