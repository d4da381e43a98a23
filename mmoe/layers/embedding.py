"""Turns a dict of transformed features into one dense input vector."""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from mmoe.config import EMBEDDING_LOOKUPS as LOOKUPS
from mmoe.layers.piecewise import PiecewiseLinearEncoding
# `lookup="auto"` uses the one-hot matmul for a table when (rows x features) is at most this: the matmul then
# costs 2 * rows * features * width FLOPs per example, a few thousand for the census vocabularies, while a
# hashed feature with 10^5 buckets stays a gather.
MATMUL_MAX_ROWS_X_FEATURES = 4096


def default_embedding_dim(vocab_size: int, cap: int) -> int:
    """The usual `6 * vocab^(1/4)` rule of thumb, capped, at least 2."""
    return int(max(2, min(cap, round(6 * vocab_size ** 0.25))))


@keras.saving.register_keras_serializable(package="mmoe")
class FeatureEmbedding(keras.layers.Layer):
    """Embeds categorical ids and concatenates them with numeric features.

    Categorical features with the same embedding width share one table with
    per-feature row offsets, so a model with dozens of categorical inputs does
    a handful of gathers (and gradient scatters) instead of one per feature;
    rows never mix because every feature owns its own range of the table.

    How a table is read (`lookup`) matters for training speed on CPU, not
    for the values: the gather's gradient is a scatter-add of one row per
    feature and example, which XLA's CPU backend runs as a serial loop (a
    third of a census training step). `"matmul"` instead multiplies a
    `[batch, rows]` multi-hot matrix by the table laid out block-diagonally,
    `[rows, features * width]`, so both directions are dense matmuls; a row
    times 1.0 plus zeros is exact, so both lookups give identical outputs.
    The matmul is used only when training: inference needs no gradient, and
    a gather is cheaper than building the block-diagonal table per call
    (a batch-1 serving request).

    Args:
        features: list of dicts `{"name", "kind", "vocab_size",
            "embedding_dim"}` (see `mmoe.config.InputFeature`).
        max_embedding_dim: cap for embeddings whose width is not given.
        lookup: `"gather"`, `"matmul"`, or `"auto"` (matmul for tables with
            rows x features <= `MATMUL_MAX_ROWS_X_FEATURES`, else gather).
        numeric_bins: with `T > 0`, every numeric feature is also given as
            its `T`-bin piecewise-linear encoding
            (`mmoe.layers.PiecewiseLinearEncoding`), whose bin edges `adapt`
            sets from training inputs.

    Call arguments:
        inputs: dict name -> `[batch]` tensor (float for numeric, integer ids
            for categorical). Ids outside `[0, vocab_size)` are clipped into
            range rather than failing inside a gather.

    Returns:
        `[batch, output_dim]`: the numeric features in spec order, their
        piecewise-linear encodings (`numeric_bins > 0`), then the
        embeddings grouped by width (in order of first appearance).
    """

    def __init__(self, features, max_embedding_dim=16, lookup="auto", numeric_bins=0, **kwargs):
        super().__init__(**kwargs)
        self.features = [dict(f) for f in features]
        if not self.features:
            raise ValueError("FeatureEmbedding needs at least one feature")
        if lookup not in LOOKUPS:
            raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
        self.lookup = lookup
        self.max_embedding_dim = int(max_embedding_dim)
        self.numeric = [f["name"] for f in self.features if f["kind"] == "numeric"]
        if int(numeric_bins) < 0:
            raise ValueError(f"numeric_bins must be >= 0, got {numeric_bins}")
        self.numeric_bins = int(numeric_bins)
        self.piecewise = (PiecewiseLinearEncoding(self.numeric_bins, name="piecewise")
                          if self.numeric_bins and self.numeric else None)
        groups: dict[int, list[tuple[str, int, int]]] = {}
        for f in self.features:
            if f["kind"] == "categorical":
                dim = int(f.get("embedding_dim") or default_embedding_dim(f["vocab_size"], self.max_embedding_dim))
                members = groups.setdefault(dim, [])
                offset = sum(size for _, _, size in members)
                members.append((f["name"], offset, int(f["vocab_size"])))
        # ((width, ((feature name, row offset, vocab size), ...)), ...): immutable tuples, because
        # TensorFlow's object tracking (tf.saved_model.save) rejects dicts with int keys.
        self.groups = tuple((dim, tuple(members)) for dim, members in groups.items())
        self.group_rows = tuple(sum(size for _, _, size in members) for _, members in self.groups)
        self.tables = [keras.layers.Embedding(rows, dim, name=f"embed_d{dim}")
                       for rows, (dim, _) in zip(self.group_rows, self.groups)]
        self.group_lookups = tuple(self._group_lookup(rows, len(members))
                                   for rows, (_, members) in zip(self.group_rows, self.groups))

    def _group_lookup(self, rows: int, num_features: int) -> str:
        if self.lookup != "auto":
            return self.lookup
        return "matmul" if rows * num_features <= MATMUL_MAX_ROWS_X_FEATURES else "gather"

    @property
    def output_dim(self) -> int:
        numeric = len(self.numeric) * (1 + (self.numeric_bins if self.piecewise is not None else 0))
        return numeric + sum(dim * len(members) for dim, members in self.groups)

    def rows(self, name):
        """The embedding rows of one categorical feature, `[vocab_size, dim]`."""
        for table, (_, members) in zip(self.tables, self.groups):
            for member, offset, size in members:
                if member == name:
                    return table.embeddings[offset:offset + size]
        raise KeyError(f"no categorical feature {name!r}")

    def build(self, input_shape):
        for table in self.tables:
            table.build((None, None))
        if self.piecewise is not None:
            self.piecewise.build((None, len(self.numeric)))

    @property
    def adaptable(self) -> bool:
        """True when the layer has state to set from training inputs (`adapt`): piecewise-linear encodings."""
        return self.piecewise is not None

    @property
    def needs_adapt(self) -> bool:
        """True while a piecewise-linear encoding still has its default edges."""
        return self.adaptable and not self.piecewise.is_adapted

    def bin_edges(self) -> dict:
        """{numeric input: its `numeric_bins + 1` bin edges} ({} without `numeric_bins`)."""
        if self.piecewise is None or not self.piecewise.built:
            return {}
        edges = ops.convert_to_numpy(self.piecewise.edges)
        return {name: [float(v) for v in row] for name, row in zip(self.numeric, edges)}

    def adapt(self, inputs) -> None:
        """Sets the piecewise-linear bin edges from training inputs (dict name -> `[rows]` array); a no-op
        without `numeric_bins`."""
        if self.piecewise is None:
            return
        missing = [n for n in self.numeric if n not in inputs]
        if missing:
            raise KeyError(f"adapt is missing numeric input(s): {missing}")
        if not self.built:
            self.build(None)
        self.piecewise.adapt(np.stack([np.asarray(inputs[n], dtype="float64").reshape(-1) for n in self.numeric],
                                      axis=1))

    def call(self, inputs, training=None):
        missing = [f["name"] for f in self.features if f["name"] not in inputs]
        if missing:
            raise KeyError(f"missing model input(s): {missing}")
        parts = []
        if self.numeric:
            numeric = ops.stack([ops.reshape(ops.cast(inputs[n], self.compute_dtype), (-1,)) for n in self.numeric],
                                axis=1)
            parts.append(numeric)
            if self.piecewise is not None:
                parts.append(ops.cast(self.piecewise(numeric), self.compute_dtype))
        for table, (dim, members), rows, lookup in zip(self.tables, self.groups, self.group_rows,
                                                        self.group_lookups):
            ids = [ops.clip(ops.reshape(ops.cast(inputs[name], "int32"), (-1,)), 0, size - 1) + offset
                   for name, offset, size in members]
            if lookup == "matmul" and training:
                vectors = self._matmul_lookup(table.embeddings, dim, rows, members, ids)
            else:
                vectors = table(ops.stack(ids, axis=1))  # [batch, features in group, dim]
            parts.append(ops.reshape(ops.cast(vectors, self.compute_dtype), (-1, len(members) * dim)))
        return ops.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    @staticmethod
    def _matmul_lookup(embeddings, dim, rows, members, ids):
        """`[batch, features * dim]` as multi-hot `[batch, rows]` @ block-diagonal `[rows, features * dim]`."""
        # mask[r, f * dim:(f + 1) * dim] = 1 where table row r belongs to feature f.
        mask = np.zeros((rows, len(members) * dim), "float32")
        for f, (_, offset, size) in enumerate(members):
            mask[offset:offset + size, f * dim:(f + 1) * dim] = 1.0
        block = ops.tile(embeddings, (1, len(members))) * ops.cast(mask, embeddings.dtype)
        # Features own disjoint row ranges, so the sum of one-hots has exactly one 1 per feature.
        multi_hot = ops.one_hot(ids[0], rows, dtype=embeddings.dtype)
        for i in ids[1:]:
            multi_hot = multi_hot + ops.one_hot(i, rows, dtype=embeddings.dtype)
        return ops.matmul(multi_hot, block)

    def compute_output_shape(self, input_shape):
        return (None, self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update({"features": self.features, "max_embedding_dim": self.max_embedding_dim,
                       "lookup": self.lookup, "numeric_bins": self.numeric_bins})
        return config
