"""Gating networks: softmax with temperature and noisy top-k, with a balancing loss."""
from __future__ import annotations

import keras
from keras import ops


def importance_cv_squared(gates):
    """Squared coefficient of variation of per-expert importance.

    Importance of an expert is the sum of its gate weights over the batch
    (Shazeer et al. 2017, eq. 6). The loss is 0 exactly when every expert gets
    the same total weight (uniform routing) and grows as routing concentrates.

    Args:
        gates: `[batch, E]` gate weights.

    Returns:
        scalar float32.
    """
    importance = ops.sum(ops.cast(gates, "float32"), axis=0)
    mean = ops.mean(importance)
    return ops.var(importance) / (ops.square(mean) + 1e-10)


@keras.saving.register_keras_serializable(package="mmoe")
class Gate(keras.layers.Layer):
    """A gate: per-example mixture weights over `num_experts` experts.

    `softmax`: `softmax(x W / temperature)`.

    `noisy_top_k` (Shazeer et al. 2017): during training, Gaussian noise with a
    learned, input-dependent scale `softplus(x W_noise)` is added to the logits;
    only the `top_k` largest logits are kept and the softmax is taken over
    those, so the kept weights are renormalised to sum to 1 and every other
    expert gets exactly 0.

    With `balance_loss_weight > 0` the layer adds
    `balance_loss_weight * CV(importance)^2` to the model's losses, which is
    minimal (0) for uniform routing. The gate always computes in float32, also
    under mixed precision, so routing is not quantised.

    Args:
        num_experts: number of experts E to weigh.
        gate_type: "softmax" or "noisy_top_k".
        temperature: softmax temperature (> 0).
        top_k: experts kept per example (noisy_top_k only).
        balance_loss_weight: weight of the load-balancing loss.
        seed: seed of the gating noise.

    Call arguments:
        inputs: `[batch, d]`.
        training: enables the gating noise.

    Returns:
        `[batch, E]` weights, rows summing to 1.
    """

    def __init__(self, num_experts, gate_type="softmax", temperature=1.0, top_k=2,
                 balance_loss_weight=0.0, seed=None, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if gate_type not in ("softmax", "noisy_top_k"):
            raise ValueError(f"gate_type must be 'softmax' or 'noisy_top_k', got {gate_type!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if gate_type == "noisy_top_k" and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = int(num_experts)
        self.gate_type = gate_type
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.balance_loss_weight = float(balance_loss_weight)
        self.seed = seed
        self._seed_generator = keras.random.SeedGenerator(seed) if gate_type == "noisy_top_k" else None

    def build(self, input_shape):
        d = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(d, self.num_experts), initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.num_experts,), initializer="zeros")
        if self.gate_type == "noisy_top_k":
            # Zero-initialised noise kernel: starts at softplus(0) ~ 0.69 noise.
            self.noise_kernel = self.add_weight(name="noise_kernel", shape=(d, self.num_experts), initializer="zeros")

    def logits(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        logits = ops.matmul(x, self.kernel) + self.bias
        if self.gate_type == "noisy_top_k" and training:
            noise_scale = ops.softplus(ops.matmul(x, self.noise_kernel))
            logits = logits + keras.random.normal(ops.shape(logits), seed=self._seed_generator) * noise_scale
        return logits / self.temperature

    def call(self, inputs, training=None):
        logits = self.logits(inputs, training=training)
        if self.gate_type == "noisy_top_k" and self.top_k < self.num_experts:
            _, indices = ops.top_k(logits, self.top_k)
            # one_hot of the k indices gives exactly k kept experts even on ties.
            keep = ops.sum(ops.one_hot(indices, self.num_experts, dtype="float32"), axis=1)
            logits = ops.where(keep > 0, logits, ops.full_like(logits, -1e9))
            gates = ops.softmax(logits, axis=-1) * keep
        else:
            gates = ops.softmax(logits, axis=-1)
        if self.balance_loss_weight > 0:
            self.add_loss(self.balance_loss_weight * importance_cv_squared(gates))
        return gates

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_experts)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_experts": self.num_experts,
            "gate_type": self.gate_type,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "balance_loss_weight": self.balance_loss_weight,
            "seed": self.seed,
        })
        config.pop("dtype", None)
        return config
