"""Small trained exports for tests and the benchmark.

`tiny_exports(base_dir)` trains a deliberately small MMoE on ~1,000 census
sample rows (tf.Transform in process, one epoch) and exports it twice, with
and without XLA.  The result is cached per process, so every test module of a
pytest session shares one training run.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Dict, List, Optional

import numpy as np

_CACHE: Dict[str, "TinyExports"] = {}
_LOCK = threading.Lock()


@dataclasses.dataclass
class TinyExports:
    """What the tests need: the Keras model, the spec, raw rows, and the two export directories."""

    model: object             # keras.Model
    spec: object              # features.spec.DatasetSpec
    transform_dir: str
    frame: object             # pandas.DataFrame of raw rows (held out from training)
    model_inputs: Dict[str, np.ndarray]  # transformed `frame`, as the Keras model takes it
    xla_dir: str              # <base>/xla/1
    plain_dir: str            # <base>/plain/1
    base_dir: str


def example_bytes(frame, spec, rows: Optional[int] = None) -> List[bytes]:
    """Serialized tf.Examples holding the serving features of `frame` (first `rows` rows)."""
    import tensorflow as tf

    from features.transform import serving_feature_spec

    serving = serving_feature_spec(spec)
    frame = frame if rows is None else frame.iloc[:rows]
    out = []
    for record in frame.to_dict("records"):
        feature = {}
        for name, parse in serving.items():
            value = record[name]
            if parse.dtype == tf.string:
                feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(value).encode()]))
            else:
                feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))
        out.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return out


def raw_columns(frame, spec) -> Dict[str, np.ndarray]:
    """The serving features of `frame` as `predict_raw` takes them: float32 or bytes object arrays."""
    import tensorflow as tf

    from features.transform import serving_feature_spec

    out = {}
    for name, parse in serving_feature_spec(spec).items():
        if parse.dtype == tf.string:
            out[name] = np.array([str(v).encode() for v in frame[name]], dtype=object)
        else:
            out[name] = frame[name].to_numpy(dtype=np.float32, na_value=np.nan)
    return out


def start_serve_process(serve_args: List[str], timeout: float = 300.0):
    """`mmoe serve <serve_args>` in a subprocess; returns (process, "host:port") once it prints "serving on".

    Pass `--port 0` to get a free port.  The caller stops the process; `process.startup_lines` holds what it
    printed before.  Raises RuntimeError (after killing it) if the server exits or does not start within
    `timeout` seconds.
    """
    import queue
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", *serve_args],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=repo,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    process.startup_lines = []
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line.startswith("serving on "):
            return process, line.split()[2]
        process.startup_lines.append(line.rstrip("\n"))
    process.kill()
    process.wait(30)
    raise RuntimeError(f"mmoe serve {' '.join(serve_args)} did not start")


def tiny_exports(base_dir: str, rows: int = 1200, seed: int = 0) -> TinyExports:
    """Train a tiny MMoE on census sample rows and export it with and without XLA (cached per base_dir)."""
    with _LOCK:
        if base_dir in _CACHE:
            return _CACHE[base_dir]
        _CACHE[base_dir] = result = _build(base_dir, rows, seed)
        return result


def _build(base_dir: str, rows: int, seed: int) -> TinyExports:
    import keras

    from features.census import CENSUS_SAMPLE_PATH, census_spec
    from features.io import read_dataset
    from features.transform import transform_in_process, transformed_feature_info
    from mmoe import InputFeature, ModelConfig, TaskSpec, build_model, compile_model
    from mmoe.training import fit, TaskData
    from serving.export import export_serving_model

    spec = census_spec(1)
    frame = read_dataset(CENSUS_SAMPLE_PATH, spec).iloc[:rows].reset_index(drop=True)
    train_df, held_out = frame.iloc[: rows - 200], frame.iloc[rows - 200:].reset_index(drop=True)
    transform_dir = os.path.join(base_dir, "transform")
    tft_output, arrays = transform_in_process(spec, train_df, {"held_out": held_out}, transform_dir,
                                              progress=None)
    features = [InputFeature(i["name"], i["kind"], i["vocab_size"])
                for i in transformed_feature_info(spec, tft_output)]
    tasks = [TaskSpec(t.name, t.kind) for t in spec.tasks]
    config = ModelConfig(arch="mmoe", num_experts=4, expert_units=(16,), tower_units=(8,), embedding_dim=4,
                         learning_rate=0.01)
    keras.utils.set_random_seed(seed)
    model = compile_model(build_model(config, features, tasks), config, tasks)
    names = [f.name for f in features]
    train = TaskData({n: arrays["train"][n] for n in names},
                     {t.name: arrays["train"][spec.label_key(t.name)].astype("float32") for t in tasks})
    fit(model, tasks, train, None, epochs=1, batch_size=256, verbose=0, seed=seed)
    model_inputs = {n: arrays["held_out"][n].astype(model.input[n].dtype) for n in names}
    xla_dir = export_serving_model(model, transform_dir, spec, os.path.join(base_dir, "xla", "1"), xla=True)
    plain_dir = export_serving_model(model, transform_dir, spec, os.path.join(base_dir, "plain", "1"), xla=False)
    return TinyExports(model=model, spec=spec, transform_dir=transform_dir, frame=held_out,
                       model_inputs=model_inputs, xla_dir=xla_dir, plain_dir=plain_dir, base_dir=base_dir)
