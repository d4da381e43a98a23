"""The `mmoe` command line.

    mmoe train   --data PATH [PATH] --task-group 1 --arch mmoe --out DIR [model flags]
    mmoe data    download | export ...

Heavy imports (TensorFlow, Beam) happen inside the commands so `--help` is fast.
Bad input ends with `error: ...` on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path


# Modules adding subcommands (`mmoe pipeline ...`, `mmoe serve`, `mmoe predict`, `mmoe ab-eval`).
COMMAND_MODULES = ("pipelines.pipeline_cli", "serving.cli", "serving.ab_cli")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,32, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive widths like 64,32, got {text!r}")
    return values


def _loss_weights(text: str) -> dict[str, float]:
    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            weights[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected task=weight pairs like income=1,marital=0.5, got {text!r}")
    return weights


MODEL_FLAGS = {
    # flag: (ModelConfig field, type, help)
    "--num-experts": ("num_experts", int, "shared experts (MMoE/OMoE; shared experts per level for CGC/PLE)"),
    "--task-experts": ("task_experts", int, "task-specific experts per task (CGC/PLE)"),
    "--ple-levels": ("ple_levels", int, "extraction levels (PLE)"),
    "--expert-units": ("expert_units", _int_list, "expert MLP widths, e.g. 64 or 128,64"),
    "--expert-dropout": ("expert_dropout", float, "dropout inside experts (and bottoms)"),
    "--bottom-units": ("bottom_units", _int_list, "bottom MLP widths (Shared-Bottom, Single-Task)"),
    "--tower-units": ("tower_units", _int_list, "tower MLP widths per task"),
    "--tower-dropout": ("tower_dropout", float, "dropout inside towers"),
    "--gate": ("gate", str, "softmax or noisy_top_k"),
    "--gate-temperature": ("gate_temperature", float, "softmax temperature of the gates"),
    "--top-k": ("top_k", int, "experts kept per example by noisy_top_k gates"),
    "--balance-loss-weight": ("balance_loss_weight", float, "weight of the load-balancing loss"),
    "--cross-layers": ("cross_layers", int, "DCN-v2 cross layers on the embedded input, before the experts (0: none)"),
    "--cross-rank": ("cross_rank", int, "rank of each cross layer's matrix (0: full)"),
    "--expert-cross-layers": ("expert_cross_layers", int,
                              "DCN-v2 cross layers inside each expert, before its MLP (0: none)"),
    "--expert-cross-rank": ("expert_cross_rank", int, "rank of the experts' cross matrices (0: full)"),
    "--numeric-bins": ("numeric_bins", int,
                       "also feed each numeric input as a piecewise-linear encoding over this many "
                       "training-quantile bins (0: off)"),
    "--embedding-dim": ("embedding_dim", int, "cap on categorical embedding widths"),
    "--learning-rate": ("learning_rate", float, "Adam learning rate"),
}


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--arch", default=None,
                       choices=["mmoe", "omoe", "shared_bottom", "single_task", "cgc", "ple"])
    group.add_argument("--model-config", metavar="FILE",
                       help="ModelConfig as JSON or YAML; flags given on the command line override it")
    for flag, (_, kind, help_text) in MODEL_FLAGS.items():
        group.add_argument(flag, type=kind, default=None, help=help_text)
    group.add_argument("--mixed-precision", action="store_true", default=None,
                       help="bfloat16 compute in experts and towers (gates and outputs stay float32)")


def model_config_from_args(args):
    from mmoe import ModelConfig

    data = {}
    if args.model_config:
        data = _load_mapping(args.model_config)
    data["arch"] = args.arch or data.get("arch", "mmoe")
    for flag, (field, _, _) in MODEL_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            data[field] = value
    if args.mixed_precision:
        data["mixed_precision"] = True
    return ModelConfig.from_dict(data)


def _load_mapping(path: str) -> dict:
    """A --model-config file: YAML (.yaml/.yml, any case) or JSON; errors name the file."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise FileNotFoundError(f"--model-config {path}: {err.strerror or err}") from None
    try:
        if path.lower().endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml.YAMLError, json.JSONDecodeError: malformed text either way
        raise ValueError(f"--model-config {path}: cannot parse it: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--model-config {path}: expected a mapping at the top level")
    return data


def _dataset_spec(args):
    from features.census import census_spec
    from features.spec import load_dataset_spec

    if args.config:
        _check_file(args.config, "--config")
        return load_dataset_spec(args.config)
    return census_spec(args.task_group)


def _check_file(path: str, flag: str) -> None:
    if Path(path).is_dir():
        raise IsADirectoryError(f"{flag} {path}: a directory, not a file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")


def cmd_train(args) -> int:
    from pipelines.train_local import TrainSettings, check_run_dir, parse_split, train_run

    check_run_dir(Path(args.out).resolve(), args.overwrite)  # before the seconds of importing Keras and TensorFlow
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, patience=args.patience, seed=args.seed,
                             split=parse_split(args.split), use_weights=args.use_weights,
                             main_task=args.main_task, loss_weights=args.loss_weights,
                             refit=args.refit, schedule=args.schedule, cosine_epochs=args.cosine_epochs,
                             weight_decay=args.weight_decay, ema=args.ema, jit_compile=not args.no_xla,
                             steps_per_execution=args.steps_per_execution)
    spec = _dataset_spec(args)
    config = model_config_from_args(args)
    for path in args.data:
        _check_file(path, "--data")
    train_run(spec, args.data, args.out, config, settings, overwrite=args.overwrite)
    return 0


def cmd_data_download(args) -> int:
    from features.census import download_census

    from features.census import CENSUS_FILES

    files = args.file or list(CENSUS_FILES)
    paths = download_census(args.cache_dir, base_url=args.base_url, files=files)
    for name in files:
        print(paths[name])
    return 0


def cmd_data_export(args) -> int:
    from pipelines.train_local import export_arrays, parse_split

    for path in args.data:
        _check_file(path, "--data")
    export_arrays(_dataset_spec(args), args.data, args.out, parse_split(args.split), args.seed,
                  overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmoe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="preprocess, train and evaluate a multi-task model",
                           description="Preprocess with the tf.Transform preprocessing_fn (in-process), train with "
                                       "early stopping on the main task's validation metric, evaluate, and write "
                                       "the model, the transform output and metrics.json into --out.")
    train.add_argument("--data", nargs="+", required=True, metavar="PATH",
                       help="one file (split by --split) or the UCI train file and test file (the paper's protocol)")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--task-group", type=int, choices=[1, 2], default=1,
                        help="census task group: 1 = income + marital, 2 = education + marital")
    source.add_argument("--config", metavar="FILE", help="dataset spec (YAML/JSON) for a CSV that is not census")
    train.add_argument("--out", required=True, metavar="DIR")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument("--split", default="60/20/20", help="train/valid/test percentages for a single file")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=512)
    train.add_argument("--patience", type=int, default=4, help="early-stopping patience in epochs")
    train.add_argument("--main-task", help="task whose validation metric drives early stopping (default: first)")
    train.add_argument("--loss-weights", type=_loss_weights, help="per-task loss weights, e.g. income=1,marital=0.5")
    train.add_argument("--use-weights", action="store_true",
                       help="use the spec's weight column (census: instance_weight) as sample weights")
    train.add_argument("--refit", action="store_true",
                       help="after early stopping, train a new model on train + valid for the epochs it kept and save "
                       "that one (metrics.json adds its test metrics as refit_test)")
    optimizer = train.add_argument_group("optimizer (beyond --learning-rate)")
    optimizer.add_argument("--schedule", choices=["constant", "plateau", "cosine"], default="constant",
                           help="learning rate: constant; x0.3 after 2 epochs without a better main-task validation "
                           "metric (plateau); or cosine decay to 1%% over --cosine-epochs")
    optimizer.add_argument("--cosine-epochs", type=int, default=20, help="length of the cosine decay in epochs")
    optimizer.add_argument("--weight-decay", type=float, default=0.0, help="> 0: AdamW with this decoupled decay")
    optimizer.add_argument("--ema", type=float, default=0.0,
                           help="> 0: keep an exponential moving average of the weights with this momentum per step "
                           "and validate, early-stop on and save the averaged weights (e.g. 0.99)")
    train.add_argument("--no-xla", action="store_true", help="train without jit_compile (TensorFlow backend)")
    train.add_argument("--steps-per-execution", type=int, default=16,
                       help="batches per compiled call; larger amortises per-step overhead")
    add_model_flags(train)
    train.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    download = data.add_parser("download", help="fetch the UCI census-income files and check their sha256",
                               description="Fetch census-income.data.gz and census-income.test.gz from UCI (or a "
                                           "mirror) into --cache-dir and check each (its known sha256, else its row "
                                           "count); a download is kept only when it passes, and a cached file that "
                                           "passes is not fetched again.")
    download.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/mmoe/census-income"),
                          help="where the files go (default %(default)s)")
    download.add_argument("--base-url", default=None, help="mirror of UCI's census-income-mld folder (file:// works)")
    download.add_argument("--file", action="append", choices=["census-income.data.gz", "census-income.test.gz"],
                          help="fetch only this file (repeatable); default: both")
    download.set_defaults(func=cmd_data_download)
    export = data.add_parser("export", help="transform a data set and save the model-ready arrays (npz)",
                             description="Split and transform like `mmoe train`, then write one .npz with "
                                         "<split>/<key> arrays and a JSON header (inputs, tasks, protocol): data "
                                         "for machines without TensorFlow, such as a JAX-only GPU host.")
    export.add_argument("--data", nargs="+", required=True, metavar="PATH")
    export_source = export.add_mutually_exclusive_group()
    export_source.add_argument("--task-group", type=int, choices=[1, 2], default=1)
    export_source.add_argument("--config", metavar="FILE")
    export.add_argument("--out", required=True, metavar="FILE.npz", help='".npz" is added if missing')
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    export.add_argument("--split", default="60/20/20")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--format", choices=["npz"], default="npz")
    export.set_defaults(func=cmd_data_export)

    # Commands that live beside the code they drive register themselves:
    # each module has `add_commands(subparsers)` and sets `func` on its parsers.
    for module_name in COMMAND_MODULES:
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).add_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "base_url", "") is None:
        from features.census import UCI_BASE_URL
        args.base_url = UCI_BASE_URL
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, OSError, RuntimeError) as err:
        # DataError (a ValueError), DownloadError (a RuntimeError) and config
        # errors name the file, column or row themselves.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
