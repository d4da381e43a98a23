"""`mmoe pipeline run`: the TFX pipeline from the command line (registered by pipelines/cli.py).

    mmoe pipeline run --data FILE_OR_DIR [--config FILE] [--pipeline-root DIR] [--serving-dir DIR]
                      [--train-steps N] [--schema FILE] [--tune] [-- BEAM ARGS...]
    mmoe pipeline run --data gs://... --compile kubeflow --output spec.json --image IMAGE
    mmoe pipeline schema --out schema.pbtxt [--pipeline-root DIR]   # the last run's schema, to curate
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

DEFAULT_PIPELINE_ROOT = os.path.join("runs", "pipeline")
DEFAULT_SERVING_DIR = os.path.join("runs", "serving")
DEFAULT_SPEC_FILE = "mmoe_pipeline.json"  # --compile kubeflow's output

EXIT_STOPPED = 1  # anomalies or a failed component


def add_commands(subparsers) -> None:
    pipeline = subparsers.add_parser("pipeline", help="the TFX batch training pipeline")
    sub = pipeline.add_subparsers(dest="pipeline_command", required=True)
    run = sub.add_parser(
        "run", help="run the TFX pipeline locally (or compile it for Kubeflow)",
        description="ExampleGen -> StatisticsGen -> SchemaGen -> ConformSchema (or ImportSchemaGen with --schema) "
                    "-> ExampleValidator -> AnomalyGate -> Transform -> [Tuner] -> Trainer -> Evaluator (against the "
                    "latest blessed model) -> Pusher, on LocalDagRunner with a SQLite ML Metadata store and Beam's "
                    "DirectRunner (multi-process).  Unchanged inputs reuse cached results, so a killed run "
                    "completes when started again.  Arguments after `--` go to Beam unchanged "
                    "(e.g. -- --runner=FlinkRunner --flink_master=HOST:8081).")
    run.add_argument("--data", required=True, metavar="FILE_OR_DIR",
                     help="a data file in the dataset spec's layout (the UCI census files as they are), or a "
                          "directory of such files")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE",
                        help="pipeline config (YAML/JSON: dataset, model, train, split, evaluation, tuner, "
                             "beam_args; see pipelines/configs.py) or a bare dataset spec")
    source.add_argument("--task-group", type=int, choices=[1, 2], default=None,
                        help="census task group when no --config is given (default 1)")
    run.add_argument("--pipeline-root", default=DEFAULT_PIPELINE_ROOT, metavar="DIR",
                     help=f"artifacts and the ML Metadata store (default {DEFAULT_PIPELINE_ROOT})")
    run.add_argument("--serving-dir", default=DEFAULT_SERVING_DIR, metavar="DIR",
                     help=f"blessed models go to DIR/<model_name>/<version> (default {DEFAULT_SERVING_DIR})")
    run.add_argument("--metadata", metavar="FILE",
                     help="SQLite ML Metadata file (default PIPELINE_ROOT/metadata.sqlite)")
    run.add_argument("--train-steps", type=int, help="training steps (default from the config: 2000)")
    run.add_argument("--eval-steps", type=int, help="validation steps per epoch (default: the whole eval split)")
    run.add_argument("--schema", metavar="FILE", help="curated schema (text proto), imported with ImportSchemaGen, to "
                                                       "validate against instead of inferring one with SchemaGen "
                                                       "(`mmoe pipeline schema --out FILE` writes a starting point)")
    run.add_argument("--tune", action="store_true", help="add the Tuner (keras-tuner random search)")
    run.add_argument("--no-cache", action="store_true", help="run every component even if its inputs are unchanged")
    run.add_argument("--model-name", help="TF Serving model name (default from the config: mmoe)")
    run.add_argument("--compile", choices=["kubeflow"], help="write a Kubeflow Pipelines v2 / Vertex AI spec "
                                                              "instead of running")
    run.add_argument("--output", default=DEFAULT_SPEC_FILE, help="spec file for --compile")
    run.add_argument("--image", default=None, help="container image for --compile (holds this repository)")
    run.add_argument("beam_args", nargs=argparse.REMAINDER, help="after `--`: Beam pipeline arguments")
    run.set_defaults(func=cmd_pipeline_run)

    schema = sub.add_parser(
        "schema", help="write the schema the last run used (to curate it and pass it with run --schema)",
        description="Writes the schema of the most recent run recorded under --pipeline-root: without --schema "
                    "that is SchemaGen's inferred schema held to the dataset spec (types, presence, label values; "
                    "categorical inputs open to new values).  Edit it and pass it to `mmoe pipeline run --schema "
                    "FILE` to validate later data against it instead of re-inferring.")
    schema.add_argument("--out", required=True, metavar="FILE", help="where to write the text-format schema")
    schema.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    schema.add_argument("--pipeline-root", default=DEFAULT_PIPELINE_ROOT, metavar="DIR",
                        help=f"the run's pipeline root (default {DEFAULT_PIPELINE_ROOT})")
    schema.add_argument("--metadata", metavar="FILE",
                        help="SQLite ML Metadata file (default PIPELINE_ROOT/metadata.sqlite)")
    schema.add_argument("--pipeline-name", default="mmoe", help="pipeline name (config `pipeline_name`; default mmoe)")
    schema.set_defaults(func=cmd_pipeline_schema)


def config_from_args(args):
    from pipelines.configs import load_config_file, make_config

    data = load_config_file(args.config) if args.config else {}
    if args.task_group is not None:
        data["dataset"] = {"task_group": args.task_group}
    config = make_config(data)
    if args.train_steps is not None or args.eval_steps is not None:
        train = config.train
        if args.train_steps is not None:
            train.train_steps = args.train_steps
        if args.eval_steps is not None:
            train.eval_steps = args.eval_steps
        train.__post_init__()
    if args.tune:
        config.tuner.enabled = True
    if args.model_name:
        config.model_name = args.model_name
        config.__post_init__()
    beam_args = list(args.beam_args or [])
    if beam_args and beam_args[0] == "--":
        beam_args = beam_args[1:]
    if beam_args:
        config.beam_args = beam_args
    return config


def cmd_pipeline_run(args) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    config = config_from_args(args)
    remote = args.data.startswith(("gs://", "s3://"))
    if not remote and not os.path.exists(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such file or directory")
    compile_only = {"--output": args.output != DEFAULT_SPEC_FILE, "--image": args.image is not None}
    local_only = {"--no-cache": args.no_cache, "--metadata": args.metadata is not None}
    ignored = [flag for flag, given in (local_only if args.compile else compile_only).items() if given]
    if ignored:  # said, not silently dropped
        raise ValueError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} nothing "
                         f"{'with' if args.compile else 'without'} --compile kubeflow")
    if args.compile and os.path.isdir(args.output):
        raise IsADirectoryError(f"--output {args.output}: a directory; it names the spec file to write")
    if args.compile == "kubeflow":
        from pipelines.kubeflow_runner import DEFAULT_IMAGE, compile_kubeflow, component_names

        path = compile_kubeflow(config, data=args.data, pipeline_root=args.pipeline_root,
                                serving_dir=args.serving_dir, output=args.output, image=args.image or DEFAULT_IMAGE,
                                schema_file=args.schema)
        print(f"wrote {path}: Kubeflow Pipelines v2 spec with components {', '.join(component_names(path))}")
        return 0

    from pipelines.local_runner import format_summary, run_local

    check_local_paths(args)
    print(f"pipeline {config.pipeline_name}: data {args.data}, root {args.pipeline_root}, "
          f"serving {args.serving_dir}, {config.train.train_steps} train steps, "
          f"beam {' '.join(config.beam_args)}", flush=True)
    summary = run_local(config, data=args.data, pipeline_root=args.pipeline_root, serving_dir=args.serving_dir,
                        metadata_path=args.metadata, schema_file=args.schema, enable_cache=not args.no_cache,
                        echo=lambda line: print(line, flush=True))
    print(format_summary(summary, config.spec.task_names))
    if summary.error:
        print(f"error: {summary.error}", file=sys.stderr)
        return EXIT_STOPPED
    return 0


def check_local_paths(args) -> None:
    """What a local run would otherwise find wrong only at the end (the Pusher) or after making junk folders."""
    for flag, path in (("--pipeline-root", args.pipeline_root), ("--serving-dir", args.serving_dir),
                       ("--metadata", args.metadata), ("--data", args.data)):
        if path and "://" in path:  # os.makedirs would make a local "gs:" folder
            raise ValueError(f"{flag} {path}: the local runner needs local paths; remote storage is for the "
                             f"pipeline compiled with --compile kubeflow")
    for flag, path in (("--pipeline-root", args.pipeline_root), ("--serving-dir", args.serving_dir)):
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"{flag} {path}: a file, not a directory")
    if args.metadata and os.path.isdir(args.metadata):
        raise IsADirectoryError(f"--metadata {args.metadata}: a directory; it names the SQLite file")
    if os.path.isdir(args.data):
        if not any(not name.startswith(".") and os.path.isfile(os.path.join(args.data, name))
                   for name in os.listdir(args.data)):
            raise FileNotFoundError(f"--data {args.data}: the directory holds no data file")
    elif os.path.getsize(args.data) == 0:
        raise ValueError(f"--data {args.data}: an empty file")


def cmd_pipeline_schema(args) -> int:
    import shutil

    from pipelines.local_runner import RunSummary, summarise

    metadata = args.metadata or os.path.join(args.pipeline_root, "metadata.sqlite")
    out = os.path.abspath(args.out)
    if out == os.path.abspath(metadata) or out.startswith(os.path.abspath(args.pipeline_root) + os.sep):
        raise ValueError(f"--out {args.out}: inside the pipeline root (or its metadata store), which the pipeline "
                         f"owns; write the schema somewhere else")
    if os.path.exists(out) and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")
    if not os.path.isfile(metadata):
        raise FileNotFoundError(f"{metadata}: no ML Metadata store; run `mmoe pipeline run` with this "
                                f"--pipeline-root first")
    summary = summarise(RunSummary(pipeline_root=os.path.abspath(args.pipeline_root), metadata_path=metadata),
                        args.pipeline_name)
    if not summary.schema_path or not os.path.isfile(summary.schema_path):
        raise FileNotFoundError(f"the last run of pipeline {args.pipeline_name!r} in {metadata} produced no schema "
                                f"(it stopped before SchemaGen); run `mmoe pipeline run` again")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.copyfile(summary.schema_path, args.out)
    kind = "inferred and held to the dataset spec" if summary.schema_inferred else "curated"
    print(f"wrote {args.out}: the schema of run {summary.run_id} ({kind}, from {summary.schema_path}); "
          f"curate it and pass it with `mmoe pipeline run --schema {args.out}`")
    return 0
