"""Turns a dict of transformed features into one dense input vector."""
from __future__ import annotations

import keras
from keras import ops


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

    Args:
        features: list of dicts `{"name", "kind", "vocab_size",
            "embedding_dim"}` (see `mmoe.config.InputFeature`).
        max_embedding_dim: cap for embeddings whose width is not given.

    Call arguments:
        inputs: dict name -> `[batch]` tensor (float for numeric, integer ids
            for categorical). Ids outside `[0, vocab_size)` are clipped into
            range rather than failing inside a gather.

    Returns:
        `[batch, output_dim]`: the numeric features in spec order, then the
        embeddings grouped by width (in order of first appearance).
    """

    def __init__(self, features, max_embedding_dim=16, **kwargs):
        super().__init__(**kwargs)
        self.features = [dict(f) for f in features]
        if not self.features:
            raise ValueError("FeatureEmbedding needs at least one feature")
        self.max_embedding_dim = int(max_embedding_dim)
        self.numeric = [f["name"] for f in self.features if f["kind"] == "numeric"]
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
        self.tables = [keras.layers.Embedding(sum(size for _, _, size in members), dim, name=f"embed_d{dim}")
                       for dim, members in self.groups]

    @property
    def output_dim(self) -> int:
        return len(self.numeric) + sum(dim * len(members) for dim, members in self.groups)

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

    def call(self, inputs):
        missing = [f["name"] for f in self.features if f["name"] not in inputs]
        if missing:
            raise KeyError(f"missing model input(s): {missing}")
        parts = []
        if self.numeric:
            parts.append(ops.stack([ops.reshape(ops.cast(inputs[n], self.compute_dtype), (-1,))
                                    for n in self.numeric], axis=1))
        for table, (dim, members) in zip(self.tables, self.groups):
            ids = ops.stack([ops.clip(ops.reshape(ops.cast(inputs[name], "int32"), (-1,)), 0, size - 1) + offset
                             for name, offset, size in members], axis=1)  # [batch, features in group]
            vectors = table(ids)  # [batch, features in group, dim]
            parts.append(ops.reshape(ops.cast(vectors, self.compute_dtype), (-1, len(members) * dim)))
        return ops.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    def compute_output_shape(self, input_shape):
        return (None, self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update({"features": self.features, "max_embedding_dim": self.max_embedding_dim})
        return config
