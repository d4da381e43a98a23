"""A lean serving-time transform built from a fitted tf.Transform output.

Why: the tf.Transform graph of `features.transform.make_preprocessing_fn`
runs ~1,500 small ops per call for the 38 census features (per feature a
join, a hash, a searchsorted, gathers, casts; and it rebuilds the sorted
vocabulary from the analyzer counts on every call, because the analyzer
results are captured tensors, not constants Grappler could fold).  At
serving batch sizes that graph, not the model, was most of the latency.

`FusedTransform` computes the same outputs with a handful of ops on whole
matrices:

* all categorical features: one [batch, C] string matrix, stripped once,
  hashed to int64 keys offset per feature and looked up in ONE hash table
  (key -> vocabulary id; see `_int_keys`); unknown values get
  vocabulary size + hash(value) % oov_buckets, one hash op per distinct
  `oov_buckets` (none when it is 1, where the hash is always 0);
* hashed features: one hash op per distinct `hash_buckets`;
* all numeric features: one [batch, N] float matrix; log1p, NaN -> training
  mean and the z-score are each one vectorised op; `bucketize` features (and
  the bucket ids `also_bucketize` features add) one batched searchsorted
  over their padded quantile boundaries (and one where for `zero_bucket`).

Training keeps using tf.Transform; nothing here is a second definition of
the parameters.  They come from the fitted transform itself:

* the analyzer results (numeric sums, vocabulary tokens, quantile
  boundaries) are read from the captured tensors of the saved transform
  function;
* every vocabulary id is obtained by running the tf.Transform layer on the
  vocabulary tokens themselves (so ranking, top_k and min_frequency are
  tf.Transform's), and vocabulary sizes come from the transformed schema.

`FusedTransform(...)` then checks itself: it runs both transforms on probe
rows (every vocabulary value, unseen, empty and whitespace-padded strings,
NaN, zero, negative and large numbers, values at the bucket boundaries) and
raises `FusedTransformError` unless every output matches.  The export falls
back to the tf.Transform graph in that case, so a change in
`features/transform.py` the fused version does not mirror costs speed,
never correctness; tests/test_serving_speed_paths.py asserts the parity on
the census spec and a non-census spec so such drift is also caught in CI.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from features.spec import CategoricalFeature, DatasetSpec, HashedFeature, NumericFeature, transformed_name
# The token layout of the packed vocabulary analyzer ("<index><US><value>"), from its one definition.
from features.transform import _PREFIX_WIDTH, _TOKEN_SEPARATOR, serving_feature_spec


class FusedTransformError(ValueError):
    """The fitted tf.Transform output cannot be reproduced by FusedTransform (the export falls back to it)."""


def _analyzer_values(tft_output) -> Tuple[np.ndarray, np.ndarray, List[np.ndarray]]:
    """(numeric sums float64 [3n] or None, vocabulary tokens [K] bytes, quantile boundaries per bucketized feature).

    tf.Transform (TF2) saves analyzer results as tensors captured by the
    transform function; they are told apart by dtype: the packed numeric
    statistics are the float64 one, the vocabulary tokens the string one
    (with their int64 counts), quantile boundaries the float32 ones, in the
    order the preprocessing_fn called the analyzers.
    """
    loaded = tf.saved_model.load(tft_output.transform_savedmodel_dir)
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise FusedTransformError("the transform SavedModel has no serving_default function (a TF1-style "
                                  "tf.Transform output?)")
    sums, tokens, boundaries = [], [], []
    for captured in signature.captured_inputs:
        if captured.dtype == tf.resource:
            raise FusedTransformError("the transform uses resources (tables or variables) the fused transform "
                                      "does not read")
        value = captured.numpy()
        if captured.dtype == tf.float64:
            sums.append(value.reshape(-1))
        elif captured.dtype == tf.string:
            tokens.append(value.reshape(-1))
        elif captured.dtype == tf.float32:
            boundaries.append(value.reshape(-1))
    if len(sums) > 1 or len(tokens) > 1:
        raise FusedTransformError(f"expected at most one numeric-statistics and one vocabulary analyzer, found "
                                  f"{len(sums)} and {len(tokens)}")
    return (sums[0] if sums else None), (tokens[0] if tokens else np.zeros([0], object)), boundaries


def _group_by(values: Sequence[int]) -> Tuple[Tuple[int, Tuple[int, ...]], ...]:
    """((value, positions holding it), ...) in first-seen order.

    Tuples, not a dict: tf.saved_model.save tracks module attributes, and a dict with integer keys holding
    lists cannot be serialized.
    """
    groups: Dict[int, List[int]] = {}
    for position, value in enumerate(values):
        groups.setdefault(value, []).append(position)
    return tuple((value, tuple(positions)) for value, positions in groups.items())


class FusedTransform(tf.Module):
    """The serving transform of `spec` as a few ops on stacked features; see the module docstring.

    `transform(raw)` maps the raw serving features (`serving_feature_spec`)
    to {transformed name: [batch] tensor}, equal to the tf.Transform layer's
    outputs for the model inputs; `matrices(raw)` gives the same values as
    (float32 [batch, N], int64 [batch, M]) with `column(name)` locating a
    feature, which lets the export pack the model inputs without one op per
    feature.
    """

    def __init__(self, spec: DatasetSpec, tft_output, tft_layer=None):
        super().__init__(name="fused_transform")
        self._serving_spec = serving_feature_spec(spec)
        last_column = spec.columns[-1]
        features = list(spec.features)
        numeric = [f for f in features if isinstance(f, NumericFeature)]
        zscored = [f for f in numeric if f.bucketize is None]
        # Every quantile-bucket output, in the order the preprocessing_fn creates their quantiles analyzers
        # (features.transform._quantile_bucket, spec order): `bucketize` features (output under their own name)
        # and `also_bucketize` ones (under bucket_input).
        bucketized = [f for f in numeric if f.bucketize is not None or f.also_bucketize is not None]
        bucket_outputs = [f.name if f.bucketize is not None else f.bucket_input for f in bucketized]
        categorical = [f for f in features if isinstance(f, CategoricalFeature)]
        hashed = [f for f in features if isinstance(f, HashedFeature)]
        strings = categorical + hashed
        if tft_layer is None:
            tft_layer = tft_output.transform_features_layer()
        sums, tokens, boundaries = _analyzer_values(tft_output)

        # -- numeric: training mean and standard deviation of every numeric feature, in spec order -------------
        self._numeric_names = [f.name for f in numeric]
        if numeric:
            if sums is None or sums.size % 3 or sums.size // 3 < len(numeric):
                raise FusedTransformError(f"numeric statistics of {None if sums is None else sums.size} values do "
                                          f"not fit {len(numeric)} numeric features")
            n = sums.size // 3
            total, total_sq, count = sums[:n], sums[n:2 * n], sums[2 * n:]
            # The same float64 arithmetic as features.transform._numeric_stats, then float32 as the graph casts.
            mean = np.divide(total, count, out=np.zeros_like(total), where=count != 0)
            var = np.maximum(np.divide(total_sq, count, out=np.zeros_like(total), where=count != 0) - mean ** 2, 0.0)
            mean, std = mean[:len(numeric)].astype(np.float32), np.sqrt(var)[:len(numeric)].astype(np.float32)
        else:
            mean = std = np.zeros([0], np.float32)
        self._mean = tf.constant(mean)
        self._std = tf.constant(np.where(std > 0, std, np.float32(1.0)).astype(np.float32))
        self._log_mask = tf.constant([f.log for f in numeric], tf.bool)
        self._any_log = any(f.log for f in numeric)
        self._zscored_index = [self._numeric_names.index(f.name) for f in zscored]
        self._bucketized_index = [self._numeric_names.index(f.name) for f in bucketized]
        # `zero_bucket` features: exactly 0 -> id 0, others their quantile bucket + 1.
        self._zero_bucket = tf.constant([[f.zero_bucket] for f in bucketized] or [[False]], tf.bool)
        self._any_zero_bucket = any(f.zero_bucket for f in bucketized)
        # `log` features are bucketed on the amount, max(x, 0), missing -> expm1(training mean of the log), as
        # features.transform._bucket_values does (computed by TensorFlow the same way, on a scalar each).
        self._bucket_log = tf.constant([[f.log] for f in bucketized] or [[False]], tf.bool)
        self._any_bucket_log = any(f.log for f in bucketized)
        self._bucket_fill = tf.constant(
            [[float(tf.math.expm1(tf.constant(mean[self._numeric_names.index(f.name)])).numpy())
              if f.log else 0.0] for f in bucketized] or [[0.0]], tf.float32)
        if len(boundaries) != len(bucketized):
            raise FusedTransformError(f"{len(boundaries)} quantile-boundary analyzers for {len(bucketized)} "
                                      f"bucketized features")
        width = max([b.size for b in boundaries], default=0)
        # Padded with +inf (never below a value) and each row's true count kept to cap the result: one batched
        # searchsorted serves every bucketized feature.
        padded = np.full([len(boundaries), max(width, 1)], np.inf, np.float32)
        for row, b in enumerate(boundaries):
            padded[row, :b.size] = b
        self._boundaries = tf.constant(padded)
        self._boundary_counts = tf.constant([b.size for b in boundaries], tf.int64)
        self._boundary_values = tuple(boundaries)

        # -- strings: categorical then hashed, one [batch, S] matrix -----------------------------------------
        self._string_names = [f.name for f in strings]
        self._strip_period = tf.constant([spec.strip_trailing_period and f.name == last_column for f in strings])
        self._any_strip_period = spec.strip_trailing_period and last_column in self._string_names
        self._num_categorical = len(categorical)
        # Integer keys (see _int_keys): each categorical feature owns the key range [i << bits, (i + 1) << bits).
        self._key_bits = 63 - max(1, len(categorical).bit_length())
        self._key_offsets = tf.constant([i << self._key_bits for i in range(len(categorical))], tf.int64)
        self._oov_groups = _group_by([f.oov_buckets for f in categorical])
        self._hash_groups = _group_by([f.hash_buckets for f in hashed])
        vocab_sizes = []
        for f in categorical:
            buckets = int(tft_output.num_buckets_for_transformed_feature(transformed_name(f.name)))
            vocab_sizes.append(buckets - f.oov_buckets)
        self._vocab_sizes = tf.constant(vocab_sizes, tf.int64)
        features_of, values, ids = self._vocabulary(tokens, categorical, vocab_sizes, tft_layer)
        if values:
            self._table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(tf.constant(self._int_keys(features_of, values), tf.int64),
                                                    tf.constant(ids, tf.int64)),
                default_value=-1)
        else:
            self._table = None
        vocabulary_values: Dict[str, List[bytes]] = {f.name: [] for f in categorical}
        for index, value in zip(features_of, values):
            vocabulary_values[categorical[index].name].append(value)
        # Kept for check() only (a tuple: see _group_by on what tf.saved_model.save can track).
        self._vocabulary_values = tuple((name, tuple(values)) for name, values in vocabulary_values.items())

        # Columns of the two output matrices: float32 = z-scored numbers; int64 = ids (categorical, hashed,
        # quantile buckets), in that order.
        self._float_columns = {f.name: i for i, f in enumerate(zscored)}
        self._int_columns = {name: i for i, name in enumerate([f.name for f in categorical + hashed] +
                                                              bucket_outputs)}
        self.check(tft_layer)

    # -- building ---------------------------------------------------------------------------------------------

    def _probe_raw(self, string_rows: Dict[str, List[bytes]], numeric_rows: Dict[str, List[float]],
                   rows: int) -> Dict[str, tf.Tensor]:
        """Raw serving features for `rows` probe rows (columns shorter than `rows` are repeated)."""
        raw = {}
        for name, parse in self._serving_spec.items():
            if parse.dtype == tf.string:
                values = string_rows.get(name) or [b""]
                raw[name] = tf.constant([values[i % len(values)] for i in range(rows)], tf.string)
            else:
                values = numeric_rows.get(name) or [0.0]
                raw[name] = tf.constant([values[i % len(values)] for i in range(rows)], tf.float32)
        return raw

    def _int_keys(self, features_of: List[int], values: List[bytes]) -> np.ndarray:
        """The table key of each vocabulary value (of categorical feature `features_of[i]`).

        Why integers: looking up feature-prefixed strings meant building a [batch, C] matrix of prefix + value
        strings per call (string concatenation is the costliest op of the fused transform at batch 256);
        hashing the values and adding the feature's offset is two cheap ops.  The key is
        `to_hash_bucket_fast(value, 2**bits)` (FarmHash Fingerprint64 modulo 2**bits; bits = 63 minus the bit
        length of the feature count, 58 for 16-31 categorical features) plus `index << bits`, so features
        never share a key.  Two vocabulary values of one feature with one key would be looked up wrongly, so
        that raises FusedTransformError (the export then keeps the tf.Transform graph); an unseen value lands
        on a vocabulary key only if its fingerprint equals one of that feature's vocabulary values' (< 1e-14
        for vocabularies of a thousand values).
        """
        index = np.array(features_of, np.int64)
        keys = (tf.strings.to_hash_bucket_fast(tf.constant(values, tf.string), 1 << self._key_bits).numpy()
                + (index << self._key_bits))
        if len(np.unique(keys)) != len(keys):
            _, first, counts = np.unique(keys, return_index=True, return_counts=True)
            clash = int(first[np.argmax(counts > 1)])
            raise FusedTransformError(f"vocabulary value {values[clash]!r} of categorical feature "
                                      f"{features_of[clash]} shares its {self._key_bits}-bit fingerprint with "
                                      f"another value of its feature")
        return keys

    def _vocabulary(self, tokens: np.ndarray, categorical, vocab_sizes,
                    tft_layer) -> Tuple[List[int], List[bytes], List[int]]:
        """(feature index, value, id) of every kept vocabulary entry, as three lists; ids from the tf.Transform
        layer itself."""
        values: Dict[int, List[bytes]] = {i: [] for i in range(len(categorical))}
        for token in tokens:
            token = bytes(token)
            head, separator, value = token.partition(_TOKEN_SEPARATOR.encode())
            if len(head) != _PREFIX_WIDTH or not separator or not head.isdigit() or int(head) >= len(categorical):
                raise FusedTransformError(f"vocabulary token {token[:40]!r} is not '<feature index><US><value>'")
            values[int(head)].append(value)
        rows = max([len(v) for v in values.values()], default=0)
        if rows == 0:
            return [], [], []
        probe = self._probe_raw({f.name: values[i] for i, f in enumerate(categorical)}, {}, rows)
        out = tft_layer(probe)
        features_of, kept, ids = [], [], []
        for i, f in enumerate(categorical):
            got = out[transformed_name(f.name)].numpy()[:len(values[i])]
            for value, token_id in zip(values[i], got):
                if token_id < vocab_sizes[i]:  # cut by top_k / min_frequency otherwise: an OOV id
                    features_of.append(i)
                    kept.append(value)
                    ids.append(int(token_id))
        return features_of, kept, ids

    def check(self, tft_layer, rows: int = 64) -> int:
        """Compare with the tf.Transform layer on probe rows; raises FusedTransformError on any difference.

        Returns the number of probe rows.
        """
        strings: Dict[str, List[bytes]] = {}
        for name, vocabulary in self._vocabulary_values:
            padded = [b"  " + v + b" " for v in vocabulary[:8]]
            period = [v + b"." for v in vocabulary[:4]]
            strings[name] = list(vocabulary) + [b"", b"__mmoe_unseen__", b"unseen value 2", b" "] + padded + period
        for name in self._string_names[self._num_categorical:]:
            strings[name] = [b"", b"a", b" a ", b"b", b"some longer value", f"{name}.".encode()]
        numbers: Dict[str, List[float]] = {}
        base = [0.0, 1.0, -1.0, float("nan"), 0.5, 3.0, 1e6, -1e6, 37.0, 1e-3]
        for name in self._numeric_names:
            numbers[name] = list(base)
        for position, values in zip(self._bucketized_index, self._boundary_values):
            name = self._numeric_names[position]
            # Values at, just below and just above each boundary (boundaries are in raw space: log features
            # are bucketed on the amount, features.transform._bucket_values).
            for b in values.astype(np.float64):
                numbers[name] += [float(b), float(np.nextafter(np.float32(b), np.float32(-np.inf))),
                                  float(np.nextafter(np.float32(b), np.float32(np.inf)))]
        rows = max([rows] + [len(v) for v in strings.values()] + [len(v) for v in numbers.values()])
        raw = self._probe_raw(strings, numbers, rows)
        want = tft_layer(raw)
        got = self.transform(raw)
        for name, value in got.items():
            expected = want[name].numpy()
            value = value.numpy()
            if value.dtype.kind == "f":
                ok = np.allclose(value, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
            else:
                ok = np.array_equal(value, expected.astype(value.dtype))
            if not ok:
                bad = int(np.flatnonzero(~np.isclose(value, expected, rtol=1e-6, atol=1e-6, equal_nan=True))[0])
                raise FusedTransformError(f"feature {name!r}: the fused transform gives {value[bad]!r} where "
                                          f"tf.Transform gives {expected[bad]!r} (probe row {bad})")
        return rows

    # -- the serving graph ------------------------------------------------------------------------------------

    def matrices(self, raw: Dict[str, tf.Tensor]) -> Tuple[tf.Tensor, tf.Tensor]:
        """(float32 [batch, N] z-scored numbers, int64 [batch, M] ids) for raw serving features."""
        batch = tf.shape(raw[next(iter(self._serving_spec))])[:1]
        floats = tf.zeros(tf.concat([batch, [0]], 0), tf.float32)
        ints = []
        if self._numeric_names:
            x = tf.stack([tf.cast(raw[n], tf.float32) for n in self._numeric_names], axis=1)
            unlogged = x
            missing = tf.math.is_nan(x)
            if self._any_log:
                logged = tf.math.log1p(tf.maximum(tf.where(missing, tf.zeros_like(x), x), 0.0))
                x = tf.where(self._log_mask & ~missing, logged, x)
            x = tf.where(missing, tf.broadcast_to(self._mean, tf.shape(x)), x)  # missing -> training mean
            if self._zscored_index:
                columns = self._zscored_index
                if columns == list(range(len(self._numeric_names))):
                    floats = (x - self._mean) / self._std
                else:
                    floats = (tf.gather(x, columns, axis=1) - tf.gather(self._mean, columns)) / tf.gather(
                        self._std, columns)
        if self._string_names:
            s = tf.strings.strip(tf.stack([raw[n] for n in self._string_names], axis=1))
            if self._any_strip_period:
                s = tf.where(self._strip_period, tf.strings.strip(tf.strings.regex_replace(s, r"\.$", "")), s)
            c = self._num_categorical
            if c:
                values = s[:, :c]
                # One hash and one lookup for every categorical feature (_int_keys).
                found = self._table.lookup(tf.strings.to_hash_bucket_fast(values, 1 << self._key_bits) +
                                           self._key_offsets)
                oov = tf.broadcast_to(self._vocab_sizes, tf.shape(found))
                if any(n > 1 for n, _ in self._oov_groups):
                    oov = oov + self._hashes(values, self._oov_groups)
                ints.append(tf.where(found >= 0, found, oov))
            if self._hash_groups:
                ints.append(self._hashes(s[:, c:], self._hash_groups))
        if self._bucketized_index:
            x_b = tf.transpose(tf.gather(x, self._bucketized_index, axis=1))  # [features, batch]
            if self._any_bucket_log:
                u = tf.transpose(tf.gather(unlogged, self._bucketized_index, axis=1))
                u_missing = tf.math.is_nan(u)
                amount = tf.where(u_missing, tf.broadcast_to(self._bucket_fill, tf.shape(u)),
                                  tf.maximum(tf.where(u_missing, tf.zeros_like(u), u), 0.0))
                x_b = tf.where(self._bucket_log, amount, x_b)
            buckets = tf.searchsorted(self._boundaries, x_b, side="right", out_type=tf.int64)
            buckets = tf.minimum(buckets, self._boundary_counts[:, tf.newaxis])
            if self._any_zero_bucket:
                shifted = buckets + tf.cast(self._zero_bucket, tf.int64)
                buckets = tf.where(self._zero_bucket & tf.equal(x_b, 0.0), tf.zeros_like(buckets), shifted)
            ints.append(tf.transpose(buckets))
        ints = tf.concat(ints, axis=1) if len(ints) > 1 else (ints[0] if ints else
                                                              tf.zeros(tf.concat([batch, [0]], 0), tf.int64))
        return floats, ints

    @staticmethod
    def _hashes(values: tf.Tensor, groups) -> tf.Tensor:
        """to_hash_bucket_fast of each column into its own bucket count: one hash op per distinct count."""
        if len(groups) == 1:
            (buckets, _), = groups
            return tf.strings.to_hash_bucket_fast(values, buckets) if buckets > 1 else tf.zeros_like(
                values, tf.int64)
        parts, order = [], []
        for buckets, columns in groups:
            part = tf.gather(values, list(columns), axis=1)
            parts.append(tf.strings.to_hash_bucket_fast(part, buckets) if buckets > 1 else
                         tf.zeros_like(part, tf.int64))
            order += list(columns)
        inverse = np.argsort(order)
        return tf.gather(tf.concat(parts, axis=1), inverse, axis=1)

    def column(self, name: str) -> Tuple[str, int]:
        """("float32" | "int64", column index) of a transformed feature in `matrices`."""
        if name in self._float_columns:
            return "float32", self._float_columns[name]
        if name in self._int_columns:
            return "int64", self._int_columns[name]
        raise KeyError(f"{name!r} is not a transformed feature of this transform")

    def transform(self, raw: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """{transformed feature name: [batch] tensor}, as the tf.Transform layer gives for the model inputs."""
        floats, ints = self.matrices(raw)
        out = {}
        for name in list(self._float_columns) + list(self._int_columns):
            kind, index = self.column(name)
            out[transformed_name(name)] = (floats if kind == "float32" else ints)[:, index]
        return out

    def packed(self, raw: Dict[str, tf.Tensor], groups: Sequence[Tuple[str, Sequence[str]]]) -> Dict[str, tf.Tensor]:
        """{group dtype: [batch, n]} for `groups` ((dtype, transformed names) pairs): one gather per group."""
        floats, ints = self.matrices(raw)
        out = {}
        for dtype, names in groups:
            located = [self.column(n) for n in names]
            kinds = {k for k, _ in located}
            if len(kinds) != 1:
                raise ValueError(f"group {dtype} mixes float and integer features: {list(names)}")
            source = floats if kinds == {"float32"} else ints
            columns = [i for _, i in located]
            if columns != list(range(source.shape[1] if source.shape[1] is not None else -1)):
                source = tf.gather(source, columns, axis=1)
            out[dtype] = tf.cast(source, dtype)
        return out
