"""A bank of MLP experts computed as one batched contraction."""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mmoe")
class ExpertBank(keras.layers.Layer):
    """`num_experts` independent MLPs over the same input, computed together.

    Every layer's weights are stacked over experts, so the whole bank is one
    matmul for the first layer (the input is shared: `[d, E * u]`) and one
    batched matmul per further layer (`[E, u, v]`), instead of a Python loop
    of per-expert Dense layers. XLA then compiles the dispatch into a few
    kernels, and the cost does not grow with the number of Python ops.

    Args:
        num_experts: number of experts E.
        units: hidden widths of each expert's MLP; the last one is the expert
            output width U.
        activation: activation after every layer (experts end in it too, as
            in the MMoE paper's ReLU experts).
        dropout: dropout rate after every layer (training only).
        kernel_initializer, bias_initializer: initialisers of the stacked
            weights (applied per expert slice, so each expert is initialised
            like a Dense layer of the same shape).

    Call arguments:
        inputs: `[batch, d]` float tensor.
        training: enables dropout.

    Returns:
        `[batch, E, U]` expert outputs.
    """

    def __init__(self, num_experts, units, activation="relu", dropout=0.0,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = int(num_experts)
        self.units = [int(u) for u in ([units] if isinstance(units, int) else units)]
        if not self.units:
            raise ValueError("units needs at least one width")
        self.activation = keras.activations.get(activation)
        self.dropout = float(dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self._dropout = keras.layers.Dropout(self.dropout) if self.dropout else None

    def build(self, input_shape):
        in_dim = int(input_shape[-1])
        self.kernels, self.biases = [], []
        for i, out_dim in enumerate(self.units):
            # First layer: [d, E, u] so it reshapes to one [d, E*u] matmul.
            # Later layers: [E, u, v] for a batched matmul over experts.
            shape = (in_dim, self.num_experts, out_dim) if i == 0 else (self.num_experts, in_dim, out_dim)
            self.kernels.append(self.add_weight(
                name=f"kernel_{i}", shape=shape, initializer=self._per_expert(self.kernel_initializer, i == 0)))
            self.biases.append(self.add_weight(
                name=f"bias_{i}", shape=(self.num_experts, out_dim), initializer=self.bias_initializer))
            in_dim = out_dim

    def _per_expert(self, initializer, first):
        """Initialise each expert's slice like a Dense kernel of one expert.

        Keras 3 initialisers draw the same values on every call (a seed is
        fixed at construction), so each expert gets its own clone with its own
        seed (`seed + e` when a seed was given), or all experts would start
        identical and stay symmetric.
        """
        config = initializer.get_config()

        def expert_initializer(e):
            if "seed" not in config:
                return initializer
            seed = None if config["seed"] is None else int(config["seed"]) + e
            return initializer.__class__.from_config({**config, "seed": seed})

        def init(shape, dtype=None):
            if first:
                d, e, u = shape
                return ops.stack([expert_initializer(i)((d, u), dtype=dtype) for i in range(e)], axis=1)
            e, u, v = shape
            return ops.stack([expert_initializer(i)((u, v), dtype=dtype) for i in range(e)], axis=0)
        return init

    def call(self, inputs, training=None):
        batch = ops.shape(inputs)[0]
        h = None
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            if i == 0:
                d, e, u = kernel.shape
                h = ops.matmul(inputs, ops.reshape(kernel, (d, e * u)))
                h = ops.reshape(h, (batch, e, u))
            else:
                # [B, E, u] x [E, u, v] -> [B, E, v], batched over experts.
                h = ops.einsum("beu,euv->bev", h, kernel)
            h = self.activation(h + bias)
            if self._dropout is not None:
                h = self._dropout(h, training=training)
        return h

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_experts, self.units[-1])

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_experts": self.num_experts,
            "units": list(self.units),
            "activation": keras.activations.serialize(self.activation),
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        })
        return config
