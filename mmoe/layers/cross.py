"""Explicit feature crosses (DCN-v2) in front of the experts."""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mmoe")
class FeatureCross(keras.layers.Layer):
    """A stack of DCN-v2 cross layers (Wang et al., WWW 2021).

    Each layer computes `x_{l+1} = x0 * (W_l x_l + b_l) + x_l`: a bounded-degree
    polynomial of the input, so layer `l` holds every feature product of degree
    up to `l + 1`, which an MLP of ReLUs only approximates. With
    `projection_dim`, `W_l = U_l V_l` is low rank (`d x r` by `r x d`). The same
    layer as keras-rs's `FeatureCross` (which does not import with TensorFlow
    2.16), stacked and with the residual built in.

    Args:
        num_layers: cross layers (>= 1).
        projection_dim: rank `r` of each `W_l`; None for a full `d x d` matrix.

    Call arguments:
        inputs: `[batch, d]`, the embedded input `x0`.

    Returns:
        `[batch, d]`.
    """

    def __init__(self, num_layers=2, projection_dim=None, **kwargs):
        super().__init__(**kwargs)
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if projection_dim is not None and int(projection_dim) < 1:
            raise ValueError(f"projection_dim must be >= 1 or None, got {projection_dim}")
        self.num_layers = int(num_layers)
        self.projection_dim = None if projection_dim is None else int(projection_dim)

    def build(self, input_shape):
        d = int(input_shape[-1])
        self.down, self.up, self.bias = [], [], []
        for i in range(self.num_layers):
            if self.projection_dim is None:
                self.down.append(self.add_weight(name=f"kernel_{i}", shape=(d, d), initializer="glorot_uniform"))
            else:
                self.down.append(self.add_weight(name=f"down_{i}", shape=(d, self.projection_dim),
                                                 initializer="glorot_uniform"))
                self.up.append(self.add_weight(name=f"up_{i}", shape=(self.projection_dim, d),
                                               initializer="glorot_uniform"))
            self.bias.append(self.add_weight(name=f"bias_{i}", shape=(d,), initializer="zeros"))

    def call(self, inputs):
        x0 = inputs
        x = inputs
        for i in range(self.num_layers):
            h = ops.matmul(x, self.down[i])
            if self.projection_dim is not None:
                h = ops.matmul(h, self.up[i])
            x = x0 * (h + self.bias[i]) + x
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"num_layers": self.num_layers, "projection_dim": self.projection_dim})
        return config
