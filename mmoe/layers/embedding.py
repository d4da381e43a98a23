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

    Args:
        features: list of dicts `{"name", "kind", "vocab_size",
            "embedding_dim"}` (see `mmoe.config.InputFeature`). Order fixes
            the layout of the output vector.
        max_embedding_dim: cap for embeddings whose width is not given.

    Call arguments:
        inputs: dict name -> `[batch]` tensor (float for numeric, integer ids
            for categorical). Ids outside `[0, vocab_size)` are clipped into
            range rather than failing inside a gather.

    Returns:
        `[batch, sum of numeric count and embedding widths]` float tensor.
    """

    def __init__(self, features, max_embedding_dim=16, **kwargs):
        super().__init__(**kwargs)
        self.features = [dict(f) for f in features]
        if not self.features:
            raise ValueError("FeatureEmbedding needs at least one feature")
        self.max_embedding_dim = int(max_embedding_dim)
        self.embeddings = {}
        for f in self.features:
            if f["kind"] == "categorical":
                dim = f.get("embedding_dim") or default_embedding_dim(f["vocab_size"], self.max_embedding_dim)
                self.embeddings[f["name"]] = keras.layers.Embedding(
                    f["vocab_size"], dim, name=f"embed_{f['name']}")

    @property
    def output_dim(self) -> int:
        return sum(1 if f["kind"] == "numeric" else self.embeddings[f["name"]].output_dim for f in self.features)

    def build(self, input_shape):
        for embedding in self.embeddings.values():
            embedding.build((None,))

    def call(self, inputs):
        missing = [f["name"] for f in self.features if f["name"] not in inputs]
        if missing:
            raise KeyError(f"missing model input(s): {missing}")
        parts = []
        for f in self.features:
            x = inputs[f["name"]]
            if f["kind"] == "numeric":
                x = ops.reshape(ops.cast(x, self.compute_dtype), (-1, 1))
            else:
                ids = ops.clip(ops.reshape(ops.cast(x, "int32"), (-1,)), 0, f["vocab_size"] - 1)
                x = ops.cast(self.embeddings[f["name"]](ids), self.compute_dtype)
            parts.append(x)
        return ops.concatenate(parts, axis=-1)

    def compute_output_shape(self, input_shape):
        return (None, self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update({"features": self.features, "max_embedding_dim": self.max_embedding_dim})
        return config
