"""The same model runs on the JAX backend, and a model saved there loads on TensorFlow."""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np

JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    assert keras.backend.backend() == "jax", keras.backend.backend()
    sys.path.insert(0, sys.argv[2])
    from conftest import make_toy_tasks
    from mmoe import ModelConfig, build_model, compile_model
    from mmoe.training import evaluate, fit, predict
    features, tasks, data = make_toy_tasks(3072)
    train, test = data.take(np.arange(2048)), data.take(np.arange(2048, 3072))
    config = ModelConfig(arch="mmoe", gate="noisy_top_k", num_experts=4, expert_units=(16,), tower_units=(8,),
                         balance_loss_weight=0.01, learning_rate=0.01, cross_layers=1,
                         expert_cross_layers=1, expert_cross_rank=4, numeric_bins=8)
    model = compile_model(build_model(config, features, tasks), config, tasks)
    fit(model, tasks, train, epochs=10, batch_size=128, verbose=0)
    model.save(sys.argv[1] + "/jax.keras")
    np.save(sys.argv[1] + "/jax_pred.npy", predict(model, test.inputs)["xor"])
    mixed = config.replace(mixed_precision=True)
    mixed_model = compile_model(build_model(mixed, features, tasks), mixed, tasks)
    fit(mixed_model, tasks, train, epochs=10, batch_size=128, verbose=0)
    print(json.dumps({"float32": evaluate(model, tasks, test), "bfloat16": evaluate(mixed_model, tasks, test)}))
""")


def test_jax_backend_trains_and_its_model_loads_on_tensorflow(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    tests_dir = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-c", JAX_SCRIPT, str(tmp_path), tests_dir], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["float32"]["xor"]["auc"] > 0.9, metrics
    assert metrics["bfloat16"]["xor"]["auc"] > 0.9, metrics

    # Saved on JAX, loaded on the TensorFlow backend of this process.
    from conftest import make_toy_tasks
    from mmoe.training import predict
    _, _, data = make_toy_tasks(3072)
    test = data.take(np.arange(2048, 3072))
    loaded = keras.saving.load_model(tmp_path / "jax.keras")
    np.testing.assert_allclose(predict(loaded, test.inputs)["xor"], np.load(tmp_path / "jax_pred.npy"),
                               rtol=1e-4, atol=1e-5)
