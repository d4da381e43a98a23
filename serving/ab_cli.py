"""`mmoe ab-eval` (registered by pipelines/cli.py through add_commands): offline and online A/B evaluation."""
from __future__ import annotations

import argparse
import os
import sys

OFFLINE = "mmoe ab-eval --a MODEL_A --b MODEL_B --data FILE --out DIR"
ONLINE = "mmoe ab-eval --logs DIR --labels FILE [--key COLUMN] --out DIR"


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "ab-eval", help="compare two models' task heads (offline on a data file, or online from prediction logs)",
        usage=f"\n  {OFFLINE} [options]\n  {ONLINE} [options]",
        description="Offline: score the same rows with two exported models and compare every shared head "
                    "(paired bootstrap, paired DeLong). Online: join the server's prediction logs of a traffic "
                    "split with outcomes and compare the arms (unpaired), with a sample-ratio-mismatch check. "
                    "Writes report.json, report.md and PNG plots; prints a verdict table. See serving/README.md.")
    offline = p.add_argument_group(
        "offline mode", "MODEL is an export directory (holding saved_model.pb), or NAME, NAME@VERSION or NAME:LABEL "
                        "in --serving-dir (labels need --model-config-file)")
    offline.add_argument("--a", metavar="MODEL", help="the control model (A)")
    offline.add_argument("--b", metavar="MODEL", help="the candidate model (B)")
    offline.add_argument("--data", metavar="FILE", help="rows laid out as the dataset spec says")
    offline.add_argument("--serving-dir", metavar="DIR", help="TF Serving layout DIR/NAME/VERSION")
    offline.add_argument("--model-config-file", metavar="FILE",
                         help="TF Serving ModelServerConfig (base paths and version_labels), as for mmoe serve")
    offline.add_argument("--config", metavar="SPEC", help="dataset spec (YAML/JSON) to read --data with")
    offline.add_argument("--task-group", type=int, choices=[1, 2],
                         help="census dataset spec (default: the one the exports name)")
    offline.add_argument("--batch-size", type=int, default=8192, help="rows per model call (default 8192)")
    online = p.add_argument_group("online mode")
    online.add_argument("--logs", metavar="DIR", help="prediction log directory of mmoe serve")
    online.add_argument("--labels", metavar="FILE",
                        help="outcomes CSV: the key column and one column per head (named HEAD or HEAD_label)")
    online.add_argument("--key", metavar="COLUMN", help="unit key column (default: the split's key feature)")
    online.add_argument("--control", metavar="ARM", help="arm compared as A (default: the split's first arm)")
    online.add_argument("--treatment", metavar="ARM", help="arm compared as B (default: the split's second arm)")
    online.add_argument("--srm-threshold", type=float, default=0.001,
                        help="chi-square p-value below which the split is flagged (default 0.001)")
    common = p.add_argument_group("both modes")
    common.add_argument("--out", metavar="DIR", help="report directory (report.json, report.md, *.png)")
    common.add_argument("--head", action="append", default=[], metavar="HEAD",
                        help="compare only this head (repeatable; default: every shared head)")
    common.add_argument("--slice", action="append", default=[], metavar="COLUMN",
                        help="also judge each value of this column (repeatable), e.g. --slice sex --slice race")
    common.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    common.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    common.add_argument("--alpha", type=float, default=0.05, help="test level; CIs are 1 - alpha (default 0.05)")
    common.add_argument("--power", type=float, default=0.8, help="power of the reported MDE (default 0.8)")
    common.add_argument("--bins", type=int, default=10, help="calibration bins (default 10)")
    common.add_argument("--min-slice-rows", type=int, default=200,
                        help="slices with fewer rows (per arm) are marked, not judged (default 200)")
    common.add_argument("--min-slice-class", type=int, default=20,
                        help="... or with fewer positives or negatives in a binary head (default 20)")
    common.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    common.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_ab_eval)


def _mode(args) -> str:
    offline = [f for f in ("a", "b", "data", "serving_dir", "model_config_file", "config", "task_group")
               if getattr(args, f) not in (None, [])]
    online = [f for f in ("logs", "labels", "key", "control", "treatment") if getattr(args, f) is not None]
    if offline and online:
        given = ", --".join(o.replace("_", "-") for o in offline + online)
        raise ValueError(f"give either the offline options (--a, --b, --data, ...) or the online ones (--logs, "
                         f"--labels, ...), not both; got --{given}")
    if online:
        missing = [f for f in ("logs", "labels", "out") if getattr(args, f) is None]  # --out: as offline
        if missing:
            raise ValueError(f"online mode needs --{' and --'.join(missing)}: {ONLINE}")
        return "online"
    missing = [f for f in ("a", "b", "data", "out") if getattr(args, f) is None]
    if missing:
        raise ValueError(f"missing --{', --'.join(missing)}: {OFFLINE}   (or {ONLINE})")
    return "offline"


def cmd_ab_eval(args) -> int:
    from serving.ab import report as report_lib
    from serving.ab.offline import print_progress
    from serving.ab.stats import Settings
    from serving.tensors import ServingError

    mode = _mode(args)
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):  # found now, not after the work
        raise ValueError(f"--out {args.out} is a file; the report goes into a directory")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    settings = Settings(resamples=args.resamples, seed=args.seed, alpha=args.alpha, power=args.power, bins=args.bins,
                        min_rows=args.min_slice_rows, min_class=args.min_slice_class)
    progress = None if args.quiet else print_progress
    try:
        if mode == "offline":
            from serving.ab.offline import evaluate_offline, resolve_model

            a = resolve_model(args.a, args.serving_dir, args.model_config_file, what="--a")
            b = resolve_model(args.b, args.serving_dir, args.model_config_file, what="--b")
            report = evaluate_offline(a, b, args.data, args.out, config=args.config, task_group=args.task_group,
                                      heads=args.head, slices=args.slice, settings=settings,
                                      batch_size=args.batch_size, plots=not args.no_plots, progress=progress)
        else:
            from serving.ab.online import evaluate_online

            report = evaluate_online(args.logs, args.labels, args.key, args.out, control=args.control,
                                     treatment=args.treatment, heads=args.head, slices=args.slice,
                                     settings=settings, srm_threshold=args.srm_threshold,
                                     plots=not args.no_plots, progress=progress)
    except ServingError as err:  # a model rejected the data (e.g. a column of the wrong type)
        raise ValueError(str(err)) from None
    print(report_lib.verdict_table(report))
    if args.out:
        print(f"report: {args.out}/report.md, {args.out}/report.json")
    return 0
