"""ExampleGen executor for files described by a `features.spec.DatasetSpec`.

Used as `FileBasedExampleGen(input_base=DIR, input_config=..., custom_config=
{"dataset": dataset_spec_to_dict(spec)}, custom_executor_spec=
executor_spec.BeamExecutorSpec(Executor))`.  Each input file (plain or gzip,
detected from its magic bytes; with or without a header line, as the spec says)
becomes tf.Examples holding the columns the spec uses (features, label sources,
weight), cleaned as `features.io.read_dataset` cleans them (values stripped,
the row-ending '.' removed when the spec says so) and typed as the spec says:

* string columns (categorical/hashed features, value-list labels) -> bytes;
* numeric columns -> float; a missing-value marker (`na_values`) or an empty
  field becomes NaN, which the transform replaces by the training mean.

Types are checked leniently on purpose, so that bad data reaches
ExampleValidator instead of failing here: a numeric column holding a value
that is not a number is written as bytes for the whole file (TFDV then reports
"unexpected data type" against the schema), and a column missing from a file
with a header is left out (TFDV reports the dropped column).  Only what cannot
be mapped to columns at all (a row with the wrong number of fields in a
headerless file, an unreadable file) raises here, with the file and line.

The examples are encoded from Arrow record batches by tfx_bsl's C++ encoder
and re-serialized with sorted keys (`deterministic=True`), so that the hash
split puts an example in the same split on every run.  Each file is one Beam
element, so files are read in parallel and split by hash downstream by the
base executor.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
from typing import Any, Dict, Iterator, List

import apache_beam as beam
import numpy as np

from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
from tfx.dsl.io import fileio
from tfx.types import standard_component_specs

DATASET_KEY = "dataset"
_BATCH_ROWS = 8192


class InputDataError(ValueError):
    """An input file cannot be mapped to the spec's columns (names the file and line)."""


def _read_text(path: str) -> str:
    from features.io import GZIP_MAGIC, decode_text

    with fileio.open(path, "rb") as fh:  # fileio: the pipeline's input may be remote (gs://, s3://)
        raw = fh.read()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise InputDataError(f"{path}: cannot read gzip file: {e}") from None
    return decode_text(raw)


def read_columns(path: str, spec) -> Dict[str, np.ndarray]:
    """Stripped string values of every spec column present in the file (object arrays)."""
    import pandas as pd

    text = _read_text(path)
    lines = [l[:-1] if l.endswith("\r") else l for l in text.split("\n")]
    first = 0
    if spec.header:
        while first < len(lines) and not lines[first].strip():
            first += 1
        if first == len(lines):
            raise InputDataError(f"{path}: empty file; expected a header line")
        names = [h.strip() for h in next(csv.reader([lines[first]], delimiter=spec.delimiter))]
        first += 1
    else:
        names = list(spec.columns)
    body = [l for l in lines[first:] if l.strip()]
    if not body:
        return {}
    # Check field counts before parsing: a shifted row would otherwise become silently wrong data.
    for number, line in enumerate(lines[first:], first + 1):
        if not line.strip():
            continue
        count = (len(next(csv.reader([line], delimiter=spec.delimiter))) if '"' in line
                 else line.count(spec.delimiter) + 1)
        if count != len(names):
            raise InputDataError(f"{path}: line {number}: expected {len(names)} fields "
                                 f"({'as in the header' if spec.header else 'one per spec column'}), found {count}")
    frame = pd.read_csv(io.StringIO("\n".join(body)), sep=spec.delimiter, header=None, names=names, dtype=str,
                        keep_default_na=False, na_filter=False, skipinitialspace=True, index_col=False,
                        engine="c")
    from features.io import strip_values

    out = {}
    for column in spec.used_columns:
        if column not in frame:
            continue  # left out: ExampleValidator reports the missing column against the schema
        out[column] = strip_values(frame[column], spec.strip_trailing_period and column == names[-1])
    return out


def typed_columns(columns: Dict[str, np.ndarray], spec) -> Dict[str, np.ndarray]:
    """Spec types: float32 (NaN for missing) for numeric columns that parse, bytes otherwise."""
    import pandas as pd

    from features.spec import FLOAT

    out = {}
    missing_markers = set(spec.na_values) | {""}
    for column, values in columns.items():
        if spec.raw_dtype(column) == FLOAT:
            series = pd.Series(values)
            is_na = series.isin(missing_markers).to_numpy()
            numbers = pd.to_numeric(series.where(~is_na, None), errors="coerce").to_numpy(dtype=np.float64)
            bad = np.isnan(numbers) & ~is_na
            if not bad.any():
                out[column] = numbers.astype(np.float32)
                continue
            # Not a number: keep the text, so TFDV reports the type against the schema.
        out[column] = np.array([v.encode("utf-8") for v in values], dtype=object)
    return out


def file_to_examples(path: str, spec_dict: Dict[str, Any]) -> Iterator[bytes]:
    """Serialized tf.Examples of one file (see the module docstring)."""
    import pyarrow as pa
    from tensorflow.core.example import example_pb2
    from tfx_bsl.coders import example_coder

    from features.spec import dataset_spec_from_dict

    spec = dataset_spec_from_dict(spec_dict, source="ExampleGen custom_config")
    columns = typed_columns(read_columns(path, spec), spec)
    if not columns:
        return
    rows = len(next(iter(columns.values())))
    encoder = example_coder.RecordBatchToExamplesEncoder()
    for start in range(0, rows, _BATCH_ROWS):
        stop = min(start + _BATCH_ROWS, rows)
        offsets = pa.array(np.arange(stop - start + 1, dtype=np.int64))
        arrays, names = [], []
        for column, values in columns.items():
            chunk = values[start:stop]
            flat = pa.array(chunk, type=pa.float32()) if chunk.dtype != object else pa.array(list(chunk),
                                                                                            type=pa.large_binary())
            arrays.append(pa.LargeListArray.from_arrays(offsets, flat))
            names.append(column)
        for record in encoder.encode(pa.RecordBatch.from_arrays(arrays, names=names)):
            # The encoder writes the feature map in an order that changes from process to process, and the
            # base executor splits by a hash of these bytes: without a canonical (key-sorted) serialization the
            # same data would split differently on every run.
            yield example_pb2.Example.FromString(record).SerializeToString(deterministic=True)


@beam.ptransform_fn
@beam.typehints.with_input_types(beam.Pipeline)
@beam.typehints.with_output_types(bytes)
def _SpecFilesToExamples(pipeline: beam.Pipeline, exec_properties: Dict[str, Any],
                         split_pattern: str) -> beam.pvalue.PCollection:
    input_base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
    config = exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY) or "{}"
    config = json.loads(config) if isinstance(config, str) else dict(config)
    if DATASET_KEY not in config:
        raise ValueError(f"ExampleGen custom_config needs {DATASET_KEY!r} (a dataset spec as a dict)")
    pattern = os.path.join(input_base, split_pattern)
    files: List[str] = sorted(f for f in fileio.glob(pattern) if not os.path.basename(f).startswith("."))
    if not files:
        raise FileNotFoundError(f"no input file matches {pattern}")
    return (pipeline
            | "InputFiles" >> beam.Create(files)
            | "Reshuffle" >> beam.Reshuffle()
            | "ReadAsExamples" >> beam.FlatMap(file_to_examples, config[DATASET_KEY]))


class Executor(BaseExampleGenExecutor):
    """FileBasedExampleGen executor for DatasetSpec-described files."""

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:
        return _SpecFilesToExamples
