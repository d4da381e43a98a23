"""Reading and splitting delimited files described by a `DatasetSpec`.

`read_dataset` turns one or several CSV-like files (plain or gzip, detected
from the file's magic bytes) into a pandas DataFrame with one column per
raw column the spec keeps:

* numeric columns (numeric features, the weight, threshold/regression label
  sources) are float64; `na_values` (and empty fields) in numeric *feature*
  columns become NaN, which preprocessing replaces by the training mean
  (imputing here, from the data being read, would leak evaluation data into
  the statistics);
* every other column is a stripped string; a missing-value marker such as
  '?' stays as is, a category of its own.

Problems are reported as `DataError` naming the file, the column, the
1-based line number and the offending value, because "could not convert
string to float" from deep inside TensorFlow is no help to whoever has to fix
the file.  Line numbers count physical lines (header included); the reader
assumes no quoted field spans several lines.
"""
from __future__ import annotations

import csv
import gzip
import io
import os
from typing import List, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from features.spec import FLOAT, DatasetSpec, NumericFeature

PathLike = Union[str, os.PathLike]

GZIP_MAGIC = b"\x1f\x8b"
# What tf.strings.strip removes (absl's ASCII whitespace), and so all the readers strip: Python's and pandas'
# strip() also remove Unicode spaces (U+00A0, U+3000, \x1c-\x1f), which the transform and the serving graph
# keep, so a value stripped one way in training and the other in serving would become out-of-vocabulary.
ASCII_WHITESPACE = " \t\n\r\f\v"
# How many bad values to quote in one error message.
_MAX_EXAMPLES = 3
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class DataError(ValueError):
    """A data file does not match its DatasetSpec (message names file, column, line)."""


def is_gzip(path: PathLike) -> bool:
    """True if the file starts with the gzip magic bytes (whatever its extension)."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def _read_text(path: str) -> str:
    opener = gzip.open if is_gzip(path) else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:  # truncated or corrupt gzip
        raise DataError(f"{path}: cannot read file: {e}") from None
    return decode_text(raw)


def decode_text(raw: bytes) -> str:
    """A data file's bytes as text: UTF-8 (a leading byte-order mark dropped), else Latin-1."""
    try:
        return raw.decode("utf-8-sig")  # -sig: drops the byte-order mark spreadsheet programs write first
    except UnicodeDecodeError:
        # Older public data sets are often Latin-1; every byte string decodes.
        return raw.decode("latin-1")


def _split_fields(line: str, delimiter: str) -> List[str]:
    if '"' in line:
        try:
            return next(csv.reader([line], delimiter=delimiter, skipinitialspace=True))
        except csv.Error as e:  # e.g. a field past csv's size limit (NUL bytes are refused before)
            raise DataError(f"cannot parse a line as CSV ({e}): {line[:80]!r}") from None
    return line.split(delimiter)


def _line_field_counts(lines: Sequence[str], delimiter: str) -> np.ndarray:
    # Fast path: count delimiters; only lines with quotes need a real CSV parse.
    return np.fromiter(
        (len(_split_fields(l, delimiter)) if '"' in l else l.count(delimiter) + 1 for l in lines),
        dtype=np.int64, count=len(lines))


def _quote_examples(values: Sequence[Tuple[int, str]]) -> str:
    shown = ", ".join(f"line {line}: {value!r}" for line, value in values[:_MAX_EXAMPLES])
    more = len(values) - _MAX_EXAMPLES
    return shown + (f" (and {more} more)" if more > 0 else "")


def _read_one(path: str, spec: DatasetSpec) -> pd.DataFrame:
    """Read one file into a frame of stripped strings indexed by 1-based line number."""
    text = _read_text(path)
    if "\x00" in text:
        raise DataError(f"{path}: holds NUL bytes, so it is a binary file, not delimited text")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start a line
    lines = [l[:-1] if l.endswith("\r") else l for l in lines]
    blank = np.array([not l.strip() for l in lines], dtype=bool)
    first_data_line = 1
    if spec.header:
        if not lines or blank[0]:
            raise DataError(f"{path}: empty file or blank first line; expected a header line with columns "
                            f"{list(spec.columns)}")
        header = [h.strip() for h in _split_fields(lines[0], spec.delimiter)]
        missing = [c for c in spec.columns if c not in header]
        if missing:
            raise DataError(f"{path}: header (line 1) lacks column(s) {missing}; found {header}")
        duplicated = sorted({h for h in header if header.count(h) > 1 and h in spec.columns})
        if duplicated:
            raise DataError(f"{path}: header (line 1) repeats column(s) {duplicated}")
        names, first_data_line = header, 2
    else:
        names = list(spec.columns)
        first = [f.strip() for f in _split_fields(lines[0], spec.delimiter)] if lines else []
        if len(first) == len(names) and sum(f == c for f, c in zip(first, names)) >= max(2, len(names) // 2):
            raise DataError(f"{path}: line 1 is a header ({', '.join(first[:4])}, ...), but the dataset spec says "
                            f"the file has none (header: false); drop the line or describe the file with a spec "
                            f"that has header: true")
    body = lines[first_data_line - 1:]
    body_blank = blank[first_data_line - 1:]
    if not len(body) or body_blank.all():
        raise DataError(f"{path}: no data rows" + (" after the header" if spec.header else ""))

    counts = _line_field_counts(body, spec.delimiter)
    bad = np.flatnonzero((counts != len(names)) & ~body_blank)
    if len(bad):
        i = bad[0]
        raise DataError(
            f"{path}: line {i + first_data_line}: expected {len(names)} fields "
            f"({'as in the header' if spec.header else 'one per spec column'}), found {counts[i]}"
            + (f"; {len(bad) - 1} more line(s) have the wrong number of fields" if len(bad) > 1 else ""))

    frame = pd.read_csv(
        io.StringIO("\n".join(l if not b else spec.delimiter * (len(names) - 1) for l, b in zip(body, body_blank))),
        sep=spec.delimiter, header=None, names=names, dtype=str, keep_default_na=False,
        na_filter=False, skipinitialspace=True, skip_blank_lines=False, index_col=False, engine="c")
    if len(frame) != len(body):  # defensive: row/line alignment is what error messages rely on
        raise DataError(f"{path}: parsed {len(frame)} rows from {len(body)} lines; quoted multi-line fields are "
                        f"not supported")
    frame.index = pd.RangeIndex(first_data_line, first_data_line + len(frame))
    frame = frame[~body_blank]
    keep = [c for c in spec.columns if c not in spec.drop_columns]
    columns = {}
    for c in keep:
        strip_period = spec.strip_trailing_period and c == names[-1]
        columns[c] = _strip_column(frame[c], strip_period)
    return pd.DataFrame(columns, index=frame.index)


def _strip_column(column: pd.Series, strip_period: bool) -> pd.Series:
    return pd.Series(strip_values(column, strip_period), index=column.index, name=column.name)


def strip_values(column, strip_period: bool) -> np.ndarray:
    """Every value with ASCII whitespace (and optionally one trailing '.') stripped, as an object array.

    Works on the distinct values only: most columns hold a few dozen distinct
    strings over many rows, which makes this ~20x faster than Series.str.strip.
    """
    codes, uniques = pd.factorize(column, sort=False)
    cleaned = pd.Index(uniques).str.strip(ASCII_WHITESPACE)
    if strip_period:
        # The period ends the row, so it sits on the last field of the line.
        cleaned = cleaned.str.replace(r"\.$", "", regex=True).str.rstrip(ASCII_WHITESPACE)
    return np.asarray(cleaned, dtype=object)[codes]


def _to_float(path: str, frame: pd.DataFrame, column: str, spec: DatasetSpec, allow_missing: bool, what: str):
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce")
    is_na = raw.isin(spec.na_values) | (raw == "")
    bad = (values.isna() & ~is_na) | np.isinf(values.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        examples = list(zip(raw.index[bad], raw[bad]))
        raise DataError(f"{path}: column {column!r} ({what}) has non-numeric value(s): {_quote_examples(examples)}")
    # The transform and the model compute in float32: a larger value would become inf there and every prediction NaN.
    huge = np.abs(values.to_numpy(dtype=float, na_value=0.0)) > _FLOAT32_MAX
    if huge.any():
        examples = list(zip(raw.index[huge], raw[huge]))
        raise DataError(f"{path}: column {column!r} ({what}) has value(s) beyond float32's range "
                        f"(±{_FLOAT32_MAX:.3g}): {_quote_examples(examples)}")
    if not allow_missing and is_na.any():
        examples = list(zip(raw.index[is_na], raw[is_na]))
        raise DataError(f"{path}: column {column!r} ({what}) has missing value(s): {_quote_examples(examples)}")
    return values.astype(np.float64).where(~is_na, np.nan)


def _validate_and_convert(path: str, frame: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    for f in spec.features:
        if isinstance(f, NumericFeature):
            frame[f.name] = _to_float(path, frame, f.name, spec, allow_missing=True, what="numeric feature")
    if spec.weight_column:
        frame[spec.weight_column] = _to_float(path, frame, spec.weight_column, spec, allow_missing=False,
                                              what="weight")
        negative = frame[spec.weight_column] < 0
        if negative.any():
            examples = list(zip(frame.index[negative], frame.loc[negative, spec.weight_column]))
            raise DataError(f"{path}: column {spec.weight_column!r} (weight) has negative value(s): "
                            f"{_quote_examples(examples)}")
    converted = set()
    for t in spec.tasks:
        if t.source_dtype == FLOAT:
            if t.column not in converted:
                frame[t.column] = _to_float(path, frame, t.column, spec, allow_missing=False,
                                            what=f"label of task {t.name!r}")
                converted.add(t.column)
        elif t.values is not None:
            raw = frame[t.column]
            bad = ~raw.isin(t.values)
            if bad.any():
                examples = list(zip(raw.index[bad], raw[bad]))
                raise DataError(f"{path}: column {t.column!r} (label of task {t.name!r}) has unexpected value(s): "
                                f"{_quote_examples(examples)}; allowed values: {list(t.values)}")
    return frame


def read_dataset(path_or_paths: Union[PathLike, Sequence[PathLike]], spec: DatasetSpec) -> pd.DataFrame:
    """Read and validate one or several files laid out as `spec` says.

    Returns a frame with the spec's columns (minus `drop_columns`) in spec
    order and a fresh 0-based index; rows of several files are concatenated
    in the order given.  Raises DataError on any mismatch (see module doc).
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if not paths:
        raise ValueError("read_dataset: no input files given")
    frames = []
    for p in paths:
        p = os.fspath(p)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"data file not found: {p}")
        frames.append(_validate_and_convert(p, _read_one(p, spec), spec))
    frame = frames[0] if len(frames) == 1 else pd.concat(frames)
    return frame.reset_index(drop=True)


# -- splits ------------------------------------------------------------------------


def split_frame(df: pd.DataFrame, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                seed: int = 0) -> Tuple[pd.DataFrame, ...]:
    """Seeded random split of the rows into len(fractions) disjoint frames.

    Sizes are floor(fraction * n) except the last split, which takes the
    remainder so no row is lost.  The same seed always gives the same split.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) < 2 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be >= 2 positive numbers summing to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(len(df))
    sizes = [int(np.floor(f * len(df))) for f in fractions[:-1]]
    bounds = np.cumsum([0] + sizes + [len(df) - sum(sizes)])
    return tuple(df.iloc[np.sort(order[a:b])].reset_index(drop=True) for a, b in zip(bounds[:-1], bounds[1:]))


def paper_split(train_df: pd.DataFrame, test_df: pd.DataFrame,
                seed: int = 0) -> Tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The MMoE paper's protocol: train on the training file, split the test file 1:1 into validation/test."""
    valid, test = split_frame(test_df, (0.5, 0.5), seed=seed)
    return train_df.reset_index(drop=True), valid, test
