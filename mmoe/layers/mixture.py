"""Weighted combination of expert outputs by gate weights."""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mmoe")
class ExpertMixture(keras.layers.Layer):
    """`sum_e gates[b, e] * experts[b, e, :]`, in float32.

    The mixture is computed in float32 whatever the experts' compute dtype, so
    bfloat16 experts feed towers with full-precision sums.

    Call arguments:
        inputs: `(gates, experts)`: `[batch, E]` and `[batch, E, U]`.

    Returns:
        `[batch, U]`.
    """

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, inputs):
        gates, experts = inputs
        return ops.einsum("be,beu->bu", ops.cast(gates, "float32"), ops.cast(experts, "float32"))

    def compute_output_shape(self, input_shape):
        gates_shape, experts_shape = input_shape
        return (experts_shape[0], experts_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        return config
