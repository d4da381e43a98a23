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

    With `cross_layers`, each expert is a DCN-v2 network (Wang et al., WWW
    2021, "stacked" structure): its own stack of cross layers
    `x_{l+1} = x0 * (W_l x_l + b_l) + x_l` on the shared input `x0`, then its
    MLP. The crosses are stacked over experts too (`[E, d, r]` batched
    matmuls), so experts differ in which feature products they hold, not only
    in how they weigh them (`mmoe.layers.FeatureCross` is the one stack shared
    by every expert).

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
        cross_layers: cross layers inside each expert, before its MLP (0:
            none).
        cross_rank: rank `r` of each expert's cross matrices (`W = U V`,
            `d x r` by `r x d`); None for full `d x d` matrices.

    Call arguments:
        inputs: `[batch, d]` float tensor.
        training: enables dropout.

    Returns:
        `[batch, E, U]` expert outputs.
    """

    def __init__(self, num_experts, units, activation="relu", dropout=0.0,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", cross_layers=0, cross_rank=None,
                 **kwargs):
        super().__init__(**kwargs)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if int(cross_layers) < 0:
            raise ValueError(f"cross_layers must be >= 0, got {cross_layers}")
        if cross_rank is not None and int(cross_rank) < 1:
            raise ValueError(f"cross_rank must be >= 1 or None, got {cross_rank}")
        self.cross_layers = int(cross_layers)
        self.cross_rank = None if cross_rank is None else int(cross_rank)
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
        e = self.num_experts
        # Cross weights: [E, d, k] per layer (k = d at full rank, r at low rank, then [E, r, d] back up).
        self.cross_down, self.cross_up, self.cross_biases = [], [], []
        per_expert = self._per_expert(self.kernel_initializer, False)
        for i in range(self.cross_layers):
            k = in_dim if self.cross_rank is None else self.cross_rank
            self.cross_down.append(self.add_weight(name=f"cross_down_{i}", shape=(e, in_dim, k),
                                                   initializer=per_expert))
            if self.cross_rank is not None:
                self.cross_up.append(self.add_weight(name=f"cross_up_{i}", shape=(e, k, in_dim),
                                                     initializer=per_expert))
            self.cross_biases.append(self.add_weight(name=f"cross_bias_{i}", shape=(e, in_dim), initializer="zeros"))
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

    def _cross(self, inputs):
        """`[batch, E, d]`: each expert's cross stack on the shared `[batch, d]` input."""
        x0 = ops.expand_dims(inputs, 1)
        x = None
        for i in range(self.cross_layers):
            if x is None:  # every expert starts from the same x0: one contraction of the shared [B, d] input
                h = ops.einsum("bd,edk->bek", inputs, self.cross_down[i])
            else:
                h = ops.einsum("bed,edk->bek", x, self.cross_down[i])
            if self.cross_rank is not None:
                h = ops.einsum("bek,ekd->bed", h, self.cross_up[i])
            x = x0 * (h + self.cross_biases[i]) + (x0 if x is None else x)
        return x

    def call(self, inputs, training=None):
        batch = ops.shape(inputs)[0]
        crossed = self._cross(inputs) if self.cross_layers else None
        h = None
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            if i == 0 and crossed is not None:
                # Each expert reads its own crossed input: [B, E, d] x [d, E, u] -> [B, E, u].
                h = ops.einsum("bed,deu->beu", crossed, kernel)
            elif i == 0:
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
            "cross_layers": self.cross_layers,
            "cross_rank": self.cross_rank,
        })
        return config
