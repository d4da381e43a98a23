"""tf.Transform preprocessing driven by a `DatasetSpec`.

`make_preprocessing_fn(spec)` is the single definition of preprocessing: the
TFX Transform component, the in-process path used by the CLI and tests
(`transform_in_process`) and the serving graph all run this function, so
training and serving cannot drift apart.

Per feature (see features/spec.py):

* numeric: optional log1p(max(x, 0)); NaN (missing) -> training mean; then
  z-score with the training mean/stddev of the present values, or
  `bucketize=N` training-quantile bucket ids; `also_bucketize=N` gives both,
  the bucket id under `bucket_name(name)`;
* categorical: stripped string -> vocabulary id (most frequent value first);
  unknown values -> one of the OOV ids after the vocabulary;
* hashed: stripped string -> FarmHash bucket id.

Every integer output records its id range [0, n) in the transformed schema,
so `transformed_feature_info` (and any TFX trainer) reads embedding sizes
with `TFTransformOutput.num_buckets_for_transformed_feature`.

Each task gets a float label under `spec.label_key(task)` and the example
weight is output under WEIGHT_KEY, divided by its training mean (so weighted
losses keep the scale of unweighted ones); it is 1.0 without a weight column.

The transform also strips whitespace and, when the spec says so, the
row-ending '.', so it gives the same result on raw CSV lines read by TFX's
CsvExampleGen as on frames from `features.io.read_dataset`.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_transform as tft
from tensorflow_transform import schema_inference

from features.spec import (FLOAT, STRING, WEIGHT_KEY, CategoricalFeature, DatasetSpec,
                           NumericFeature, Task, transformed_name)

_TF_DTYPES = {FLOAT: tf.float32, STRING: tf.string}


# -- feature specs ----------------------------------------------------------------


def raw_feature_spec(spec: DatasetSpec) -> Dict[str, tf.io.FixedLenFeature]:
    """tf.io parsing spec of the raw columns the transform reads: features, label sources, weight."""
    return {c: tf.io.FixedLenFeature([], _TF_DTYPES[spec.raw_dtype(c)]) for c in spec.used_columns}


def serving_feature_spec(spec: DatasetSpec) -> Dict[str, tf.io.FixedLenFeature]:
    """The raw spec a serving request must satisfy: model inputs only, no labels or weight."""
    features = set(spec.feature_names)
    return {k: v for k, v in raw_feature_spec(spec).items() if k in features}


# -- preprocessing_fn ---------------------------------------------------------------


def _clean_strings(x: tf.Tensor, strip_period: bool) -> tf.Tensor:
    x = tf.strings.strip(x)
    if strip_period:
        x = tf.strings.strip(tf.strings.regex_replace(x, r"\.$", ""))
    return x


def _set_range(ids: tf.Tensor, size) -> tf.Tensor:
    """Record ids in [0, size) in the transformed schema (read back by num_buckets_for_transformed_feature)."""
    ids = tf.cast(ids, tf.int64)
    schema_inference.set_tensor_schema_override(ids, tf.constant(0, tf.int64), tf.cast(size, tf.int64) - 1)
    return ids


# Why the analyzers are packed: every tf.Transform analyzer becomes dozens of
# Beam transforms, and with ~40 features the fixed cost per analyzer
# dominated everything (about 2 minutes on 2 cores for 1,000 rows, with one
# vocabulary and one z-score per feature).  So all numeric statistics come
# from ONE tft.sum over a stacked matrix, and all vocabularies from ONE
# tft.count_per_key over feature-prefixed tokens; per-feature vocabularies
# are then built in the graph from those counts.


def _numeric_stats(columns: List[tf.Tensor], name: str) -> Tuple[tf.Tensor, tf.Tensor]:
    """Training mean and standard deviation of each column, NaNs ignored, from one analyzer.

    Sums run in float64 so E[x^2] - E[x]^2 does not cancel catastrophically
    for large-valued columns.
    """
    x = tf.stack([tf.cast(c, tf.float64) for c in columns], axis=1)  # [batch, n]
    present = tf.logical_not(tf.math.is_nan(x))
    x0 = tf.where(present, x, tf.zeros_like(x))
    stacked = tf.concat([x0, tf.square(x0), tf.cast(present, tf.float64)], axis=1)
    sums = tft.sum(stacked, reduce_instance_dims=False, name=name)  # [3n]
    n = len(columns)
    total, total_sq, count = sums[:n], sums[n:2 * n], sums[2 * n:]
    mean = tf.math.divide_no_nan(total, count)
    var = tf.maximum(tf.math.divide_no_nan(total_sq, count) - tf.square(mean), 0.0)
    return mean, tf.sqrt(var)


def _numeric_inputs(inputs, spec: DatasetSpec) -> Dict[str, tf.Tensor]:
    """Numeric features as float32 with log1p applied where asked; NaN marks missing."""
    out = {}
    for f in spec.features:
        if isinstance(f, NumericFeature):
            x = tf.cast(inputs[f.name], tf.float32)
            if f.log:
                missing = tf.math.is_nan(x)
                logged = tf.math.log1p(tf.maximum(tf.where(missing, tf.zeros_like(x), x), 0.0))
                x = tf.where(missing, x, logged)
            out[f.name] = x
    return out


_PREFIX_WIDTH = 5  # feature index in the combined token, zero-padded: supports 100,000 categorical features
_TOKEN_SEPARATOR = "\x1f"  # ASCII unit separator: does not occur in ordinary text
_HASH_SPACE = 2 ** 62  # token fingerprints; collisions between two tokens have probability ~n^2 / 2^63


def _categorical_ids(columns: List[tf.Tensor], features: List[CategoricalFeature]) -> List[tf.Tensor]:
    """Vocabulary ids for every categorical feature from a single count_per_key analyzer.

    Each value becomes the token "<feature index><US><value>"; the analyzer
    counts all tokens at once.  In the graph, each feature's vocabulary is its
    tokens ordered by count (most frequent first; ties by token fingerprint,
    so the order is deterministic), cut by top_k and min_frequency; id = rank.
    Lookup is by 62-bit fingerprint with searchsorted, which needs no lookup
    table resource.  Unknown values go to vocabulary size + hash(value) % oov_buckets.
    """
    n_features = len(features)
    tokens = [tf.strings.join([tf.constant(f"{i:0{_PREFIX_WIDTH}d}{_TOKEN_SEPARATOR}"), c])
              for i, c in enumerate(columns)]
    keys, counts = tft.count_per_key(tf.reshape(tf.stack(tokens, axis=1), [-1]), name="categorical_counts")
    feature_of = tf.strings.to_number(tf.strings.substr(keys, 0, _PREFIX_WIDTH), tf.int32)
    fingerprint = tf.strings.to_hash_bucket_fast(keys, _HASH_SPACE)
    # Lexicographic sort by (feature, -count, fingerprint): stable sorts from the last key to the first.
    order = tf.argsort(fingerprint, stable=True)
    order = tf.gather(order, tf.argsort(-tf.gather(counts, order), stable=True))
    order = tf.gather(order, tf.argsort(tf.gather(feature_of, order), stable=True))
    feature_of, counts, fingerprint = (tf.gather(t, order) for t in (feature_of, counts, fingerprint))
    position = tf.range(tf.size(feature_of), dtype=tf.int32)
    first = tf.math.unsorted_segment_min(position, feature_of, n_features)
    rank = tf.cast(position - tf.gather(first, feature_of), tf.int64)
    big = np.iinfo(np.int64).max
    top_k = tf.constant([f.top_k or big for f in features], tf.int64)
    min_frequency = tf.constant([f.min_frequency or 0 for f in features], tf.int64)
    keep = (rank < tf.gather(top_k, feature_of)) & (counts >= tf.gather(min_frequency, feature_of))
    sizes = tf.math.unsorted_segment_sum(tf.cast(keep, tf.int64), feature_of, n_features)
    # Kept tokens sorted by fingerprint, with a sentinel larger than any fingerprint at the end so
    # searchsorted always lands on a valid index (also when nothing was kept).
    kept_fingerprint = tf.boolean_mask(fingerprint, keep)
    kept_rank = tf.boolean_mask(rank, keep)
    by_fingerprint = tf.argsort(kept_fingerprint, stable=True)
    table_keys = tf.concat([tf.gather(kept_fingerprint, by_fingerprint), [big]], axis=0)
    table_ids = tf.concat([tf.gather(kept_rank, by_fingerprint), [0]], axis=0)

    ids = []
    for i, (f, token, value) in enumerate(zip(features, tokens, columns)):
        query = tf.strings.to_hash_bucket_fast(token, _HASH_SPACE)
        slot = tf.searchsorted(table_keys, query)
        found = tf.equal(tf.gather(table_keys, slot), query)
        oov = sizes[i] + tf.strings.to_hash_bucket_fast(value, f.oov_buckets)
        ids.append(_set_range(tf.where(found, tf.gather(table_ids, slot), oov), sizes[i] + f.oov_buckets))
    return ids


def _label(x: tf.Tensor, task: Task, strip_period: bool) -> tf.Tensor:
    if task.positive is not None:
        x = _clean_strings(x, strip_period)
        hits = tf.equal(tf.expand_dims(x, -1), tf.constant(list(task.positive))[tf.newaxis, :])
        return tf.cast(tf.reduce_any(hits, axis=-1), tf.float32)
    x = tf.cast(x, tf.float32)
    if task.threshold is not None:
        return tf.cast(x > task.threshold, tf.float32)
    return x


def frame_labels(frame: pd.DataFrame, spec: DatasetSpec, task_name: str) -> np.ndarray:
    """[n] float labels of a task from its raw column in a frame `features.io.read_dataset` made, as the transform
    derives them (the same `_label`)."""
    task = spec.task(task_name)
    column = frame[task.column]
    values = column.astype(str).to_numpy(dtype=object) if task.positive is not None else \
        column.to_numpy(dtype="float32")
    # read_dataset already stripped values and the UCI row-ending period, so no period stripping here.
    return _label(tf.constant(values), task, strip_period=False).numpy().astype("float64")


def _bucket_values(column: tf.Tensor, raw: tf.Tensor, mean: tf.Tensor, log: bool) -> Tuple[tf.Tensor, tf.Tensor]:
    """(value with NaN where missing, value with missing filled) that quantile buckets are taken over.

    For a `log` feature that is the amount max(x, 0) itself, not log1p of it (the same buckets, log1p being
    monotone): TensorFlow's float32 log1p can differ by one ulp for one value depending on where it sits in a
    tensor (vectorised or scalar path), which moves a value lying exactly on a boundary (boundaries are data
    values, e.g. log1p(1800)) to another bucket, so serving could disagree with training.  A missing amount
    is filled with expm1 of the training mean of the logged value, the amount the z-scored input is filled with.
    """
    if not log:
        return raw, tf.where(tf.math.is_nan(raw), mean, raw)
    missing = tf.math.is_nan(raw)
    amount = tf.maximum(tf.where(missing, tf.zeros_like(raw), tf.cast(column, tf.float32)), 0.0)
    return tf.where(missing, raw, amount), tf.where(missing, tf.math.expm1(mean), amount)


def _quantile_bucket(raw: tf.Tensor, filled: tf.Tensor, num_buckets: int, name: str,
                     zero_bucket: bool = False) -> tf.Tensor:
    """Training-quantile bucket id of `filled` (missing values already filled: `_bucket_values`).

    The quantiles are taken of `raw` with missing rows weighted 0, not of `filled`: `filled` depends on the
    mean analyzer, and a quantiles analyzer over it makes the analysis two-phase, which fails in the TFX
    Transform component (Beam, "ApplySavedModel[Phase1]") though it works in process. Otherwise this is
    `tft.bucketize` (same epsilon, one analyzer per feature in spec order, as serving/fast_transform.py reads).
    With `zero_bucket`, zero rows are weighted 0 as well, a value of exactly 0 gets id 0 and the others their
    quantile bucket + 1 (`NumericFeature.zero_bucket`).
    """
    with tf.name_scope(name):
        valid = tf.logical_not(tf.math.is_nan(raw))
        counted = tf.logical_and(valid, tf.not_equal(raw, 0.0)) if zero_bucket else valid
        boundaries = tft.quantiles(tf.where(valid, raw, tf.zeros_like(raw)), num_buckets,
                                   epsilon=min(1.0 / num_buckets, 0.01), weights=tf.cast(counted, tf.float32))
        ids = tft.apply_buckets(filled, boundaries)
        if not zero_bucket:
            return ids
        return _set_range(tf.where(tf.equal(filled, 0.0), tf.zeros_like(ids), ids + 1), num_buckets + 1)


def make_preprocessing_fn(spec: DatasetSpec) -> Callable[[Dict[str, tf.Tensor]], Dict[str, tf.Tensor]]:
    """tf.Transform preprocessing_fn for `spec` (see the module docstring for what it does)."""
    last_column = spec.columns[-1]

    def strip_period(column: str) -> bool:
        return spec.strip_trailing_period and column == last_column

    def preprocessing_fn(inputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        outputs = {}
        numeric = _numeric_inputs(inputs, spec)
        stat_columns = dict(numeric)
        if spec.weight_column:
            stat_columns[WEIGHT_KEY] = tf.cast(inputs[spec.weight_column], tf.float32)
        stats = {}
        if stat_columns:
            means, stds = _numeric_stats(list(stat_columns.values()), name="numeric_stats")
            stats = {name: (tf.cast(means[i], tf.float32), tf.cast(stds[i], tf.float32))
                     for i, name in enumerate(stat_columns)}

        categorical = [f for f in spec.features if isinstance(f, CategoricalFeature)]
        vocab_ids = {}
        if categorical:
            ids = _categorical_ids([_clean_strings(inputs[f.name], strip_period(f.name)) for f in categorical],
                                   categorical)
            vocab_ids = {f.name: i for f, i in zip(categorical, ids)}

        for f in spec.features:
            if isinstance(f, NumericFeature):
                raw = numeric[f.name]
                mean, std = stats[f.name]
                x = tf.where(tf.math.is_nan(raw), mean, raw)  # missing -> training mean
                if f.bucketize is not None or f.also_bucketize is not None:
                    bucket_raw, bucket_x = _bucket_values(inputs[f.name], raw, mean, f.log)
                if f.bucketize is not None:
                    out = _quantile_bucket(bucket_raw, bucket_x, f.bucketize, name=f"bucketize_{f.name}",
                                           zero_bucket=f.zero_bucket)
                else:
                    # A constant column has std 0: emit x - mean (all zeros) rather than inf/NaN.
                    out = (x - mean) / tf.where(std > 0, std, tf.ones_like(std))
                if f.also_bucketize is not None:
                    # Same place in the analyzer order as a `bucketize` feature would take (spec order);
                    # serving/fast_transform.py reads the boundaries in that order.
                    outputs[f.bucket_input] = _quantile_bucket(bucket_raw, bucket_x, f.also_bucketize,
                                                               name=f"bucketize_{f.bucket_input}",
                                                               zero_bucket=f.zero_bucket)
            elif isinstance(f, CategoricalFeature):
                out = vocab_ids[f.name]
            else:  # HashedFeature
                value = _clean_strings(inputs[f.name], strip_period(f.name))
                out = _set_range(tf.strings.to_hash_bucket_fast(value, f.hash_buckets), f.hash_buckets)
            outputs[transformed_name(f.name)] = out
        for t in spec.tasks:
            outputs[spec.label_key(t.name)] = _label(inputs[t.column], t, strip_period(t.column))
        if spec.weight_column:
            # Divide by the training mean: weighted losses then keep the scale of unweighted ones.
            w = stat_columns[WEIGHT_KEY]
            outputs[WEIGHT_KEY] = tf.math.divide_no_nan(w, stats[WEIGHT_KEY][0])
        else:
            outputs[WEIGHT_KEY] = tf.ones(tf.shape(inputs[spec.used_columns[0]])[:1], tf.float32)
        return outputs

    return preprocessing_fn


def transformed_feature_info(spec: DatasetSpec, tft_output: tft.TFTransformOutput) -> List[dict]:
    """Model-neutral description of the transformed inputs, in spec order.

    Each entry is {"name", "kind": "numeric" | "categorical", "vocab_size"}:
    vocab_size is the number of distinct ids (vocabulary + OOV buckets, hash
    buckets or quantile buckets) for categorical features, read from the
    integer domain the transform recorded in its output schema; None for
    numeric features.
    """
    info = []
    for f in spec.features:
        name = transformed_name(f.name)
        if f.is_categorical:
            info.append({"name": name, "kind": "categorical",
                         "vocab_size": int(tft_output.num_buckets_for_transformed_feature(name))})
        else:
            info.append({"name": name, "kind": "numeric", "vocab_size": None})
        if f.bucket_input is not None:
            info.append({"name": f.bucket_input, "kind": "categorical",
                         "vocab_size": int(tft_output.num_buckets_for_transformed_feature(f.bucket_input))})
    return info


# -- in-process transform (Beam DirectRunner) -----------------------------------------


def _column_array(frame: pd.DataFrame, column: str, dtype: str, where: str) -> np.ndarray:
    if column not in frame:
        raise KeyError(f"{where}: missing column {column!r} needed by the transform")
    values = frame[column]
    if dtype == FLOAT:
        return values.to_numpy(dtype=np.float32, na_value=np.nan)
    return values.astype(str).to_numpy(dtype=object)


def _record_batches(frame: pd.DataFrame, spec: DatasetSpec, arrow_schema, batch_size: int, where: str):
    """Split a frame into Arrow RecordBatches laid out as tfx_bsl expects for FixedLenFeature([]).

    Each column is a large_list with exactly one value per row; building the
    lists from offsets avoids a Python object per cell.
    """
    import pyarrow as pa

    columns = {c: _column_array(frame, c, spec.raw_dtype(c), where) for c in spec.used_columns}
    batches = []
    for start in range(0, len(frame), batch_size):
        stop = min(start + batch_size, len(frame))
        offsets = pa.array(np.arange(stop - start + 1, dtype=np.int64))
        arrays = []
        for field in arrow_schema:
            values = columns[field.name][start:stop]
            if spec.raw_dtype(field.name) == STRING:
                flat = pa.array([v.encode("utf-8") for v in values], type=field.type.value_type)
            else:
                flat = pa.array(values, type=field.type.value_type)
            arrays.append(pa.LargeListArray.from_arrays(offsets, flat))
        batches.append(pa.RecordBatch.from_arrays(arrays, schema=arrow_schema))
    return batches


def _write_record_batches(batches, path: str) -> int:
    """Write RecordBatches to an uncompressed Arrow IPC file; returns how many were written."""
    import pyarrow as pa

    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return len(batches)


def _read_record_batch(position):
    """Beam step: (Arrow IPC file, batch index) -> that RecordBatch (memory-mapped, no copy)."""
    import pyarrow as pa

    path, index = position
    return pa.ipc.open_file(pa.memory_map(path, "r")).get_batch(index)


def transform_frame(tft_output: tft.TFTransformOutput, spec: DatasetSpec, frame: pd.DataFrame,
                    batch_size: int = 65_536, where: str = "frame") -> Dict[str, np.ndarray]:
    """Apply a fitted transform to a frame of raw columns; returns numpy arrays by output key."""
    keys = spec.input_names + spec.label_keys + [WEIGHT_KEY]
    if len(frame) == 0:
        return {k: np.zeros((0,), np.float32) for k in keys}
    raw_columns = {c: _column_array(frame, c, spec.raw_dtype(c), where) for c in spec.used_columns}
    chunks: Dict[str, List[np.ndarray]] = {k: [] for k in keys}
    for start in range(0, len(frame), batch_size):
        raw = {c: tf.constant(v[start:start + batch_size], dtype=_TF_DTYPES[spec.raw_dtype(c)])
               for c, v in raw_columns.items()}
        out = tft_output.transform_raw_features(raw, drop_unused_features=True)
        for k in keys:
            chunks[k].append(np.asarray(out[k]))
    return {k: np.concatenate(v) for k, v in chunks.items()}


def transform_in_process(spec: DatasetSpec, train_df: pd.DataFrame, eval_frames: Mapping[str, pd.DataFrame],
                         output_dir: str, batch_size: int = 8_192,
                         progress: Optional[Callable[[str], None]] = print
                         ) -> Tuple[tft.TFTransformOutput, Dict[str, Dict[str, np.ndarray]]]:
    """Fit the transform on `train_df` and apply it to it and to every eval frame.

    The analysis runs as a tf.Transform Beam pipeline (DirectRunner, in this
    process) fed with Arrow RecordBatches, and writes transform_fn/ and
    transformed_metadata/ under `output_dir`, so `tft.TFTransformOutput(output_dir)`
    (and TFX-style serving) can load it.  The transform is then applied with
    the saved graph in TensorFlow directly: one pass per split, much faster
    than a second Beam pass.

    Returns (tft_output, arrays) where arrays[split][key] is a numpy array
    for each transformed feature name, label key and WEIGHT_KEY; splits are
    "train" plus the keys of `eval_frames`.
    """
    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import schema_utils
    from tfx_bsl.public import tfxio

    if "train" in eval_frames:
        raise ValueError("eval_frames cannot have a split named 'train' (the training split is always returned)")
    if len(train_df) == 0:
        raise ValueError("transform_in_process: the training frame is empty")
    say = progress or (lambda message: None)
    os.makedirs(output_dir, exist_ok=True)
    schema = schema_utils.schema_from_feature_spec(raw_feature_spec(spec))
    adapter_config = tfxio.TFExampleBeamRecord(
        physical_format="inmem", telemetry_descriptors=["features"], schema=schema).TensorAdapterConfig()
    batches = _record_batches(train_df, spec, adapter_config.arrow_schema, batch_size, "train")

    start = time.time()
    say(f"analyzing {len(train_df):,} training rows ({len(spec.features)} features, {len(spec.tasks)} tasks)...")
    # Beam's scratch files live under output_dir (removed after), so nothing leaks into /tmp.
    with tempfile.TemporaryDirectory(prefix="tft-tmp-", dir=output_dir) as temp_dir:
        arrow_path = os.path.join(temp_dir, "train.arrow")
        num_batches = _write_record_batches(batches, arrow_path)
        del batches
        options = beam.options.pipeline_options.PipelineOptions(["--direct_num_workers=1"])
        with beam.Pipeline(runner="DirectRunner", options=options) as pipeline:
            with tft_beam.Context(temp_dir=temp_dir, force_tf_compat_v1=False):
                # Pass file positions, not the data: beam.Create pickles and bz2-compresses its
                # elements into the pipeline graph, which cost ~30 s for 30,000 rows.
                raw = (pipeline
                       | "BatchPositions" >> beam.Create([(arrow_path, i) for i in range(num_batches)],
                                                         reshuffle=False)
                       | "ReadRecordBatches" >> beam.Map(_read_record_batch))
                transform_fn = (raw, adapter_config) | "Analyze" >> tft_beam.AnalyzeDataset(
                    make_preprocessing_fn(spec))
                _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(output_dir)
    # Not where it went: callers write into temporary or staging directories and say where the result lands.
    say(f"analysis done in {time.time() - start:.1f}s")

    tft_output = tft.TFTransformOutput(output_dir)
    arrays = {}
    for split, frame in {"train": train_df, **eval_frames}.items():
        t0 = time.time()
        arrays[split] = transform_frame(tft_output, spec, frame, where=split)
        say(f"transformed {split}: {len(frame):,} rows in {time.time() - t0:.1f}s")
    return tft_output, arrays
