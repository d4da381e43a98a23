"""Shared test fixtures. Tests run on CPU; the TensorFlow backend unless a test
starts a subprocess with another backend."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def make_toy_tasks(n: int, seed: int = 0):
    """A small learnable two-task problem: an XOR-like binary task that needs
    non-linearity and a regression task that depends on a categorical input."""
    from mmoe import InputFeature, TaskSpec
    from mmoe.training import TaskData

    rng = np.random.default_rng(seed)
    a = rng.normal(size=n).astype("float32")
    b = rng.normal(size=n).astype("float32")
    c = rng.integers(0, 12, size=n).astype("int32")
    inputs = {"a": a, "b": b, "c": c}
    labels = {"xor": ((a * b) > 0).astype("float32"),
              "level": (np.sin(2 * a) + (c % 4) - 1.5 + 0.1 * rng.normal(size=n)).astype("float32")}
    features = [InputFeature("a"), InputFeature("b"), InputFeature("c", "categorical", vocab_size=12)]
    tasks = [TaskSpec("xor", "binary"), TaskSpec("level", "regression")]
    return features, tasks, TaskData(inputs, labels)


@pytest.fixture(scope="session")
def toy():
    features, tasks, data = make_toy_tasks(4096)
    train = data.take(np.arange(0, 3072))
    test = data.take(np.arange(3072, 4096))
    return features, tasks, train, test
