"""Dense stacks: towers, shared bottoms and task heads."""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mmoe")
class MLP(keras.layers.Layer):
    """A stack of Dense layers with activation and dropout.

    Args:
        units: hidden widths; empty means identity.
        activation: activation after each layer.
        dropout: dropout rate after each layer (training only).

    Call arguments:
        inputs: `[batch, d]`.

    Returns:
        `[batch, units[-1]]` (or the input when `units` is empty).
    """

    def __init__(self, units, activation="relu", dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.units = [int(u) for u in ([units] if isinstance(units, int) else units)]
        self.activation = activation
        self.dropout = float(dropout)
        self.hidden_layers = []
        for i, width in enumerate(self.units):
            self.hidden_layers.append(keras.layers.Dense(width, activation=activation, dtype=self.dtype_policy,
                                                   name=f"dense_{i}"))
            if self.dropout:
                self.hidden_layers.append(keras.layers.Dropout(self.dropout, name=f"dropout_{i}"))

    def build(self, input_shape):
        shape = input_shape
        for layer in self.hidden_layers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)

    def call(self, inputs, training=None):
        h = inputs
        for layer in self.hidden_layers:
            h = layer(h, training=training) if isinstance(layer, keras.layers.Dropout) else layer(h)
        return h

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units[-1]) if self.units else input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"units": list(self.units), "activation": self.activation, "dropout": self.dropout})
        return config


@keras.saving.register_keras_serializable(package="mmoe")
class TaskHead(keras.layers.Layer):
    """Final projection of a tower to one prediction per example, in float32.

    Args:
        kind: "binary" (sigmoid probability) or "regression" (linear value).

    Call arguments:
        inputs: `[batch, d]`.

    Returns:
        `[batch]` predictions.
    """

    def __init__(self, kind="binary", **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if kind not in ("binary", "regression"):
            raise ValueError(f"kind must be 'binary' or 'regression', got {kind!r}")
        self.kind = kind
        self.projection = keras.layers.Dense(1, activation="sigmoid" if kind == "binary" else None,
                                         dtype="float32", name="logit")

    def build(self, input_shape):
        self.projection.build(input_shape)

    def call(self, inputs):
        return ops.squeeze(self.projection(ops.cast(inputs, "float32")), axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)

    def get_config(self):
        config = super().get_config()
        config.update({"kind": self.kind})
        config.pop("dtype", None)
        return config
